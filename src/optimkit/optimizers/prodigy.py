r"""Prodigy: Adam with a learning rate estimated on the fly (Mishchenko & Defazio, 2023).

Compatible with ``prodigyopt`` 1.1.2: same arguments, defaults, param-group keys and state
keys, so a ``prodigyopt.Prodigy`` state_dict loads here and continues identically (and back).

One step, with :math:`d` the current distance estimate (one value for every group; one per
group with ``split_groups=True``, each group then running these equations on its own),
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
    d'    = min(d', d_limit)                              if d_limit is set
    d'    = d                                             if k >= d_freeze_step (frozen)
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
   with ``wd dlr > 2`` checks ``max |p| (wd dlr - 1)``. Not checked: the update ``dlr m / (sqrt(v) + d' eps)``,
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

Where things live: this module holds the class (options, state, and :meth:`Prodigy._apply`,
the step: statistics -> d update -> apply) and the per-tensor reference (the equations);
``_prodigy/`` holds the mechanisms: ``paths`` (which implementation runs a group),
``foreach``, ``fused`` (CPU float32 fast path), ``compiled``, ``sharding`` (the host sync and
the collective), ``nonfinite`` (the checks before the first write), ``checkpoint``
(state_dict checks, dtype recasts) and ``common``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from .. import _torch_compat as tc
from .._base import ANY, PARAM_SHAPE, SCALAR, GroupWork, OptimizerBase, ParamsT
from .._rounding import LowPrecisionStateMixin
from .._validation import check_betas, check_bool, check_range, fail, fail_type, scalar
from ._prodigy.checkpoint import CheckpointMixin
from ._prodigy.common import (_LOW_PRECISION, _dtensor_sliced, _effective_lr, _is_dtensor,
                              _local, _max_abs, _stat_dtype, _write_back)
from ._prodigy.nonfinite import (NonFiniteMixin, NonFiniteStepError,  # noqa: F401 (public here)
                                 _input_problem, _locate_nonfinite,
                                 _output_problem)
from ._prodigy.diagnosis import Diagnosis, ProdigyDiagnosisWarning  # noqa: F401 (public)
from ._prodigy.groups import FLOAT_SCALARS, GroupsMixin, check_groups, estimates
from ._prodigy.paths import PathsMixin
from ._prodigy.sharding import ShardingMixin

__all__ = ["Prodigy", "NonFiniteStepError", "ProdigyDiagnosisWarning", "prodigy_stats_reference",
           "prodigy_apply_reference"]

class Prodigy(PathsMixin, ShardingMixin, NonFiniteMixin, CheckpointMixin, GroupsMixin,
              LowPrecisionStateMixin, OptimizerBase):
    r"""Prodigy, a learning-rate-free Adam (prodigyopt-compatible). Equations: module docstring.

    Every number below may also be a 0-dim or 1-element real tensor (as torch.optim accepts):
    each step reads it as a Python float (one host sync per CUDA tensor).

    Args:
        params: parameters or param groups (a group may be empty).
        lr: multiplier of the estimated step size ``d`` (dimensionless); keep 1.0 and tune
            ``d_coef`` instead (below 0.1 warns). Every group's lr must be the largest lr or
            0 (0 freezes the group: no update, no weight decay), unless ``split_groups``.
            ``0 <= lr < inf``.
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
            Runs the foreach path (not the fused phase 2). Also accepted as a name:
            ``'bfloat16'``/``'bf16'``, ``'float32'``/``'fp32'`` (optionally
            ``'torch.'``-prefixed), as config files and sd-scripts pass it. float16 is
            refused (``ValueError``): ``v = d^2 g^2`` underflows it.
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
        split_groups: every param group estimates its own ``d`` (own ``d_numerator``,
            ``d_denom``, ``d_max``, growth and ``k``; its own betas, d0, d_coef, ...) and its
            ``lr`` multiplies its own ``d``: exactly one Prodigy per group, in one step with one
            host sync (and one collective when sharded). For text-encoder / U-Net lrs and
            LoRA+ ratios (``lr`` 1 and 16 for A/B). Without it, groups share one ``d`` as in
            prodigyopt and their lrs must be the largest or 0.
        d_limit: an absolute maximum for ``d`` (``None``: none), ``d_limit >= d0``: ``d' =
            min(d', d_limit)`` after the update (``d_max`` keeps the uncapped estimate).
        d_freeze_step: from the step with ``k >= d_freeze_step`` on, ``d`` stops updating and
            the run continues as Adam with step ``d * lr`` (``None``: never; an int >= 0).
            Both are group values that may be changed mid-run, e.g. when a LoRA starts to
            overcook late in training.
        diagnose: warn once (:class:`ProdigyDiagnosisWarning`) when ``lr < 0.1`` at
            construction, when ``d`` is still ``d0`` after 100 steps with gradients (naming
            the likely cause: lr far below 1, safeguard_warmup under a warm-up from 0, bias
            correction, ``d0`` below the parameters' rounding step, tiny gradients) and when
            ``d`` keeps growing (>= 10x per 25 steps for 100 steps). No extra host sync.

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
    #: Prodigy's kernels take lr, eps and weight_decay scaled by d, so the d-scaled values are
    #: checked against the dtypes at every step (``_output_problem``, ``_input_problem``)
    _dtype_bounded = ()
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
        split_groups: bool = False,
        d_limit: float | None = None,
        d_freeze_step: int | None = None,
        diagnose: bool = True,
    ) -> None:
        # On the optimizer, not in the groups (prodigyopt's group keys stay exactly its own).
        check_bool(type(self).__name__, "independent_ranks", independent_ranks)
        check_bool(type(self).__name__, "diagnose", diagnose)
        self._independent_ranks = independent_ranks
        self._diagnosis = Diagnosis() if diagnose else None
        self._setup_state_dtype(state_dtype)
        defaults = dict(
            lr=lr, betas=betas, beta3=beta3, eps=eps, weight_decay=weight_decay,
            d=d0, d0=d0, d_max=d0, d_numerator=0.0, d_coef=d_coef, k=0,
            growth_rate=growth_rate, use_bias_correction=use_bias_correction,
            decouple=decouple, safeguard_warmup=safeguard_warmup, fsdp_in_use=fsdp_in_use,
            slice_p=slice_p, d_hat=d0, d_denom=0.0, skipped_steps=0,
            strict_growth=strict_growth, nonfinite=nonfinite,
            stochastic_rounding=stochastic_rounding, foreach=foreach,
            split_groups=split_groups, d_limit=d_limit, d_freeze_step=d_freeze_step,
        )
        # (parameter, its new state): with flat=True a bucket's whole buffer and its state
        self._fresh: list[tuple[Tensor, dict[str, Any]]] = []
        self._scratch: dict[tuple[torch.device, torch.dtype], Tensor] = {}
        super().__init__(params, defaults, flat=flat, compile=compile)
        if self._diagnosis is not None:
            self._diagnosis.check_lr(type(self).__name__, self.param_groups)
            self._diagnosis.check_low_precision(type(self).__name__, self.param_groups)

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
                     "strict_growth", "stochastic_rounding", "split_groups"):
            check_bool(n, flag, g[flag])
        dl = g["d_limit"]
        if dl is not None:
            if isinstance(dl, bool) or not isinstance(dl, (int, float)):
                fail_type(n, "d_limit", dl, "d_limit > 0 or None")
            if not dl > 0:  # NaN included
                fail(n, "d_limit", dl, "d_limit > 0 or None")
            if dl < scalar(g["d0"]):
                fail(n, "d_limit", dl, f"d_limit >= d0 (= {scalar(g['d0'])!r}) or None")
        fs = g["d_freeze_step"]
        if fs is not None and (isinstance(fs, bool) or not isinstance(fs, int) or fs < 0):
            fail(n, "d_freeze_step", fs, "an int >= 0 (the step from which d stops updating) "
                 "or None")
        if not isinstance(g["nonfinite"], str) or g["nonfinite"] not in ("raise", "skip"):
            fail(n, "nonfinite", g["nonfinite"], "'raise' or 'skip'")
        if getattr(self, "_flat", False) and sp != 1:
            # s and p0 would subsample the flat buffer, not each tensor: other elements than
            # prodigyopt's, so a different d
            fail(n, "slice_p", sp, "1 with flat=True (slicing is per tensor)")
        if getattr(self, "_independent_ranks", False) and g["fsdp_in_use"]:
            fail(n, "fsdp_in_use", True, "False with independent_ranks=True (sharded parameters "
                 "need their d sums all-reduced; independent ranks never communicate)")

    # ------------------------------------------------------------------ groups and state
    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["_independent_ranks"] = self.__dict__.get("_independent_ranks", False)
        state["_diagnosis"] = self.__dict__.get("_diagnosis")
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._fresh = []
        self._scratch = {}
        self.__dict__.setdefault("_independent_ranks", False)
        self.__dict__.setdefault("_diagnosis", Diagnosis())
        for g in self.param_groups:
            # prodigyopt under FSDP stores these as tensors; plain floats from here on
            for key in FLOAT_SCALARS:
                if isinstance(g.get(key), Tensor):
                    g[key] = scalar(g[key])
            g["k"] = int(g["k"])
            g["skipped_steps"] = int(g["skipped_steps"])
            g["effective_lr"] = _effective_lr(g)

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
        if scalar(group["betas"][0]) > 0:
            state["exp_avg"] = torch.zeros_like(p, dtype=dt, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(p, dtype=dt, memory_format=torch.preserve_format)
        self._fresh.append((p, state))

    def _state_spec(self, group: dict[str, Any], p: Tensor) -> dict[str, Any]:
        n = p.numel()
        s_shape = ANY if _is_dtensor(p) else (-(-n // group["slice_p"]),)
        spec: dict[str, Any] = {"step": SCALAR, "s": s_shape, "p0": ANY, "exp_avg_sq": PARAM_SHAPE}
        if scalar(group["betas"][0]) > 0:
            spec["exp_avg"] = PARAM_SHAPE
        return spec

    @tc.not_traced  # reads every group's d, k, ...: traced, dynamo guarded on their values
    def _gather(self, gi: int, group: dict[str, Any]) -> GroupWork:
        if gi == 0:  # before any state is created (the base step() has validated each group)
            check_groups(type(self).__name__, self.param_groups)
            if self._independent_ranks and self._has_sharded_params():
                raise ValueError(
                    f"{type(self).__name__}: independent_ranks=True but some parameters are "
                    "sharded (DTensor / FSDP): their d sums must be all-reduced; drop "
                    "independent_ranks")
        return super()._gather(gi, group)

    def _state_layout(self, group: dict[str, Any]) -> Any:
        return group["slice_p"]  # s holds every slice_p-th element

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

    # Not traced (as RAdam's update): every step branches on host values that change at
    # every step (d, d_max, d_numerator, k); traced, dynamo guarded on each and compiled
    # again at every step until its recompile limit (measured by a user: 12 steps, 67 s).
    @tc.not_traced
    def _apply(self, works: list[GroupWork]) -> None:
        """The step: phase 1 (statistics, reads only) -> the one host sync -> the d update ->
        checks -> phase 2 (writes). One estimate of d over every group, or one per group
        (``split_groups``); ``e`` holds an estimate's scalars (``_prodigy/groups.py``)."""
        fresh = self._fresh
        ests = [e for e in estimates(self.param_groups, works) if e.lr > 0]
        if not ests:  # everything frozen (prodigyopt also stops before any update)
            self._settle_fresh(fresh, torch.stack([torch.any(_local(p)) for p, _ in fresh])
                               .tolist() if fresh else [])
            return

        problem = _input_problem(ests, self._narrowest_is_float32)
        if problem is not None:  # from hyperparameters and dtypes: every rank decides alike
            self._reject(problem)
            return
        # ---- phase 1: statistics only; nothing is written (s' is written in phase 2)
        for e in ests:
            # keyed by the group (one object for the whole run), not by the GroupWork (new
            # each step): torch.compile(opt.step) would otherwise guard on its identity
            for w in e.active:
                e.compiled[id(w.group)] = comp = self._compiled_applies(w)
                e.fast[id(w.group)] = fast = not comp and self._fast(w, e.beta1)
                # per group: (<g_sl, p0 - p_sl>, ||s'||_1, sum of max |g| per tensor)
                e.pieces.append(self._phase1(w, e.beta3, e.d, e.dlr, fast=fast, compiled=comp))
            # Bounds the overflow checks need beyond max |g| (decided from every group's
            # hyperparameters, not from which groups have gradients here: the same on every rank)
            need_p = any((not g["decouple"] and scalar(g["weight_decay"]) > 0)
                         or (g["decouple"] and scalar(g["weight_decay"]) * e.dlr > 2)
                         for g in e.live)
            e.pmax = _max_abs([_local(p) for w in e.active for p in w.params]) if need_p else None
            e.smax = self._s_max_fp16(e.active, e.beta3, e.d, e.dlr)

        # ---- the one host sync: every estimate's sums (all-reduced when sharded), p0 flags
        sums = self._global_sums(ests, fresh, [w for e in ests for w in e.active])
        if sums.failed_ranks:
            raise RuntimeError(
                f"{type(self).__name__}: {sums.failed_ranks:g} other rank(s) raised in this "
                "step before Prodigy's all-reduce (see their error); the step was not taken "
                "and parameters and optimizer state are unchanged on every rank")
        new = []
        for e, (delta, den, gmax, pmax, smax) in zip(ests, sums.est):
            g0 = e.groups[0]
            if not math.isfinite(gmax) and all(math.isfinite(x) for x in (delta, den, pmax, smax)):
                gmax = self._exact_gmax(e)  # the fast path's bound overflowed; rare
            if not all(math.isfinite(x) for x in (delta, den, gmax, pmax, smax)):
                self._reject("non-finite statistics in this step (" + _locate_nonfinite(
                    self.param_groups, e.active, self.state) + ")")
                return
            update = den != 0.0  # no gradient signal yet: prodigyopt keeps s, m, v, returns
            d_new, d_max = e.d, e.d_max
            d_numerator, d_hat = scalar(g0["d_numerator"]), scalar(g0["d_hat"])
            if update:
                # ---- d update (host floats)
                d_numerator = d_numerator * e.beta3 + delta
                d_hat = scalar(g0["d_coef"]) * d_numerator / den
                if e.d == e.d0 and not g0["strict_growth"]:
                    d_new = max(e.d, d_hat)
                d_max = max(d_max, d_hat)
                d_new = min(d_max, d_new * scalar(g0["growth_rate"]))
                if g0["d_limit"] is not None:
                    d_new = min(d_new, scalar(g0["d_limit"]))  # the cap
                if g0["d_freeze_step"] is not None and e.k >= g0["d_freeze_step"]:
                    d_new = e.d  # frozen: the statistics go on, d does not move
            problem = _output_problem(
                e.live, decouple=g0["decouple"], update=update, d=e.d, d0=e.d0, d_new=d_new,
                d_max=d_max, d_numerator=d_numerator, d_hat=d_hat, dlr=e.dlr, beta1=e.beta1,
                beta2=e.beta2, gmax=gmax, pmax=pmax, smax=smax, lim=sums.limits,
                half_params=sums.half, half_state=self._state_dtype == torch.float16)
            if problem is not None:
                self._reject(problem)
                return
            new.append((update, d_new, d_max, d_numerator, d_hat, den, gmax))
        # ---- from here on nothing raises: every input and output was checked
        self._settle_fresh(fresh, sums.flags)
        self._recast_moved(works)
        for e, (update, d_new, d_max, d_numerator, d_hat, den, gmax) in zip(ests, new):
            if not update:
                for w in e.active:
                    self._phase2(w, e.beta1, e.beta2, e.beta3, e.d, e.d, e.dlr,
                                 update_params=False)
                continue
            # ---- phase 2: moments and parameters (frozen groups only count the step)
            for w in e.works:
                if w.params and float(w.group["lr"]) > 0:
                    self._phase2(w, e.beta1, e.beta2, e.beta3, e.d, d_new, e.dlr,
                                 update_params=True, fast=e.fast.get(id(w.group), False),
                                 compiled=e.compiled.get(id(w.group), False))
                for st in w.states:
                    st["step"] += 1
            for g in e.groups:
                g.update(d_numerator=d_numerator, d_denom=den, d=d_new, d_max=d_max,
                         d_hat=d_hat, k=e.k + 1)
                g["effective_lr"] = _effective_lr(g)
            if self._diagnosis is not None:  # host floats only: no extra sync
                self._diagnosis.after_step(type(self).__name__, self, e, d_new, gmax)


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
