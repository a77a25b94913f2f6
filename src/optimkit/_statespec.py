"""The state shapes a subclass declares in ``_state_spec``, and the check of one loaded state
value against them (``OptimizerBase._check_state_dict``)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

if TYPE_CHECKING:
    from ._base import OptimizerBase

#: markers used in ``_state_spec``
PARAM_SHAPE = "param"  # same shape as the parameter
SCALAR = "scalar"  # one element (step counters)
ANY = "any"  # no shape constraint


def check_state_value(bad: str, pid: Any, key: str, v: Any, spec: Any, p: Tensor) -> None:
    if isinstance(v, Tensor) and v.is_meta and not p.is_meta:
        raise ValueError(
            f"{bad}: state[{pid!r}][{key!r}] is a meta tensor (shape {tuple(v.shape)}, no data): "
            "the checkpoint was saved from an optimizer whose state was never materialised "
            "(a model built on the meta device?)")
    if spec == ANY:
        return
    if spec == SCALAR:
        ok = isinstance(v, Tensor) and v.numel() == 1 and not v.is_complex() and v.dtype != torch.bool
        ok = ok or (isinstance(v, (int, float)) and not isinstance(v, bool))
        if not ok:
            raise ValueError(f"{bad}: state[{pid!r}][{key!r}] must be a scalar, got {_describe(v)}")
        x = float(v)
        if not (math.isfinite(x) and x >= 0 and x == int(x)):
            raise ValueError(
                f"{bad}: state[{pid!r}][{key!r}]={x!r}; a step counter must be a whole number >= 0"
            )
        return
    want = _want(spec, p)
    if not isinstance(v, Tensor) or tuple(v.shape) != want:
        raise ValueError(
            f"{bad}: state[{pid!r}][{key!r}] has {_describe(v)}, expected shape {want}"
        )
    if p.is_floating_point() and not v.is_floating_point():
        raise ValueError(
            f"{bad}: state[{pid!r}][{key!r}] has dtype {v.dtype}; expected a floating-point "
            f"tensor (the parameter is {p.dtype})"
        )


def _want(spec: Any, p: Tensor) -> tuple[int, ...]:
    """The shape a state tensor of ``spec`` (``PARAM_SHAPE`` or a shape) must have for ``p``."""
    return tuple(p.shape) if spec == PARAM_SHAPE else tuple(spec)


def _describe(v: Any) -> str:
    if isinstance(v, Tensor):
        return f"shape {tuple(v.shape)}"
    return f"type {type(v).__name__}"


def check_state_shapes(opt: OptimizerBase, gi: int, group: dict[str, Any],
                       params: list[Tensor], states: list[Any]) -> None:
    """Raise before the step writes anything if a parameter's state no longer has the shape
    ``_state_spec`` declares: its ``.data`` was replaced by a tensor of another shape after
    the state was created (pruning, a resized embedding written into the same Parameter).
    torch.optim fails part-way through such a step, with the earlier groups already stepped.
    ``step()`` calls this only when a group's parameter shapes (or ``_state_layout``) differ
    from its last step's."""
    for p, st in zip(params, states):
        if not st:
            continue
        for key, spec in opt._state_spec(group, p).items():
            v = st.get(key)
            if spec in (ANY, SCALAR) or not isinstance(v, Tensor):
                continue
            want = _want(spec, p)
            if tuple(v.shape) != want:
                pi = next(i for i, q in enumerate(group["params"]) if q is p)
                raise RuntimeError(
                    f"{type(opt).__name__}: state {key!r} of parameter {pi} in param group "
                    f"{gi} has shape {tuple(v.shape)}, expected {want} for the parameter's "
                    f"shape {tuple(p.shape)} (the parameter's data was replaced by a tensor of "
                    "another shape, or a setting the state's layout depends on changed, after "
                    "the state was created); nothing was changed. Build a new optimizer for "
                    "the new shapes, or drop that state with del opt.state[p]")
