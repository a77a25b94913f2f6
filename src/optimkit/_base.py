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

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor

from ._flatten import FlatBucket, build_buckets, dissolve_warning
from ._impl import Impl, check_impl_flags, resolve_impl
from ._torch_compat import scalar_dtype
from ._validation import check_bool

ParamsT = Iterable[Tensor] | Iterable[dict[str, Any]] | Iterable[tuple[str, Tensor]]

#: markers used in ``_state_spec``
PARAM_SHAPE = "param"  # same shape as the parameter
SCALAR = "scalar"  # one element (step counters)
ANY = "any"  # no shape constraint


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


class OptimizerBase(torch.optim.Optimizer):
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
    #: sparse gradients are handled (only Adagrad, as in torch)
    _supports_sparse: ClassVar[bool] = False
    #: the class has a torch.compile single-pass update (``compile=True``, see _compiled.py)
    _has_compiled: ClassVar[bool] = False

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
        params = param_group.get("params")
        plist = [params] if isinstance(params, Tensor) else list(params or [])
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
        super().add_param_group(param_group)
        if self._flat:
            gi = len(self.param_groups) - 1
            self._buckets[gi] = build_buckets(self.param_groups[gi]["params"], whole=self._compile)

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        if not self._fused_in_group:  # torch pickles only defaults, state and param_groups
            state["_fused"] = getattr(self, "_fused", None)
        state["_compile"] = getattr(self, "_compile", False)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        if not hasattr(self, "_buckets"):
            # An unpickled copy (pickle, deepcopy) steps per tensor: its parameters are new
            # tensors that do not share the original's flat buffers. (torch's load_state_dict
            # also calls __setstate__, on a live optimizer: its buckets stay.)
            self._flat = False
            self._buckets = {}
            self._outside = {}
        self.__dict__.setdefault("_compile", False)
        # Checkpoints written before a key existed still load: fill in today's defaults.
        for group in self.param_groups:
            for k, v in self.defaults.items():
                group.setdefault(k, v)
        if self._tensor_steps:
            self._normalize_steps()

    def _normalize_steps(self) -> None:
        """Bring every ``step`` counter to torch.optim's non-fused layout: a 0-dim CPU tensor.

        Old checkpoints hold Python numbers; torch's fused/capturable runs keep the counter on
        the parameter's device. Both load into the layout our paths expect.
        """
        for st in self.state.values():
            if not isinstance(st, dict) or "step" not in st:
                continue
            s = st["step"]
            if not isinstance(s, Tensor):
                st["step"] = torch.tensor(float(s), dtype=scalar_dtype())
            elif not s.is_cpu:
                st["step"] = s.detach().to("cpu")

    # ----------------------------------------------------------------------------- step
    def _gather(self, gi: int, group: dict[str, Any]) -> GroupWork:
        owner = type(self).__name__
        params, grads = [], []
        flat_work, per_tensor = self._plan_buckets(gi, group)
        for pi, p in per_tensor:
            g = p.grad
            if g is None:
                continue
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
        for b, _ in flat_work:
            params.extend(b.chunk_p)
            grads.extend(b.chunk_g)
        fused = self._fused_flag(group)
        has_fused = self._has_fused and self._fused_applies(group)
        if not has_fused:
            fused = None  # no kernel for this group's options: the policy as without one
        impl = resolve_impl(group.get("foreach"), fused, has_fused, params,
                            self._fused_broken, owner, grads, self._loop_on_cpu)
        if self._compile:
            impl = "compiled"
        return GroupWork(group, params, grads, [], impl, flat_work)

    def _plan_buckets(
        self, gi: int, group: dict[str, Any],
    ) -> tuple[list[tuple[FlatBucket, list[int]]], list[tuple[int, Tensor]]]:
        """Which of this group's flat buckets step flat this time, and the (index, parameter)
        pairs the per-tensor gather walks. Changes nothing except re-laying state whose
        values stay the same."""
        buckets = self._buckets.get(gi)
        if buckets is None:
            return [], list(enumerate(group["params"]))
        outside = self._outside.get(gi)
        if outside is None:
            inside = {id(p) for b in buckets for p in b.members}
            outside = self._outside[gi] = [(i, p) for i, p in enumerate(group["params"])
                                           if id(p) not in inside]
        out, split = [], []
        for b in list(buckets):
            if not b.intact():
                buckets.remove(b)
                self._outside.pop(gi, None)
                split.extend(zip(b.indices, b.members))
                dissolve_warning(type(self).__name__)
                continue
            parts = [b]
            if not b.synced and all(p.grad is not None for p in b.members):
                parts = b.regroup(self, group)  # counters may agree again, or in runs
                if len(parts) > 1:
                    i = buckets.index(b)
                    buckets[i:i + 1] = parts
            for part in parts:
                plan = part.plan()
                if plan is None:  # members step one by one this time
                    split.extend(zip(part.indices, part.members))
                    continue
                out.append((part, plan))
        if split:
            return out, sorted(outside + split, key=lambda ip: ip[0])
        return out, outside

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
        # Everything that can fail is checked for every group before any state is touched.
        works = [self._gather(gi, g) for gi, g in enumerate(self.param_groups)]
        for work in works:
            n_plain = len(work.params) - sum(len(b.chunk_p) for b, _ in work.buckets)
            for p in work.params[:n_plain]:
                state = self.state[p]
                if len(state) == 0:
                    self._init_state(work.group, p, state)
                work.states.append(state)
            for b, repair in work.buckets:
                b.repair(repair)
                if not b.ready:
                    b.init_state(self, work.group)
                work.states.extend(b.chunk_states)
        try:
            self._apply(works)
        finally:
            for work in works:
                for b, _ in work.buckets:
                    b.after_step(self, work.group)
            self._note_unsynced(works)
        return loss

    def _note_unsynced(self, works: list[GroupWork]) -> None:
        """Members of a flat bucket that stepped one by one: their counters may now differ."""
        for gi, work in enumerate(works):
            flat_ids = {id(b) for b, _ in work.buckets}
            for b in self._buckets.get(gi, ()):
                if id(b) not in flat_ids and any(p.grad is not None for p in b.members):
                    b.synced = False

    def zero_grad(self, set_to_none: bool = True) -> None:
        """As ``torch.optim.Optimizer.zero_grad``; with ``flat=True`` the flat gradient buffers
        are zeroed instead (gradients stay views of them, never ``None``)."""
        if not self._buckets:
            return super().zero_grad(set_to_none)
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

    # ----------------------------------------------------------------------- state_dict
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state_dict (ours or torch.optim's), after checking all of it."""
        self._check_state_dict(state_dict)
        super().load_state_dict(state_dict)
        for gi, buckets in self._buckets.items():
            for b in buckets:
                b.relink_from_members(self, self.param_groups[gi])

    def _check_state_dict(self, sd: Any) -> None:
        owner = type(self).__name__
        bad = f"{owner}.load_state_dict: malformed state_dict"
        if not isinstance(sd, dict) or "state" not in sd or "param_groups" not in sd:
            raise ValueError(f"{bad}: expected a dict with keys 'state' and 'param_groups'")
        groups, state = sd["param_groups"], sd["state"]
        if not isinstance(groups, list) or not isinstance(state, dict):
            raise ValueError(f"{bad}: 'param_groups' must be a list and 'state' a dict")
        if len(groups) != len(self.param_groups):
            raise ValueError(
                f"{bad}: it has {len(groups)} param groups, this optimizer has {len(self.param_groups)}"
            )
        id_to_param: dict[Any, tuple[dict, Tensor]] = {}
        for gi, (saved, mine) in enumerate(zip(groups, self.param_groups)):
            if not isinstance(saved, dict) or "params" not in saved:
                raise ValueError(f"{bad}: param group {gi} has no 'params'")
            if len(saved["params"]) != len(mine["params"]):
                raise ValueError(
                    f"{bad}: param group {gi} has {len(saved['params'])} parameters, "
                    f"this optimizer's has {len(mine['params'])}"
                )
            merged = {**self.defaults, **{k: v for k, v in saved.items() if k not in ("params", "param_names")}}
            try:
                # The same checks as the constructor and add_param_group: a checkpoint must not
                # bring in flags those refuse (fused=True without a fused kernel, capturable=True).
                check_impl_flags(owner, merged.get("foreach"), merged.get("fused"), self._has_fused)
                _refuse_unsupported(owner, merged)
                self._validate_group(merged)
            except ValueError as e:
                raise ValueError(f"{bad}: param group {gi}: {e}") from None
            for pid, p in zip(saved["params"], mine["params"]):
                id_to_param[pid] = (merged, p)
        for pid, st in state.items():
            if pid not in id_to_param:
                raise ValueError(f"{bad}: state for unknown parameter id {pid!r}")
            if not isinstance(st, dict):
                raise ValueError(f"{bad}: state of parameter {pid!r} is not a dict")
            if not st:
                continue
            group, p = id_to_param[pid]
            for key, spec in self._state_spec(group, p).items():
                if key not in st:
                    raise ValueError(f"{bad}: state of parameter {pid!r} misses key {key!r}")
                _check_state_value(bad, pid, key, st[key], spec, p)


def _refuse_unsupported(owner: str, group: dict[str, Any]) -> None:
    for flag in ("capturable", "differentiable"):
        if group.get(flag):
            raise ValueError(
                f"{owner}: {flag}=True is not supported by optimkit; use torch.optim.{owner} "
                "if you need it"
            )


def _check_state_value(bad: str, pid: Any, key: str, v: Any, spec: Any, p: Tensor) -> None:
    if spec == ANY:
        return
    if spec == SCALAR:
        n = v.numel() if isinstance(v, Tensor) else (1 if isinstance(v, (int, float)) else -1)
        if n != 1:
            raise ValueError(f"{bad}: state[{pid!r}][{key!r}] must be a scalar, got {_describe(v)}")
        return
    want = tuple(p.shape) if spec == PARAM_SHAPE else tuple(spec)
    if not isinstance(v, Tensor) or tuple(v.shape) != want:
        raise ValueError(
            f"{bad}: state[{pid!r}][{key!r}] has {_describe(v)}, expected shape {want}"
        )


def _describe(v: Any) -> str:
    if isinstance(v, Tensor):
        return f"shape {tuple(v.shape)}"
    return f"type {type(v).__name__}"
