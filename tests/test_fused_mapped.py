"""RMSprop and RAdam run torch's fused Adam kernel with mapped hyperparameters.

What the generic suites (optim_db rows) do not reach: the RMSprop scratch buffer's chunking
(tensors split across calls), a non-finite gradient not leaking through the reused scratch,
non-contiguous tensors, RAdam counters that diverge across the rectification threshold (a
layer frozen during the first steps), half precision on CPU against a float64 computation,
what the default picks, and that nothing of the fused path enters the state_dict.
"""

from __future__ import annotations

import copy
import pickle
import warnings

import pytest
import torch

import harness
import optimkit
from optimkit.optimizers import radam as radam_mod
from optimkit.optimizers import rmsprop as rmsprop_mod

F64 = harness.tolerances(torch.float64)


def _params(seed: int = 0, dtype=torch.float64) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    shapes = [(13, 7), (29,), (), (0, 3), (5, 11), (40,)]
    ps = [torch.nn.Parameter(torch.randn(s, generator=g, dtype=dtype)) for s in shapes]
    # a non-contiguous parameter (a transposed view's storage layout)
    ps.append(torch.nn.Parameter(torch.randn(6, 9, generator=g, dtype=dtype).t()))
    return ps


def _train(make, steps: int, *, frozen=(), frozen_steps=range(0), nan_at=None, seed: int = 1):
    """``steps`` steps of seeded random gradients; ``frozen`` params get no gradient during
    ``frozen_steps``; param 1 gets a NaN gradient at step ``nan_at``."""
    ps = _params()
    opt = make(ps)
    g = torch.Generator().manual_seed(seed)
    for t in range(steps):
        for i, p in enumerate(ps):
            # laid out like the parameter, as autograd lays out gradients (a hand-made
            # gradient with other strides sends the whole group to foreach: test_integration)
            grad = torch.empty_like(p).copy_(torch.randn(p.shape, generator=g, dtype=p.dtype))
            if i in frozen and t in frozen_steps:
                grad = None
            elif nan_at == t and i == 1:
                grad = grad.clone()
                grad[3] = float("nan")
            p.grad = grad
        opt.step()
    return ps, opt


def _assert_same(a, b, **tol):
    (pa, oa), (pb, ob) = a, b
    for i, (x, y) in enumerate(zip(pa, pb)):
        torch.testing.assert_close(x, y, equal_nan=True, msg=lambda m: f"param {i}: {m}", **tol)
        sa, sb = oa.state[x], ob.state[y]
        assert sa.keys() == sb.keys()
        for k in sa:
            torch.testing.assert_close(sa[k], sb[k], equal_nan=True,
                                       msg=lambda m: f"state {i}[{k}]: {m}", **tol)


@pytest.fixture
def spy(monkeypatch):
    """Counts the calls of the fused entry points (so a test knows the fused path ran)."""
    calls = {"rmsprop": 0, "radam": 0}

    def wrap(mod, name, key):
        real = getattr(mod, name)

        def f(*a, **k):
            calls[key] += 1
            return real(*a, **k)

        monkeypatch.setattr(mod, name, f)

    wrap(rmsprop_mod, "rmsprop_fused", "rmsprop")
    wrap(radam_mod, "radam_fused", "radam")
    return calls


# ------------------------------------------------------------------------------ RMSprop
@pytest.mark.parametrize("scratch", [7, 64, 1 << 18], ids=["split", "chunked", "one-call"])
@pytest.mark.parametrize("cfg", [
    dict(lr=1e-2),
    dict(lr=3e-3, alpha=0.9, eps=1e-6, weight_decay=1e-2, maximize=True),
    dict(lr=1e-2, alpha=0.0),
], ids=["plain", "wd-max", "alpha0"])
def test_rmsprop_fused_matches_reference(cfg, scratch, monkeypatch, spy):
    monkeypatch.setattr(rmsprop_mod, "SCRATCH_NUMEL", scratch)
    kw = dict(steps=30, frozen=(0, 4), frozen_steps=range(5, 12))
    fast = _train(lambda ps: optimkit.RMSprop(ps, **cfg, fused=True), **kw)
    assert spy["rmsprop"] == 30
    ref = _train(lambda ps: optimkit.RMSprop(ps, **cfg, foreach=False), **kw)
    _assert_same(fast, ref, **F64)
    oracle = _train(lambda ps: torch.optim.RMSprop(ps, **cfg, foreach=False), **kw)
    _assert_same(fast, oracle, **F64)


def test_rmsprop_nan_gradient_does_not_leak_through_scratch(monkeypatch):
    """The scratch buffer is shared by every tensor of a chunk and every step: a NaN in one
    gradient must poison only its own parameter, as in the reference."""
    monkeypatch.setattr(rmsprop_mod, "SCRATCH_NUMEL", 64)
    kw = dict(steps=6, nan_at=2)
    fast = _train(lambda ps: optimkit.RMSprop(ps, lr=1e-2, fused=True), **kw)
    ref = _train(lambda ps: optimkit.RMSprop(ps, lr=1e-2, foreach=False), **kw)
    _assert_same(fast, ref, **F64)
    assert torch.isnan(fast[0][1]).any()
    assert all(torch.isfinite(p).all() for i, p in enumerate(fast[0]) if i != 1)


def test_rmsprop_scratch_is_allocated_once_and_not_in_state():
    ps = _params()
    opt = optimkit.RMSprop(ps, lr=1e-2)
    for _ in range(3):
        for p in ps:
            p.grad = torch.ones_like(p)
        opt.step()
        if _ == 0:
            bufs = dict(opt._scratch_bufs)
    assert opt._scratch_bufs.keys() == bufs.keys() == {(torch.device("cpu"), torch.float64)}
    assert all(opt._scratch_bufs[k] is bufs[k] for k in bufs)  # reused, not per step
    sd = opt.state_dict()
    ref = torch.optim.RMSprop(_params(), lr=1e-2)
    for p in ref.param_groups[0]["params"]:
        p.grad = torch.ones_like(p)
    ref.step()
    tsd = ref.state_dict()
    assert [sorted(s) for s in sd["state"].values()] == [sorted(s) for s in tsd["state"].values()]
    assert sd["param_groups"][0].keys() == tsd["param_groups"][0].keys()
    assert "fused" not in sd["param_groups"][0]
    assert float(sd["state"][0]["step"]) == 3.0  # the real counter still counts


def test_rmsprop_default_and_flags(spy):
    def one_step(**kw):
        p = torch.nn.Parameter(torch.randn(5))
        opt = optimkit.RMSprop([p], **kw)
        p.grad = torch.randn(5)
        before = spy["rmsprop"]
        opt.step()
        return spy["rmsprop"] - before

    assert one_step() == 1  # plain RMSprop: fused by default
    assert one_step(fused=False) == 0
    assert one_step(foreach=True) == 0
    assert one_step(foreach=False) == 0
    assert one_step(centered=True) == 0  # no kernel for it: foreach, silently (not asked)
    assert one_step(momentum=0.9) == 0
    with pytest.raises(ValueError, match=r"RMSprop: invalid alpha=1.0; expected 0 <= alpha < 1"):
        one_step(alpha=1.0)  # refused: square_avg would stay 0 (every step lr * g / eps)
    with pytest.warns(RuntimeWarning, match="RMSprop.*fused=True.*centered"):
        assert one_step(fused=True, centered=True) == 0
    opt = optimkit.RMSprop([torch.nn.Parameter(torch.randn(2))], fused=True)
    with pytest.warns(RuntimeWarning, match="momentum"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.randn(2))], "momentum": 0.5})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.add_param_group({"params": [torch.nn.Parameter(torch.randn(2))], "alpha": 0.9})


def test_fused_choice_survives_pickle_and_deepcopy():
    for cls in (optimkit.RMSprop, optimkit.RAdam):
        opt = cls([torch.nn.Parameter(torch.randn(3))], fused=False)
        for other in (copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))):
            assert other._fused is False
            assert "fused" not in other.param_groups[0]


# -------------------------------------------------------------------------------- RAdam
@pytest.mark.parametrize("cfg", [
    dict(lr=1e-2),
    dict(lr=1e-2, weight_decay=1e-1),
    dict(lr=1e-2, weight_decay=1e-1, decoupled_weight_decay=True),
    dict(lr=1e-2, betas=(0.8, 0.9), eps=1e-6, maximize=True),
], ids=["plain", "coupled", "decoupled", "betas-max"])
def test_radam_fused_matches_reference_with_lagging_counters(cfg, spy):
    """Two params frozen over steps 3..9: their counters lag by 7, so for several steps some
    tensors are rectified (kernel) while others are not (foreach) in the same bucket, and
    afterwards the kernel runs with two different step values."""
    kw = dict(steps=40, frozen=(0, 2), frozen_steps=range(3, 10))
    fast = _train(lambda ps: optimkit.RAdam(ps, **cfg, fused=True), **kw)
    assert spy["radam"] == 40
    ref = _train(lambda ps: optimkit.RAdam(ps, **cfg, foreach=False), **kw)
    _assert_same(fast, ref, **F64)
    oracle = _train(lambda ps: torch.optim.RAdam(ps, **cfg, foreach=False), **kw)
    _assert_same(fast, oracle, **F64)
    steps = {float(s["step"]) for s in fast[1].state.values()}
    assert steps == {40.0, 33.0}


def test_radam_default_is_fused_and_zero_lr_is_a_no_op(spy):
    p = torch.nn.Parameter(torch.randn(4, dtype=torch.float64))
    p0 = p.detach().clone()
    opt = optimkit.RAdam([p], lr=0.0, weight_decay=0.5, decoupled_weight_decay=True)
    for _ in range(8):
        p.grad = torch.randn(4, dtype=torch.float64)
        opt.step()
    assert spy["radam"] == 8
    assert torch.equal(p.detach(), p0)
    assert "fused" not in opt.state_dict()["param_groups"][0]


# --------------------------------------------------------------------- half precision
def _f64_rmsprop(p, g, v, lr, alpha, eps, wd):
    g = g + wd * p
    v = alpha * v + (1 - alpha) * g * g
    return p - lr * g / (v.sqrt() + eps), v


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_cpu_within_rounding(dtype):
    """torch's CPU fused SGD kernel skips SIMD blocks of half tensors (SGD._fused_broken);
    the Adam kernel must not: one step of each optimizer, every element within one rounding
    (plus the stored state's own rounding) of the float64 math from the same inputs."""
    n = 4099  # several full SIMD blocks and a tail
    gen = torch.Generator().manual_seed(0)
    p_init = torch.randn(n, generator=gen).to(dtype)
    grad = torch.randn(n, generator=gen).to(dtype)
    ulp = 2.0 ** (-8 if dtype == torch.bfloat16 else -11)

    p = torch.nn.Parameter(p_init.clone())
    opt = optimkit.RMSprop([p], lr=1e-2, alpha=0.9, eps=1e-4, weight_decay=1e-2)
    p.grad = grad.clone()
    assert opt._gather(0, opt.param_groups[0]).impl == "fused"
    opt.step()
    want, _ = _f64_rmsprop(p_init.double(), grad.double(), torch.zeros(n, dtype=torch.float64),
                           1e-2, 0.9, 1e-4, 1e-2)
    err = (p.detach().double() - want).abs()
    assert (err <= 2 * ulp * want.abs() + 1e-6).all(), err.max()
    assert (p.detach() != p_init).float().mean() > 0.5  # the update was not rounded away

    # RAdam at a rectified step (t=10) from given moments
    p = torch.nn.Parameter(p_init.clone())
    opt = optimkit.RAdam([p], lr=2e-1, betas=(0.9, 0.999), eps=1e-4)
    m0 = (0.1 * torch.randn(n, generator=gen)).to(dtype)
    v0 = (0.01 * torch.rand(n, generator=gen)).to(dtype)
    opt.state[p].update(step=torch.tensor(9.0), exp_avg=m0.clone(), exp_avg_sq=v0.clone())
    p.grad = grad.clone()
    opt.step()
    t, b1, b2 = 10.0, 0.9, 0.999
    m = b1 * m0.double() + (1 - b1) * grad.double()
    v = b2 * v0.double() + (1 - b2) * grad.double() ** 2
    rect = radam_mod._rectification(t, b2)
    want = p_init.double() - 2e-1 * rect * (m / (1 - b1**t)) * (1 - b2**t) ** 0.5 / (v.sqrt() + 1e-4)
    err = (p.detach().double() - want).abs()
    assert (err <= 2 * ulp * want.abs() + 1e-6).all(), err.max()
    assert (p.detach() != p_init).float().mean() > 0.5


# -------------------------------------------------------------------------------- CUDA
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("cls,cfg", [
    (optimkit.RMSprop, dict(lr=1e-2, weight_decay=1e-2)),
    (optimkit.RAdam, dict(lr=1e-2, weight_decay=1e-1, decoupled_weight_decay=True)),
])
def test_cuda_fused_matches_cpu_reference(cls, cfg):
    steps, kw = 30, dict(frozen=(0,), frozen_steps=range(2, 8))
    ref = _train(lambda ps: cls(ps, **cfg, foreach=False), steps, **kw)

    def make(ps):
        for p in ps:
            p.data = p.data.cuda()
        return cls(ps, **cfg, fused=True)

    ps = _params()
    opt = make(ps)
    g = torch.Generator().manual_seed(1)
    for t in range(steps):
        for i, p in enumerate(ps):
            # laid out like the parameter, as autograd lays out gradients (a hand-made
            # gradient with other strides sends the whole group to foreach: test_integration)
            grad = torch.empty_like(p).copy_(torch.randn(p.shape, generator=g, dtype=p.dtype))
            p.grad = None if (i in kw["frozen"] and t in kw["frozen_steps"]) else grad.cuda()
        opt.step()
    for a, b in zip(ps, ref[0]):
        torch.testing.assert_close(a.detach().cpu(), b.detach(), **F64)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_sgd_fused_true_on_half_cpu_falls_back_loudly(dtype):
    """SGD(fused=True) on CPU half tensors would hit torch's broken kernel (SGD._fused_broken):
    it warns once per step call, naming the reason, and steps exactly like foreach=True."""
    gen = torch.Generator().manual_seed(0)
    init, grad = torch.randn(4099, generator=gen).to(dtype), torch.randn(4099, generator=gen).to(dtype)
    out = {}
    for flags in (dict(fused=True), dict(foreach=True)):
        p = torch.nn.Parameter(init.clone())
        opt = optimkit.SGD([p], lr=0.1, momentum=0.9, **flags)
        for _ in range(3):
            p.grad = grad.clone()
            if flags.get("fused"):
                with pytest.warns(RuntimeWarning, match="fused kernel is wrong for .*using the foreach path"):
                    opt.step()
            else:
                opt.step()
        out[tuple(flags)] = p.detach().clone()
    assert torch.equal(out[("fused",)], out[("foreach",)])
    assert not torch.equal(out[("fused",)], init)
