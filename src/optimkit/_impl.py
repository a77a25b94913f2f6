"""Which implementation runs a step: the per-tensor reference, multi-tensor foreach, or fused;
and on how many threads.

The user chooses with ``foreach=`` / ``fused=`` exactly as in torch.optim; ``None`` (the
default) means "the fastest correct path for these tensors". The policy lives here, once,
so every optimizer makes the same choice for the same tensors.

Small tensors and parallel regions
----------------------------------
torch's fused CPU kernels split every tensor over the intra-op threads with grain size 0:
one OpenMP parallel region per tensor, whatever its size. Its elementwise ops split only
tensors of at least ``GRAIN_SIZE`` = 32768 elements, but its vectorized unary math (``sqrt``,
used by Adam's for-loop, Adadelta, RAdam, Prodigy) splits from 2048 elements. A region costs
a few microseconds on an idle machine; when another process keeps the cores busy (a data
loader, a second job, a shared CI runner) each region waits until the OS runs every one of
its threads, which can take a scheduler time slice: milliseconds per tensor.

Measured here (2 vCPUs, torch 2.13, 2 threads; the machine was shared with 4 other jobs,
load average 5-11, so "alone" is already contended; /tmp scripts, interleaved windows,
mean / median ms per step over windows), torch's fused kernels over a 64-128-128-10 MLP
(6 tensors, 26k parameters) and over the 2000-tensor ``small`` set (2M parameters):

=========================================  ===================  ======================
option                                     MLP, SGD momentum    small, SGD momentum
=========================================  ===================  ======================
fused, all threads (the policy before)     105 / 104 ms         2157 / 244 ms
fused under ``set_num_threads(1)``         0.067 / 0.058 ms     17.3 / 16.4 ms
foreach (ATen splits >= 32768 only)        0.21 / 0.21 ms       57.5 / 57.9 ms
for-loop (torch's CPU default)             0.30 / 0.30 ms       106 / 108 ms
same, plus one 2-thread matmul process:
fused, all threads                         158 / 156 ms         1004 / 962 ms
fused under ``set_num_threads(1)``         0.11 / 0.098 ms      43.6 / 36.6 ms
foreach                                    0.43 / 0.44 ms       151 / 154 ms
for-loop                                   0.64 / 0.67 ms       287 / 284 ms
=========================================  ===================  ======================

Adam (load ~10): fused all threads 80 / 112 ms on the MLP, one thread 0.34 / 0.35 ms,
foreach 98 / 118 ms and torch's for-loop 83 / 98 ms (their ``sqrt`` opens a region per
tensor above 2048 elements: the for-loop under ``set_num_threads(1)`` took 0.9 ms); batching
the tensors into one contiguous scratch per buffer (``torch.cat`` in, one fused call, copy
back) 16.6 / 23.1 ms. On the small set: fused all threads 1830 / 234 ms, one thread 63 /
60 ms, foreach 631 / 513 ms, batched 702 / 629 ms. Toggling ``set_num_threads(1)`` and back
costs ~0.5-5 us. Per tensor of Adam at 4096 / 32768 / 262144 elements (8 tensors a call):
2 threads 823 / 1204 / 10947 us, one thread 64 / 257 / 1224 us under that load.

So the policy is, for every optimizer and every implementation:

* a step whose tensors are all CPU tensors below :data:`SERIAL_BELOW_NUMEL` elements runs on
  one thread (:func:`run_serially`, applied around the whole update in
  ``OptimizerBase.step``): no parallel region at all, whatever ops the path uses;
* in any other step, torch's fused kernels still step the small tensors of a list in a
  one-thread call of their own (``_torch_compat.serial_for_small``), the large ones with all
  threads.

Neither changes a result: the per-element math of every elementwise op and fused kernel is
the same however the elements are split over threads (the fused kernels split at cache-line
boundaries; vectorized ``sqrt`` is correctly rounded like the scalar one), and a reduction
over a tensor below 32768 elements is never split. One thing does depend on it, as it
depends on the thread count a user sets: a reduction over a buffer of 32768 or more
elements built inside an all-small step (Prodigy sums ``<g, p0 - p>`` over its scratch
buffer) adds its partial sums in the order of one thread instead of two. The parity tests
(tests/test_parity_classic.py, tests/test_torch_optim_db.py, tests/test_flat.py) pass
unchanged. Batching (copying small tensors into one buffer) was
slower than one thread, and switching small tensors to foreach was 3-4x slower than the fused
kernel on one thread and would change results (foreach and fused round differently).
"""

from __future__ import annotations

from collections import defaultdict
import warnings
from collections.abc import Callable, Collection, Iterable, Sequence
from typing import Literal, NamedTuple

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


class ImplFacts(NamedTuple):
    """What :func:`resolve_impl` needs to know about a group's tensors, for a caller that has
    read them already (``_step.gather_dense``, in bulk): ``why`` the fused kernel cannot take
    them ("" if it can); whether torch's fused kernels accept every tensor (``supported``) and
    whether a per-tensor loop beats foreach on them (``large_cpu``, with ``loop_on_cpu``
    applied), both asked only when the decision gets that far."""

    why: str
    supported: Callable[[], bool]
    large_cpu: Callable[[], bool]


def resolve_impl(
    foreach: bool | None,
    fused: bool | None,
    has_fused: bool,
    tensors: Sequence[Tensor],
    fused_broken: Collection[tuple[str, torch.dtype]] = (),
    owner: str = "",
    grads: Sequence[Tensor] = (),
    loop_on_cpu: bool = False,
    *,
    facts: ImplFacts | None = None,
) -> Impl:
    """Pick the implementation for one param group's tensors.

    ``fused_broken`` lists (device type, dtype) pairs on which the torch fused kernel is known
    to compute wrong results; those never run fused (an explicit ``fused=True`` falls back to
    foreach with a warning, since silently training wrong is worse than being slower).
    The fused kernels also walk a parameter and its gradient as if they had the same memory
    layout: a gradient assigned by hand with other strides (autograd never produces one) would
    be read in the wrong order, so such groups run foreach too. ``facts``: these facts about
    ``tensors`` and ``grads``, read by the caller (the same decision, without reading them
    again here).
    """
    if facts is None:
        why = ""
        if fused_broken and any((t.device.type, t.dtype) in fused_broken for t in tensors):
            why = broken_text(fused_broken)
        elif any(g.is_sparse for g in grads):
            why = "a gradient is sparse (the fused kernels take dense gradients only)"
        elif any(p.numel() > 1 and p.stride() != g.stride() for p, g in zip(tensors, grads)):
            why = strides_text()
        facts = ImplFacts(why, lambda: tc.fused_supported(tensors),
                          lambda: loop_on_cpu and _large_cpu_tensors(tensors))
    why = facts.why
    if fused:
        if why:
            # (the frame of OptimizerBase.step's caller, through _pick_impl and _gather)
            warnings.warn(f"{owner}: {why}; using the foreach path instead", RuntimeWarning,
                          stacklevel=5)
            return "foreach"
        return "fused"
    if foreach is False:
        return "reference"
    if foreach is True:
        return "foreach"
    # Default: torch's fused kernels are single-pass and reach the bandwidth floor on CPU
    # (measured in DESIGN.md); foreach is the multi-pass fallback.
    if has_fused and fused is None and not why and facts.supported():
        return "fused"
    if facts.large_cpu():
        return "reference"
    return "foreach"


def broken_text(fused_broken: Collection[tuple[str, torch.dtype]]) -> str:
    return (f"torch {torch.__version__}'s fused kernel is wrong for "
            f"{sorted({f'{d}/{str(t)[6:]}' for d, t in fused_broken})} tensors")


def strides_text() -> str:
    return "a gradient's memory layout (strides) differs from its parameter's"


#: a step whose CPU tensors all have fewer elements runs on one thread (ATen's GRAIN_SIZE)
SERIAL_BELOW_NUMEL = tc.SERIAL_BELOW_NUMEL


def run_serially(tensor_lists: Iterable[Sequence[Tensor]]) -> bool:
    """Whether a step over these tensors runs on one thread: every tensor is a CPU tensor
    with fewer than :data:`SERIAL_BELOW_NUMEL` elements (and there is at least one). Only
    speed depends on it, never a result (see the module docstring)."""
    seen = False
    for ts in tensor_lists:
        for t in ts:
            if not t.is_cpu or t.numel() >= SERIAL_BELOW_NUMEL:
                return False
            seen = True
    return seen


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


def same_dtypes(params: Sequence[Tensor], others: Sequence[Tensor]) -> bool:
    """Whether ``others[i].dtype == params[i].dtype`` for every i (state buffers against their
    parameters); one dtype read per buffer when ``params`` is a :class:`OneDeviceDtype`."""
    if type(params) is OneDeviceDtype:
        dtype = params.key[1]
        return all(t.dtype == dtype for t in others)
    return all(t.dtype == p.dtype for p, t in zip(params, others))


class OneDeviceDtype(list):
    """A list of tensors checked, in this step, to share one (device, dtype): ``key``.

    ``_step.gather_dense`` reads every parameter's device and dtype anyway; handing the
    answer on this way spares :func:`group_by_device_dtype` reading them again per tensor in
    every update (a plain list, a slice of this one included, is grouped as before)."""

    __slots__ = ("key",)
    key: tuple[torch.device, torch.dtype]


def group_by_device_dtype(
    *tensor_lists: Sequence[Tensor | None],
) -> dict[tuple[torch.device, torch.dtype], tuple[list[list], list[int]]]:
    """Bucket parallel lists by the (device, dtype) of the first list's tensors.

    Returns ``{(device, dtype): ([list_0, list_1, ...], indices)}`` where ``indices`` are the
    positions in the input lists, so results can be written back.
    """
    first = tensor_lists[0]
    if type(first) is OneDeviceDtype:
        n = len(first)
        if all(len(src) == n for src in tensor_lists):
            return {first.key: ([list(src) for src in tensor_lists], list(range(n)))}
    buckets: dict = defaultdict(lambda: ([[] for _ in tensor_lists], []))
    for i, t in enumerate(first):
        lists, idx = buckets[(t.device, t.dtype)]
        for lst, src in zip(lists, tensor_lists):
            lst.append(src[i])
        idx.append(i)
    return dict(buckets)
