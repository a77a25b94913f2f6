"""Which implementation runs a step: the per-tensor reference, multi-tensor foreach, or fused.

The user chooses with ``foreach=`` / ``fused=`` exactly as in torch.optim; ``None`` (the
default) means "the fastest correct path for these tensors". The policy lives here, once,
so every optimizer makes the same choice for the same tensors.
"""

from __future__ import annotations

from collections import defaultdict
import warnings
from collections.abc import Collection, Sequence
from typing import Literal

import torch
from torch import Tensor

from . import _torch_compat as tc

#: "compiled" is chosen only by ``compile=True`` (optimkit._compiled), never by the policy
Impl = Literal["reference", "foreach", "fused", "compiled"]
IMPLS: tuple[Impl, ...] = ("reference", "foreach", "fused")


def check_impl_flags(owner: str, foreach: bool | None, fused: bool | None, has_fused: bool) -> None:
    """Reject impossible flag combinations at construction time."""
    for name, v in (("foreach", foreach), ("fused", fused)):
        if v is not None and not isinstance(v, bool):
            raise ValueError(f"{owner}: invalid {name}={v!r}; expected True, False or None")
    if foreach and fused:
        raise ValueError(f"{owner}: foreach=True and fused=True cannot both be set; pick one")
    if fused and not has_fused:
        raise ValueError(
            f"{owner}: invalid fused=True; this optimizer has no fused kernel "
            "(use foreach=True or leave both None for the fastest available path)"
        )


def resolve_impl(
    foreach: bool | None,
    fused: bool | None,
    has_fused: bool,
    tensors: Sequence[Tensor],
    fused_broken: Collection[tuple[str, torch.dtype]] = (),
    owner: str = "",
    grads: Sequence[Tensor] = (),
    loop_on_cpu: bool = False,
) -> Impl:
    """Pick the implementation for one param group's tensors.

    ``fused_broken`` lists (device type, dtype) pairs on which the torch fused kernel is known
    to compute wrong results; those never run fused (an explicit ``fused=True`` falls back to
    foreach with a warning, since silently training wrong is worse than being slower).
    The fused kernels also walk a parameter and its gradient as if they had the same memory
    layout: a gradient assigned by hand with other strides (autograd never produces one) would
    be read in the wrong order, so such groups run foreach too.
    """
    why = ""
    if any((t.device.type, t.dtype) in fused_broken for t in tensors):
        why = (f"torch {torch.__version__}'s fused kernel is wrong for "
               f"{sorted({f'{d}/{str(t)[6:]}' for d, t in fused_broken})} tensors")
    elif any(p.numel() > 1 and p.stride() != g.stride() for p, g in zip(tensors, grads)):
        why = "a gradient's memory layout (strides) differs from its parameter's"
    if fused:
        if why:
            warnings.warn(f"{owner}: {why}; using the foreach path instead", RuntimeWarning,
                          stacklevel=4)
            return "foreach"
        return "fused"
    if foreach is False:
        return "reference"
    if foreach is True:
        return "foreach"
    # Default: torch's fused kernels are single-pass and reach the bandwidth floor on CPU
    # (measured in DESIGN.md); foreach is the multi-pass fallback.
    if has_fused and fused is None and not why and tc.fused_supported(tensors):
        return "fused"
    if loop_on_cpu and _large_cpu_tensors(tensors):
        return "reference"
    return "foreach"


#: mean elements per tensor above which a per-tensor loop beats foreach on CPU
LOOP_BEATS_FOREACH_NUMEL = 1 << 16


def _large_cpu_tensors(tensors: Sequence[Tensor]) -> bool:
    """On CPU, torch's foreach kernels make one pass over memory per op, each op walking
    every tensor, while a per-tensor loop runs all ops of one tensor while it is still in
    cache. Measured here (2 threads, 25M fp32 params in 148 tensors, benchmarks/step_time.py):
    Adadelta loop 36.6 ms vs foreach 59.6, RMSprop 19.1 vs 28.1, RAdam 26.3 vs 38.6 (torch's
    own for-loop vs foreach show the same); with 2000 tensors of ~1000 elements foreach wins
    (Adadelta 49.3 vs 55.3 ms), since per-call overhead dominates there."""
    if not tensors or any(t.device.type != "cpu" for t in tensors):
        return False
    return sum(t.numel() for t in tensors) >= LOOP_BEATS_FOREACH_NUMEL * len(tensors)


def group_by_device_dtype(
    *tensor_lists: Sequence[Tensor | None],
) -> dict[tuple[torch.device, torch.dtype], tuple[list[list], list[int]]]:
    """Bucket parallel lists by the (device, dtype) of the first list's tensors.

    Returns ``{(device, dtype): ([list_0, list_1, ...], indices)}`` where ``indices`` are the
    positions in the input lists, so results can be written back.
    """
    buckets: dict = defaultdict(lambda: ([[] for _ in tensor_lists], []))
    for i, t in enumerate(tensor_lists[0]):
        lists, idx = buckets[(t.device, t.dtype)]
        for lst, src in zip(lists, tensor_lists):
            lst.append(src[i])
        idx.append(i)
    return dict(buckets)
