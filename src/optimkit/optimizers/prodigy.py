r"""Prodigy: Adam with a learning rate estimated on the fly (Mishchenko & Defazio, 2023).

Compatible with ``prodigyopt`` 1.1.2: same arguments, defaults, param-group keys and state
keys, so a ``prodigyopt.Prodigy`` state_dict loads here and continues identically (and back).

One step, with :math:`d` the current distance estimate (global: one value for every group),
:math:`k` the step counter, :math:`\eta` = ``lr`` (the largest group lr; groups have that lr or
0), every sliced quantity taken on ``x.flatten()[::slice_p]``, and primes marking new values::

    bc    = sqrt(1 - beta2^(k+1)) / (1 - beta1^(k+1))    if use_bias_correction, else 1
    dlr   = d * eta * bc                                  the step multiplier of this step
    g     = g + weight_decay * theta                      only if not decouple (p.grad untouched)
    c     = (d/d0) * dlr, or (d/d0) * d if safeguard_warmup (per group)
  phase 1: statistics (groups with lr > 0; reads only, so a non-finite step changes nothing)
    r'    = beta3 * r + sum_params (d/d0) * dlr * <g_sl, theta0_sl - theta_sl>
    s'    = beta3 * s + c * g_sl                          per parameter; only ||s'||_1 is kept
  the d update (the one host sync; the two sums are all-reduced first when sharded)
    d_hat = d_coef * r' / sum_params ||s'||_1
    d     = max(d, d_hat)                                 only while d == d0 (the first jump)
    d_max' = max(d_max, d_hat)
    d'    = min(d_max', d * growth_rate)
  phase 2: writes (groups with lr > 0)
    s     <- s'
    m     <- beta1 * m + d * (1 - beta1) * g              (no m when beta1 == 0)
    v     <- beta2 * v + d^2 * (1 - beta2) * g^2
    theta <- theta - weight_decay * dlr * theta           only if decouple
    theta <- theta - dlr * m / (sqrt(v) + d' * eps)       beta1 > 0
    theta <- theta - dlr * d' * g / (sqrt(v) + d' * eps)  beta1 == 0
    k     <- k + 1

``theta0`` (state ``p0``) is the parameter at its first step (a 0-dim zero when the parameter
was all zeros). Units: ``d`` is in parameter units (a distance to the solution), ``s`` in loss
units and ``r`` (``d_numerator``) in loss x parameter units; ``m``, ``v`` and ``s`` carry factors
of ``d`` so that old statistics stay comparable as ``d`` grows. prodigyopt updates ``m``, ``v``
and ``s`` before the d update; they do not depend on ``d'``, so writing them afterwards gives
the same values. When ``sum ||s'||_1 == 0`` (no gradient signal yet) the step writes ``s``,
``m`` and ``v`` and stops: no ``d``, ``k`` or parameter change, as in prodigyopt.

State per parameter (prodigyopt's keys): ``step`` (int), ``s`` and ``p0`` (sliced: 1/slice_p of
the parameter), ``exp_avg`` (if beta1 > 0) and ``exp_avg_sq``. Param-group keys: every
constructor argument plus the global scalars ``d``, ``d0``, ``d_max``, ``d_numerator`` (= r),
``d_hat``, ``d_denom`` (= ||s||_1), ``k``, mirrored into every group, and ``effective_lr`` and
``skipped_steps``.
For a DTensor parameter (FSDP2) every state tensor is a DTensor on the parameter's mesh, so
``torch.distributed.checkpoint`` saves each rank's part: ``exp_avg``, ``exp_avg_sq`` and, with
``slice_p == 1``, ``s`` and ``p0`` have the parameter's shape and placements; with ``slice_p >
1`` ``s`` and ``p0`` hold each rank's slice ``shard.flatten()[::slice_p]`` as one zero-padded
row (see ``_dtensor_sliced``). ``p0`` then never takes the 0-dim shortcut.

Where this differs from prodigyopt 1.1.2, on purpose:

* ``p.grad`` is never modified (prodigyopt adds the coupled weight decay into it).
* A group with ``lr=0`` is frozen: no update, no weight decay (prodigyopt applies its decoupled
  weight decay and, with beta1=0, a step of size ``dlr * d * g / (d * eps)``).
* float16/bfloat16 parameters keep float32 state and compute every statistic in float32;
  the updated value is rounded back once (optionally stochastically).
* Sharded parameters all-reduce on the parameters' device (prodigyopt calls ``.cuda()``), and
  ranks with no gradient, or with empty param groups, still join the all-reduce. Param groups
  may be empty anywhere, group 0 included.
* A non-finite statistic raises :class:`NonFiniteStepError` (or skips the step) and leaves
  parameters and state untouched (prodigyopt lets one NaN freeze ``d`` and poison the state);
  so does a step whose outputs would be non-finite (see "Checked before the first write").
* The foreach path syncs with the host once per step (prodigyopt: twice per parameter).
* ``strict_growth=True`` makes ``growth_rate`` bound the first jump away from ``d0`` too.
* Hyperparameters that prodigyopt reads from group 0 only (betas, beta3, d0, d_coef,
  growth_rate, use_bias_correction, decouple, fsdp_in_use) must agree across groups; a group
  that sets a different value raises instead of being silently ignored.

Checked before the first write. ``step()`` validates every group's hyperparameters (values set
after construction included; 0-dim/1-element tensors are read as Python floats, as the same
floats step), the gradients (base class) and the lr rule, creates state, runs phase 1 (which
only reads), then decides from the one host sync, before phase 2 writes anything:

1. inputs: the two sums and max |g| are finite;
2. the d update: new ``d``, ``d_max``, ``d_numerator``, ``d_hat`` finite, ``d > 0``;
3. the scalars phase 2 passes to its kernels (``d/d0``, ``dlr``, ``c_s``, ``d (1 - beta1)``,
   ``d^2 (1 - beta2)``, ``wd dlr``, ``d' eps``, the next step's ``d'/d0`` and ``c_s``) fit
   the narrowest dtype the step computes in, and ``d' eps`` is at least its smallest normal
   (else ``sqrt(v) + d' eps`` can be 0 where ``v`` is);
4. phase 2's outputs, bounded on the host instead of checked afterwards (which would need a
   second pass and copies to roll back): with ``G`` = max |g| from phase 1 (taken while each
   piece is in cache; ``+ wd * max |p|`` under coupled decay), ``(d G)^2 <= max / 2`` keeps
   ``v`` (an average of ``(d g)^2``) and ``m`` (of ``d g``) finite for good; decoupled decay
   with ``wd dlr > 2`` checks ``max |p| (wd dlr - 1)``; a float16 ``state_dtype`` checks
   ``max |s'|`` and ``v`` against 65504. Not checked: the update ``dlr m / (sqrt(v) + d' eps)``,
   which Adam's Cauchy-Schwarz argument bounds by ``dlr (1 - beta1) / sqrt((1 - beta2)(1 -
   beta1^2 / beta2))`` (7.3 ``dlr`` at the defaults) for state this algorithm wrote.

A failure at any point before the writes leaves parameters, state, group values and torch's RNG
as they were (state created by the step is removed). ``compile=True`` compiles phase 2's kernel
on first use, after phase 1's compiled with the same toolchain.

Across ranks (see :meth:`Prodigy._dist_mode`): sharded runs all-reduce the sums with the
bounds, the dtype limits and a failure flag, so every rank makes the same decision, and a rank
that raised before the collective still joins it (the others then raise too). Unsharded runs
with several ranks gather a fingerprint of each rank's parameters at the first step: equal
(DDP) never communicates again; different (``ZeroRedundancyOptimizer`` without
``fsdp_in_use``) warns and reduces from then on.

A parameter moved to another dtype after construction (``model.double()``) keeps training as
a fresh optimizer that loaded this one's state_dict: its state is recast once the step is
known to be taken.
"""

from __future__ import annotations

import math
import os
import sys
import warnings
from typing import Any

import torch
from torch import Tensor

from .. import _compiled
from .. import _torch_compat as tc
from .._base import ANY, PARAM_SHAPE, SCALAR, GroupWork, OptimizerBase, ParamsT
from .._impl import group_by_device_dtype
from .._rounding import LowPrecisionStateMixin, chunk_budget, chunks, stochastic_round_
from .._validation import check_betas, check_bool, check_range, fail

try:  # DTensor (FSDP2) is optional: torch builds without distributed lack it
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor, Replicate, Shard
except Exception:  # pragma: no cover - depends on the torch build
    dist = None  # type: ignore[assignment]
    DTensor = Replicate = Shard = None  # type: ignore[assignment,misc]

_LOW_PRECISION = (torch.float16, torch.bfloat16)
#: read from group 0 by prodigyopt; here they must agree across groups
_GLOBAL_KEYS = ("betas", "beta3", "d0", "d_coef", "growth_rate", "use_bias_correction", "decouple",
                "fsdp_in_use", "strict_growth", "nonfinite")
#: global scalars, mirrored into every group so they round-trip through state_dict
_MIRRORED = ("d", "d_max", "d_numerator", "d_hat", "d_denom", "k", "skipped_steps")
_FLOAT_SCALARS = ("d", "d_max", "d_numerator", "d_hat", "d_denom")


class NonFiniteStepError(FloatingPointError):
    """A Prodigy step met a NaN/inf statistic, or would have written one; nothing was
    changed."""


class Prodigy(LowPrecisionStateMixin, OptimizerBase):
    r"""Prodigy, a learning-rate-free Adam (prodigyopt-compatible). Equations: module docstring.

    Every number below may also be a 0-dim or 1-element real tensor (as torch.optim accepts):
    each step reads it as a Python float (one host sync per CUDA tensor).

    Args:
        params: parameters or param groups (a group may be empty).
        lr: multiplier of the estimated step size ``d`` (dimensionless); keep 1.0 and tune
            ``d_coef`` instead. Every group's lr must be the largest lr or 0 (0 freezes the
            group: no update, no weight decay). ``0 <= lr < inf``.
        betas: ``(beta1, beta2)``, ``0 <= betas[0] < 1`` and ``0 <= betas[1] < 1``: decay of
            the first moment ``exp_avg`` (``beta1 = 0`` drops it and saves one buffer) and of
            the second moment ``exp_avg_sq``.
        beta3: decay of the d statistics ``r`` and ``s``, ``0 <= beta3 < 1``; ``None`` means
            ``sqrt(beta2)``.
        eps: added to ``sqrt(v)`` after scaling by ``d`` (``d * eps``), ``0 < eps < inf``.
        weight_decay: ``0 <= weight_decay < inf``; decoupled (``theta -= weight_decay * dlr *
            theta``) when ``decouple``, else an L2 term added to the gradient the step uses. A
            value so large that a step would overflow is refused at that step
            (:class:`NonFiniteStepError`, nothing changed).
        decouple: AdamW-style decoupled weight decay (default) instead of coupled L2.
        use_bias_correction: multiply the step by Adam's ``sqrt(1 - beta2^(k+1)) / (1 -
            beta1^(k+1))``.
        safeguard_warmup: accumulate ``s`` with ``(d/d0) * d`` instead of ``(d/d0) * dlr``, so
            a warmup schedule on ``lr`` does not shrink ``||s||_1`` and inflate ``d``.
        d0: initial ``d`` (parameter units), ``0 < d0 < inf``; must be below the true
            distance. ``d0 * eps`` must stay a normal number of the parameters' dtype (float32:
            above 1.2e-38), else every step is refused.
        d_coef: multiplies the estimate, ``d_hat = d_coef * r / ||s||_1``: larger gives a
            larger ``d`` (more aggressive), smaller is more conservative. ``0 < d_coef < inf``.
        growth_rate: ``d`` grows by at most this factor per step, ``1 <= growth_rate``
            (``inf``: no bound). As in prodigyopt the first jump away from ``d0`` is not
            bounded unless ``strict_growth=True``.
        fsdp_in_use: parameters are sharded across ranks: all-reduce the two sums of the d
            update every step. Detected automatically for DTensor (FSDP2) and FSDP1 flat
            parameters, and, with a warning, at the first step for ranks that hold different
            parameters (``ZeroRedundancyOptimizer``); see docs/distributed.md.
        slice_p: compute ``r`` and ``s`` on every ``slice_p``-th element only (an int, ``1 <=
            slice_p < 2**63``):
            ``s`` and ``p0`` shrink to ``1/slice_p`` of the parameter; an approximation for
            ``slice_p > 1`` (11 is reasonable).
        strict_growth: bound the first jump from ``d0`` by ``growth_rate`` as well (not in
            prodigyopt; default ``False`` reproduces it).
        nonfinite: ``"raise"`` (default) raises :class:`NonFiniteStepError` naming the first
            parameter with a NaN/inf gradient; ``"skip"`` skips the step with a warning and
            counts it in ``group["skipped_steps"]``. Either way nothing is changed.
        stochastic_rounding: round float16/bfloat16 parameters stochastically (unbiased) when
            writing the float32 result back; uses torch's global RNG. No effect on float32/64.
        foreach: ``True`` multi-tensor path (one host sync per step), ``False`` the per-tensor
            reference, ``None`` (default) the multi-tensor path.
        state_dtype: dtype of ``s``, ``exp_avg`` and ``exp_avg_sq``. ``None`` (default):
            the parameter's dtype, float32 for float16/bfloat16 parameters. ``p0`` always keeps
            float32 (or float64) precision: d is estimated from ``p0 - p``, which bf16 rounding
            of ``p0`` swamps. ``torch.bfloat16`` cuts the state of float32 parameters from 16 to
            10 bytes/param at ``slice_p=1``; each
            step computes in float32 and writes the state back with unbiased stochastic
            rounding (generators seeded from torch's global RNG, saved in ``state_dict``).
            Runs the foreach path (not the fused phase 2).
        flat: lay the parameters, gradients and state out as views into one buffer per
            param group and (device, dtype), and step it in large chunks (see
            ``optimkit._flatten``): the same math, far less per-tensor overhead with many
            small tensors. Re-points each eligible ``p.data`` and ``p.grad`` into the buffers;
            ``zero_grad()`` then zeroes gradients instead of setting them to ``None``.
        compile: run both phases as ``torch.compile``-generated single-pass kernels
            (``optimkit._compiled``): phase 1 reads ``g, p, p0, s`` once for both sums, phase 2
            updates ``s, m, v, p`` in one pass. Groups with ``slice_p > 1`` or a narrower
            ``state_dtype`` keep the default path. The first step compiles (seconds) and
            needs a C++ compiler on CPU. Best with ``flat``.
        independent_ranks: each rank of an initialised process group trains its own model
            with this optimizer: never communicate (by default the first step checks that
            the ranks hold the same parameters, and reduces when they are shards).

    Example:
        >>> model = torch.nn.Linear(3, 1)
        >>> opt = Prodigy(model.parameters(), weight_decay=0.01)
        >>> model(torch.randn(4, 3)).sum().backward(); opt.step()
        >>> opt.param_groups[0]["d"], opt.param_groups[0]["effective_lr"]  # doctest: +SKIP

    Reference: K. Mishchenko, A. Defazio, "Prodigy: An Expeditiously Adaptive Parameter-Free
    Learner", 2023, arXiv:2306.06101.
    """

    # Its foreach path (fused Adam kernel for phase 2) beats the loop at every size.
    _loop_on_cpu = False
    _has_compiled = True
    _state_keys = frozenset({"step", "s", "p0", "exp_avg", "exp_avg_sq"})

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1.0,
        betas: tuple[float, float] = (0.9, 0.999),
        beta3: float | None = None,
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        decouple: bool = True,
        use_bias_correction: bool = False,
        safeguard_warmup: bool = False,
        d0: float = 1e-6,
        d_coef: float = 1.0,
        growth_rate: float = float("inf"),
        fsdp_in_use: bool = False,
        slice_p: int = 1,
        *,
        strict_growth: bool = False,
        nonfinite: str = "raise",
        stochastic_rounding: bool = False,
        foreach: bool | None = None,
        state_dtype: torch.dtype | None = None,
        flat: bool = False,
        compile: bool = False,
        independent_ranks: bool = False,
    ) -> None:
        # On the optimizer, not in the groups (prodigyopt's group keys stay exactly its own).
        check_bool(type(self).__name__, "independent_ranks", independent_ranks)
        self._independent_ranks = independent_ranks
        self._setup_state_dtype(state_dtype)
        defaults = dict(
            lr=lr, betas=betas, beta3=beta3, eps=eps, weight_decay=weight_decay,
            d=d0, d0=d0, d_max=d0, d_numerator=0.0, d_coef=d_coef, k=0,
            growth_rate=growth_rate, use_bias_correction=use_bias_correction,
            decouple=decouple, safeguard_warmup=safeguard_warmup, fsdp_in_use=fsdp_in_use,
            slice_p=slice_p, d_hat=d0, d_denom=0.0, skipped_steps=0,
            strict_growth=strict_growth, nonfinite=nonfinite,
            stochastic_rounding=stochastic_rounding, foreach=foreach,
        )
        # (parameter, its new state): with flat=True a bucket's whole buffer and its state
        self._fresh: list[tuple[Tensor, dict[str, Any]]] = []
        self._scratch: dict[tuple[torch.device, torch.dtype], Tensor] = {}
        super().__init__(params, defaults, flat=flat, compile=compile)

    # ------------------------------------------------------------------ validation
    def _validate_group(self, g: dict[str, Any]) -> None:
        n = type(self).__name__
        # Real numbers, or 0-dim / 1-element real tensors as torch.optim accepts; every step
        # reads them as Python floats (a CUDA tensor costs a host sync each).
        check_range(n, "lr", g["lr"], 0.0, math.inf, hi_open=True)
        check_betas(n, g["betas"])
        if g["beta3"] is not None:
            check_range(n, "beta3", g["beta3"], 0.0, 1.0, hi_open=True)
        check_range(n, "eps", g["eps"], 0.0, math.inf, lo_open=True, hi_open=True)
        check_range(n, "weight_decay", g["weight_decay"], 0.0, math.inf, hi_open=True)
        check_range(n, "d0", g["d0"], 0.0, math.inf, lo_open=True, hi_open=True)
        check_range(n, "d_coef", g["d_coef"], 0.0, math.inf, lo_open=True, hi_open=True)
        check_range(n, "growth_rate", g["growth_rate"], 1.0)
        sp = g["slice_p"]
        if isinstance(sp, bool) or not isinstance(sp, int) or not 1 <= sp < 2**63:
            fail(n, "slice_p", sp, "an int in 1 <= slice_p < 2**63")
        for flag in ("decouple", "use_bias_correction", "safeguard_warmup", "fsdp_in_use",
                     "strict_growth", "stochastic_rounding"):
            check_bool(n, flag, g[flag])
        if not isinstance(g["nonfinite"], str) or g["nonfinite"] not in ("raise", "skip"):
            fail(n, "nonfinite", g["nonfinite"], "'raise' or 'skip'")
        if getattr(self, "_flat", False) and sp != 1:
            # s and p0 would subsample the flat buffer, not each tensor: other elements than
            # prodigyopt's, so a different d
            fail(n, "slice_p", sp, "1 with flat=True (slicing is per tensor)")
        if getattr(self, "_independent_ranks", False) and g["fsdp_in_use"]:
            fail(n, "fsdp_in_use", True, "False with independent_ranks=True (sharded parameters "
                 "need their d sums all-reduced; independent ranks never communicate)")

    def _check_groups(self, groups: list[dict[str, Any]]) -> None:
        """Global hyperparameters agree and lrs are max-or-0 (prodigyopt's rule), else ValueError."""
        n = type(self).__name__
        g0 = groups[0]
        for gi, g in enumerate(groups[1:], start=1):
            for key in _GLOBAL_KEYS:
                if _norm(g.get(key)) != _norm(g0.get(key)):
                    raise ValueError(
                        f"{n}: param group {gi} has {key}={g.get(key)!r} but param group 0 has "
                        f"{g0.get(key)!r}; {key} is global in Prodigy (one d for all groups): "
                        f"use the same value in every group"
                    )
        lrs = [float(g["lr"]) for g in groups]
        nonzero = sorted({lr for lr in lrs if lr != 0.0})
        if len(nonzero) > 1:
            raise ValueError(
                f"{n}: param groups have lr values {lrs}; Prodigy's step size d is global, so "
                f"every group's lr must be either the largest lr ({max(lrs)!r}) or 0 (frozen). "
                f"Tune the step with d_coef, or use separate optimizers"
            )

    # ------------------------------------------------------------------ groups and state
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if self.param_groups:
            merged = {**self.defaults, **{k: v for k, v in param_group.items() if k != "params"}}
            self._validate_group(merged)
            self._check_groups([*self.param_groups, merged])
        super().add_param_group(param_group)
        new = self.param_groups[-1]
        if len(self.param_groups) > 1:  # a late group joins the running estimate
            for key in _MIRRORED:
                new[key] = self.param_groups[0][key]
        new["effective_lr"] = _effective_lr(new)

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["_independent_ranks"] = self.__dict__.get("_independent_ranks", False)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._fresh = []
        self._scratch = {}
        self.__dict__.setdefault("_independent_ranks", False)
        for g in self.param_groups:
            # prodigyopt under FSDP stores these as tensors; plain floats from here on
            for key in _FLOAT_SCALARS:
                if isinstance(g.get(key), Tensor):
                    g[key] = float(g[key])
            g["k"] = int(g["k"])
            g["skipped_steps"] = int(g["skipped_steps"])
            g["effective_lr"] = _effective_lr(g)

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

    def _init_state(self, group: dict[str, Any], p: Tensor, state: dict[str, Any]) -> None:
        pl = _local(p)
        dt = self._state_dtype_of(p)
        state["step"] = 0
        if _is_dtensor(p):
            # DTensors, so that torch.distributed.checkpoint saves every rank's part (it takes
            # plain tensors as replicated: one rank's copy for all). The step works on
            # _sliced_local views of them. No 0-dim p0 shortcut: whether a shard is all zeros
            # differs between ranks, and one layout on every rank is what DCP needs.
            state["s"] = _dtensor_sliced(p, group["slice_p"], dt, copy=False)
            state["p0"] = _dtensor_sliced(p, group["slice_p"], _stat_dtype(pl), copy=True)
        else:
            sliced = pl.reshape(-1)[:: group["slice_p"]]
            state["s"] = torch.zeros(sliced.shape, dtype=dt, device=pl.device)
            # Full copy for now; replaced by a 0-dim zero after the step's one host sync if the
            # parameter turns out to be all zeros (prodigyopt's memory saving, decided without
            # a sync of its own).
            # p0 keeps full precision whatever state_dtype says: the d estimate needs p0 - p,
            # and in bf16 the rounding of p0 (~0.4% of |p|) swamps the early movement of p.
            # Measured (optimkit compare --tasks cnn, 2 seeds): bf16 p0 -> val acc 0.54,
            # float32 p0 with bf16 s/m/v -> 0.987 (float32 state: 0.983).
            state["p0"] = torch.empty(sliced.shape, dtype=_stat_dtype(pl), device=pl.device)
            state["p0"].copy_(sliced)  # contiguous even when the slice is strided
        if float(self.param_groups[0]["betas"][0]) > 0:
            state["exp_avg"] = torch.zeros_like(p, dtype=dt, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(p, dtype=dt, memory_format=torch.preserve_format)
        self._fresh.append((p, state))

    def _state_spec(self, group: dict[str, Any], p: Tensor) -> dict[str, Any]:
        n = p.numel()
        s_shape = ANY if _is_dtensor(p) else (-(-n // group["slice_p"]),)
        spec: dict[str, Any] = {"step": SCALAR, "s": s_shape, "p0": ANY, "exp_avg_sq": PARAM_SHAPE}
        if float(group["betas"][0]) > 0:
            spec["exp_avg"] = PARAM_SHAPE
        return spec

    def _gather(self, gi: int, group: dict[str, Any]) -> GroupWork:
        if gi == 0:  # before any state is created: the whole step is checked first
            for g in self.param_groups:  # values set after construction (a scheduler, a user)
                self._validate_group(g)
            self._check_groups(self.param_groups)
            if self._independent_ranks and self._has_sharded_params():
                raise ValueError(
                    f"{type(self).__name__}: independent_ranks=True but some parameters are "
                    "sharded (DTensor / FSDP): their d sums must be all-reduced; drop "
                    "independent_ranks")
        return super()._gather(gi, group)

    def _mixed_dtype_ok(self, group: dict[str, Any]) -> bool:
        # A model moved to another dtype after construction keeps training: its state is
        # recast (as load_state_dict into a fresh optimizer would) once the step is known to
        # be taken, see _recast_moved.
        return True

    # ------------------------------------------------------------------ the step
    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        """One step; ``closure`` re-evaluates the model and returns the loss.

        A step that raises leaves parameters, state, group values and torch's RNG as they
        were. With several ranks it raises on every rank: a rank that fails before Prodigy's
        collective still joins it, flagging the failure, so no rank is left waiting.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._fresh = []
        self._joined = False
        try:
            super().step()
        except Exception:
            self._undo_fresh()
            if not self._joined:
                self._join_failed()
            raise
        finally:
            self._fresh = []
        return loss

    def _apply(self, works: list[GroupWork]) -> None:
        groups = self.param_groups
        g0 = groups[0]
        beta1, beta2 = (float(b) for b in g0["betas"])
        beta3 = float(g0["beta3"]) if g0["beta3"] is not None else math.sqrt(beta2)
        k, d, d_max, d0 = int(g0["k"]), float(g0["d"]), float(g0["d_max"]), float(g0["d0"])
        lr = max(float(g["lr"]) for g in groups)
        dlr = d * lr * _bias_correction(g0, k)
        fresh = self._fresh
        if lr == 0.0:  # everything frozen (prodigyopt also stops before any update)
            self._settle_fresh(fresh, torch.stack([torch.any(_local(p)) for p, _ in fresh])
                               .tolist() if fresh else [])
            return

        # ---- phase 1: statistics only; nothing is written (s' is written in phase 2)
        c_num = (d / d0) * dlr  # the numerator's per-step scale (d/d0 keeps it away from 0)
        active = [w for w in works if w.params and float(w.group["lr"]) > 0]
        # per group: (<g_sl, p0 - p_sl>, ||s'||_1, sum of max |g| per tensor)
        pieces: list[tuple[Any, Any, Any]] = []
        # keyed by the group (one object for the whole run), not by the GroupWork (new each
        # step): torch.compile(opt.step) would otherwise guard on its identity and recompile
        comp = {id(w.group): self._compiled_applies(w) for w in active}
        fast = {id(w.group): not comp[id(w.group)] and self._fast(w, beta1) for w in active}
        for w in active:
            grp = w.group
            if comp[id(w.group)]:
                pieces.append(prodigy_stats_compiled(
                    w.params, w.grads, [st["s"] for st in w.states],
                    [st["p0"] for st in w.states], **self._s_hp(grp, beta3, d, dlr)))
                continue
            if fast[id(w.group)]:  # plain tensors: no DTensor unwrapping needed
                pieces.append(prodigy_stats_fast(
                    w.params, w.grads, [st["s"] for st in w.states],
                    [st["p0"] for st in w.states], **self._s_hp(grp, beta3, d, dlr),
                    scratch=self._scratch_for(w.params[0])))
                continue
            fn = prodigy_stats_reference if w.impl == "reference" else prodigy_stats_foreach
            sp = grp["slice_p"]
            pieces.append(fn(
                [_local(p) for p in w.params], [_local(g) for g in w.grads],
                [_sliced_local(st["s"], p, sp) for p, st in zip(w.params, w.states)],
                [_sliced_local(st["p0"], p, sp) for p, st in zip(w.params, w.states)],
                **self._s_hp(grp, beta3, d, dlr),
            ))
        # Bounds the overflow checks need beyond max |g| (decided from every group's
        # hyperparameters, not from which groups have gradients here: the same on every rank)
        live = [g for g in groups if float(g["lr"]) > 0]
        need_p = any((not g0["decouple"] and float(g["weight_decay"]) > 0)
                     or (g0["decouple"] and float(g["weight_decay"]) * dlr > 2) for g in live)
        pmax = _max_abs([_local(p) for w in active for p in w.params]) if need_p else None
        smax = self._s_max_fp16(active, beta3, d, dlr)

        # ---- the one host sync: global sums (all-reduced when sharded) and the p0 flags
        sums = self._global_sums(pieces, fresh, c_num, pmax, smax, active)
        if sums.failed_ranks:
            raise RuntimeError(
                f"{type(self).__name__}: {sums.failed_ranks:g} other rank(s) raised in this "
                "step before Prodigy's all-reduce (see their error); the step was not taken "
                "and parameters and optimizer state are unchanged on every rank")
        update = sums.den != 0.0  # no gradient signal yet: prodigyopt keeps s, m, v, returns
        problem = None
        if not all(math.isfinite(x) for x in (sums.delta, sums.den, sums.gmax, sums.pmax,
                                              sums.smax)):
            problem = "non-finite statistics in this step (" + _locate_nonfinite(
                groups, active, self.state) + ")"
        d_new, d_numerator, d_hat = d, float(g0["d_numerator"]), float(g0["d_hat"])
        if problem is None and update:
            # ---- d update (global scalars, host floats)
            d_numerator = d_numerator * beta3 + sums.delta
            d_hat = float(g0["d_coef"]) * d_numerator / sums.den
            if d == d0 and not g0["strict_growth"]:
                d_new = max(d, d_hat)
            d_max = max(d_max, d_hat)
            d_new = min(d_max, d_new * float(g0["growth_rate"]))
        if problem is None:
            problem = _output_problem(
                live, decouple=g0["decouple"], update=update, d=d, d0=d0, d_new=d_new,
                d_max=d_max, d_numerator=d_numerator, d_hat=d_hat, dlr=dlr, beta1=beta1,
                beta2=beta2, gmax=sums.gmax, pmax=sums.pmax, smax=sums.smax,
                lim=sums.limits, half_params=sums.half,
                half_state=self._state_dtype == torch.float16)
        if problem is not None:
            self._reject(problem)
            return
        # ---- from here on nothing raises: every input and output was checked
        self._settle_fresh(fresh, sums.flags)
        self._recast_moved(works)
        if not update:
            for w in active:
                self._phase2(w, beta1, beta2, beta3, d, d, dlr, update_params=False)
            return

        # ---- phase 2: moments and parameters (frozen groups only count the step)
        for w in works:
            if w.params and float(w.group["lr"]) > 0:
                self._phase2(w, beta1, beta2, beta3, d, d_new, dlr, update_params=True,
                             fast=fast.get(id(w.group), False),
                             compiled=comp.get(id(w.group), False))
            for st in w.states:
                st["step"] += 1
        for g in groups:
            g.update(d_numerator=d_numerator, d_denom=sums.den, d=d_new, d_max=d_max,
                     d_hat=d_hat, k=k + 1)
            g["effective_lr"] = _effective_lr(g)

    def _s_hp(self, grp: dict[str, Any], beta3: float, d: float, dlr: float) -> dict[str, Any]:
        """The s-update hyperparameters of one group: s' = beta3 * s + c_s * g_sl."""
        d0 = float(grp["d0"])
        return dict(
            slice_p=grp["slice_p"], beta3=beta3,
            c_s=(d / d0) * d if grp["safeguard_warmup"] else (d / d0) * dlr,
            coupled_wd=0.0 if self.param_groups[0]["decouple"] else float(grp["weight_decay"]),
        )

    def _fast(self, w: GroupWork, beta1: float) -> bool:
        """Whether group ``w`` takes the fast path (:func:`prodigy_stats_fast` and
        :func:`prodigy_apply_fused`): the multi-tensor implementation, ``beta1 > 0`` (the fused
        kernel needs ``exp_avg``), and every tensor a plain contiguous tensor of a dtype in
        ``_FAST_DTYPES`` on a device in ``_FAST_DEVICES``.

        float64 stays on the foreach path, which matches prodigyopt to ~1e-10: the fused
        kernel's ``grad_scale`` is float32 only, and ``1/d`` rounded to float32 would cost that.
        float16/bfloat16 keep float32 state, which the fused kernel (one dtype) cannot take.
        """
        if w.impl == "reference" or beta1 <= 0:
            return False
        for p, g, st in zip(w.params, w.grads, w.states):
            if (type(p) not in _PLAIN or p.dtype not in _FAST_DTYPES
                    or p.device.type not in _FAST_DEVICES or not p.is_contiguous()
                    or not g.is_contiguous() or g.dtype != p.dtype or g.is_sparse
                    or not st["exp_avg"].is_contiguous() or not st["exp_avg_sq"].is_contiguous()
                    or st["exp_avg"].dtype != p.dtype or st["exp_avg_sq"].dtype != p.dtype
                    or st["s"].dtype != p.dtype or st["p0"].dtype != p.dtype):
                return False
        return True

    def _scratch_for(self, p: Tensor) -> Tensor:
        """Two chunk-sized buffers for phase 1's temporaries (per device and dtype; not state)."""
        key = (p.device, p.dtype)
        buf = self._scratch.get(key)
        if buf is None:
            n = 2 * (_CHUNK_BYTES.get(p.device.type, _CHUNK_BYTES_DEFAULT) // 4)
            buf = self._scratch[key] = torch.empty(n, dtype=p.dtype, device=p.device)
        return buf

    def _compiled_applies(self, w: GroupWork) -> bool:
        """``compile=True`` runs this group compiled: slice_p 1 (the kernels take whole
        tensors), and every tensor plain, contiguous, with state in its own dtype."""
        if w.impl != "compiled" or w.group["slice_p"] != 1:
            return False
        return all(type(p) in _PLAIN and p.dtype in (torch.float32, torch.float64)
                   and _compiled.takes(p, *(st[k] for k in ("s", "exp_avg", "exp_avg_sq")
                                            if k in st))
                   and st["exp_avg_sq"].dtype == p.dtype and st["s"].dtype == p.dtype
                   for p, st in zip(w.params, w.states))

    def _phase2(self, w: GroupWork, beta1: float, beta2: float, beta3: float, d: float,
                d_new: float, dlr: float, *, update_params: bool, fast: bool = False,
                compiled: bool = False) -> None:
        grp = w.group
        if update_params and compiled:
            decouple = self.param_groups[0]["decouple"]
            prodigy_apply_compiled(
                w.params, w.grads, [st["s"] for st in w.states],
                [st["exp_avg"] for st in w.states] if beta1 > 0 else None,
                [st["exp_avg_sq"] for st in w.states],
                **self._s_hp(grp, beta3, d, dlr), beta1=beta1, beta2=beta2, d=d, d_new=d_new,
                dlr=dlr, eps=float(grp["eps"]),
                decoupled_wd=float(grp["weight_decay"]) if decouple else 0.0,
            )
            return
        if update_params and fast and _FAST_D_RANGE[0] < d < _FAST_D_RANGE[1]:
            decouple = self.param_groups[0]["decouple"]
            prodigy_apply_fused(
                w.params, w.grads, [st["s"] for st in w.states],
                [st["exp_avg"] for st in w.states], [st["exp_avg_sq"] for st in w.states],
                **self._s_hp(grp, beta3, d, dlr), beta1=beta1, beta2=beta2, d=d, d_new=d_new,
                dlr=dlr, eps=float(grp["eps"]),
                decoupled_wd=float(grp["weight_decay"]) if decouple else 0.0,
                scratch=self._scratch_for(w.params[0]),
            )
            return
        fn = prodigy_apply_reference if w.impl == "reference" else prodigy_apply_foreach
        if any(st["exp_avg_sq"].dtype != _stat_dtype(_local(p))
               for p, st in zip(w.params, w.states)):
            self._phase2_upcast(w, fn, beta1, beta2, beta3, d, d_new, dlr,
                                update_params=update_params)
            return
        fn(
            [_local(p) for p in w.params], [_local(g) for g in w.grads],
            [_sliced_local(st["s"], p, grp["slice_p"]) for p, st in zip(w.params, w.states)],
            [_local(st["exp_avg"]) for st in w.states] if beta1 > 0 else None,
            [_local(st["exp_avg_sq"]) for st in w.states],
            **self._s_hp(grp, beta3, d, dlr),
            beta1=beta1, beta2=beta2, d=d, d_new=d_new, dlr=dlr, eps=float(grp["eps"]),
            decoupled_wd=float(grp["weight_decay"]) if self.param_groups[0]["decouple"] else 0.0,
            stochastic_rounding=grp["stochastic_rounding"], update_params=update_params,
        )

    def _phase2_upcast(self, w: GroupWork, fn: Any, beta1: float, beta2: float, beta3: float,
                       d: float, d_new: float, dlr: float, *, update_params: bool) -> None:
        """Phase 2 with state in a narrower dtype (``state_dtype``): per chunk, upcast ``s``,
        ``m`` and ``v`` to the compute dtype, run ``fn`` (the same math), then write them back
        with stochastic rounding, tensor by tensor in input order so that every implementation
        draws the same random numbers."""
        grp = w.group
        sp = grp["slice_p"]
        decoupled = float(grp["weight_decay"]) if self.param_groups[0]["decouple"] else 0.0
        params = [_local(p) for p in w.params]
        stored = {"s": [_sliced_local(st["s"], p, sp) for p, st in zip(w.params, w.states)],
                  "exp_avg_sq": [_local(st["exp_avg_sq"]) for st in w.states]}
        if beta1 > 0:
            stored["exp_avg"] = [_local(st["exp_avg"]) for st in w.states]
        for lo, hi in chunks(params, chunk_budget(params[0].device)):
            cds = [_stat_dtype(p) for p in params[lo:hi]]
            work = {k: [t.to(c) for t, c in zip(v[lo:hi], cds)] for k, v in stored.items()}
            fn(params[lo:hi], [_local(g) for g in w.grads[lo:hi]], work["s"],
               work.get("exp_avg"), work["exp_avg_sq"], **self._s_hp(grp, beta3, d, dlr),
               beta1=beta1, beta2=beta2, d=d, d_new=d_new, dlr=dlr, eps=float(grp["eps"]),
               decoupled_wd=decoupled, stochastic_rounding=grp["stochastic_rounding"],
               update_params=update_params)
            for i in range(hi - lo):
                for k in ("s", "exp_avg", "exp_avg_sq"):
                    if k in work and work[k][i] is not stored[k][lo + i]:
                        self._round_into(stored[k][lo + i], work[k][i])

    # ------------------------------------------------------------------ helpers
    def _global_sums(self, pieces: list[tuple[Any, Any, Any]],
                     fresh: list[tuple[Tensor, dict[str, Any]]], c_num: float,
                     pmax: Tensor | None, smax: Tensor | None,
                     active: list[GroupWork]) -> _Sums:
        """The step's statistics with one host sync: the sum of c_num * dots, ``||s'||_1``,
        the bounds (max |g| per tensor, summed; max |p| and max |s'| where needed), the dtype
        limits and the p0 flags.

        Unsharded, the per-tensor values come to the host and are summed there in parameter
        order, exactly as prodigyopt sums its per-parameter ``.item()`` values, so the result is
        bitwise the same whatever the implementation. Sharded, each rank sums on its device and
        the vector is all-reduced there (ranks without gradients contribute zeros; a rank that
        failed before this point contributes its failure flag, see :meth:`_join_failed`).
        The first step with several ranks and no sharding declared all-gathers that vector
        with a fingerprint of each rank's parameters instead (see :meth:`_dist_mode`).
        """
        dev = self._main_device()
        acc = _acc_dtype(dev)
        mode = self._dist_mode()
        flags = [torch.any(_local(p)).reshape(1).to(device=dev, dtype=acc) for p, _ in fresh]
        narrow = float(self._narrowest_is_float32(active))
        half = float(any(p.dtype == torch.float16 for w in active for p in w.params))
        bounds = [x.reshape(1).to(device=dev, dtype=acc) if x is not None
                  else torch.zeros(1, dtype=acc, device=dev) for x in (pmax, smax)]
        if mode in ("reduce", "check"):
            red = torch.zeros(_N_REDUCE, dtype=acc, device=dev)
            for dots, l1s, chk in pieces:
                if isinstance(dots, Tensor):
                    red[:3] += torch.stack([dots.sum() * c_num, l1s.sum(), chk.sum()]).to(red)
                else:
                    red[:3] += torch.tensor([c_num * sum(dots), sum(l1s), chk], dtype=acc,
                                            device=dev)
            red[3:5] = torch.cat(bounds)
            red[6], red[7] = narrow, half
        if mode == "reduce":
            self._collective(mode, red)
            vals = torch.cat([red, *flags]).tolist()
            return _Sums(vals[0], vals[1], vals[2], vals[3], vals[4], vals[5],
                         _limits(vals[6] > 0), vals[7] > 0, vals[_N_REDUCE:])
        on_dev = [t.reshape(-1).to(device=dev, dtype=acc) for piece in pieces
                  if isinstance(piece[0], Tensor) for t in piece]
        tail = torch.cat(bounds)
        if mode == "check":
            vec = torch.cat([red, self._fingerprint(dev, acc)])
            tail = torch.cat([tail, self._collective(mode, vec).reshape(-1)])
        host = iter(torch.cat(on_dev + flags + [tail]).tolist())
        delta = den = chk = 0.0
        for dots, l1s, probe in pieces:
            if isinstance(dots, Tensor):
                dots = [next(host) for _ in range(dots.numel())]
                l1s = [next(host) for _ in range(l1s.numel())]
                probe = sum(next(host) for _ in range(probe.numel()))
            for x in dots:
                delta += c_num * x
            for x in l1s:
                den += x
            chk += probe
        p0_flags = [next(host) for _ in fresh]
        local = _Sums(delta, den, chk, next(host), next(host), 0.0, _limits(narrow > 0),
                      half > 0, p0_flags)
        if mode != "check":
            return local
        rows = list(host)
        width = len(rows) // dist.get_world_size()
        rows = [rows[i:i + width] for i in range(0, len(rows), width)]
        failed = sum(r[5] for r in rows)
        if failed:
            local.failed_ranks = failed
            return local
        if _same_parameters([r[_N_REDUCE:] for r in rows]):
            self._replica_key = self._groups_key()  # data parallel: never communicate again
            return local
        # Sharded without fsdp_in_use (ZeroRedundancyOptimizer): reduce, now and from now on
        self._shard_key = self._groups_key()
        warnings.warn(_sharded_warning(type(self).__name__, rows), UserWarning,
                      stacklevel=_caller_level())
        tot = [sum(r[i] for r in rows) for i in range(_N_REDUCE)]
        return _Sums(tot[0], tot[1], tot[2], tot[3], tot[4], 0.0,
                     _limits(max(r[6] for r in rows) > 0), max(r[7] for r in rows) > 0, p0_flags)

    def _groups_key(self) -> tuple[int, ...]:
        return tuple(len(g["params"]) for g in self.param_groups)

    def _dist_mode(self) -> str:
        """How this step's d sums combine across ranks.

        ``"local"``: one process (or ``independent_ranks``). ``"reduce"``: sharded
        (``fsdp_in_use``, DTensor or FSDP1 flat parameters): the sums are all-reduced every
        step. ``"check"``: several ranks, no sharding declared or detected, not yet verified:
        the step (the first, and the first after the param groups change) all-gathers the
        sums with a fingerprint of each rank's parameters. Identical fingerprints (data
        parallel: every rank holds every parameter) make it ``"replicated"``, which never
        communicates; different ones (ZeroRedundancyOptimizer without ``fsdp_in_use``) make
        it ``"reduce"`` with a warning, so every rank uses the d of the whole model.
        """
        if (self.__dict__.get("_independent_ranks") or dist is None or not dist.is_available()
                or not dist.is_initialized() or dist.get_world_size() < 2):
            return "local"
        if self.param_groups[0]["fsdp_in_use"] or self._has_sharded_params():
            return "reduce"
        key = self._groups_key()
        if self.__dict__.get("_shard_key") == key:
            return "reduce"
        return "replicated" if self.__dict__.get("_replica_key") == key else "check"

    def _has_sharded_params(self) -> bool:
        """Whether any parameter (with a grad or not) is a DTensor or an FSDP1 flat parameter."""
        # Scanning every parameter each step costs ~0.5 ms per 2000 tensors: redo it only when
        # the groups change (a parameter does not turn into a DTensor under an optimizer).
        key = self._groups_key()
        if self.__dict__.get("_sharded_key") != key:
            self._sharded_params = any(_is_dtensor(p) or hasattr(p, "_fsdp_flattened")
                                       for g in self.param_groups for p in g["params"])
            self._sharded_key = key
        return self._sharded_params

    def _collective(self, mode: str, vec: Tensor) -> Tensor:
        """The step's one collective: all-reduce (``"reduce"``) or all-gather (``"check"``)."""
        self._joined = True
        if mode == "reduce":
            dist.all_reduce(vec, op=dist.ReduceOp.SUM)
            return vec
        out = [torch.empty_like(vec) for _ in range(dist.get_world_size())]
        dist.all_gather(out, vec)
        return torch.stack(out)

    def _join_failed(self) -> None:
        """This rank raised before the step's collective: join it anyway with a failure flag,
        so the other ranks raise too instead of waiting. Joins exactly when the others reach
        it: the mode and the frozen-step rule depend only on values every rank shares."""
        try:
            mode = self._dist_mode()
            lr = max(float(g["lr"]) for g in self.param_groups)
            if mode not in ("reduce", "check") or lr == 0:
                return
            dev = self._main_device()
            acc = _acc_dtype(dev)
            n = _N_REDUCE if mode == "reduce" else _N_REDUCE + _N_FINGERPRINT
            vec = torch.zeros(n, dtype=acc, device=dev)
            vec[5] = 1.0  # the failure flag
            self._collective(mode, vec)
        except Exception:  # the error being raised is the one to report
            pass

    def _fingerprint(self, dev: torch.device, acc: torch.dtype) -> Tensor:
        """This rank's parameter set: count, elements, a hash of the shapes, and the L1 and
        squared L2 norms of the values (data-parallel ranks hold the same values)."""
        ps = [_local(p) for g in self.param_groups for p in g["params"]]
        h = 0
        for p in ps:
            h = (h * 1000003 + hash(tuple(p.shape))) % 2147483647
        l1 = l2 = torch.zeros((), dtype=acc, device=dev)
        nonempty = [p.detach() for p in ps if p.numel()]
        if nonempty:
            for (ts,), _ in group_by_device_dtype(nonempty).values():
                l1 = l1 + torch.stack(tc.foreach_norm(ts, ord=1)).to(dev, acc).sum()
                l2 = l2 + torch.stack(tc.foreach_norm(ts, ord=2)).to(dev, acc).square().sum()
        head = torch.tensor([len(ps), sum(p.numel() for p in ps), h], dtype=acc, device=dev)
        return torch.cat([head, l1.reshape(1), l2.reshape(1)])

    def _narrowest_is_float32(self, active: list[GroupWork]) -> bool:
        """Whether this step computes or stores anything in float32 range (a float32, bfloat16
        or float16 parameter, or a narrower ``state_dtype``), else everything is float64."""
        if self._state_dtype is not None:
            return True
        return any(p.dtype != torch.float64 for w in active for p in w.params)

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

    def _main_device(self) -> torch.device:
        """The device of the step's scalars and collective: the first parameter's, in any
        group (group 0 may be empty); with none on this rank (a ZeRO shard with no
        parameters) the process group's device."""
        for g in self.param_groups:
            for p in g["params"]:
                return _local(p).device
        if dist is not None and dist.is_available() and dist.is_initialized():
            backend = str(dist.get_backend())
            if "nccl" in backend and torch.cuda.is_available():
                return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

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


#: the all-reduced vector: [c_num * sum dots, sum ||s'||_1, max |g| (summed over groups and
#: ranks), max |p|, max |s'|, failed ranks, float32 range in use, float16 parameters]
_N_REDUCE = 8
#: count, elements, shape hash, L1, squared L2 (see Prodigy._fingerprint)
_N_FINGERPRINT = 5


class _Sums:
    """What the step's host sync returns (see ``Prodigy._global_sums``)."""

    __slots__ = ("delta", "den", "gmax", "pmax", "smax", "failed_ranks", "limits", "half",
                 "flags")

    def __init__(self, delta: float, den: float, gmax: float, pmax: float, smax: float,
                 failed_ranks: float, limits: torch.finfo, half: bool,
                 flags: list[float]) -> None:
        self.delta, self.den, self.gmax, self.pmax, self.smax = delta, den, gmax, pmax, smax
        self.failed_ranks, self.limits, self.half, self.flags = failed_ranks, limits, half, flags


_HALF_MAX = torch.finfo(torch.float16).max
_INTERNAL = (os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
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


def _same_parameters(fps: list[list[float]]) -> bool:
    """Whether every rank's fingerprint is the same: counts and the shape hash exactly, the
    norms to 1e-6 relative (identical values summed the same way agree exactly; the tolerance
    only absorbs another reduction order on other hardware; NaN weights are reported by the
    non-finite check, not here)."""
    first = fps[0]
    return all(fp[:3] == first[:3] and all(
        abs(a - b) <= 1e-6 * max(abs(a), abs(b)) or not (math.isfinite(a) and math.isfinite(b))
        for a, b in zip(fp[3:], first[3:])) for fp in fps[1:])


def _sharded_warning(owner: str, rows: list[list[float]]) -> str:
    desc = "; ".join(f"rank {i}: {int(r[_N_REDUCE])} tensors, {int(r[_N_REDUCE + 1])} elements"
                     for i, r in enumerate(rows))
    return (
        f"{owner}: the ranks hold different parameters ({desc}, or the same shapes with other "
        "values): the optimizer is sharded across ranks (e.g. ZeroRedundancyOptimizer), so "
        "Prodigy all-reduces its d statistics every step from now on and every rank uses the "
        "d of the whole model. Pass fsdp_in_use=True to say so (and silence this warning), "
        "or independent_ranks=True if each rank trains its own model"
    )


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
        wd, eps = float(g["weight_decay"]), float(g["eps"])
        c_s = (d / d0) * d if g["safeguard_warmup"] else (d / d0) * dlr
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


def _max_abs(tensors: list[Tensor]) -> Tensor | None:
    """max |t| over ``tensors`` (float64 on the first tensor's device), one multi-tensor op per
    (device, dtype); None when there is nothing to scan."""
    nonempty = [t.detach() for t in tensors if t.numel()]
    if not nonempty:
        return None
    dev = nonempty[0].device
    acc = _acc_dtype(dev)
    out = [_absmax(ts).to(dev, acc) for (ts,), _ in group_by_device_dtype(nonempty).values()]
    return torch.stack(out).max()


#: below this many elements a tensor joins the others in one ``cat`` before its max |t|
_SMALL_ABSMAX = 1 << 16


def _absmax(ts: list[Tensor]) -> Tensor:
    """max |t| over non-empty tensors of one device and dtype, NaN if any entry is NaN.

    ``aminmax`` (one vectorised pass) rather than the inf-norm, whose CPU kernel measured 20x
    slower here (1.07 ms against 0.06 ms for 2^18 float32); small tensors are concatenated
    first so that a model with thousands of them costs a few ops, not one per tensor."""
    parts: list[Tensor] = []
    small = [t if t.dim() == 1 else t.reshape(-1) for t in ts if t.numel() < _SMALL_ABSMAX]
    big = [t for t in ts if t.numel() >= _SMALL_ABSMAX]
    for t in big + ([torch.cat(small)] if small else []):
        lo, hi = torch.aminmax(t)
        parts += [hi, lo.neg()]
    return torch.stack(parts).max()


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


# ---------------------------------------------------------------------------------- math
def prodigy_stats_reference(
    params: list[Tensor], grads: list[Tensor], s: list[Tensor], p0: list[Tensor], *,
    slice_p: int, beta3: float, c_s: float, coupled_wd: float,
) -> tuple[list[float], list[float], float]:
    """Phase 1, one tensor at a time, in prodigyopt's order of operations. Reads only.

    Returns per tensor ``<g_sl, p0 - p_sl>`` and ``||s'||_1`` with ``s' = beta3 * s + c_s *
    g_sl`` (``s'`` itself is written in phase 2, once the step is known to be finite), and a
    finiteness probe: max |g| when ``slice_p > 1`` (the slice does not see every gradient
    entry), else 0.
    """
    dots: list[float] = []
    l1s: list[float] = []
    chk = 0.0
    for p, g, s_, p0_ in zip(params, grads, s, p0):
        if p.dtype in _LOW_PRECISION:
            p, g = p.float(), g.float()
        if coupled_wd != 0:
            g = g.add(p, alpha=coupled_wd)  # g + wd * theta, in a new tensor
        s_, p0_ = s_.to(p.dtype), p0_.to(p.dtype)  # narrower state_dtype: compute upcast
        g_sl = g.flatten()[::slice_p]
        dots.append(torch.dot(g_sl, p0_ - p.flatten()[::slice_p]).item())  # r increment / c
        l1s.append(s_.mul(beta3).add_(g_sl, alpha=c_s).abs().sum().item())  # ||s'||_1 term
        if g.numel():  # bounds the outputs (and sees a NaN/inf outside the slice)
            m = g.abs().amax().item()
            chk = max(chk, m) if m == m else math.nan  # max(), keeping a NaN
    return dots, l1s, chk


def prodigy_stats_foreach(
    params: list[Tensor], grads: list[Tensor], s: list[Tensor], p0: list[Tensor], *,
    slice_p: int, beta3: float, c_s: float, coupled_wd: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """Phase 1 without host syncs: the values of :func:`prodigy_stats_reference` as tensors.

    Per-tensor dots and L1 norms (input order, float64 on the first tensor's device) and the
    probe. torch has no multi-tensor dot or sum, so the reductions run per tensor, each
    temporary freed before the next (a list of live temporaries costs page faults on CPU);
    they match the reference bit for bit (``foreach_norm(ord=1)`` would sum in another order).
    """
    dev = params[0].device
    acc = _acc_dtype(dev)
    dots, l1s = [], []
    for p, g, s_, p0_ in zip(params, grads, s, p0):
        p_sl, g_sl = p.reshape(-1)[::slice_p], g.reshape(-1)[::slice_p]
        if p.dtype in _LOW_PRECISION:
            p_sl, g_sl = p_sl.float(), g_sl.float()
        if coupled_wd != 0:
            g_sl = g_sl.add(p_sl, alpha=coupled_wd)  # a new tensor: p.grad untouched
        s_, p0_ = s_.to(p_sl.dtype), p0_.to(p_sl.dtype)  # narrower state_dtype: compute upcast
        dots.append(torch.dot(g_sl, p0_ - p_sl))
        l1s.append(torch.mul(s_, beta3).add_(g_sl, alpha=c_s).abs_().sum())
    chk = torch.zeros((), dtype=acc, device=dev)
    nonempty = [g for g in grads if g.numel()]  # the inf-norm of an empty tensor is an error
    if nonempty:  # bounds the outputs; NaN/inf iff a gradient entry is (slices miss some)
        for (gs,), _ in group_by_device_dtype(nonempty).values():
            chk = chk + _absmax(gs).to(dev, acc)
    return (torch.stack([t.to(dev, acc) for t in dots]),
            torch.stack([t.to(dev, acc) for t in l1s]), chk)


def prodigy_apply_reference(
    params: list[Tensor], grads: list[Tensor], s: list[Tensor], exp_avgs: list[Tensor] | None,
    exp_avg_sqs: list[Tensor], *, slice_p: int, beta3: float, c_s: float, coupled_wd: float,
    beta1: float, beta2: float, d: float, d_new: float, dlr: float, eps: float,
    decoupled_wd: float, stochastic_rounding: bool, update_params: bool = True,
) -> None:
    """Phase 2, one tensor at a time: s' and the moments with the old d, the step with d'."""
    for i, (p, g) in enumerate(zip(params, grads)):
        low = p.dtype in _LOW_PRECISION
        theta = p.float() if low else p
        if low:
            g = g.float()
        if coupled_wd != 0:
            g = g.add(theta, alpha=coupled_wd)  # coupled L2, in a new tensor
        s[i].mul_(beta3).add_(g.flatten()[::slice_p], alpha=c_s)  # s <- beta3 s + c_s g_sl
        v = exp_avg_sqs[i]
        if exp_avgs is not None:
            exp_avgs[i].mul_(beta1).add_(g, alpha=d * (1 - beta1))  # m <- b1 m + d(1-b1) g
        v.mul_(beta2).addcmul_(g, g, value=d * d * (1 - beta2))  # v <- b2 v + d^2(1-b2) g^2
        if not update_params:
            continue
        denom = v.sqrt().add_(d_new * eps)  # sqrt(v) + d' eps
        if decoupled_wd != 0:
            theta.add_(theta, alpha=-decoupled_wd * dlr)  # theta -= wd dlr theta
        if exp_avgs is not None:
            theta.addcdiv_(exp_avgs[i], denom, value=-dlr)  # theta -= dlr m / denom
        else:
            theta.addcdiv_(g, denom, value=-dlr * d_new)  # theta -= dlr d' g / denom
        if low:
            _write_back(p, theta, stochastic_rounding)


#: size of one multi-tensor chunk (float32 bytes), which bounds the live temporaries. On CPU
#: foreach ops loop over tensors anyway, and small chunks keep the data in cache and let the
#: allocator reuse warm pages: measured here (20 x 1 MiB tensors, 1 thread) 1 MiB chunks ran
#: at prodigyopt's per-tensor speed, 8 MiB chunks ~1.8x and unchunked ~2.3x slower. On GPUs
#: larger chunks mean fewer kernel launches; 32 MiB still bounds the extra memory.
_CHUNK_BYTES = {"cpu": 1 << 20}
_CHUNK_BYTES_DEFAULT = 32 << 20


def prodigy_apply_foreach(
    params: list[Tensor], grads: list[Tensor], s: list[Tensor], exp_avgs: list[Tensor] | None,
    exp_avg_sqs: list[Tensor], *, slice_p: int, beta3: float, c_s: float, coupled_wd: float,
    beta1: float, beta2: float, d: float, d_new: float, dlr: float, eps: float,
    decoupled_wd: float, stochastic_rounding: bool, update_params: bool = True,
) -> None:
    """Phase 2 with multi-tensor ops per (device, dtype) chunk: the same equations."""
    lists = (params, grads, s, exp_avg_sqs) + ((exp_avgs,) if exp_avgs is not None else ())
    for blists, _ in group_by_device_dtype(*lists).values():
        for lo, hi in _chunks(blists[0]):
            ps, gs, ss, vs = (lst[lo:hi] for lst in blists[:4])
            ms = blists[4][lo:hi] if exp_avgs is not None else None
            low = ps[0].dtype in _LOW_PRECISION
            thetas = [p.float() for p in ps] if low else ps
            if low:
                gs = [g.float() for g in gs]
            if coupled_wd != 0:
                gs = tc.foreach_add(gs, thetas, alpha=coupled_wd)  # new tensors
            tc.foreach_mul_(ss, beta3)
            tc.foreach_add_(ss, [g.reshape(-1)[::slice_p] for g in gs], alpha=c_s)
            if ms is not None:
                tc.foreach_mul_(ms, beta1)
                tc.foreach_add_(ms, gs, alpha=d * (1 - beta1))
            tc.foreach_mul_(vs, beta2)
            tc.foreach_addcmul_(vs, gs, gs, value=d * d * (1 - beta2))
            if not update_params:
                continue
            denom = tc.foreach_sqrt(vs)
            tc.foreach_add_(denom, d_new * eps)
            if decoupled_wd != 0:
                tc.foreach_add_(thetas, thetas, alpha=-decoupled_wd * dlr)
            if ms is not None:
                tc.foreach_addcdiv_(thetas, ms, denom, value=-dlr)
            else:
                tc.foreach_addcdiv_(thetas, gs, denom, value=-dlr * d_new)
            if low:
                if stochastic_rounding:
                    for p, t in zip(ps, thetas):
                        stochastic_round_(p, t)
                else:
                    tc.foreach_copy_(ps, thetas)


#: the fast path (see ``Prodigy._fast``): dtypes and device types, and the ``d`` for which
#: ``1/d`` is a normal float32 (the fused kernel's ``grad_scale``); outside it the foreach path
_FAST_DTYPES = (torch.float32,)
_FAST_DEVICES = ("cpu",)
_FAST_D_RANGE = (1e-30, 1e30)
_PLAIN = (torch.Tensor, torch.nn.Parameter)


def prodigy_stats_fast(
    params: list[Tensor], grads: list[Tensor], s: list[Tensor], p0: list[Tensor], *,
    slice_p: int, beta3: float, c_s: float, coupled_wd: float, scratch: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    """Phase 1 for plain contiguous same-dtype tensors: :func:`prodigy_stats_foreach`'s sums,
    rounded differently.

    Returns partial sums whose totals are the sums of ``<g_sl, p0 - p_sl>`` and ``||s'||_1``
    (one value per piece, not per tensor) and the probe. Large tensors are cut into pieces of
    at most ``scratch.numel() // 2`` elements whose temporaries live in ``scratch``: fresh
    megabyte temporaries cost page faults on CPU (the allocator hands such blocks back to the
    OS), which measured here as 2x on this phase. Runs of small tensors are reduced with a few
    multi-tensor ops and one ``cat`` into ``scratch`` instead of ~6 ops per tensor (per-op
    overhead dominates below ~10^4 elements). Float32 sums in another order than the
    reference: agreement to float32 rounding, not bitwise. A NaN/inf anywhere in ``g``
    (``slice_p == 1``), ``p``, ``p0`` or ``s`` makes a sum non-finite, as in the reference.
    The probe, max |g|, is taken piece by piece while the piece is in cache (``slice_p ==
    1``), or over whole gradients (``slice_p > 1``: the slices do not see every entry).
    """
    dev = params[0].device
    acc = _acc_dtype(dev)
    piece = scratch.numel() // 2
    buf_a, buf_b = scratch[:piece], scratch[piece:2 * piece]
    dots: list[Tensor] = []
    l1s: list[Tensor] = []
    gmax: list[Tensor] = []
    small: list[int] = []  # indices of a run of small tensors, reduced together

    def flush() -> None:
        if not small:
            return
        p_sl = [params[i].view(-1)[::slice_p] for i in small]
        g_sl = [grads[i].view(-1)[::slice_p] for i in small]
        if slice_p == 1:
            gmax.append(_absmax(g_sl))
        if coupled_wd != 0:
            g_sl = tc.foreach_add(g_sl, p_sl, alpha=coupled_wd)  # new tensors: p.grad untouched
        diffs = tc.foreach_sub([p0[i] for i in small], p_sl)  # a 0-dim (zero) p0 broadcasts
        tc.foreach_mul_(diffs, g_sl)
        n = sum(x.numel() for x in diffs)
        dots.append(torch.cat(diffs, out=buf_a[:n]).sum())
        del diffs
        s_new = tc.foreach_mul([s[i] for i in small], beta3)
        tc.foreach_add_(s_new, g_sl, alpha=c_s)
        l1s.append(torch.stack(tc.foreach_norm(s_new, ord=1)).sum())
        small.clear()

    run = 0
    for i, p in enumerate(params):
        n = -(-p.numel() // slice_p)
        if n == 0:
            continue  # an empty tensor adds nothing
        if n <= piece // 8:  # small: joins the current run
            if run + n > piece:
                flush()
                run = 0
            small.append(i)
            run += n
            continue
        p_sl, g_sl, q = p.view(-1)[::slice_p], grads[i].view(-1)[::slice_p], p0[i]
        for lo in range(0, n, piece):
            hi = min(n, lo + piece)
            pp, gg, ss = p_sl[lo:hi], g_sl[lo:hi], s[i][lo:hi]
            qq = q if q.dim() == 0 else q[lo:hi]  # 0-dim: a zero p0 (broadcasts)
            if slice_p == 1:
                lo_, hi_ = torch.aminmax(gg)
                gmax += [hi_, lo_.neg()]
            if coupled_wd != 0:
                gg = torch.add(gg, pp, alpha=coupled_wd, out=buf_b[:hi - lo])
            dots.append(torch.dot(gg, torch.sub(qq, pp, out=buf_a[:hi - lo])))
            l1s.append(torch.mul(ss, beta3, out=buf_a[:hi - lo]).add_(gg, alpha=c_s).abs_().sum())
    flush()
    chk = torch.zeros((), dtype=acc, device=dev)
    nonempty = [g for g in grads if g.numel()]
    if gmax:
        chk = torch.stack(gmax).to(acc).max()
    elif nonempty and slice_p > 1:  # NaN/inf iff a gradient entry is (slices miss some)
        for (gs,), _ in group_by_device_dtype(nonempty).values():
            chk = chk + _absmax(gs).to(acc)
    if not dots:
        zero = torch.zeros(1, dtype=acc, device=dev)
        return zero, zero, chk
    return torch.stack(dots).to(acc), torch.stack(l1s).to(acc), chk


def prodigy_apply_fused(
    params: list[Tensor], grads: list[Tensor], s: list[Tensor], exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor], *, slice_p: int, beta3: float, c_s: float, coupled_wd: float,
    beta1: float, beta2: float, d: float, d_new: float, dlr: float, eps: float,
    decoupled_wd: float, scratch: Tensor,
) -> None:
    """Phase 2 through torch's single-pass fused Adam(W) kernel (beta1 > 0, one dtype).

    The kernel computes, with ``grad_scale = 1/d``, ``lr = dlr``, ``eps = d' * eps`` and bias
    corrections of exactly 1 (``_torch_compat.fused_adam_unit_step``)::

        theta = theta - (dlr * wd) * theta      (decoupled: a foreach op before the kernel)
        gk    = g / (1/d)  (+ (d * wd) * theta when coupled: gk = d * (g + wd * theta))
        m     = lerp(m, gk, 1 - beta1)      = beta1 m + d (1 - beta1) g
        v     = beta2 v + (1 - beta2) gk^2  = beta2 v + d^2 (1 - beta2) g^2
        theta = theta - dlr * m / (sqrt(v) + d' * eps)

    which is :func:`prodigy_apply_foreach`'s update up to float32 rounding (``1/d`` rounded to
    float32, lerp, and ``c_s * g + (c_s * wd) * theta`` for ``c_s * (g + wd * theta)`` in ``s``).

    With a ``grad_scale`` the kernel writes the unscaled gradient back into its gradient
    argument (it mirrors GradScaler's in-place unscale), so the kernel never sees ``p.grad``:
    the work goes in pieces of at most ``scratch.numel()`` elements (whole small tensors, or
    slices of large ones), each piece's gradients are copied into ``scratch`` (cache-sized, so
    the kernel reads them from cache), ``s`` is updated from that copy, then the kernel runs.
    """
    dev = params[0].device
    inv_d = torch.tensor(1.0 / d, dtype=torch.float32, device=dev)
    step = tc.fused_adam_unit_step(dev)
    for piece in _pieces([p.numel() for p in params], scratch.numel()):
        ps = [params[i].view(-1)[a:b] for i, a, b in piece]
        gs = [grads[i].view(-1)[a:b] for i, a, b in piece]
        gk, off = [], 0
        for g in gs:
            gk.append(scratch[off:off + g.numel()])
            off += g.numel()
        tc.foreach_copy_(gk, gs)
        # s covers elements 0, slice_p, 2 slice_p, ... of each tensor: those inside [a, b)
        firsts = [-(-a // slice_p) * slice_p for _, a, _ in piece]
        ss = [s[i][f // slice_p:-(-b // slice_p)] for (i, _, b), f in zip(piece, firsts)]
        tc.foreach_mul_(ss, beta3)
        tc.foreach_add_(ss, [g[f - a::slice_p] for g, (_, a, _), f in zip(gk, piece, firsts)],
                        alpha=c_s)
        if coupled_wd != 0:  # s <- beta3 s + c_s (g + wd theta)_sl, without a temporary
            tc.foreach_add_(ss, [x[f - a::slice_p] for x, (_, a, _), f in zip(ps, piece, firsts)],
                            alpha=c_s * coupled_wd)
        if decoupled_wd != 0:
            # Not the kernel's decoupled decay: it multiplies by (1 - dlr * wd) rounded to
            # float32, and while dlr * wd is near float32's epsilon (Prodigy's first steps,
            # d ~ d0) that factor is off by up to half an ulp of 1 in the same direction for
            # every element: a bias in p - p0 that moved d by 0.5% in 30 steps. Adding
            # -dlr*wd*theta rounds once per element, as the foreach path does.
            tc.foreach_add_(ps, ps, alpha=-decoupled_wd * dlr)
        tc.fused_adam_(ps, gk, [exp_avgs[i].view(-1)[a:b] for i, a, b in piece],
                       [exp_avg_sqs[i].view(-1)[a:b] for i, a, b in piece], [],
                       [step] * len(piece), amsgrad=False, lr=dlr, beta1=beta1, beta2=beta2,
                       weight_decay=coupled_wd * d, eps=d_new * eps, maximize=False,
                       grad_scale=inv_d, found_inf=None)


def _pieces(numels: list[int], cap: int) -> list[list[tuple[int, int, int]]]:
    """Group ``(tensor index, start, end)`` element ranges into pieces of at most ``cap``
    elements: consecutive whole tensors while they fit, a larger tensor cut into slices."""
    out: list[list[tuple[int, int, int]]] = []
    cur: list[tuple[int, int, int]] = []
    size = 0
    for i, n in enumerate(numels):
        for a in range(0, n, cap):
            b = min(n, a + cap)
            if size + (b - a) > cap:
                out.append(cur)
                cur, size = [], 0
            cur.append((i, a, b))
            size += b - a
    if cur:
        out.append(cur)
    return out


# ------------------------------------------------------------------- compile=True kernels
def _stats_kernel(p: Tensor, g: Tensor, s: Tensor, p0: Tensor, hp: Tensor) -> Tensor:
    """Phase 1 of one 1-D tensor in one read of ``p, g, s, p0``: ``[<g, p0 - p>, ||s'||_1,
    max |g|]`` with ``g <- g + coupled_wd * p`` (max |g| before) and ``s' = beta3 s + c_s g``;
    ``hp = [beta3, c_s, coupled_wd]``. Nothing is written (s' is written in phase 2)."""
    beta3, c_s, wd = hp.unbind(0)
    gmax = torch.max(torch.abs(g))
    g = g + wd * p  # wd = 0 adds exactly 0
    return torch.stack([torch.sum(g * (p0 - p)), torch.sum(torch.abs(beta3 * s + c_s * g)),
                        gmax])


def _apply_math(p: Tensor, g: Tensor, s: Tensor, m: Tensor | None, v: Tensor,
                hp: Tensor) -> None:
    """Phase 2 of one 1-D tensor in one pass: :func:`prodigy_apply_reference`'s equations.
    ``hp = [beta3, c_s, coupled_wd, beta1, beta2, d, d_new, dlr, eps, decoupled_wd]``."""
    beta3, c_s, wd, beta1, beta2, d, d_new, dlr, eps, wd_dec = hp.unbind(0)
    g = g + wd * p
    s.copy_(beta3 * s + c_s * g)
    v_new = beta2 * v + d * d * (1 - beta2) * g * g
    v.copy_(v_new)
    denom = torch.sqrt(v_new) + d_new * eps
    theta = p - (wd_dec * dlr) * p
    if m is not None:
        m_new = beta1 * m + d * (1 - beta1) * g
        m.copy_(m_new)
        p.copy_(theta - dlr * m_new / denom)
    else:
        p.copy_(theta - (dlr * d_new) * g / denom)


# one entry point per variant: torch.compile keys its cache on the code object
def _apply_kernel_m(p: Tensor, g: Tensor, s: Tensor, m: Tensor, v: Tensor, hp: Tensor) -> None:
    _apply_math(p, g, s, m, v, hp)


def _apply_kernel_no_m(p: Tensor, g: Tensor, s: Tensor, v: Tensor, hp: Tensor) -> None:
    _apply_math(p, g, s, None, v, hp)


def prodigy_stats_compiled(
    params: list[Tensor], grads: list[Tensor], s: list[Tensor], p0: list[Tensor], *,
    slice_p: int, beta3: float, c_s: float, coupled_wd: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """Phase 1 with ``compile=True`` (slice_p 1): per tensor ``(dots, l1s)`` as tensors, and
    max |g| over the tensors (the bound of the output checks)."""
    k = _compiled.kernel(_stats_kernel)
    out = []
    for p, g, s_, q in zip(params, grads, s, p0):
        if p.numel() == 0:
            continue
        hp = _compiled.scalars(p, beta3, c_s, coupled_wd)
        if q.dim() == 0:  # a zero p0 (prodigyopt's all-zero parameter): broadcast it
            q = q.expand(p.shape)
        if p.numel() >= 2 and q.is_contiguous():
            out.append(k(*_compiled.flat1d(p, g, s_, q), hp))
        else:  # tiny or broadcast p0: the reference's two sums, eagerly
            gg = g.reshape(-1) + coupled_wd * p.reshape(-1)
            out.append(torch.stack([torch.dot(gg, q.reshape(-1) - p.reshape(-1)),
                                    (beta3 * s_ + c_s * gg).abs().sum(), g.abs().max()]))
    acc = _acc_dtype(params[0].device)
    zero = torch.zeros((), dtype=acc, device=params[0].device)
    if not out:
        return zero.reshape(1), zero.reshape(1), zero
    both = torch.stack(out).to(acc)
    return both[:, 0], both[:, 1], both[:, 2].max()


def prodigy_apply_compiled(
    params: list[Tensor], grads: list[Tensor], s: list[Tensor], exp_avgs: list[Tensor] | None,
    exp_avg_sqs: list[Tensor], *, slice_p: int, beta3: float, c_s: float, coupled_wd: float,
    beta1: float, beta2: float, d: float, d_new: float, dlr: float, eps: float,
    decoupled_wd: float,
) -> None:
    """Phase 2 with ``compile=True``: one compiled pass per tensor over ``p, g, s, m, v``."""
    k = _compiled.kernel(_apply_kernel_m if exp_avgs is not None else _apply_kernel_no_m)
    for i, (p, g) in enumerate(zip(params, grads)):
        if p.numel() == 0:
            continue
        hp = _compiled.scalars(p, beta3, c_s, coupled_wd, beta1, beta2, d, d_new, dlr, eps,
                               decoupled_wd)
        m = [exp_avgs[i]] if exp_avgs is not None else []
        if p.numel() >= 2:
            k(*_compiled.flat1d(p, g, s[i], *m, exp_avg_sqs[i]), hp)
        else:
            prodigy_apply_reference(
                [p], [g], [s[i]], m or None, [exp_avg_sqs[i]], slice_p=1, beta3=beta3,
                c_s=c_s, coupled_wd=coupled_wd, beta1=beta1, beta2=beta2, d=d, d_new=d_new,
                dlr=dlr, eps=eps, decoupled_wd=decoupled_wd, stochastic_rounding=False)


def _chunks(tensors: list[Tensor]) -> list[tuple[int, int]]:
    """Consecutive index ranges whose float32-equivalent size stays within the chunk budget."""
    return chunks(tensors, _CHUNK_BYTES.get(tensors[0].device.type, _CHUNK_BYTES_DEFAULT))


def _write_back(p: Tensor, value: Tensor, stochastic: bool) -> None:
    if stochastic:
        stochastic_round_(p, value)
    else:
        p.copy_(value)  # round to nearest


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


def _bias_correction(group: dict[str, Any], k: int) -> float:
    if not group["use_bias_correction"]:
        return 1.0
    beta1, beta2 = (float(b) for b in group["betas"])
    return ((1 - beta2 ** (k + 1)) ** 0.5) / (1 - beta1 ** (k + 1))


def _effective_lr(group: dict[str, Any]) -> float:
    """The multiplier the next step applies: d * lr * bias_correction (0 for a frozen group)."""
    return float(group["d"]) * float(group["lr"]) * _bias_correction(group, int(group["k"]))


def _local(t: Tensor) -> Tensor:
    return t.to_local() if _is_dtensor(t) else t


def _dtensor_sliced(p: Tensor, slice_p: int, dtype: torch.dtype, *, copy: bool) -> Tensor:
    """State ``s`` (zeros) or ``p0`` (``copy``) of DTensor ``p``, as a DTensor on p's mesh.

    ``slice_p == 1``: p's shape and placements (like ``exp_avg``); the local view flattened is
    this rank's ``flatten()`` of its shard. ``slice_p > 1``: this rank's slice
    ``shard.flatten()[::slice_p]`` has a length that differs between ranks and matches no
    Shard layout of a 1-D tensor (torch splits dims as ``torch.chunk`` does), so every rank
    holds one row of length ``L`` (the longest slice any rank can have), zero-padded: global
    shape ``(*mesh sizes of p's sharded mesh dims, L)``, one Shard per sharded mesh dim,
    Replicate where p is replicated. Padding is never read or written by the step.
    """
    if slice_p == 1:
        out = torch.zeros_like(p, dtype=dtype, memory_format=torch.contiguous_format)
        return out.copy_(p.detach()) if copy else out
    mesh, pl = p.device_mesh, p.to_local()
    lead: list[int] = []
    placements: list[Any] = []
    largest = list(p.shape)  # the largest local shard: torch.chunk puts the remainder first
    for mesh_dim, placement in enumerate(p.placements):
        if placement.is_shard():
            largest[placement.dim] = -(-largest[placement.dim] // mesh.size(mesh_dim))
            placements.append(Shard(len(lead)))
            lead.append(mesh.size(mesh_dim))
        else:  # Replicate (parameters are never Partial)
            placements.append(Replicate())
    width = -(-math.prod(largest) // slice_p)
    n = -(-pl.numel() // slice_p)
    if n > width:  # a layout other than torch.chunk's (e.g. _StridedShard): say so, don't guess
        raise NotImplementedError(
            f"Prodigy: slice_p={slice_p} with DTensor placements {p.placements} of shape "
            f"{tuple(p.shape)} gives a local slice of {n} elements, more than the {width} "
            f"expected; use slice_p=1 with this sharding"
        )
    local = torch.zeros((1,) * len(lead) + (width,), dtype=dtype, device=pl.device)
    if copy:
        local.view(-1)[:n].copy_(pl.reshape(-1)[::slice_p])
    return DTensor.from_local(local, mesh, placements, run_check=False,
                              shape=torch.Size((*lead, width)),
                              stride=tuple(math.prod(lead[i + 1:]) * width for i in range(len(lead)))
                              + (1,))


def _sliced_local(t: Tensor, p: Tensor, slice_p: int) -> Tensor:
    """The flat local ``s``/``p0`` the step computes on: ``t`` itself when not a DTensor, else
    a view of this rank's part (padding cut off), so in-place updates land in ``t``."""
    if not _is_dtensor(t):
        return t
    return t.to_local().view(-1)[: -(-_local(p).numel() // slice_p)]


def _is_dtensor(t: Tensor) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def _stat_dtype(p: Tensor) -> torch.dtype:
    return torch.float32 if p.dtype in _LOW_PRECISION else p.dtype


def _acc_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64


def _norm(v: Any) -> Any:
    if isinstance(v, Tensor):
        return float(v)
    if isinstance(v, (list, tuple)):
        return tuple(_norm(x) for x in v)
    return v
