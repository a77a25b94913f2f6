"""A small, real training problem that every parity test runs.

An MLP on scikit-learn's bundled handwritten digits (real data, no download), plus the
awkward parameters optimizers get wrong: a 0-dim scalar and an empty tensor. The trajectory
freezes the first layer for a few steps (its grads are None), drops one bias gradient for a
single step, and uses two param groups with different hyperparameters.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from functools import lru_cache
from typing import Any

import torch
from torch import nn

FREEZE = range(20, 26)  # steps where layer 1 gets no gradient (frozen)
DROP_BIAS_STEP = 40  # step where the output bias gets no gradient


@lru_cache(maxsize=None)
def _digits() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float64) / 16.0
    y = torch.tensor(d.target, dtype=torch.long)
    return x, y


class Net(nn.Module):
    def __init__(self, dtype: torch.dtype, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.l1 = nn.Linear(64, 24, dtype=dtype)
        self.l2 = nn.Linear(24, 10, dtype=dtype)
        with torch.no_grad():
            for p in (self.l1.weight, self.l1.bias, self.l2.weight, self.l2.bias):
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.3)
        self.scale = nn.Parameter(torch.tensor(0.5, dtype=dtype))  # 0-dim
        self.empty = nn.Parameter(torch.zeros(0, 3, dtype=dtype))  # empty

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.l1(x))
        return self.l2(h) * (1 + self.scale) + self.empty.sum()

    def groups(self, second: dict[str, Any]) -> list[dict[str, Any]]:
        return [
            {"params": [self.l1.weight, self.l1.bias, self.scale, self.empty]},
            {"params": [self.l2.weight, self.l2.bias], **second},
        ]


def batches(steps: int, dtype: torch.dtype, batch: int = 64, seed: int = 0):
    x, y = _digits()
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, x.shape[0], (batch,), generator=g)
        yield x[idx].to(dtype), y[idx]


def loss_fn(net: Net, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    out = net(x)
    loss = nn.functional.cross_entropy(out.float() if out.dtype in (torch.float16, torch.bfloat16) else out, y)
    return loss + 0.1 * net.scale.float() ** 2


def run(
    make_opt: Callable[[list[dict[str, Any]]], torch.optim.Optimizer],
    *,
    dtype: torch.dtype = torch.float64,
    steps: int = 100,
    second: dict[str, Any] | None = None,
    net: Net | None = None,
    opt: torch.optim.Optimizer | None = None,
    start: int = 0,
    events: bool = True,
    sched: Callable[[torch.optim.Optimizer], Any] | None = None,
    use_closure: bool = False,
) -> tuple[Net, torch.optim.Optimizer, list[float]]:
    """Train ``steps`` steps (numbered from ``start``); returns (net, optimizer, losses)."""
    net = net if net is not None else Net(dtype)
    opt = opt if opt is not None else make_opt(net.groups(second or {}))
    scheduler = sched(opt) if sched is not None else None
    losses: list[float] = []
    all_batches = list(batches(start + steps, dtype))[start:]
    for i, (x, y) in enumerate(all_batches):
        t = start + i
        frozen = events and t in FREEZE
        net.l1.weight.requires_grad_(not frozen)
        net.l1.bias.requires_grad_(not frozen)

        def closure() -> torch.Tensor:
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(net, x, y)
            loss.backward()
            if events and t == DROP_BIAS_STEP:
                net.l2.bias.grad = None
            return loss

        if use_closure:
            loss = opt.step(closure)
        else:
            loss = closure()
            opt.step()
        losses.append(float(loss.detach()))
        if scheduler is not None:
            scheduler.step()
    net.l1.weight.requires_grad_(True)
    net.l1.bias.requires_grad_(True)
    return net, opt, losses


def roundtrip(sd: dict[str, Any]) -> dict[str, Any]:
    """Save and reload a state_dict as a checkpoint would, with ``weights_only=True``."""
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def assert_same_trajectory(
    net_a: Net, opt_a: torch.optim.Optimizer, net_b: Net, opt_b: torch.optim.Optimizer,
    *, rtol: float, atol: float,
) -> None:
    """Every parameter and every state entry of the two runs agree."""
    for (name, pa), pb in zip(net_a.named_parameters(), net_b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=rtol, atol=atol, msg=lambda m: f"param {name}: {m}")
    for (name, pa), pb in zip(net_a.named_parameters(), net_b.parameters()):
        sa, sb = opt_a.state.get(pa, {}), opt_b.state.get(pb, {})
        ka = {k for k, v in sa.items() if v is not None}
        kb = {k for k, v in sb.items() if v is not None}
        assert ka == kb, f"state keys differ for {name}: {sorted(ka)} vs {sorted(kb)}"
        for k in ka:
            va, vb = sa[k], sb[k]
            if isinstance(va, torch.Tensor):
                torch.testing.assert_close(
                    va.to(vb.dtype) if isinstance(vb, torch.Tensor) else va,
                    vb, rtol=rtol, atol=atol, msg=lambda m: f"state {name}[{k}]: {m}",
                )
            else:
                assert va == vb, f"state {name}[{k}]: {va} != {vb}"


def tolerances(dtype: torch.dtype) -> dict[str, float]:
    """The stated parity tolerances: float64 1e-12 relative, float32 1e-5 relative."""
    if dtype == torch.float64:
        return dict(rtol=1e-12, atol=1e-12)
    return dict(rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------
# Helpers for the generic suites (state_dict, errors, properties, integration). Additive:
# nothing above depends on them.


def opt_params(opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    """Every parameter of ``opt``, in param-group order."""
    return [p for g in opt.param_groups for p in g["params"]]


def snapshot(opt: torch.optim.Optimizer) -> dict[str, Any]:
    """Deep copies of everything a step or a load may change: groups, state, params, grads."""
    import copy

    params = opt_params(opt)
    return dict(
        groups=[
            {**{k: copy.deepcopy(v) for k, v in g.items() if k != "params"},
             "params": [id(p) for p in g["params"]]}
            for g in opt.param_groups
        ],
        # ``opt.state`` is a defaultdict: ``.get`` does not create entries.
        state=[None if opt.state.get(p) is None else copy.deepcopy(dict(opt.state[p])) for p in params],
        n_state=len(opt.state),
        values=[p.detach().clone() for p in params],
        grads=[None if p.grad is None else p.grad.detach().clone() for p in params],
    )


def bitwise_equal(a: Any, b: Any) -> bool:
    """Exact equality, bit for bit for tensors (so -0.0 != 0.0 and NaN == same NaN)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
            return False
        if a.dtype != b.dtype or a.shape != b.shape or a.layout != b.layout:
            return False
        if a.is_sparse:
            a, b = a.to_dense(), b.to_dense()
        return bool(torch.equal(a.reshape(-1).contiguous().view(torch.uint8),
                                b.reshape(-1).contiguous().view(torch.uint8)))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(bitwise_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(bitwise_equal(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, float) and a != a and b != b:
        return True  # both NaN
    return type(a) is type(b) and a == b


def assert_unchanged(opt: torch.optim.Optimizer, before: dict[str, Any]) -> None:
    """``opt`` (groups, state, parameters, gradients) is bit for bit as in ``snapshot``."""
    now = snapshot(opt)
    for key in ("groups", "n_state", "state", "values", "grads"):
        assert bitwise_equal(before[key], now[key]), f"optimizer {key} changed"


def assert_same_state(
    params_a: list[torch.Tensor], opt_a: torch.optim.Optimizer,
    params_b: list[torch.Tensor], opt_b: torch.optim.Optimizer, *, rtol: float, atol: float,
) -> None:
    """Like ``assert_same_trajectory`` for plain lists of parameters."""
    assert len(params_a) == len(params_b)
    for i, (pa, pb) in enumerate(zip(params_a, params_b)):
        torch.testing.assert_close(pa, pb, rtol=rtol, atol=atol, msg=lambda m: f"param {i}: {m}")
        sa, sb = opt_a.state.get(pa, {}), opt_b.state.get(pb, {})
        ka = {k for k, v in sa.items() if v is not None}
        kb = {k for k, v in sb.items() if v is not None}
        assert ka == kb, f"state keys differ for param {i}: {sorted(ka)} vs {sorted(kb)}"
        for k in ka:
            va, vb = sa[k], sb[k]
            if isinstance(va, torch.Tensor) and isinstance(vb, torch.Tensor):
                torch.testing.assert_close(va.to(vb.dtype), vb, rtol=rtol, atol=atol,
                                           msg=lambda m: f"state {i}[{k}]: {m}")
            else:
                assert float(va) == float(vb), f"state {i}[{k}]: {va} != {vb}"


def one_thread():
    """Generator for an autouse fixture: torch ops on one thread while the fixture is active.

    The parity model is tiny; with several OpenMP threads on a shared, busy 2-core machine a
    100-step run was measured at ~1.2 s instead of ~0.1 s on one thread (threads spin
    waiting for each other), so the generic suites run single-threaded.
    """
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)
