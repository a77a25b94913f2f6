"""OptimizerBase: the mechanics every optimkit optimizer shares, written once.

A subclass supplies only what is specific to its algorithm:

* ``_validate_group(group)``  range checks on one param group's hyperparameters
  (called for the constructor's defaults, every ``add_param_group`` and every loaded
  state_dict, *before* anything is changed);
* ``_init_state(group, p, state)``  lazily allocate the state of one parameter;
* ``_state_spec(group, p)``  the state keys a stepped parameter must have and their shapes
  (used to reject a malformed state_dict before it is loaded);
* ``_update(work)``  the math for one param group, dispatching on ``work.impl`` to the
  per-tensor reference, the foreach path or the fused path.

``step()`` gathers every group's (params, grads, state) first and raises on anything it
cannot handle (sparse or complex gradients) *before* touching a parameter or a state
buffer, so a step that cannot be taken leaves everything exactly as it was.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from typing import Any, ClassVar

import torch
from torch import Tensor

from ._flatten import FlatBucket, build_buckets, dissolve_warning, tied_params
from ._impl import Impl, ImplFacts, check_impl_flags, resolve_impl, run_serially
from ._state_dict import StateDictMixin
from ._statespec import ANY, PARAM_SHAPE, SCALAR, check_state_shapes
from ._step import NO_STATE, GroupWork, gather_dense, settings_key
from ._validation import check_bool, check_fits_dtypes, refuse_unsupported as _refuse_unsupported

ParamsT = Iterable[Tensor] | Iterable[dict[str, Any]] | Iterable[tuple[str, Tensor]]

__all__ = ["ANY", "PARAM_SHAPE", "SCALAR", "GroupWork", "OptimizerBase", "ParamsT"]


class OptimizerBase(StateDictMixin, torch.optim.Optimizer):
    """Base class of every optimkit optimizer (a ``torch.optim.Optimizer``)."""

    #: this optimizer has a fused single-pass kernel (``fused=True`` is allowed)
    _has_fused: ClassVar[bool] = False
    #: (device type, dtype) pairs where torch's fused kernel is known to be wrong
    _fused_broken: ClassVar[frozenset[tuple[str, torch.dtype]]] = frozenset()
    #: with no flags and no fused kernel, large CPU tensors run the per-tensor loop, which is
    #: faster there than foreach (see _impl._large_cpu_tensors); Prodigy's foreach is not
    _loop_on_cpu: ClassVar[bool] = True
    #: False where torch's class of the same name has no "fused" param-group key (RMSprop,
    #: RAdam): the choice is then held on the optimizer, so group keys (and state_dicts) stay
    #: torch's, and it survives pickling
    _fused_in_group: ClassVar[bool] = True
    #: state["step"] is a 0-dim tensor as torch.optim keeps it (Prodigy: a Python int)
    _tensor_steps: ClassVar[bool] = False
    #: sparse gradients are handled (SGD and Adagrad, as in torch.optim)
    _supports_sparse: ClassVar[bool] = False
    #: the class has a torch.compile single-pass update (``compile=True``, see _compiled.py)
    _has_compiled: ClassVar[bool] = False
    #: every per-parameter state key the class can keep (whatever its options); a state_dict
    #: with others is another optimizer's and is refused. ``None``: not checked.
    _state_keys: ClassVar[frozenset[str] | None] = None
    #: ``_validate_group`` reads nothing but the group's values: step() then skips groups
    #: whose settings (``_step.settings_key``) already passed it
    _pure_validation: ClassVar[bool] = False
    #: hyperparameters the update hands to torch as scalars in the parameters' dtype: each
    #: must fit it (``_validation.check_fits_dtypes``, checked with the parameters at hand)
    _dtype_bounded: ClassVar[tuple[str, ...]] = ("lr", "weight_decay")

    def __init__(self, params: ParamsT, defaults: dict[str, Any], *, flat: bool = False,
                 compile: bool = False) -> None:
        owner = type(self).__name__
        check_bool(owner, "flat", flat)
        check_bool(owner, "compile", compile)
        if compile and not self._has_compiled:
            raise ValueError(
                f"{owner}: invalid compile=True; {owner} has no compiled path (its default is "
                "already a single-pass kernel, or it has none yet)"
            )
        # Held on the optimizer, not in the groups, so group keys stay torch.optim's.
        self._flat = flat
        self._compile = compile
        self._buckets: dict[int, list[FlatBucket]] = {}
        self._outside: dict[int, list[tuple[int, Tensor]]] = {}  # params in no bucket, per group
        check_impl_flags(owner, defaults.get("foreach"), defaults.get("fused"), self._has_fused)
        _refuse_unsupported(owner, defaults)
        if not self._fused_in_group:
            self._fused = defaults.pop("fused", None)
        if isinstance(params, Tensor):
            raise TypeError(
                f"{owner}: params must be an iterable of Tensors or dicts, got a single Tensor; "
                "pass model.parameters() or [tensor]"
            )
        params = list(params)
        if len(params) == 0:
            raise ValueError(f"{owner}: got an empty parameter list; nothing to optimize")
        if flat:
            # Tied weights (two Parameters over one memory) may sit in different groups: find
            # them over every group before the first group is flattened.
            tensors: list[Any] = []
            for g in params:
                if isinstance(g, dict):
                    g["params"] = _materialize_params(owner, g)
                    tensors.extend(g["params"])
                else:
                    tensors.append(g)
            self._tied = tied_params([t[1] if isinstance(t, tuple) else t for t in tensors])
        self._validate_group(dict(defaults))
        super().__init__(params, defaults)

    # ----------------------------------------------------------------------------- hooks
    def _validate_group(self, group: dict[str, Any]) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _init_state(self, group: dict[str, Any], p: Tensor, state: dict[str, Any]) -> None:
        raise NotImplementedError  # pragma: no cover - abstract

    def _state_spec(self, group: dict[str, Any], p: Tensor) -> dict[str, Any]:
        raise NotImplementedError  # pragma: no cover - abstract

    def _update(self, work: GroupWork) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _check_settings(self, group: dict[str, Any], fused: bool | None) -> None:
        """The checks of a group's values that step() and load_state_dict run (the
        implementation flags, with ``fused`` as the caller reads it; the torch.optim flags
        optimkit lacks; the class's ranges). Changes nothing. (add_param_group runs the same,
        with the compile=True check between the first two.)"""
        owner = type(self).__name__
        check_impl_flags(owner, group.get("foreach"), fused, self._has_fused)
        _refuse_unsupported(owner, group)
        self._validate_group(group)

    def _state_layout(self, group: dict[str, Any]) -> Any:
        """The group settings the state's shapes depend on besides the parameters' shapes
        (Prodigy: ``slice_p``); a change re-checks them (``check_state_shapes``)."""
        return None

    def _keeps_state(self, group: dict[str, Any]) -> bool:
        """False where this group's update keeps no per-parameter state (SGD without
        momentum: ``_init_state`` leaves it empty): step() then looks none up."""
        return True

    def _fused_flag(self, group: dict[str, Any]) -> bool | None:
        """The ``fused=`` choice for ``group``: its key, or the optimizer's where torch's class
        has no such group key (``_fused_in_group``)."""
        return group.get("fused") if self._fused_in_group else getattr(self, "_fused", None)

    def _fused_applies(self, group: dict[str, Any]) -> bool:
        """Whether the fused path covers this group's options (RMSprop: not centered, ...)."""
        return True

    # ------------------------------------------------------------------- param groups
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        owner = type(self).__name__
        if not isinstance(param_group, dict):
            raise TypeError(f"{owner}: a param group must be a dict, got {type(param_group).__name__}")
        plist = _materialize_params(owner, param_group)
        # Written back (as torch does, in the caller's dict) before anything reads it again:
        # a generator such as model.parameters() can be consumed only once.
        param_group["params"] = plist
        for p in plist:
            if isinstance(p, tuple):  # named parameters
                p = p[1]
            if not isinstance(p, Tensor):
                raise TypeError(f"{owner}: can only optimize Tensors, got {type(p).__name__}")
            if not (p.is_leaf or p.retains_grad):
                raise ValueError(
                    f"{owner}: cannot optimize a non-leaf tensor (shape {tuple(p.shape)}); "
                    "pass the leaf parameter, e.g. model.parameters(), or call .detach().requires_grad_()"
                )
            if p.is_complex():
                raise ValueError(f"{owner}: complex parameters are not supported (shape {tuple(p.shape)})")
        # Validate the group as it will be (defaults filled in) before adding anything.
        merged = {**getattr(self, "defaults", {}), **{k: v for k, v in param_group.items() if k != "params"}}
        check_impl_flags(owner, merged.get("foreach"), merged.get("fused"), self._has_fused)
        fused = self._fused_flag(merged)
        if getattr(self, "_compile", False) and (merged.get("foreach") is not None or fused):
            raise ValueError(
                f"{owner}: compile=True chooses the implementation itself; leave foreach and "
                f"fused unset (got foreach={merged.get('foreach')!r}, fused={fused!r})"
            )
        _refuse_unsupported(owner, merged)
        self._validate_group(merged)
        check_fits_dtypes(owner, merged, self._dtype_bounded, plist)
        self._check_param_list(plist)
        with warnings.catch_warnings():
            # torch's own duplicate warning (ours, naming the optimizer, was just issued)
            warnings.filterwarnings("ignore", message="optimizer contains a parameter group "
                                    "with duplicate parameters")
            super().add_param_group(param_group)
        if self._flat:
            gi = len(self.param_groups) - 1
            self._tied = getattr(self, "_tied", frozenset()) | tied_params(
                [p for g in self.param_groups for p in g["params"]])
            self._buckets[gi] = build_buckets(self.param_groups[gi]["params"], whole=self._compile,
                                              tied=self._tied)

    def _check_param_list(self, plist: list[Any]) -> None:
        """torch.optim.Optimizer's checks of a new group's parameters, with messages that name
        the optimizer: all named or none, none already in another group (``ValueError``), and a
        warning for a parameter listed twice in the group."""
        owner = type(self).__name__
        named = [isinstance(p, tuple) for p in plist]
        if any(named) and not all(named):
            raise ValueError(
                f"{owner}: a param group mixes named parameters ((name, tensor) pairs, e.g. "
                "model.named_parameters()) and plain tensors; give all of them names or none"
            )
        tensors = [p[1] if isinstance(p, tuple) else p for p in plist]
        if self.param_groups and any(("param_names" in g) != all(named) for g in self.param_groups):
            if plist:
                raise ValueError(
                    f"{owner}: this param group's parameters are {'' if all(named) else 'not '}"
                    f"named but the existing groups' are {'not ' if all(named) else ''}named; "
                    "give every group named parameters or none"
                )
        ids = [id(t) for t in tensors]
        if len(set(ids)) != len(ids):
            warnings.warn(
                f"{owner}: a param group lists the same parameter more than once; it is stepped "
                "once per listing (as torch.optim does, which will make this an error: "
                "github.com/pytorch/pytorch/issues/40967)",
                UserWarning, stacklevel=4,
            )
        existing = {id(p) for g in self.param_groups for p in g["params"]}
        if existing.intersection(ids):
            raise ValueError(
                f"{owner}: some parameters appear in more than one parameter group; each "
                "parameter may belong to one group only"
            )

    # ----------------------------------------------------------------------------- step
    def _gather(self, gi: int, group: dict[str, Any]) -> GroupWork:
        if gi not in self._buckets:  # the usual group, read in bulk (None: needs this walk)
            dense = gather_dense(self, gi, group)
            if dense is not None:
                work, facts, sig = dense
                work.impl = self._pick_impl(gi, group, work.params, work.grads,
                                            enumerate(group["params"]), facts, sig)
                return work
        owner = type(self).__name__
        params, grads, shapes = [], [], []
        mixed = False  # a gradient in another dtype than its parameter
        flat_work, per_tensor = self._plan_buckets(gi, group)
        for pi, p in per_tensor:
            g = p.grad
            if g is None:
                continue
            if g.dtype != p.dtype:
                # torch's p.grad_dtype (e.g. float32 gradients of bfloat16 weights):
                # torch.optim's per-tensor loop steps it where its in-place ops promote across
                # dtypes, and so does our reference; elsewhere torch fails part-way
                if not (g.is_floating_point() and self._mixed_dtype_ok(group)):
                    raise RuntimeError(
                        f"{owner}: gradient dtype {g.dtype} does not match parameter dtype "
                        f"{p.dtype} (param group {gi}, parameter {pi}, shape {tuple(p.shape)}); "
                        f"nothing was changed. torch.optim's {owner} cannot step it either (its "
                        "state is kept in the parameter's dtype); cast the gradient with "
                        "p.grad = p.grad.to(p.dtype), or use optimkit.Prodigy (computes in "
                        "float32)")
                mixed = True
            if g.is_sparse and not self._supports_sparse:
                raise RuntimeError(
                    f"{owner} does not support sparse gradients (param group {gi}, parameter {pi}, "
                    f"shape {tuple(p.shape)}); use optimkit.Adagrad, or torch.optim.SparseAdam"
                )
            if g.shape != p.shape:
                raise RuntimeError(
                    f"{owner}: gradient shape {tuple(g.shape)} does not match parameter shape "
                    f"{tuple(p.shape)} (param group {gi}, parameter {pi})"
                )
            params.append(p)
            grads.append(g)
            shapes.append(p.shape)
        for b, _ in flat_work:
            params.extend(b.chunk_p)
            grads.extend(b.chunk_g)
        impl = "reference" if mixed else self._pick_impl(gi, group, params, grads, per_tensor)
        return GroupWork(group, params, grads, [], impl, flat_work, shapes=shapes)

    def _pick_impl(self, gi: int, group: dict[str, Any], params: list[Tensor],
                   grads: list[Tensor], per_tensor: Iterable[tuple[int, Tensor]],
                   facts: ImplFacts | None = None,
                   sig: tuple[torch.dtype, ...] | None = None) -> Impl:
        """The implementation for this step of group ``gi`` (``resolve_impl``; ``facts`` about
        the tensors when the caller has read them; ``sig``: see ``_dtypes_moved``)."""
        fused = self._fused_flag(group)
        has_fused = self._has_fused and self._fused_applies(group)
        if not has_fused:
            fused = None  # no kernel for this group's options: the policy as without one
        impl = resolve_impl(group.get("foreach"), fused, has_fused, params, self._fused_broken,
                            type(self).__name__, grads, self._loop_on_cpu, facts=facts)
        if self._compile:
            impl = "compiled"
        if self._dtypes_moved(gi, group, per_tensor, sig):
            impl = "reference"
        return impl

    # ------------------------------------------------------- parameters that changed dtype
    def _state_dtype_of(self, p: Tensor) -> torch.dtype:
        """The dtype this optimizer keeps ``p``'s state buffers in (its own, by default)."""
        return p.dtype

    def _mixed_dtype_ok(self, group: dict[str, Any]) -> bool:
        """Whether torch.optim's per-tensor loop keeps stepping this group when the parameters'
        dtype differs from their state's (``model.double()`` after the optimizer was built):
        its in-place ops then compute in the promoted dtype and write back into each buffer's
        own dtype. Our reference makes the same calls, so such groups take it. Where torch
        fails (a ``lerp_`` between dtypes: Adam, RAdam, centered RMSprop) we refuse instead,
        before anything is written."""
        return False

    def _dtypes_moved(self, gi: int, group: dict[str, Any],
                      params: Iterable[tuple[int, Tensor]],
                      sig: tuple[torch.dtype, ...] | None = None) -> bool:
        """True when some of ``params`` ((index, parameter) pairs: the group's parameters
        stepped one by one) has state in another dtype than it should (the model was moved to
        another dtype after the optimizer was built): the group then runs the per-tensor
        reference as torch.optim does, or raises before any write. Members of flat buckets need no check: a move
        replaces their storage, which dissolves the bucket and puts them in ``params``.

        Cheap in the usual case: the full check runs only when the parameters' dtypes differ
        from the last step's. ``sig``: those dtypes, when the caller has read them already."""
        if sig is None:
            params = list(params)
            sig = tuple(p.dtype for _, p in params)
        cache = self.__dict__.setdefault("_dtype_sig", {})
        hit = cache.get(gi)
        if hit is not None and hit[0] == sig:
            return hit[1]
        moved = None
        for pi, p in params:
            st = self.state.get(p)
            if not st:
                continue
            want = self._state_dtype_of(p)
            for key, spec in self._state_spec(group, p).items():
                v = st.get(key)
                if spec == PARAM_SHAPE and isinstance(v, Tensor) and v.dtype != want:
                    moved = (pi, p, key, v.dtype)
                    break
            if moved:
                break
        if moved and not self._mixed_dtype_ok(group):
            owner = type(self).__name__
            pi, p, key, dt = moved
            raise RuntimeError(
                f"{owner}: parameter {pi} of param group {gi} (shape {tuple(p.shape)}) is "
                f"{p.dtype} but its state {key!r} is {dt}: the model was moved to another dtype "
                f"after the optimizer was built. torch.optim.{owner} cannot step this either; "
                "nothing was changed. Build a new optimizer for the moved model and load this "
                "one's state into it (load_state_dict casts the state to the parameters' dtype): "
                f"new = {owner}(model.parameters(), ...); new.load_state_dict(old.state_dict())"
            )
        cache[gi] = (sig, moved is not None)
        return moved is not None

    def _plan_buckets(
        self, gi: int, group: dict[str, Any],
    ) -> tuple[list[tuple[FlatBucket, list[int]]], list[tuple[int, Tensor]]]:
        """Which of this group's flat buckets step flat this time, and the (index, parameter)
        pairs the per-tensor gather walks. Changes nothing except re-laying state whose
        values stay the same."""
        buckets = self._buckets.get(gi)
        if buckets is None:
            return [], list(enumerate(group["params"]))
        self._drop_broken(gi)  # (forgets the cached outside list when it dissolves any)
        outside = self._outside.get(gi)
        if outside is None:
            outside = self._outside[gi] = self._outside_of(gi)
        out, split = [], []
        for b in list(buckets):
            b.stepped_alone = False
            absent = b.absent()
            parts = [b]
            if not b.synced and not absent:
                parts = b.regroup(self, group)  # counters may agree again, or in runs
                if len(parts) > 1:
                    i = buckets.index(b)
                    buckets[i:i + 1] = parts
            for part in parts:
                miss = absent if part is b else []
                plan = part.plan(miss)
                if plan is None:  # members with a gradient step one by one this time
                    skip = set(miss)
                    split.extend(ip for k, ip in enumerate(zip(part.indices, part.members))
                                 if k not in skip)
                    part.stepped_alone = len(skip) < len(part.members)
                    continue
                out.append((part, plan))
        if split:
            return out, sorted(outside + split, key=lambda ip: ip[0])
        return out, outside

    def _outside_of(self, gi: int) -> list[tuple[int, Tensor]]:
        """(index, parameter) of group ``gi``'s parameters that are in none of its buckets."""
        inside = {id(p) for b in self._buckets.get(gi, ()) for p in b.members}
        return [(i, p) for i, p in enumerate(self.param_groups[gi]["params"]) if id(p) not in inside]

    def _drop_broken(self, gi: int, grads: bool = False) -> bool:
        """Dissolve, for good and with a warning, group ``gi``'s buckets whose members no longer
        live in the flat buffers (``p.data = ...``, ``model.to(...)``). Members keep their state;
        one whose view received no gradient since ``zero_grad()`` gets ``p.grad = None``, which
        is what it would have without ``flat``."""
        buckets = self._buckets.get(gi, [])
        broken = [b for b in buckets if not b.intact(grads=grads)]
        for b in broken:
            for i in b.absent():
                p = b.members[i]
                if p.grad is b.grad_views[i]:
                    p.grad = None
            b.close()
            buckets.remove(b)
            dissolve_warning(type(self).__name__)
        if broken:
            self._outside.pop(gi, None)
        return bool(broken)

    def _apply(self, works: list[GroupWork]) -> None:
        """Run the update of every group; Prodigy overrides this (its step size is global)."""
        for work in works:
            if work.params:
                self._update(work)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Perform one optimization step; ``closure`` re-evaluates the model and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # Everything that can fail is checked for every group before any state is touched,
        # hyperparameters included: a scheduler or the user may have changed them since.
        passed = self.__dict__.setdefault("_passed", {}) if self._pure_validation else None
        for gi, g in enumerate(self.param_groups):
            key = settings_key(g) if passed is not None else None
            try:
                # a key equal to one that passed: these very settings passed (a stale key
                # only costs a re-check)
                if key is None or passed.get(gi) != key:
                    # the implementation flags too: a group edited after construction
                    self._check_settings(g, self._fused_flag(g))
                # every step: the parameters' dtypes may have changed since (model.half())
                check_fits_dtypes(type(self).__name__, g, self._dtype_bounded, g["params"])
            except ValueError as e:
                raise type(e)(f"{e} (param group {gi}, at step(); nothing was changed)") from None
            if key is not None:
                passed[gi] = key
        works = [self._gather(gi, g) for gi, g in enumerate(self.param_groups)]
        seen = self.__dict__.setdefault("_shapes_seen", {})
        for gi, work in enumerate(works):
            n_plain = len(work.params) - sum(len(b.chunk_p) for b, _ in work.buckets)
            plain = work.params[:n_plain] if work.buckets else work.params
            if not work.buckets and not self._keeps_state(work.group):
                work.states = [NO_STATE] * n_plain
                continue
            states = list(map(self.state.get, plain))
            if not all(states):  # some parameter steps for the first time
                for i, p in enumerate(plain):
                    if not states[i]:
                        state = states[i] = {}
                        self._init_state(work.group, p, state)
                        if state:  # a stateless optimizer (SGD without momentum) keeps no
                            self.state[p] = state  # entry, as torch.optim's state_dict has none
            layout = (work.shapes, self._state_layout(work.group))
            if seen.get(gi) != layout:  # a parameter's data replaced by another shape?
                check_state_shapes(self, gi, work.group, plain, states)
                seen[gi] = layout
            work.states.extend(states)
            for b, repair in work.buckets:
                b.repair(repair)
                if not b.ready:
                    b.init_state(self, work.group)
                work.states.extend(b.chunk_states)
        # one thread: no parallel region per small tensor (_impl; as single_threaded(), inline)
        threads = torch.get_num_threads() if self._serial_step(works) else 1
        try:
            if threads != 1:
                torch.set_num_threads(1)
            self._apply(works)
        finally:
            if threads != 1:
                torch.set_num_threads(threads)
            if self._buckets:
                for work in works:
                    for b, _ in work.buckets:
                        b.after_step(self, work.group)
                self._note_unsynced(works)
        return loss

    def _serial_step(self, works: list[GroupWork]) -> bool:
        """Whether this step runs on one thread (``_impl.run_serially``: every tensor small
        and on the CPU). Cached per layout of the step's tensors (how many per group, which
        first): the choice changes speed only, so a stale answer is never wrong. Not under
        torch.compile (a traced step) nor ``compile=True`` (inductor's kernels pick their
        own threads)."""
        if self._compile or torch.compiler.is_compiling():
            return False
        key = tuple((len(w.params), id(w.params[0]) if w.params else 0) for w in works)
        hit = self.__dict__.get("_serial_sig")
        if hit is not None and hit[0] == key:
            return hit[1]
        serial = run_serially(w.params for w in works)
        self.__dict__["_serial_sig"] = (key, serial)
        return serial

    def _note_unsynced(self, works: list[GroupWork]) -> None:
        """Members of a flat bucket that stepped one by one: their counters may now differ."""
        for gi, work in enumerate(works):
            flat_ids = {id(b) for b, _ in work.buckets}
            for b in self._buckets.get(gi, ()):
                if id(b) not in flat_ids and getattr(b, "stepped_alone", False):
                    b.synced = False

    def zero_grad(self, set_to_none: bool = True) -> None:
        """As ``torch.optim.Optimizer.zero_grad``; with ``flat=True`` the flat gradient buffers
        are zeroed instead (gradients stay views of them, never ``None``)."""
        if not self._buckets:
            return super().zero_grad(set_to_none)
        for gi in list(self._buckets):
            self._drop_broken(gi, grads=True)  # gradients no longer views: zeroed as plain ones
        members = set()
        for buckets in self._buckets.values():
            for b in buckets:
                b.zero_grad(set_to_none)
                members.update(id(p) for p in b.members)
        for group in self.param_groups:
            for p in group["params"]:
                if id(p) in members or p.grad is None:
                    continue
                if set_to_none:
                    p.grad = None
                else:
                    if p.grad.grad_fn is not None:
                        p.grad.detach_()
                    else:
                        p.grad.requires_grad_(False)
                    p.grad.zero_()

def _materialize_params(owner: str, param_group: dict[str, Any]) -> list[Any]:
    """A param group's ``"params"`` as a list, accepting every form torch.optim accepts: a
    Tensor, a list or tuple, any iterable (a generator such as ``model.parameters()``, a
    ``filter``, ``named_parameters()``). A set is refused as torch refuses it (its order, and
    so the state_dict's parameter numbering, changes between runs)."""
    if "params" not in param_group:
        raise ValueError(f"{owner}: a param group needs a 'params' entry, got keys {sorted(param_group)}")
    params = param_group["params"]
    if isinstance(params, Tensor):
        return [params]
    if isinstance(params, (set, frozenset)):
        raise TypeError(
            f"{owner}: a param group's 'params' is a set, whose order changes between runs; "
            "pass a list (e.g. list(model.parameters()))"
        )
    if isinstance(params, dict) or not hasattr(params, "__iter__"):
        raise TypeError(
            f"{owner}: a param group's 'params' must be a Tensor or an iterable of Tensors "
            f"(or of (name, Tensor) pairs), got {type(params).__name__}"
        )
    return list(params)
