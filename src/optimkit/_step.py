"""What ``OptimizerBase.step`` gathers before it changes anything, and the common case of that
gather done at C speed.

``step()`` runs, at every step and for every param group, checks that cannot be skipped: a
scheduler or the user may have changed a hyperparameter, replaced a gradient
(``zero_grad(set_to_none=True)`` gives new gradient tensors every step), or moved the model
to another dtype or device (``model.to()`` keeps the Parameter objects and replaces their
data, so no object identity says that anything changed). The checks are kept; what this
module removes is the Python overhead around them, which dominated steps over many small
tensors (measured on the 2000-tensor ``small`` set: ~10 us of Python per tensor against
~1.5 us for torch's fused SGD kernel itself):

* :func:`settings_key`: a group's hyperparameters as a value snapshot; ``step()`` skips
  re-running the range checks of a group whose snapshot equals one that already passed them.
* :func:`gather_dense`: one group's parameters and gradients with every per-tensor fact the
  implementation choice needs (gradient shapes and strides against the parameters', dtype,
  device, tensor type), read in one tight loop that keeps nothing but the answers. It
  handles the usual group (dense gradients, one device and dtype); anything else returns
  ``None`` and the general walk in ``OptimizerBase._gather`` runs, which raises the errors
  and makes the choices it always made. Both decide through ``_impl.resolve_impl``, this one
  handing it the facts it read (``ImplFacts``).
"""

from __future__ import annotations

import types
from dataclasses import dataclass, field
from functools import partial
from operator import is_
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from . import _torch_compat as tc
from ._impl import (LOOP_BEATS_FOREACH_NUMEL, Impl, ImplFacts, OneDeviceDtype, broken_text,
                    strides_text)

if TYPE_CHECKING:
    from ._base import OptimizerBase
    from ._flatten import FlatBucket


@dataclass
class GroupWork:
    """Everything one param group's update needs, gathered before any change is made."""

    group: dict[str, Any]
    params: list[Tensor]
    grads: list[Tensor]
    states: list[dict[str, Any]]
    impl: Impl
    #: flat buckets stepped as chunks this step (``flat=True``): their chunk tensors follow the
    #: per-tensor parameters in ``params``/``grads``; with the gradients to copy in first
    buckets: list[tuple[FlatBucket, list[int]]] = field(default_factory=list)
    #: every gradient is known (checked this step) to be dense; False: not known
    dense: bool = False
    #: the shapes of the per-tensor parameters stepped (``params`` before any flat chunk),
    #: for ``_statespec.check_state_shapes``
    shapes: list[torch.Size] = field(default_factory=list)


#: the state of every parameter of a group whose update keeps none (SGD without momentum):
#: read-only, so an update that did write state would fail loudly instead of losing it
NO_STATE: Any = types.MappingProxyType({})

_PLAIN = frozenset({float, int, bool, str, type(None)})


def settings_key(group: dict[str, Any]) -> tuple[Any, ...] | None:
    """A snapshot of ``group``'s settings (every key but the parameters) that compares equal
    exactly when each value has the same type and an equal value, or ``None`` when some value
    is not a plain Python scalar or a tuple/list of them (a tensor lr can change in place, a
    numpy float is not worth the risk): such groups are validated at every step.

    Why a value snapshot is enough: the classes that use it (``_pure_validation``) validate
    a group from its values alone, and two values of the same type that compare equal pass
    or fail the same checks (``-0.0`` and ``0.0`` included; a NaN never passes one, so a key
    holding it is never stored). Lists are copied into tuples, so changing a list in place
    changes the key. The type is part of the key because ``True == 1`` while a bool lr is
    refused and an int one is not."""
    key = []
    for k, v in group.items():
        t = type(v)
        if t in _PLAIN:
            key.append((k, t, v))
        elif k == "params" or k == "param_names":
            continue
        elif t is tuple or t is list:
            items = tuple((type(x), x) for x in v)
            if not all(tx in _PLAIN for tx, _ in items):
                return None
            key.append((k, t, items))
        else:
            return None
    return tuple(key)


IS_NONE = partial(is_, None)
_EXACT = frozenset({Tensor, torch.nn.Parameter})
_CPU = torch.device("cpu")


def gather_dense(
    opt: OptimizerBase, gi: int, group: dict[str, Any],
) -> tuple[GroupWork, ImplFacts, tuple[torch.dtype, ...]] | None:
    """Group ``gi``'s work (its ``impl`` still to be chosen from the facts returned; with the
    group's parameter dtypes, for ``_dtypes_moved``) when every parameter is dense, on one
    device, of one dtype, and every gradient present matches its parameter's shape; else
    ``None`` (the general walk then runs, and raises where a gradient is unusable). Changes
    nothing.

    The decisions are the general walk's, from the same facts: sparse gradients
    and gradient shapes that differ send the group to the general walk (which handles or
    refuses them), strides, the one (device, dtype) pair
    (torch's known-broken fused kernels, fused support, the dtype signature of
    ``_dtypes_moved``) and the tensor types (fused support). Under torch.compile the general
    walk runs (what dynamo traces is kept as it was)."""
    if torch.compiler.is_compiling():
        return None
    params = group["params"]
    if not params:
        return None
    dtype = params[0].dtype
    ps, grads, shapes = OneDeviceDtype(), [], []
    same_strides = cpu = True
    exact = _EXACT
    # One Python loop: measured faster than a map() per fact, on 6 tensors and on 2000 (the
    # torch.Size and stride tuples are freed as soon as they are compared).
    try:
        for p in params:
            if p.dtype is not dtype:  # (dtypes are singletons)
                return None
            g = p.grad
            if g is None:
                continue
            # exact types: no Python override of shape/stride()/is_sparse in between
            if type(p) not in exact or type(g) not in exact or g.is_sparse or p.is_sparse:
                return None
            if same_strides and g.stride() != p.stride():
                same_strides = False
            shape = p.shape
            if g.dtype is not dtype or g.shape != shape:  # the general walk raises
                return None
            if cpu and not p.is_cpu:
                cpu = False
            ps.append(p)
            grads.append(g)
            shapes.append(shape)
    except RuntimeError:  # a tensor without strides (sparse CSR, ...)
        return None
    if not ps:
        return None
    if cpu:
        device = _CPU
    else:
        devices = {p.device for p in ps}
        if len(devices) != 1:
            return None
        device = devices.pop()
    dtypes = (dtype,) * len(params)
    ps.key = (device, dtype)

    why = ""
    broken = opt._fused_broken
    if broken and (device.type, dtype) in broken:
        why = broken_text(broken)
    elif not same_strides and any(p.numel() > 1 and p.stride() != g.stride()
                                  for p, g in zip(ps, grads)):
        why = strides_text()

    def supported() -> bool:  # tc.fused_supported(ps), from the facts read above
        # (exact types, none sparse: checked above)
        return dtype in tc.FUSED_DTYPES and device.type in tc.FUSED_DEVICE_TYPES

    def large_cpu() -> bool:  # opt._loop_on_cpu and _impl._large_cpu_tensors(ps)
        return (opt._loop_on_cpu and device.type == "cpu"
                and sum(map(Tensor.numel, ps)) >= LOOP_BEATS_FOREACH_NUMEL * len(ps))

    return (GroupWork(group, ps, grads, [], "foreach", dense=True, shapes=shapes),
            ImplFacts(why, supported, large_cpu), dtypes)
