"""The default implementation policy (optimkit._impl.resolve_impl), as users meet it."""

from __future__ import annotations

import pytest
import torch

import optimkit
import optimkit._base as base
from optimkit._impl import LOOP_BEATS_FOREACH_NUMEL, resolve_impl

BIG = LOOP_BEATS_FOREACH_NUMEL * 2


def test_resolve_impl_rules():
    big, small = [torch.zeros(BIG)], [torch.zeros(10)] * 3
    assert resolve_impl(None, None, False, big, loop_on_cpu=True) == "reference"
    assert resolve_impl(None, None, False, small, loop_on_cpu=True) == "foreach"
    assert resolve_impl(None, None, False, big, loop_on_cpu=False) == "foreach"
    assert resolve_impl(True, None, False, big, loop_on_cpu=True) == "foreach"  # asked for
    assert resolve_impl(False, None, False, small) == "reference"
    assert resolve_impl(None, None, True, big, loop_on_cpu=True) == "fused"  # fused first
    assert resolve_impl(None, False, True, big, loop_on_cpu=True) == "reference"
    # mean size decides: one big tensor among many tiny ones is still "many small tensors"
    assert resolve_impl(None, None, False, big + [torch.zeros(1)] * 8, loop_on_cpu=True) == "foreach"


@pytest.fixture
def chosen(monkeypatch):
    seen: list[str] = []
    real = base.resolve_impl

    def spy(*a, **k):
        seen.append(real(*a, **k))
        return seen[-1]

    monkeypatch.setattr(base, "resolve_impl", spy)
    return seen


@pytest.mark.parametrize("cls,want", [
    (optimkit.Adadelta, "reference"),  # no fused kernel: the loop is faster on big CPU tensors
    (optimkit.Adam, "fused"),
    (optimkit.Prodigy, "foreach"),  # its foreach path is the fast one at every size
])
def test_default_on_big_cpu_tensors(cls, want, chosen):
    p = torch.nn.Parameter(torch.randn(BIG))
    opt = cls([p])
    p.grad = torch.randn(BIG)
    opt.step()
    assert chosen == [want]


def test_centered_rmsprop_on_big_cpu_tensors_runs_the_loop(monkeypatch):
    from optimkit.optimizers import rmsprop as mod

    ran = []
    for name in ("rmsprop_reference", "rmsprop_foreach"):
        real = getattr(mod, name)
        monkeypatch.setattr(mod, name, lambda *a, _r=real, _n=name, **k: (ran.append(_n), _r(*a, **k)))
    p = torch.nn.Parameter(torch.randn(BIG))
    opt = optimkit.RMSprop([p], centered=True)
    p.grad = torch.randn(BIG)
    opt.step()
    assert ran == ["rmsprop_reference"]


# ------------------------------------------------- small tensors: no parallel region each
from optimkit import _torch_compat as tc  # noqa: E402
from optimkit._impl import SERIAL_BELOW_NUMEL, run_serially  # noqa: E402

SMALL = SERIAL_BELOW_NUMEL - 1


def test_run_serially_rules():
    assert run_serially([[torch.zeros(SMALL)], [torch.zeros(3)]])
    assert not run_serially([[torch.zeros(SMALL)], [torch.zeros(SERIAL_BELOW_NUMEL)]])
    assert not run_serially([[], []])  # nothing to step


@pytest.fixture
def two_threads():
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(old)


@pytest.mark.parametrize("cls", [optimkit.Adam, optimkit.Adadelta, optimkit.SGD, optimkit.Prodigy])
def test_a_step_of_small_tensors_runs_on_one_thread(cls, two_threads, monkeypatch):
    seen = []
    real = cls._apply

    def spy(self, works):
        seen.append(torch.get_num_threads())
        return real(self, works)

    monkeypatch.setattr(cls, "_apply", spy)
    ps = [torch.nn.Parameter(torch.randn(n)) for n in (10, 300, SMALL)]
    opt = cls(ps, lr=1.0 if cls is optimkit.Prodigy else 1e-3,  # Prodigy: lr multiplies d
              **({"momentum": 0.9} if cls is optimkit.SGD else {}))
    for p in ps:
        p.grad = torch.randn_like(p)
    opt.step()
    assert seen and set(seen) == {1}
    assert torch.get_num_threads() == 2  # restored
    big = torch.nn.Parameter(torch.randn(SERIAL_BELOW_NUMEL))
    opt.add_param_group({"params": [big]})
    big.grad = torch.randn_like(big)
    seen.clear()
    opt.step()  # a large tensor in the step: the caller's threads
    assert set(seen) == {2}


def test_threads_restored_when_a_step_raises(two_threads, monkeypatch):
    p = torch.nn.Parameter(torch.randn(10))
    opt = optimkit.Adam([p])
    p.grad = torch.randn(10)

    def boom(self, works):
        raise RuntimeError("boom")

    monkeypatch.setattr(optimkit.Adam, "_apply", boom)
    with pytest.raises(RuntimeError, match="boom"):
        opt.step()
    assert torch.get_num_threads() == 2


def test_fused_kernel_splits_small_from_large_bit_identically(two_threads, monkeypatch):
    """A mixed list: the small tensors in a one-thread call, the large in another; the
    results equal one call of torch's kernel on all threads, bit for bit."""
    sizes = (7, 1000, SMALL, SERIAL_BELOW_NUMEL, 3 * SERIAL_BELOW_NUMEL + 5)
    def lists():
        g2 = torch.Generator().manual_seed(0)
        ps = [torch.randn(n, generator=g2) for n in sizes]
        gs = [torch.randn(n, generator=g2) for n in sizes]
        return ps, gs, [torch.zeros(n) for n in sizes], [torch.zeros(n) for n in sizes]

    kw = dict(amsgrad=False, lr=1e-2, beta1=0.9, beta2=0.99, weight_decay=0.1, eps=1e-8,
              maximize=False, grad_scale=None, found_inf=None)
    a, b = lists(), lists()
    steps = [torch.tensor(3.0) for _ in sizes]
    calls = []
    real = torch._fused_adamw_

    def spy(ps, *args, **kwargs):
        calls.append((len(ps), torch.get_num_threads()))
        return real(ps, *args, **kwargs)

    for _ in range(3):
        torch._fused_adamw_(*a, [], steps, **kw)
    wrapped = tc.serial_for_small(spy)
    for _ in range(3):
        wrapped(*b, [], steps, **kw)
    assert calls[:2] == [(2, 2), (3, 1)]  # large ones on 2 threads, then the 3 small on 1
    for x, y in zip(a, b):
        for s, t in zip(x, y):
            assert torch.equal(s, t)
    assert torch.get_num_threads() == 2
