"""The checkpoint side of :class:`optimkit._base.OptimizerBase`: ``load_state_dict`` (atomic,
in torch.optim's hook order, every check before anything is replaced) and pickling."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ._statespec import check_state_value
from ._torch_compat import scalar_dtype
from ._validation import check_fits_dtypes


class StateDictMixin:
    """``load_state_dict`` and pickling for :class:`~optimkit._base.OptimizerBase` (which
    supplies ``_validate_group``, ``_state_spec``, ``_state_keys`` and the flat buckets)."""

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

    # ----------------------------------------------------------------------- state_dict
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state_dict (ours or torch.optim's), atomically.

        In torch.optim's order: the ``register_load_state_dict_pre_hook`` hooks run first (a
        hook may adapt an old checkpoint), then every check (:meth:`_check_state_dict`) runs
        before anything is replaced, then the state is loaded (:meth:`_load_checked`) and the
        post-hooks run. A state_dict that is refused raises ``ValueError`` and changes nothing.
        """
        if not isinstance(state_dict, dict):
            raise ValueError(
                f"{type(self).__name__}.load_state_dict: expected a dict, got "
                f"{type(state_dict).__name__}"
            )
        sd = state_dict.copy()  # shallow, as torch: hooks may replace entries
        for hook in self._optimizer_load_state_dict_pre_hooks.values():
            out = hook(self, sd)
            if out is not None:
                sd = out
        self._check_state_dict(sd)
        self._load_checked(sd)
        for hook in self._optimizer_load_state_dict_post_hooks.values():
            hook(self)

    def _load_checked(self, sd: dict[str, Any]) -> None:
        """Load a state_dict that passed :meth:`_check_state_dict` (subclasses extend this to
        restore what torch's loader does not know about). torch's own loader runs with the
        hooks switched off: they ran (pre) and run (post) in :meth:`load_state_dict`."""
        pre = self._optimizer_load_state_dict_pre_hooks
        post = self._optimizer_load_state_dict_post_hooks
        self._optimizer_load_state_dict_pre_hooks = type(pre)()
        self._optimizer_load_state_dict_post_hooks = type(post)()
        try:
            torch.optim.Optimizer.load_state_dict(self, sd)
        finally:
            self._optimizer_load_state_dict_pre_hooks = pre
            self._optimizer_load_state_dict_post_hooks = post
        self._after_load(sd)
        self.__dict__.pop("_dtype_sig", None)
        for gi, buckets in self._buckets.items():
            for b in buckets:
                b.relink_from_members(self, self.param_groups[gi])

    def _after_load(self, sd: dict[str, Any]) -> None:
        """Adjust the state torch's loader wrote (e.g. recast to a ``state_dtype``); runs before
        flat buckets are relinked to it."""

    def _check_state_dict(self, sd: Any) -> None:
        """Every check a state_dict must pass before anything is loaded; changes nothing.
        Subclasses extend it (call ``super()`` first)."""
        owner = type(self).__name__
        bad = f"{owner}.load_state_dict: malformed state_dict"
        if isinstance(sd, dict) and "lookahead" in sd:
            raise ValueError(
                f"{owner}.load_state_dict: this is a Lookahead state_dict (it has a 'lookahead' "
                f"entry with the slow weights); load it into optimkit.Lookahead({owner}(...)) with "
                "Lookahead.load_state_dict, or drop the 'lookahead' entry yourself to keep only "
                f"the {owner} state"
            )
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
                self._check_settings(merged, merged.get("fused"))
                check_fits_dtypes(owner, merged, self._dtype_bounded, mine["params"])
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
            known = self._state_keys
            if known is not None and not set(st) <= known:
                extra = sorted(str(k) for k in set(st) - known)
                raise ValueError(
                    f"{bad}: state of parameter {pid!r} has keys {extra} that {owner} never "
                    f"keeps (it keeps {sorted(known)}); is this another optimizer's state_dict?"
                )
            for key, spec in self._state_spec(group, p).items():
                if key not in st:
                    raise ValueError(f"{bad}: state of parameter {pid!r} misses key {key!r}")
                check_state_value(bad, pid, key, st[key], spec, p)
