r"""Flat buffers (``flat=True``): one contiguous buffer per param group and (device, dtype).

Why: a step is memory-bound, and with many small tensors the per-tensor cost (a Python call,
one kernel launch or one OpenMP region per tensor and per op) dominates: 2000 tensors of
~1000 elements ran at 3-16% of the bandwidth floor (docs/performance.md), whatever the
implementation, torch.optim's fused kernels included. With ``flat=True`` the optimizer
lays the parameters, their gradients and its state out as views into one buffer each (as
large-scale trainers do), and steps the buffer in a few large chunks: the same per-tensor,
foreach or fused math as always, called on ``ceil(N / CHUNK_NUMEL)`` chunks instead of one
call per tensor.

What it changes for the user (documented on every optimizer's ``flat`` argument):

* ``p.data`` of each eligible parameter is re-pointed to its slice of the flat buffer (values
  unchanged) unless the parameters already are back-to-back views of one storage;
* ``p.grad`` is a view of a flat gradient buffer, and ``optimizer.zero_grad()`` zeroes that
  buffer instead of setting gradients to ``None``;
* each ``optimizer.state[p]`` holds views into the flat state buffers and the ``step``
  counter as a 0-dim view of a per-bucket vector, so ``state_dict()`` has torch's layout and
  loads into torch.optim (and non-flat optimkit) and back.

Everything else falls back to the per-tensor path, never to different math:

* not eligible (never flattened): parameters that do not require grad at construction,
  non-contiguous or non-floating ones, tensor subclasses (DTensor, FSDP flat params), ones
  whose ``grad_dtype`` is not their dtype;
* a gradient replaced by the user (``model.zero_grad()`` then backward, or ``p.grad = ...``)
  is copied into the flat buffer and ``p.grad`` re-pointed (one extra copy that step);
* a member without a gradient (or with a sparse one) in some step: that step the bucket's
  members with gradients step one by one, as without ``flat``; once their step counters agree
  again the bucket steps flat again;
* a parameter whose storage was replaced (``p.data = ...``, ``model.to(...)``): the bucket
  is dissolved for good (its members keep their state) with a warning.
"""

from __future__ import annotations

import operator
import warnings
import weakref
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

if TYPE_CHECKING:  # pragma: no cover
    from ._base import OptimizerBase

#: elements per chunk (1 MiB of float32): large enough that per-call overhead is amortised,
#: small enough that a multi-pass per-tensor update of one chunk stays in L2/L3 cache
CHUNK_NUMEL = 1 << 18


def flat_view(tensors: list[Tensor]) -> Tensor | None:
    """One 1-D view covering ``tensors`` if they are contiguous, back-to-back views of one storage.

    Returns ``None`` otherwise (the caller then has to copy).
    """
    if not tensors:
        return None
    first = tensors[0]
    storage = first.untyped_storage()
    offset = first.storage_offset()
    for t in tensors:
        if (
            not t.is_contiguous()
            or t.dtype != first.dtype
            or t.device != first.device
            or t.untyped_storage().data_ptr() != storage.data_ptr()
            or t.storage_offset() != offset
        ):
            return None
        offset += t.numel()
    n = offset - first.storage_offset()
    return torch.empty(0, dtype=first.dtype, device=first.device).set_(
        storage, first.storage_offset(), (n,)
    )


def eligible(p: Tensor) -> bool:
    """Whether ``p`` can live in a flat buffer (a plain, dense, contiguous floating tensor)."""
    return (
        p.requires_grad
        and p.layout == torch.strided
        and p.is_floating_point()
        and p.is_contiguous()
        and type(p.data) is Tensor
        and not hasattr(p, "_fsdp_flattened")
        # gradients in another dtype (torch's p.grad_dtype) cannot be views of a buffer of p's
        and getattr(p, "grad_dtype", p.dtype) == p.dtype
    )


def build_buckets(params: list[Tensor], whole: bool = False,
                  tied: frozenset[int] = frozenset()) -> list[FlatBucket]:
    """The buckets of one param group: its eligible parameters per (device, dtype).

    ``whole``: one chunk per bucket (compiled single-pass kernels need no cache blocking, and
    each call of one costs tens of microseconds). ``tied``: ids of parameters that share memory
    with another parameter (:func:`tied_params`); they keep their storage, so they stay tied."""
    by_key: dict[tuple[torch.device, torch.dtype], list[tuple[int, Tensor]]] = {}
    for i, p in enumerate(params):
        if eligible(p) and p.numel() > 0 and id(p) not in tied:
            by_key.setdefault((p.device, p.dtype), []).append((i, p))
    return [FlatBucket([p for _, p in ms], [i for i, _ in ms], whole) for ms in by_key.values()]


def tied_params(tensors: list[Tensor]) -> frozenset[int]:
    """ids of the distinct tensors whose memory overlaps another's (tied weights: two
    Parameters over one storage). Copying either into a flat buffer would untie them."""
    by_storage: dict[tuple[Any, int], dict[int, Tensor]] = {}
    for t in tensors:
        if isinstance(t, Tensor) and t.layout == torch.strided and t.numel() > 0:
            try:
                key = (t.device, t.untyped_storage().data_ptr())
            except (RuntimeError, NotImplementedError):  # tensor subclasses without storage
                continue
            by_storage.setdefault(key, {})[id(t)] = t
    tied: set[int] = set()
    for ts in by_storage.values():
        if len(ts) < 2:
            continue
        spans = sorted((t.data_ptr(), t.data_ptr() + _extent(t), i) for i, t in ts.items())
        end, owner = spans[0][1], spans[0][2]
        for a, b, i in spans[1:]:
            if a < end:  # overlaps the furthest-reaching span so far
                tied.update((i, owner))
            if b > end:
                end, owner = b, i
    return frozenset(tied)


def _extent(t: Tensor) -> int:
    """Bytes from ``t``'s first element to one past its last (strides allowed)."""
    n = 1 + sum((k - 1) * abs(st) for k, st in zip(t.shape, t.stride()))
    return n * t.element_size()


def _alias(view: Tensor) -> Tensor:
    """A tensor over exactly ``view``'s memory with a storage of its own (DLPack, zero-copy).

    Parameters re-pointed into the flat buffer become such aliases, not views: to a checkpoint
    writer each then owns its whole storage, as before flattening (safetensors refuses, and
    ``accelerate.save_state`` fails on, tensors that are part of a larger storage), while the
    optimizer's chunk kernels write the same memory through the flat buffer."""
    return torch.from_dlpack(view.detach())


class FlatBucket:
    """The parameters of one param group on one (device, dtype), stepped as flat chunks.

    ``state`` is the optimizer state of the whole buffer as the optimizer's ``_init_state``
    creates it for a 1-D parameter of ``N`` elements; ``chunk_states`` are per-chunk views of
    it (each with its own scalar counters), and the members' ``optimizer.state[p]`` entries
    views in the parameters' shapes.
    """

    def __init__(self, members: list[Tensor], indices: list[int], whole: bool = False,
                 parent: tuple[Tensor, Tensor, list[Tensor], list[bool]] | None = None) -> None:
        self.members = members
        self.whole = whole
        self.indices = indices  # positions in the param group (for error messages, order)
        self.numels = [p.numel() for p in members]
        self.offsets: list[int] = []
        n = 0
        for k in self.numels:
            self.offsets.append(n)
            n += k
        self.numel = n
        # Whether each member got a gradient since the last zero_grad(set_to_none=True): a
        # flat gradient is never None, so backward reports arrivals through a hook. A member
        # without one skips the step exactly as a parameter whose .grad is None.
        self.got_grad = [p.grad is not None for p in members]
        with torch.no_grad():
            if parent is not None:  # a run of a parent bucket's members: the same memory
                self.flat_p, self.flat_g, self.grad_views, self.got_grad = parent
                flat = self.flat_p
            else:
                flat = flat_view([p.detach() for p in members])
                if flat is None:
                    flat = torch.cat([p.detach().reshape(-1) for p in members])
                    for p, v in zip(members, self._views(flat)):
                        p.data = _alias(v)
                self.flat_p = flat
                grads = [p.grad for p in members]
                gflat = None
                if all(g is not None and not g.is_sparse and g.dtype == flat.dtype for g in grads):
                    gflat = flat_view(grads)  # already one buffer in the same layout: adopt it
                if gflat is not None and gflat.numel() == n:
                    self.flat_g = gflat
                    self.grad_views = list(grads)
                else:
                    self.flat_g = torch.zeros_like(flat)
                    self.grad_views = self._views(self.flat_g)
                    for p, g, v in zip(members, grads, self.grad_views):
                        if g is not None:
                            v.copy_(g.to_dense() if g.is_sparse else g)
                        p.grad = v
        self.ptrs = [p.data_ptr() for p in members]
        self.gptrs = [v.data_ptr() for v in self.grad_views]
        ref = weakref.ref(self)

        def arrived(i: int) -> Any:
            # A tensor hook: it sees each incoming gradient before autograd accumulates it.
            def hook(grad: Tensor) -> None:
                b = ref()
                if b is None:
                    return
                if grad.is_sparse and not b.got_grad[i]:
                    # Accumulated into the dense view, a sparse gradient (nn.Embedding(
                    # sparse=True)) would turn dense: Adam would then step where it must
                    # refuse, weight decay would touch every row. Without flat the .grad is
                    # None here, so autograd stores the sparse gradient itself: same here.
                    m = b.members[i]
                    if m.grad is b.grad_views[i]:
                        m.grad = None
                b.got_grad[i] = True
            return hook

        # (a member frozen with requires_grad=False takes no hook; if it is unfrozen, the
        # gradient it then gets is seen as a replaced .grad or as a non-zero view)
        self._hooks = [p.register_hook(arrived(i))
                       for i, p in enumerate(members) if p.requires_grad]
        step = n if whole else CHUNK_NUMEL
        spans = [(a, min(a + step, n)) for a in range(0, n, step)]
        self.spans = spans
        self.chunk_p = [flat[a:b] for a, b in spans]
        self.chunk_g = [self.flat_g[a:b] for a, b in spans]
        self.state: dict[str, Any] = {}
        self.ready = False  # state laid out (possibly empty: SGD without momentum)
        self._had_state = False  # ... and not empty
        self.chunk_states: list[dict[str, Any]] = []
        self._vecs: dict[str, Tensor] = {}  # 0-dim tensor counters: the members' values
        self._member_states: list[dict[str, Any]] = []  # the members' opt.state dicts
        self.synced = True  # members' counters agree, so the bucket may step flat

    def _views(self, flat: Tensor, shapes: list[Any] | None = None) -> list[Tensor]:
        shapes = shapes or [p.shape for p in self.members]
        return [flat[o : o + k].view(s) for o, k, s in zip(self.offsets, self.numels, shapes)]

    # ------------------------------------------------------------------ per-step checks
    def intact(self, grads: bool = False) -> bool:
        """The members still live in the flat buffer: nobody replaced ``p.data``. With
        ``grads``, also the gradient views (``model.to(...)`` swaps the ``.data`` of each
        ``p.grad``; checked by ``zero_grad``, off the step's hot path)."""
        if list(map(Tensor.data_ptr, self.members)) != self.ptrs:
            return False
        return not grads or list(map(Tensor.data_ptr, self.grad_views)) == self.gptrs

    def close(self) -> None:
        """Stop listening for gradients (the bucket is dissolved or replaced)."""
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def absent(self) -> list[int]:
        """Members that count as having no gradient this step: ``p.grad is None``, or their
        gradient view received nothing since ``zero_grad()`` (no backward reached them, and
        it holds only the zeros zero_grad wrote; a value written into it by hand counts)."""
        if all(self.got_grad):  # the usual case: backward reached every member
            return []
        quiet = [i for i, (p, v, got) in enumerate(zip(self.members, self.grad_views, self.got_grad))
                 if not got and p.grad is v]
        out = []
        if quiet:
            written = torch.stack([self.grad_views[i].any() for i in quiet]).tolist()
            for i, w in zip(quiet, written):
                if w:
                    self.got_grad[i] = True
                else:
                    out.append(i)
        return out

    def plan(self, absent: list[int]) -> list[int] | None:
        """Indices of members whose gradient must be copied in; ``None`` if the bucket cannot
        step flat this time (a member without a usable dense gradient, or counters that
        disagree)."""
        if not self.synced or absent:
            return None
        views = self.grad_views
        if all(map(operator.is_, map(_grad_of, self.members), views)):
            return []
        repair = []
        for i, (p, v) in enumerate(zip(self.members, views)):
            g = p.grad
            if g is v:
                continue
            if (g is None or g.is_sparse or g.shape != v.shape or g.device != v.device
                    or g.dtype != v.dtype):  # (another dtype: the per-tensor walk decides)
                return None
            repair.append(i)
        return repair

    def repair(self, idx: list[int]) -> None:
        """Copy replaced gradients into the flat buffer and point ``p.grad`` back at it."""
        if not idx:
            return
        with torch.no_grad():
            torch._foreach_copy_([self.grad_views[i] for i in idx],
                                 [self.members[i].grad for i in idx])
        for i in idx:
            self.members[i].grad = self.grad_views[i]

    # ------------------------------------------------------------------ state layout
    def init_state(self, opt: OptimizerBase, group: dict[str, Any]) -> None:
        """Create the whole buffer's state with the optimizer's own ``_init_state``."""
        opt._init_state(group, self.flat_p, self.state)
        self.link(opt, group)

    def link(self, opt: OptimizerBase, group: dict[str, Any]) -> None:
        """(Re)build the chunk states and the members' ``opt.state[p]`` from ``self.state``."""
        from ._base import PARAM_SHAPE

        self.ready = True
        self._had_state = bool(self.state)
        self.chunk_states = [{} for _ in self.spans]
        self._vecs = {}
        member_states: list[dict[str, Any]] = [{} for _ in self.members]
        specs = [opt._state_spec(group, p) for p in self.members]
        for key, v in self.state.items():
            if isinstance(v, Tensor) and v.dim() == 1 and v.numel() == self.numel:
                for cs, (a, b) in zip(self.chunk_states, self.spans):
                    cs[key] = v[a:b]
                shapes = [p.shape if sp.get(key) == PARAM_SHAPE else (k,)
                          for p, k, sp in zip(self.members, self.numels, specs)]
                for ms, view in zip(member_states, self._views(v, shapes)):
                    ms[key] = view
            elif isinstance(v, Tensor) and v.dim() == 0:
                for cs in self.chunk_states:
                    cs[key] = v.clone()
                vec = self._vecs[key] = v.reshape(1).repeat(len(self.members))
                for i, ms in enumerate(member_states):
                    ms[key] = vec[i]
            elif v is None or isinstance(v, (int, float, bool)):
                for st in (*self.chunk_states, *member_states):
                    st[key] = v
            else:
                raise RuntimeError(  # an optimizer with state flat mode does not know how to split
                    f"{type(opt).__name__}: flat=True cannot lay out state {key!r} "
                    f"({type(v).__name__}); please report this"
                )
        for p, ms in zip(self.members, member_states):
            if ms or p in opt.state:  # stateless (plain SGD): no entries, as in torch.optim
                opt.state[p] = ms
        self._member_states = member_states  # the same dicts: updated without hashing tensors

    def after_step(self, opt: OptimizerBase, group: dict[str, Any]) -> None:
        """Bring the members' counters up to date; adopt state created during the step."""
        if self._had_state and not self.state:  # creation rolled back (Prodigy's rejects)
            for p in self.members:
                opt.state.pop(p, None)
            self.chunk_states, self.ready, self._had_state = [], False, False
            return
        if not self.state:  # stateless (plain SGD): nothing to keep up to date
            return
        first = self.chunk_states[0]
        fresh = [k for k, v in first.items()
                 if isinstance(v, Tensor) and v.dim() == 1 and self.state.get(k) is None]
        if fresh:  # e.g. SGD's momentum buffer, created from the first gradient
            for k in fresh:
                self.state[k] = torch.cat([cs[k].reshape(-1) for cs in self.chunk_states])
            scalars = {k: first[k] for k in self._vecs}
            self.link(opt, group)
            for k, v in scalars.items():
                self._vecs[k].fill_(v)
                for cs in self.chunk_states:
                    cs[k].copy_(v)
            return
        for k, vec in self._vecs.items():
            vec.fill_(first[k])
        for k, v in first.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and v != self.state[k]:
                self.state[k] = v
                for ms in self._member_states:
                    ms[k] = v

    def relink_from_members(self, opt: OptimizerBase, group: dict[str, Any]) -> None:
        """Rebuild the flat state from the members' ``opt.state`` (after ``load_state_dict``,
        or when counters that drifted apart agree again). Leaves the bucket unsynced (stepping
        per tensor) if the members' states cannot form one flat state."""
        states = [opt.state.get(p) for p in self.members]
        counters = _counter_keys(opt, group, self.members[0])
        self.synced = False
        if all(not st for st in states):
            self.state, self.chunk_states, self._vecs = {}, [], {}
            self.ready = self._had_state = False
            self.synced = True
            return
        if any(not st for st in states) or len({tuple(st) for st in states}) != 1:
            return
        new: dict[str, Any] = {}
        with torch.no_grad():
            for key in states[0]:
                vals = [st[key] for st in states]
                if all(v is None for v in vals):
                    new[key] = None
                elif key in counters and all(isinstance(v, Tensor) for v in vals):
                    if not bool((torch.stack(vals) == vals[0]).all()):
                        return
                    new[key] = vals[0].detach().clone()
                elif key in counters and all(isinstance(v, (int, float)) for v in vals):
                    if len(set(vals)) != 1:
                        return
                    new[key] = vals[0]
                elif all(isinstance(v, Tensor) and v.layout == torch.strided for v in vals):
                    parts = []
                    for v, k in zip(vals, self.numels):
                        if v.numel() == k:
                            parts.append(v.detach().reshape(-1))
                        elif v.numel() == 1:  # Prodigy's 0-dim p0 of an all-zero parameter
                            parts.append(v.detach().reshape(1).expand(k))
                        else:
                            return
                    if len({t.dtype for t in parts}) != 1 or len({t.device for t in parts}) != 1:
                        return
                    new[key] = torch.cat(parts)
                else:
                    return
        self.state = new
        self.link(opt, group)
        self.synced = True

    def regroup(self, opt: OptimizerBase, group: dict[str, Any]) -> list[FlatBucket]:
        """An unsynced bucket whose members all have gradients again: relink it if the counters
        agree, else split it into runs of consecutive members whose states agree (e.g. a layer
        frozen for a while lags the rest by some steps), each a bucket over the same storage."""
        self.relink_from_members(opt, group)
        if self.synced:
            return [self]
        counters = _counter_keys(opt, group, self.members[0])
        sigs = [_signature(opt.state.get(p), counters) for p in self.members]
        runs, start = [], 0
        for i in range(1, len(sigs) + 1):
            if i == len(sigs) or sigs[i] != sigs[start]:
                runs.append((start, i))
                start = i
        if len(runs) == 1:
            return [self]
        parts = []
        for i, j in runs:
            a, b = self.offsets[i], self.offsets[j - 1] + self.numels[j - 1]
            nb = FlatBucket(self.members[i:j], self.indices[i:j], self.whole,
                            parent=(self.flat_p[a:b], self.flat_g[a:b], self.grad_views[i:j],
                                    self.got_grad[i:j]))
            nb.relink_from_members(opt, group)
            parts.append(nb)
        self.close()
        return parts

    def zero_grad(self, set_to_none: bool) -> None:
        """Zero the flat gradient and point every member's ``.grad`` back at its view; a member
        that no longer requires grad (frozen) gets ``None`` as without ``flat``, so that it
        skips the step exactly as torch.optim would skip it."""
        self.flat_g.zero_()
        self.got_grad = [not set_to_none] * len(self.members)
        for p, v in zip(self.members, self.grad_views):
            if set_to_none and not p.requires_grad:
                p.grad = None
            elif p.grad is not v:
                p.grad = v


_grad_of = operator.attrgetter("grad")


def _counter_keys(opt: OptimizerBase, group: dict[str, Any], p: Tensor) -> set[str]:
    """State keys that are per-parameter counters (``step``), not buffers shaped like ``p``."""
    from ._base import SCALAR

    return {k for k, v in opt._state_spec(group, p).items() if v == SCALAR}


def _signature(st: dict[str, Any] | None, counters: set[str]) -> Any:
    """What must agree between members stepped as one bucket: the state keys and counters."""
    if not st:
        return None
    vals = tuple((k, float(st[k]) if isinstance(st[k], Tensor) else st[k])
                 for k in sorted(counters) if k in st)
    return tuple(sorted(st)), vals


def dissolve_warning(owner: str) -> None:
    warnings.warn(
        f"{owner}(flat=True): a parameter's storage was replaced (p.data = ..., model.to(...)); "
        "its flat bucket is dissolved and those parameters step one by one from now on",
        RuntimeWarning, stacklevel=4,
    )
