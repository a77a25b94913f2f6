"""Sparse gradients: Adagrad and SGD follow torch.optim; every other optimizer refuses them.

The model is an ``nn.Embedding(sparse=True)`` feeding a dense linear layer, so one param
group holds a sparse and a dense gradient together. Index batches repeat rows on purpose
(the sparse update must sum duplicates before its non-linear step) and leave most rows
untouched (their parameters and accumulators must not move).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import harness
import optimkit

# torch's oracle builds sparse tensors without invariant checks and says so
pytestmark = pytest.mark.filterwarnings("ignore:Sparse invariant checks:UserWarning")

STEPS = 50
ROWS, DIM = 30, 5


class SparseNet(nn.Module):
    def __init__(self, dtype: torch.dtype) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.emb = nn.Embedding(ROWS, DIM, sparse=True, dtype=dtype)
        self.out = nn.Linear(DIM, 3, dtype=dtype)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))

    def loss(self, idx: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(self.out(self.emb(idx).mean(1)), y)


def _batches(steps: int):
    g = torch.Generator().manual_seed(2)
    for _ in range(steps):
        # 8 bags of 6 indices from only the first 20 rows: repeats within a batch, and rows
        # 20..29 never receive a gradient.
        yield torch.randint(0, 20, (8, 6), generator=g), torch.randint(0, 3, (8,), generator=g)


def _train(make_opt, dtype=torch.float64, steps=STEPS):
    net = SparseNet(dtype)
    opt = make_opt(net.parameters())
    for idx, y in _batches(steps):
        opt.zero_grad(set_to_none=True)
        net.loss(idx, y).backward()
        opt.step()
    return net, opt


CONFIGS = [
    dict(lr=0.1),
    dict(lr=0.1, lr_decay=1e-2, initial_accumulator_value=0.1),
    dict(lr=0.1, eps=1e-6, maximize=True),
]
IMPLS = {"default": {}, "reference": dict(foreach=False), "foreach": dict(foreach=True),
         "fused": dict(fused=True)}


# Sparse gradients always take the reference path; the impl flag decides the dense layer's
# path in the same group, so every impl runs once and the other configs run the default.
CASES = [pytest.param(CONFIGS[0], impl, id=f"{impl}-lr=0.1") for impl in IMPLS] + [
    pytest.param(cfg, "default", id="default-" + ",".join(f"{k}={v}" for k, v in cfg.items()))
    for cfg in CONFIGS[1:]
]


@pytest.mark.parametrize("cfg,impl", CASES)
def test_sparse_adagrad_matches_torch(cfg, impl):
    ours = _train(lambda ps: optimkit.Adagrad(ps, **cfg, **IMPLS[impl]))
    ref = _train(lambda ps: torch.optim.Adagrad(ps, **cfg, foreach=False))
    assert ours[0].emb.weight.grad.is_sparse  # the test really exercised sparse gradients
    harness.assert_same_trajectory(*ours, *ref, **harness.tolerances(torch.float64))
    # rows that never got a gradient did not move (and their accumulator is the initial value)
    untouched = SparseNet(torch.float64).emb.weight[20:]
    torch.testing.assert_close(ours[0].emb.weight[20:], untouched, rtol=0, atol=0)
    init = cfg.get("initial_accumulator_value", 0.0)
    assert (ours[1].state[ours[0].emb.weight]["sum"][20:] == init).all()


def test_sparse_adagrad_float32_matches_torch():
    ours = _train(lambda ps: optimkit.Adagrad(ps, lr=0.1), dtype=torch.float32)
    ref = _train(lambda ps: torch.optim.Adagrad(ps, lr=0.1), dtype=torch.float32)
    harness.assert_same_trajectory(*ours, *ref, **harness.tolerances(torch.float32))


def test_adagrad_state_created_in_constructor_like_torch():
    a, b = SparseNet(torch.float64), SparseNet(torch.float64)
    sd_ours = optimkit.Adagrad(a.parameters(), initial_accumulator_value=0.3).state_dict()
    sd_torch = torch.optim.Adagrad(b.parameters(), initial_accumulator_value=0.3).state_dict()
    assert sd_ours["state"].keys() == sd_torch["state"].keys() == {0, 1, 2}
    for k, st in sd_torch["state"].items():
        assert sd_ours["state"][k].keys() == st.keys()
        for key, v in st.items():
            assert sd_ours["state"][k][key].dtype == v.dtype, key
            torch.testing.assert_close(sd_ours["state"][k][key], v, rtol=0, atol=0)
    # and torch's state_dict loads into ours, then both take the same step
    opt = optimkit.Adagrad(a.parameters(), initial_accumulator_value=0.3)
    opt.load_state_dict(harness.roundtrip(sd_torch))


# ------------------------------------------------------------------------- refusals
def _snapshot(net: nn.Module, opt: torch.optim.Optimizer):
    return [p.detach().clone() for p in net.parameters()], copy.deepcopy(opt.state_dict()["state"])


def _assert_unchanged(net, opt, before):
    params, state = before
    for p, q in zip(net.parameters(), params):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    now = opt.state_dict()["state"]
    assert now.keys() == state.keys()
    for k in state:
        assert now[k].keys() == state[k].keys()
        for key, v in state[k].items():
            if isinstance(v, torch.Tensor):
                torch.testing.assert_close(now[k][key], v, rtol=0, atol=0)
            else:
                assert now[k][key] == v


def _warm_then_sparse_step(make_opt):
    """One dense step (so state exists), then a sparse gradient; returns (net, opt, before, err)."""
    net = SparseNet(torch.float64)
    # The dense layer comes first in its own group: it must not be updated either.
    opt = make_opt([{"params": list(net.out.parameters())}, {"params": [net.emb.weight]}])
    idx, y = next(_batches(1))
    net.loss(idx, y).backward()
    net.emb.weight.grad = net.emb.weight.grad.to_dense()
    opt.step()
    opt.zero_grad(set_to_none=True)
    net.loss(idx, y).backward()
    assert net.emb.weight.grad.is_sparse
    before = _snapshot(net, opt)
    with pytest.raises(RuntimeError) as err:
        opt.step()
    return net, opt, before, str(err.value)


REFUSING = {
    "Adam": lambda g: optimkit.Adam(g, lr=0.1),
    "RMSprop": lambda g: optimkit.RMSprop(g, lr=0.01, momentum=0.5, centered=True),
    "Adadelta": lambda g: optimkit.Adadelta(g),
}


@pytest.mark.parametrize("name", list(REFUSING))
def test_sparse_gradient_refused_with_advice(name):
    net, opt, before, msg = _warm_then_sparse_step(REFUSING[name])
    assert msg.startswith(name), msg
    assert "sparse" in msg and "Adagrad" in msg, msg
    _assert_unchanged(net, opt, before)


@pytest.mark.parametrize("impl", ["reference", "foreach", "fused"])
def test_sparse_adagrad_with_weight_decay_refused(impl):
    # torch raises too: the L2 term would make the gradient dense.
    net, opt, before, msg = _warm_then_sparse_step(
        lambda g: optimkit.Adagrad(g, lr=0.1, weight_decay=1e-2, **IMPLS[impl]))
    assert "Adagrad" in msg and "weight_decay" in msg and "sparse" in msg, msg
    _assert_unchanged(net, opt, before)


# ------------------------------------------------------------------------------- SGD
SGD_CONFIGS = [
    dict(lr=0.1),
    dict(lr=0.1, momentum=0.9),
    dict(lr=0.1, momentum=0.9, nesterov=True),
    dict(lr=0.05, momentum=0.5, dampening=0.3, maximize=True),
]


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("cfg", SGD_CONFIGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_sparse_sgd_matches_torch(cfg, impl):
    """torch.optim.SGD takes sparse gradients (its per-tensor loop adds them into the parameter
    and a sparse momentum buffer); so does optimkit.SGD, whatever the impl flag (it decides only
    the dense layer's path... except fused=True, which torch refuses with sparse gradients)."""
    if impl == "fused":
        net, opt, before, msg = _warm_then_sparse_step(
            lambda g: optimkit.SGD(g, **cfg, fused=True))
        assert "SGD" in msg and "fused" in msg and "sparse" in msg, msg
        _assert_unchanged(net, opt, before)
        return
    ours = _train(lambda ps: optimkit.SGD(ps, **cfg, **IMPLS[impl]))
    ref = _train(lambda ps: torch.optim.SGD(ps, **cfg, foreach=False))
    assert ours[0].emb.weight.grad.is_sparse
    harness.assert_same_trajectory(*ours, *ref, **harness.tolerances(torch.float64))
    untouched = SparseNet(torch.float64).emb.weight[20:]
    torch.testing.assert_close(ours[0].emb.weight[20:], untouched, rtol=0, atol=0)


def test_sparse_sgd_with_weight_decay_refused_before_any_write():
    # torch.optim.SGD fails inside its loop (add(sparse, dense)), after earlier parameters moved
    net, opt, before, msg = _warm_then_sparse_step(
        lambda g: optimkit.SGD(g, lr=0.1, momentum=0.9, weight_decay=1e-2))
    assert "SGD" in msg and "weight_decay" in msg and "sparse" in msg, msg
    _assert_unchanged(net, opt, before)
