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
