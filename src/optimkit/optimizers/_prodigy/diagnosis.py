"""Prodigy's diagnosis: a warning, once, when ``d`` does not move or grows without bound, naming
the likely cause from what the step can see and what to change (``diagnose=False`` turns it
off). It reads only host floats the step already has (the one host sync's sums and the new
``d``), so it adds no host sync; the one extra read (the parameters' scale, for the d0 cause)
happens once, when the warning is issued.

The rules (documented on the Prodigy page):

* **stuck**: ``d`` is still ``d0`` (at most ``2 * d0``) after ``STUCK_STEPS`` steps that had a
  non-zero gradient.
  In a healthy run ``d`` leaves ``d0`` within a few steps: the numerator grows like ``k^2``
  and ``||s||_1`` like ``k``, so ``d_hat ~ k * d0 * lr * bc / 2`` passes ``d0`` after about
  ``2 / (lr * bc)`` steps (``bc`` the bias correction). Causes, checked in this order:
  safeguard_warmup under an lr warm-up (the lr rose during the stuck steps), lr far below 1,
  gradients near ``eps`` (clipped to a tiny norm: the Adam step ``g / (|g| + eps)`` shrinks),
  bias correction early in training (``bc < 0.5``), ``d0 * lr`` below the rounding step of the
  parameters (``|p| * finfo(dtype).eps``: updates round to nothing), else none visible.
* **runaway**: every ``GROWTH_WINDOW`` steps, ``d`` is compared with its value one window
  earlier; ``d`` that grew at least ``GROWTH_FACTOR`` x in each of ``GROWTH_WINDOWS``
  consecutive windows (>= 10^4x over 100 steps, still >= 10x per 25 steps) is reported. A
  healthy run grows that fast only in its first 30-50 steps, from ``d0`` (measured on the test
  problems: ``d0=1e-9`` reaches its plateau in ~30 steps); a loss that is unbounded below along
  some direction (or too large a ``d_coef``) keeps growing, ~10^10x per 25 steps.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch

from ..._validation import scalar
from .common import _bias_correction, _local
from .nonfinite import _caller_level


class ProdigyDiagnosisWarning(UserWarning):
    """Prodigy's ``d`` does not move (still ``d0``) or grows without bound, or ``lr`` is far
    below 1: the message names the likely cause and what to change. Silence it with
    ``Prodigy(..., diagnose=False)`` or ``warnings.filterwarnings("ignore",
    category=optimkit.ProdigyDiagnosisWarning)``."""


#: a constructor lr below this is warned about (Prodigy's lr multiplies d; 1.0 is the default)
LR_WARN = 0.1
#: steps with a non-zero gradient after which a d still at d0 (at most STUCK_FACTOR x d0: the
#: first jump may lift it a hair above d0) is reported
STUCK_STEPS = 100
STUCK_FACTOR = 2.0
GROWTH_WINDOW = 25
GROWTH_FACTOR = 10.0
GROWTH_WINDOWS = 4


class _Track:
    __slots__ = ("stuck", "first_lr", "gmax", "window_d", "grown")

    def __init__(self) -> None:
        self.stuck = 0  # steps with a gradient while d == d0; -1 once d left d0
        self.first_lr = math.nan
        self.gmax = 0.0  # largest max |g| seen while stuck
        self.window_d = math.nan
        self.grown = 0


class Diagnosis:
    """The diagnosis state of one optimizer (not saved in state_dict: a resumed run starts
    observing again)."""

    def __init__(self) -> None:
        self.warned: set[str] = set()
        self.tracks: dict[int, _Track] = {}

    def check_lr(self, owner: str, groups: list[dict[str, Any]]) -> None:
        """At construction: warn once when a group's lr is far below 1."""
        lrs = [scalar(g["lr"]) for g in groups]
        small = [lr for lr in lrs if 0 < lr < LR_WARN]
        if not small:
            return
        lr = min(small)
        self._warn(
            "lr",
            f"{owner}: lr={lr:g} is far below 1. Prodigy's lr multiplies the step size d it "
            f"estimates (each step moves the parameters by about d * lr), so lr={lr:g} makes "
            f"the steps {1 / lr:.3g}x smaller than Prodigy intends and d may never leave d0. "
            "Use lr=1.0 and tune d_coef instead (larger d_coef = larger d); from "
            "kohya-ss/sd-scripts pass --learning_rate 1.0 (and --unet_lr / --text_encoder_lr "
            "1.0 if you set them). For different step sizes per group use split_groups=True "
            "with lrs around 1. Pass diagnose=False to silence this")

    def check_low_precision(self, owner: str, groups: list[dict[str, Any]]) -> None:
        """At construction: warn once when bfloat16/float16 parameters are rounded to nearest.
        Prodigy's first steps move a parameter by ~d0 * lr (1e-6 at the defaults), far below
        those dtypes' rounding step (2^-8 of the value for bfloat16): rounded to nearest, most
        parameters stay at p0 until d has grown, so training starts late (measured by a user:
        a bf16 model's loss flat for 30 steps, moving by step 150; 0.99 -> 0.11 at step 30
        with stochastic rounding)."""
        for g in groups:
            if g["stochastic_rounding"] or not scalar(g["lr"]) > 0:
                continue
            low = sorted({str(p.dtype).replace("torch.", "") for p in g["params"]
                          if p.dtype in (torch.bfloat16, torch.float16)})
            if low:
                self._warn(
                    "low_precision",
                    f"{owner}: {' and '.join(low)} parameters with stochastic_rounding=False: "
                    f"Prodigy's first steps (~d0 * lr = {scalar(g['d0']) * scalar(g['lr']):.3g}) "
                    f"are far below {low[0]}'s rounding step, so rounded to nearest most "
                    "parameters stay where they are until d has grown and training starts "
                    "late. Pass stochastic_rounding=True (unbiased: small steps count on "
                    "average), or keep float32 master weights. Pass diagnose=False to silence "
                    "this")
                return

    def after_step(self, owner: str, opt: Any, e: Any, d_new: float, gmax: float) -> None:
        """After an estimate's d update (host floats only)."""
        if "stuck" in self.warned and "runaway" in self.warned:  # both already issued
            return
        tr = self.tracks.get(id(e.groups[0]))
        if tr is None:
            tr = self.tracks[id(e.groups[0])] = _Track()
        fs = e.groups[0]["d_freeze_step"]
        if tr.stuck >= 0 and "stuck" not in self.warned and (fs is None or e.k < fs):
            if d_new > STUCK_FACTOR * e.d0:
                tr.stuck = -1
            elif gmax > 0:
                if tr.stuck == 0:
                    tr.first_lr = e.lr
                tr.stuck += 1
                tr.gmax = max(tr.gmax, gmax)
                if tr.stuck >= STUCK_STEPS:
                    self._warn("stuck", self._stuck_message(owner, opt, e, tr))
        if "runaway" not in self.warned and (e.k + 1) % GROWTH_WINDOW == 0:
            if math.isfinite(tr.window_d) and d_new >= GROWTH_FACTOR * tr.window_d:
                tr.grown += 1
            else:
                tr.grown = 0
            tr.window_d = d_new
            if tr.grown >= GROWTH_WINDOWS:
                self._warn("runaway", self._runaway_message(owner, e, d_new))

    # ------------------------------------------------------------------ messages
    def _stuck_message(self, owner: str, opt: Any, e: Any, tr: _Track) -> str:
        g0 = e.groups[0]
        eps = scalar(g0["eps"])
        bc = _bias_correction(g0, e.k)
        head = (f"{owner}: d is still d0={e.d0:g} (d={scalar(g0['d']):.3g}) after {tr.stuck} "
                f"steps with non-zero gradients{_which(opt, e)}: Prodigy is not adapting. "
                "Likely cause: ")
        if g0["safeguard_warmup"] and tr.first_lr < 0.5 * e.lr:
            return head + (
                f"safeguard_warmup=True under an lr warm-up (lr rose from {tr.first_lr:g} to "
                f"{e.lr:g}): ||s||_1 accumulates d-sized terms while the parameters move by "
                "d * lr, so d_hat stays below d0 until the warm-up ends. Use "
                "safeguard_warmup=False, or start the warm-up well above 0 and make it shorter")
        if e.lr < LR_WARN:
            return head + (
                f"lr={e.lr:g} is far below 1. lr multiplies d: the parameters move by ~d0 * lr "
                f"per step and d_hat passes d0 only after ~{2 / e.lr:.3g} steps. Use lr=1.0 "
                "(from sd-scripts: --learning_rate 1.0) and tune d_coef instead")
        if tr.gmax < 10 * eps:
            return head + (
                f"the gradients are tiny (max |gradient| <= {tr.gmax:.3g}, eps = {eps:g}): the "
                "Adam step g / (|g| + eps) shrinks to ~|g| / eps, so the parameters barely "
                "move. Gradients clipped to a tiny norm (clip_grad_norm_ max_norm) or a loss "
                "scaled near 0? Clip at 1.0 or more, unscale the loss, or lower eps")
        if g0["use_bias_correction"] and bc < 0.5:
            return head + (
                f"use_bias_correction=True multiplies the early steps by {bc:.3g} (it stays "
                f"below 1 for ~1/(1 - beta2) steps), which slows d's start. Use "
                "use_bias_correction=False (prodigyopt's default), or larger d0 / d_coef")
        scale, dtype = _param_scale(e)  # the one extra read, once
        rounding = scale * torch.finfo(dtype).eps
        if e.d0 * e.lr * bc < rounding and not g0["stochastic_rounding"]:
            return head + (
                f"d0={e.d0:g} is far below the parameters' scale (max |p| = {scale:.3g}, "
                f"{str(dtype).replace('torch.', '')}): steps of ~d0 * lr = {e.d0 * e.lr:.3g} "
                f"are below the rounding step {rounding:.3g}, so the parameters never leave "
                f"p0. Use d0 >= {10 * rounding / max(e.lr * bc, 1e-300):.2g}"
                + (", or stochastic_rounding=True" if dtype in (torch.bfloat16, torch.float16)
                   else ""))
        return head + (
            "none visible from the optimizer (lr, eps, bias correction and d0 look fine). "
            "Gradients that change sign every step (pure noise) or parameters the loss does not "
            "depend on keep d_hat below d0; try a larger d0 or d_coef")

    def _runaway_message(self, owner: str, e: Any, d_new: float) -> str:
        factor = GROWTH_FACTOR ** GROWTH_WINDOWS
        return (
            f"{owner}: d keeps growing: d = {d_new:.3g} grew at least {GROWTH_FACTOR:g}x in "
            f"each of the last {GROWTH_WINDOWS} windows of {GROWTH_WINDOW} steps (>= "
            f"{factor:g}x). The loss may be unbounded below along some direction (e.g. weights "
            "without weight decay before a normalisation), or d_coef is too large. To bound "
            f"d: d_limit=<max d> (a cap), d_freeze_step=<step> (d stops updating, Adam goes "
            "on), a finite growth_rate (e.g. 1.02), weight_decay, or a smaller d_coef")

    def _warn(self, kind: str, msg: str) -> None:
        self.warned.add(kind)
        warnings.warn(msg, ProdigyDiagnosisWarning, stacklevel=_caller_level())


def _which(opt: Any, e: Any) -> str:
    if not e.groups[0].get("split_groups"):
        return ""
    gi = next((i for i, g in enumerate(opt.param_groups) if g is e.groups[0]), None)
    return f" (param group {gi})"


def _param_scale(e: Any) -> tuple[float, torch.dtype]:
    """max |p| over the estimate's parameters with gradients, and their narrowest dtype."""
    ps = [_local(p) for w in e.active for p in w.params if p.numel()]
    if not ps:
        return 0.0, torch.float32
    dtype = min((p.dtype for p in ps), key=lambda t: torch.finfo(t).bits)
    scale = max(float(p.detach().abs().max()) for p in ps)
    return scale, dtype
