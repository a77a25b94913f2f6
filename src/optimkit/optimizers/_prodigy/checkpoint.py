"""Prodigy's state_dict checks and dtype bookkeeping: a checkpoint is checked in full before
anything is replaced; loaded state keeps the dtypes Prodigy keeps; state of a parameter moved
to another dtype is recast once the step is known to be taken; an all-zero parameter's ``p0``
becomes prodigyopt's 0-dim zero."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from ..._base import GroupWork
from .common import _LOW_PRECISION, _is_dtensor, _local, _stat_dtype


class CheckpointMixin:
    """load_state_dict's Prodigy checks, the dtype recasts, the p0 shortcut."""

    # ------------------------------------------------------------------ state_dict
    # load_state_dict is the base's: pre-hooks, then _check_state_dict (everything below runs
    # before anything is replaced; the rounding generators are checked by the mixin and
    # restored only after), then torch's loader, then _after_load.
    def _check_state_dict(self, sd: Any) -> None:
        """The base's checks (structure, hyperparameters, state keys and shapes), then
        Prodigy's: the global scalars, ``p0``'s layout and the state's values."""
        super()._check_state_dict(sd)
        bad = f"{type(self).__name__}.load_state_dict: malformed state_dict"
        owners: dict[Any, tuple[dict[str, Any], Tensor]] = {}
        for gi, (saved, mine) in enumerate(zip(sd["param_groups"], self.param_groups)):
            merged = {**self.defaults,
                      **{k: v for k, v in saved.items() if k not in ("params", "param_names")}}
            where = f"{bad}: param group {gi}"
            for key in ("d", "d0", "d_max"):
                _check_loaded_real(where, key, merged[key], positive=True)
            for key in ("d_numerator", "d_hat", "d_denom"):
                _check_loaded_real(where, key, merged[key], positive=False)
            for key in ("k", "skipped_steps"):
                _check_loaded_count(where, key, merged[key])
            for pid, p in zip(saved["params"], mine["params"]):
                owners[pid] = (merged, p)
        for pid, st in sd["state"].items():
            if not st:
                continue
            group, p = owners[pid]
            for key in ("s", "p0", "exp_avg", "exp_avg_sq"):
                v = st.get(key)
                if v is None and key == "exp_avg":
                    continue  # beta1 == 0 (the base checked the keys the group needs)
                if not isinstance(v, Tensor) or not v.is_floating_point():
                    raise ValueError(f"{bad}: state[{pid!r}][{key!r}] must be a floating-point "
                                     f"tensor, got {_describe_value(v)}")
                loc = _local(v)
                if loc.numel() and not bool(torch.isfinite(loc).all()):
                    raise ValueError(f"{bad}: state[{pid!r}][{key!r}] holds NaN or inf (a "
                                     f"checkpoint of a run that diverged?)")
                if key == "exp_avg_sq" and loc.numel() and bool((loc < 0).any()):
                    raise ValueError(f"{bad}: state[{pid!r}]['exp_avg_sq'] holds negative values "
                                     f"(a second moment is >= 0)")
            p0 = st["p0"]
            if not _is_dtensor(p):
                want = (-(-p.numel() // group["slice_p"]),)
                if p0.dim() != 0 and tuple(p0.shape) != want:
                    raise ValueError(f"{bad}: state[{pid!r}]['p0'] has shape {tuple(p0.shape)}, "
                                     f"expected {want} (or a 0-dim zero for an all-zero parameter)")

    def _after_load(self, sd: dict[str, Any]) -> None:
        """torch casts loaded floating state to the parameter's dtype; put back the dtypes
        Prodigy keeps (float32 state for float16/bfloat16 parameters, or ``state_dtype``) from
        the saved values, without a double rounding through the parameter's dtype."""
        super()._after_load(sd)
        self.__dict__.pop("_recast_sig", None)
        if self._state_dtype is not None:
            self._recast_loaded_state(sd, ("s", "exp_avg", "exp_avg_sq"), self._state_dtype_of)
            self._recast_loaded_state(sd, ("p0",), lambda p: _stat_dtype(_local(p)))
            return
        saved_state = sd["state"]
        for saved, mine in zip(sd["param_groups"], self.param_groups):
            for pid, p in zip(saved["params"], mine["params"]):
                st = self.state.get(p)
                if p.dtype not in _LOW_PRECISION or not st or pid not in saved_state:
                    continue
                for key in ("s", "p0", "exp_avg", "exp_avg_sq"):
                    v = saved_state[pid].get(key)
                    if isinstance(v, Tensor):
                        st[key] = v.to(device=p.device, dtype=torch.float32, copy=True)

    def _state_dtype_of(self, p: Tensor) -> torch.dtype:
        return self._state_dtype or _stat_dtype(_local(p))

    def _settle_fresh(self, fresh: list[tuple[Tensor, dict[str, Any]]],
                      any_flags: list[float]) -> None:
        for (p, st), nonzero in zip(fresh, any_flags):
            # DTensor p0 keeps its layout (_init_state); a flat bucket's p0 stays one buffer
            # (its members' entries are views of it), so only plain parameters take the 0-dim
            # shortcut.
            if not nonzero and not _is_dtensor(p) and self.state.get(p) is st:
                st["p0"] = torch.zeros((), dtype=st["p0"].dtype, device=st["p0"].device)

    def _recast_moved(self, works: list[GroupWork]) -> None:
        """State whose dtype no longer fits its parameter (``model.double()`` after the
        optimizer was built) is recast as ``load_state_dict`` into a fresh optimizer would:
        ``s``, ``exp_avg``, ``exp_avg_sq`` to the state dtype, ``p0`` to the statistics dtype.
        Runs only once the step is known to be taken; cheap when nothing moved."""
        sig = self.__dict__.setdefault("_recast_sig", {})
        moved = False
        for gi, (w, group) in enumerate(zip(works, self.param_groups)):
            key = tuple(p.dtype for p in group["params"])
            if sig.get(gi) == key:
                continue
            done = True
            for p, st in zip(w.params, w.states):
                if not st:
                    continue
                want = self._state_dtype_of(p)
                for k in ("s", "exp_avg", "exp_avg_sq"):
                    if isinstance(st.get(k), Tensor) and st[k].dtype != want:
                        st[k] = st[k].to(want)
                        moved = True
                want0 = _stat_dtype(_local(p))
                if st["p0"].dtype != want0:
                    st["p0"] = st["p0"].to(want0)
                    moved = True
            # parameters without a gradient keep theirs until they step
            for p in group["params"]:
                st = self.state.get(p)
                if st and isinstance(st.get("exp_avg_sq"), Tensor) and (
                        st["exp_avg_sq"].dtype != self._state_dtype_of(p)
                        or st["p0"].dtype != _stat_dtype(_local(p))):
                    done = False
                    break
            if done:
                sig[gi] = key
        if moved:
            self.__dict__.pop("_dtype_sig", None)  # the base's cache: the group is no longer moved


def _check_loaded_real(where: str, key: str, v: Any, *, positive: bool) -> None:
    ok = (isinstance(v, (int, float)) and not isinstance(v, bool)) or (
        isinstance(v, Tensor) and v.numel() == 1 and v.dtype != torch.bool and not v.is_complex())
    x = float(v) if ok else math.nan
    if not (math.isfinite(x) and (x > 0 or not positive)):
        want = "a finite number > 0" if positive else "a finite number"
        raise ValueError(f"{where}: {key}={v!r}; expected {want}")


def _check_loaded_count(where: str, key: str, v: Any) -> None:
    ok = (isinstance(v, (int, float)) and not isinstance(v, bool)) or (
        isinstance(v, Tensor) and v.numel() == 1 and v.dtype != torch.bool and not v.is_complex())
    x = float(v) if ok else math.nan
    if not (math.isfinite(x) and x >= 0 and x == int(x)):
        raise ValueError(f"{where}: {key}={v!r}; expected a count (an integer >= 0)")


def _describe_value(v: Any) -> str:
    if isinstance(v, Tensor):
        return f"a {v.dtype} tensor of shape {tuple(v.shape)}"
    return f"{type(v).__name__} {v!r}"
