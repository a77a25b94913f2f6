"""Property-based parity: for random shapes, dtypes and hyperparameters, every fast
implementation of a row equals its per-tensor reference, parameters and state included.

Drawn per example: 1-4 tensors, each a general shape (1-3 dimensions of size 1-5), a 0-dim
scalar or an empty ``(0, k)`` tensor, float32 or float64, every hyperparameter of
``row.hyper_space`` (``(lo, hi)`` float ranges or tuples of choices; ``beta1``/``beta2`` form
``betas``; ``nesterov`` is drawn too where the class has it, with ``dampening=0`` and
examples with ``momentum=0`` rejected, as Nesterov requires), and 3 steps of random
gradients, each missing (None) with probability 1/4.
Tolerances (stated): ``harness.tolerances``: float64 1e-12 relative, float32 1e-5 relative.
25 examples per optimizer.
"""

from __future__ import annotations

import inspect

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import harness
from optim_db import IMPL_FLAGS, OPTIMS

_one_thread = pytest.fixture(autouse=True, scope="module")(harness.one_thread)

STEPS = 3


def _is_range(v) -> bool:
    return (isinstance(v, tuple) and len(v) == 2
            and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v))


def _hyper_strategy(info):
    parts = {k: st.floats(v[0], v[1], allow_nan=False, allow_infinity=False) if _is_range(v)
             else st.sampled_from(v) for k, v in info.hyper_space.items()}
    if "nesterov" in inspect.signature(info.cls.__init__).parameters and "nesterov" not in parts:
        parts["nesterov"] = st.booleans()
    return st.fixed_dictionaries(parts)


def _to_kwargs(h: dict) -> dict:
    h = dict(h)
    if "beta1" in h or "beta2" in h:
        h["betas"] = (h.pop("beta1", 0.9), h.pop("beta2", 0.999))
    if h.get("nesterov"):
        assume(h.get("momentum", 0) > 0)  # Nesterov needs momentum > 0 ...
        h["dampening"] = 0.0  # ... and no dampening
    return h


_general = st.lists(st.integers(1, 5), min_size=1, max_size=3).map(tuple)
_empty = st.tuples(st.just(0), st.integers(0, 3))
# about half general shapes, a quarter 0-dim, a quarter empty; 1-4 tensors per example
shapes_st = st.lists(st.one_of(_general, _general, st.just(()), _empty), min_size=1, max_size=4)


def _make_params(shapes, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, dtype=dtype, generator=g) for s in shapes]


def _make_grads(shapes, dtype, seed):
    g = torch.Generator().manual_seed(seed + 1)
    out = []
    for _ in range(STEPS):
        keep = torch.rand(len(shapes), generator=g) >= 0.25
        out.append([torch.randn(s, dtype=dtype, generator=g) if k else None
                    for s, k in zip(shapes, keep.tolist())])
    return out


def _run(info, kwargs, impl, init, grads):
    params = [torch.nn.Parameter(t.clone()) for t in init]
    opt = info.cls(params, **kwargs, **IMPL_FLAGS[impl])
    for step_grads in grads:
        for p, gr in zip(params, step_grads):
            p.grad = None if gr is None else gr.clone()
        opt.step()
    return params, opt


@pytest.mark.parametrize("info", OPTIMS, ids=lambda i: i.name)
def test_fast_impls_match_reference(info):
    fast = [i for i in info.impls if i != "reference"]
    assert fast, f"{info.name} has no fast implementation to check"

    @settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(shapes=shapes_st, dtype=st.sampled_from([torch.float32, torch.float64]),
           hyper=_hyper_strategy(info), seed=st.integers(0, 2**31 - 1))
    def check(shapes, dtype, hyper, seed):
        kwargs = _to_kwargs(hyper)
        init = _make_params(shapes, dtype, seed)
        grads = _make_grads(shapes, dtype, seed)
        ref_p, ref_opt = _run(info, kwargs, "reference", init, grads)
        for impl in fast:
            p, opt = _run(info, kwargs, impl, init, grads)
            harness.assert_same_state(p, opt, ref_p, ref_opt, **harness.tolerances(dtype))

    check()
