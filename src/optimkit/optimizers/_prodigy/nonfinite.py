"""What Prodigy checks before its first write, and what it does when a check fails: the
bounds on phase 2's outputs (decided on the host from the step's one sync), naming the
parameter that holds a NaN/inf, undoing the state the step created, raising or skipping."""

from __future__ import annotations

import math
import os
import sys
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ..._base import GroupWork
from ..._validation import scalar
from .common import _c_s, _local, _max_abs, _sliced_local


class NonFiniteStepError(FloatingPointError):
    """A Prodigy step met a NaN/inf statistic, or would have written one; nothing was
    changed."""


class NonFiniteMixin:
    """Refusing a step: undo what it created, then raise or skip."""

    def _s_max_fp16(self, active: list[GroupWork], beta3: float, d: float,
                    dlr: float) -> Tensor | None:
        """max |s'| over groups whose ``s`` is stored in float16 (``state_dtype``), whose range
        (65504) the new ``s`` can exceed element by element; None when there are none."""
        if self._state_dtype != torch.float16:
            return None
        out = []
        for w in active:
            hp = self._s_hp(w.group, beta3, d, dlr)
            sp = hp["slice_p"]
            for p, g, st in zip(w.params, w.grads, w.states):
                pl, gl = _local(p).reshape(-1)[::sp].float(), _local(g).reshape(-1)[::sp].float()
                if hp["coupled_wd"] != 0:
                    gl = gl.add(pl, alpha=hp["coupled_wd"])
                s_ = _sliced_local(st["s"], p, sp).float()
                if s_.numel():
                    out.append(s_.mul(beta3).add_(gl, alpha=hp["c_s"]).abs_().amax().double())
        return torch.stack(out).max() if out else None
    def _undo_fresh(self) -> None:
        """State created by this step: back to "never stepped" (flat buckets included)."""
        fresh, self._fresh = self._fresh, []
        for p, st in fresh:
            st.clear()  # a flat bucket's members are then dropped (FlatBucket.after_step)
            if self.state.get(p) is st:
                del self.state[p]
        if fresh:
            for gi, buckets in self._buckets.items():
                for b in buckets:
                    if b.ready and not b.state and getattr(b, "_had_state", False):
                        b.after_step(self, self.param_groups[gi])

    def _exact_gmax(self, e: Any) -> float:
        """max |g| over estimate ``e``'s gradients, when the probe (a bound: the fast path
        takes ``||g_piece||_2``, see ``prodigy_stats_fast``) overflowed although every sum is
        finite: gradients near float32's range, refused or not on the exact value. An extra
        host sync, on this rare path only. Sharded (``reduce`` / ``check``) the ranks would
        need another collective to agree, so the bound stays (the step is refused)."""
        if self._dist_mode() not in ("local", "replicated"):
            return math.inf
        m = _max_abs([_local(g) for w in e.active for g in w.grads])
        return math.inf if m is None else float(m)

    def _reject(self, problem: str) -> None:
        """A step whose inputs or outputs are non-finite: undo state creation, then raise or
        skip (the decision comes from values every rank shares)."""
        self._undo_fresh()
        n = type(self).__name__
        msg = (f"{n}: {problem}; the step was not taken and parameters and optimizer state are "
               "unchanged")
        if self.param_groups[0]["nonfinite"] == "raise":
            raise NonFiniteStepError(msg + "; pass nonfinite='skip' to skip such steps instead")
        for g in self.param_groups:
            g["skipped_steps"] += 1
        warnings.warn(msg + f" (skipped steps so far: {self.param_groups[0]['skipped_steps']})",
                      RuntimeWarning, stacklevel=_caller_level())


_HALF_MAX = torch.finfo(torch.float16).max
_INTERNAL = (os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
             os.path.dirname(os.path.abspath(torch.__file__)))


def _caller_level() -> int:
    """The ``stacklevel`` of the first frame outside optimkit and torch (the user's call of
    ``step()``, through torch's hooks and no_grad wrappers, or ZeroRedundancyOptimizer)."""
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_code.co_filename.startswith(_INTERNAL):
        frame, level = frame.f_back, level + 1
    return level


def _limits(float32: bool) -> torch.finfo:
    return torch.finfo(torch.float32 if float32 else torch.float64)


def _input_problem(ests: list[Any], narrow_is_float32: Callable[[list[GroupWork]], bool],
                   ) -> str | None:
    """Why phase 1 cannot run, or None. Phase 1 hands torch scalars in float32 (float64 when
    everything is): ``c_s`` in ``s' = beta3 s + c_s g`` and, with coupled weight decay
    (``decouple=False``), ``weight_decay`` in ``g + wd * theta``. torch refuses to convert a
    larger one (``value cannot be converted to type float without overflow``) or its sums
    overflow; either way the step's output is non-finite. Decided from hyperparameters, the
    estimate's scalars and dtypes only (every rank decides alike), before anything is
    computed."""
    fmt = lambda x: f"{x:.4g}"  # noqa: E731
    for e in ests:
        lim = _limits(narrow_is_float32(e.active))
        name = str(lim.dtype).replace("torch.", "")
        for g in e.live:
            coupled = 0.0 if g["decouple"] else scalar(g["weight_decay"])
            warm = g["safeguard_warmup"]
            c_s = _c_s(g, e.d, e.d0, e.dlr)
            for key, v in (("weight_decay", coupled),
                           (f"c_s = (d / d0) * {'d' if warm else 'dlr'}", c_s),
                           ("c_s * weight_decay", c_s * coupled)):
                if not abs(v) <= lim.max:
                    return (f"{key} = {fmt(v)} overflows {name} (max {fmt(lim.max)}), the "
                            "dtype phase 1 computes in: non-finite output")
    return None


def _output_problem(groups: list[dict[str, Any]], *, decouple: bool, update: bool, d: float,
                    d0: float, d_new: float, d_max: float, d_numerator: float, d_hat: float,
                    dlr: float, beta1: float, beta2: float, gmax: float, pmax: float,
                    smax: float, lim: torch.finfo, half_params: bool = False,
                    half_state: bool = False) -> str | None:
    """Why this step's outputs could be non-finite, or None. Host arithmetic only.

    ``lim`` is the narrowest floating type the step computes or stores in (float32 unless
    everything is float64). Checked: the d update's new values; every scalar phase 2 hands
    to a kernel, in ``lim``'s range; ``d' * eps`` above ``lim``'s smallest normal (else the
    denominator ``sqrt(v) + d' eps`` can be 0 where v is); ``exp_avg_sq``: with ``G`` a bound
    on max |g + coupled_wd * p|, ``(d G)^2 <= max / 2`` keeps ``v' = beta2 v + d^2 (1 -
    beta2) g^2`` and ``m`` (``|m'| <= max(|m|, d G)``) finite; decoupled decay with ``wd *
    dlr > 2`` (a factor ``|1 - wd dlr| > 1``) must keep ``max |p| * (wd dlr - 1)`` in range;
    ``s`` stored in float16: max |s'| within float16's range. Where parameters (``p``) or the
    state (``m``, ``v``) are stored in float16, its range bounds those checks.
    """
    fmt = lambda x: f"{x:.4g}"  # noqa: E731
    name = str(lim.dtype).replace("torch.", "")
    if update:
        for key, v in (("d", d_new), ("d_max", d_max), ("d_numerator", d_numerator),
                       ("d_hat", d_hat)):
            if not math.isfinite(v):
                return (f"the d update gives {key}={v!r} (d={fmt(d)}, d_numerator="
                        f"{fmt(d_numerator)}): non-finite output")
        if not d_new > 0:
            return f"the d update gives d={d_new!r}; d must stay > 0"
    big = lim.max
    for g in groups:
        wd, eps = scalar(g["weight_decay"]), scalar(g["eps"])
        c_s = _c_s(g, d, d0, dlr)
        coupled = 0.0 if decouple else wd
        scal = {"d / d0": d / d0, "dlr = d * lr * bias_correction": dlr, "c_s": c_s,
                "c_s * weight_decay": c_s * coupled, "d * weight_decay": d * coupled,
                "d * (1 - beta1)": d * (1 - beta1), "d^2 * (1 - beta2)": d * d * (1 - beta2)}
        if update:
            # this step's, and the next step's scale factors with the new d (a d that made
            # every later step overflow would be a non-finite output too)
            nxt = d_new / d0
            scal.update({"weight_decay * dlr": (wd if decouple else 0.0) * dlr,
                         "d * eps": d_new * eps, "dlr * d": dlr * d_new, "new d / d0": nxt,
                         "new c_s": nxt * d_new * max(1.0, dlr / d if d > 0 else 1.0)})
        for key, v in scal.items():
            if not (math.isfinite(v) and abs(v) <= big):
                return f"{key} = {fmt(v)} overflows {name} (max {fmt(big)}): non-finite output"
        if update and d_new * eps < lim.tiny:
            return (f"d * eps = {fmt(d_new * eps)} underflows {name} (smallest normal "
                    f"{fmt(lim.tiny)}), so the update's denominator sqrt(v) + d * eps can be 0: "
                    f"use a larger d0 (now {fmt(d0)}) or eps (now {fmt(eps)})")
        geff = gmax + coupled * pmax
        vbig, vname = (_HALF_MAX, "its float16 storage") if half_state else (big, name)
        if d * geff > math.sqrt(vbig / 2):
            dg2 = fmt((d * geff) ** 2) if d * geff < 1e150 else "inf"
            return (f"exp_avg_sq would overflow {vname}: d = {fmt(d)} times max |gradient| "
                    f"<= {fmt(geff)} gives d^2 g^2 up to {dg2}")
        pbig = _HALF_MAX if half_params else big
        if update and decouple and wd * dlr > 2 and pmax * (wd * dlr - 1) > pbig / 2:
            return (f"decoupled weight decay would overflow the parameters: weight_decay * dlr "
                    f"= {fmt(wd * dlr)} scales max |p| = {fmt(pmax)} past {fmt(pbig)}")
    if smax > _HALF_MAX / 2:
        return (f"s would overflow its float16 storage (state_dtype=torch.float16): max |s| = "
                f"{fmt(smax)}; use state_dtype=torch.bfloat16")
    return None


def _locate_nonfinite(groups: list[dict[str, Any]], active: list[GroupWork],
                      state: Any) -> str:
    """Name the first parameter whose step inputs are non-finite (error path: syncs freely).

    Walks the groups' own parameters (not the work lists, which hold flat chunks with
    ``flat=True``), with their gradients and state."""
    for w in active:
        gi = next(i for i, g in enumerate(groups) if g is w.group)
        for pi, p in enumerate(w.group["params"]):
            if p.grad is None:
                continue
            st = state.get(p) or {}
            parts = {"gradient": _local(p.grad), "parameter": _local(p)}
            for key in ("p0", "s"):
                if isinstance(st.get(key), Tensor):
                    parts[f"state {key}"] = _local(st[key])
            bad = [name for name, t in parts.items() if not bool(torch.isfinite(t).all())]
            if bad:
                return (f"first at param group {gi}, parameter {pi}, shape {tuple(p.shape)}: "
                        f"non-finite {' and '.join(bad)}")
    return ("no local parameter holds a NaN/inf: the sums overflowed, or the NaN/inf is on "
            "another rank")
