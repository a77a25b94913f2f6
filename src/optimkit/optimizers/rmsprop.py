r"""RMSprop, optionally centered and with momentum: drop-in for ``torch.optim.RMSprop``.

The math, per parameter :math:`\theta` with gradient :math:`g_t` at step :math:`t`::

    g   <- -g                                  if maximize
    g   <- g + weight_decay * theta            (L2 penalty, coupled)
    v_t = alpha * v_{t-1} + (1 - alpha) * g^2  running mean of squared gradients
    m_t = alpha * m_{t-1} + (1 - alpha) * g    running mean of gradients    (if centered)
    den = sqrt(max(v_t - m_t^2, 0)) + eps      if centered (variance estimate)
        = sqrt(v_t) + eps                      otherwise
    b_t = momentum * b_{t-1} + g / den         if momentum > 0
    theta <- theta - lr * b_t                  if momentum > 0
    theta <- theta - lr * g / den              otherwise

All buffers start at zero (no bias correction, as in torch). ``lr`` is in parameter units per
normalised gradient unit, ``eps`` in gradient units. State: ``step``, ``square_avg`` (v),
``momentum_buffer`` (b, only when ``momentum > 0``) and ``grad_avg`` (m, only when
``centered``), exactly as torch.optim stores them.

Fused path: plain RMSprop (not centered, no momentum, ``alpha < 1``) is torch's fused Adam
kernel with ``beta1 = 0`` (its first moment becomes the gradient itself), ``beta2 = alpha``
and both bias corrections forced to exactly 1 by handing the kernel step counters of
``2**100`` (``beta**(2**100)`` is exactly 0 for every ``beta < 1``). The kernel's first-moment
buffer is a per-(device, dtype) scratch buffer owned by the optimizer, never state.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor

from .. import _compiled
from .. import _torch_compat as tc
from .._base import PARAM_SHAPE, SCALAR, GroupWork, OptimizerBase, ParamsT
from .._impl import group_by_device_dtype
from .._validation import scalar, check_bool, check_eps, check_finite_nonnegative, check_range
from ._prodigy.nonfinite import _caller_level

#: elements of the fused path's scratch first-moment buffer per (device, dtype): small enough
#: to stay in cache and to cost nothing in memory, large enough that a kernel call is long
#: compared with its launch/OpenMP overhead.
SCRATCH_NUMEL = 1 << 18


class RMSprop(OptimizerBase):
    r"""RMSprop: divide the gradient by a running root-mean-square of recent gradients.

    Args:
        params: parameters or param groups to optimize.
        lr: learning rate (step size), ``0 <= lr < inf``. Default ``1e-2`` as in torch.optim.
        alpha: smoothing constant of the running averages, ``0 <= alpha < 1``, and
            ``0 < alpha`` with ``centered=True``; 0.99 keeps about the last 100 steps.
            (``alpha = 1`` would never let a gradient into ``square_avg``: every step would
            be ``lr * g / eps``; centered with ``alpha = 0`` estimates the variance as 0.)
        eps: added to the root-mean-square in the denominator (gradient units), which is 0
            for a coordinate whose gradients were all 0: ``1.1754943508222875e-38 <= eps < inf``
            (``torch.finfo(torch.float32).tiny``: a smaller eps rounds to 0 in float32).
        weight_decay: coupled L2 penalty coefficient, ``0 <= weight_decay < inf``.
        momentum: heavy-ball coefficient applied to the normalised step,
            ``0 <= momentum < 1``.
        centered: normalise by an estimate of the gradient's variance instead of its second
            moment (subtracts the squared running mean); needs ``alpha > 0``.
        capturable: must be ``False`` (CUDA-graph capture is not supported by optimkit).
        foreach: ``True`` multi-tensor path, ``False`` per-tensor reference, ``None`` fastest.
        maximize: ascend the objective instead of descending.
        differentiable: must be ``False`` (not supported by optimkit).
        fused: ``True`` single-pass path (torch's fused Adam kernel with mapped
            hyperparameters), the default when ``None`` and the group is plain RMSprop (not
            centered, ``momentum == 0``, ``alpha < 1``) on CPU/CUDA floating tensors. It has no
            kernel for centered or momentum RMSprop: those groups take the foreach path, with a
            warning when ``fused=True`` was asked for. Not a param-group key (torch's
            RMSprop has none); the choice is the optimizer's.
        flat: lay the parameters, gradients and state out as views into one buffer per
            param group and (device, dtype), and step it in large chunks (see
            ``optimkit._flatten``): the same math, far less per-tensor overhead with many
            small tensors. Re-points each eligible ``p.data`` and ``p.grad`` into the buffers;
            ``zero_grad()`` then zeroes gradients instead of setting them to ``None``.
        compile: run every variant (centered, momentum) as one ``torch.compile``-generated
            single-pass kernel (``optimkit._compiled``): fewer bytes moved per step, but the
            first step compiles (seconds) and needs a C++ compiler on CPU. Best with ``flat``.

    Example:
        >>> model = torch.nn.Linear(3, 1)
        >>> opt = RMSprop(model.parameters(), lr=1e-3, centered=True, momentum=0.9)
        >>> model(torch.randn(4, 3)).sum().backward(); opt.step()

    Reference: Hinton, "Neural Networks for Machine Learning", lecture 6e (2012); centered
    form: Graves, "Generating Sequences With Recurrent Neural Networks", 2013.
    """

    _tensor_steps = True
    _pure_validation = True  # _validate_group reads only the group (step() may skip it)
    _state_keys = frozenset({"step", "square_avg", "momentum_buffer", "grad_avg"})
    _has_fused = True
    _fused_in_group = False  # torch.optim's class has no "fused" group key
    _has_compiled = True

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1e-2,
        alpha: float = 0.99,
        eps: float = 1e-8,
        weight_decay: float = 0,
        momentum: float = 0,
        centered: bool = False,
        capturable: bool = False,
        foreach: bool | None = None,
        maximize: bool = False,
        differentiable: bool = False,
        *,
        fused: bool | None = None,
        flat: bool = False,
        compile: bool = False,
    ) -> None:
        defaults = dict(
            lr=lr, momentum=momentum, alpha=alpha, eps=eps, centered=centered,
            weight_decay=weight_decay, capturable=capturable, foreach=foreach,
            maximize=maximize, differentiable=differentiable, fused=fused,
        )
        super().__init__(params, defaults, flat=flat, compile=compile)

    def _validate_group(self, g: dict[str, Any]) -> None:
        n = type(self).__name__
        check_finite_nonnegative(n, "lr", g["lr"])
        # alpha = 1 never lets a gradient into square_avg: every step would be lr * g / eps
        alpha = check_range(n, "alpha", g["alpha"], 0.0, 1.0, hi_open=True)
        # sqrt(square_avg) is 0 for a coordinate whose gradients were all 0
        check_eps(n, "eps", g["eps"])
        check_finite_nonnegative(n, "weight_decay", g["weight_decay"])
        check_range(n, "momentum", g["momentum"], 0.0, 1.0, hi_open=True)
        check_bool(n, "centered", g["centered"])
        check_bool(n, "maximize", g["maximize"])
        if g["centered"] and alpha == 0:
            raise ValueError(
                f"{n}: invalid alpha={g['alpha']!r}; expected 0 < alpha < 1 with centered=True "
                "(with alpha = 0 the variance estimate g^2 - g^2 is exactly 0 and every step "
                "is lr * g / eps)"
            )

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        g = self.param_groups[-1]
        if getattr(self, "_fused", None) and not _fused_eligible(g):
            warnings.warn(
                f"{type(self).__name__}: fused=True has no single-pass kernel for centered=True "
                f"or momentum > 0 (this group: centered={g['centered']}, "
                f"momentum={g['momentum']}); it uses the foreach path",
                # the user's constructor or add_param_group call, however deep torch's
                # Optimizer.__init__ -> add_param_group chain is (stacklevel=3 named _base.py)
                RuntimeWarning, stacklevel=_caller_level(),
            )

    def _fused_applies(self, group: dict[str, Any]) -> bool:
        return _fused_eligible(group)

    def _mixed_dtype_ok(self, group: dict[str, Any]) -> bool:
        # torch's loop steps on across dtypes except centered (grad_avg.lerp_ needs one dtype)
        return not group["centered"]

    def _init_state(self, group: dict[str, Any], p: Tensor, state: dict[str, Any]) -> None:
        state["step"] = torch.tensor(0.0, dtype=tc.scalar_dtype())
        state["square_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        if group["momentum"] > 0:
            state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        if group["centered"]:
            state["grad_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)

    def _state_spec(self, group: dict[str, Any], p: Tensor) -> dict[str, Any]:
        spec: dict[str, Any] = {"step": SCALAR, "square_avg": PARAM_SHAPE}
        if group["momentum"] > 0:
            spec["momentum_buffer"] = PARAM_SHAPE
        if group["centered"]:
            spec["grad_avg"] = PARAM_SHAPE
        return spec

    def _update(self, work: GroupWork) -> None:
        g = work.group
        hp = dict(
            lr=scalar(g["lr"]), alpha=scalar(g["alpha"]), eps=scalar(g["eps"]),
            weight_decay=scalar(g["weight_decay"]), momentum=scalar(g["momentum"]), maximize=g["maximize"],
        )
        use_buf, centered = g["momentum"] > 0, g["centered"]
        for s, p in zip(work.states, work.params) if use_buf or centered else ():
            # momentum / centered switched on after this parameter's state was created: start
            # the new buffer from zero, as a fresh state would.
            if use_buf and "momentum_buffer" not in s:
                s["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            if centered and "grad_avg" not in s:
                s["grad_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        steps = [s["step"] for s in work.states]
        square_avgs = [s["square_avg"] for s in work.states]
        bufs = [s["momentum_buffer"] for s in work.states] if use_buf else None
        grad_avgs = [s["grad_avg"] for s in work.states] if centered else None
        impl = work.impl
        if impl == "fused":
            rmsprop_fused(work.params, work.grads, steps, square_avgs, scratch=self._scratch,
                          lr=hp["lr"], alpha=hp["alpha"], eps=hp["eps"],
                          weight_decay=hp["weight_decay"], maximize=hp["maximize"])
            return
        fn = {"reference": rmsprop_reference, "foreach": rmsprop_foreach,
              "compiled": rmsprop_compiled}[impl]
        fn(work.params, work.grads, steps, square_avgs, grad_avgs, bufs, **hp)

    def _scratch(self, device: torch.device, dtype: torch.dtype) -> Tensor:
        """The fused path's first-moment scratch buffer for (device, dtype), made once."""
        bufs = self.__dict__.setdefault("_scratch_bufs", {})
        buf = bufs.get((device, dtype))
        if buf is None:
            buf = bufs[(device, dtype)] = torch.zeros(SCRATCH_NUMEL, device=device, dtype=dtype)
        return buf


def _fused_eligible(group: dict[str, Any]) -> bool:
    """Plain RMSprop maps onto the fused Adam kernel; centered / momentum do not. (alpha=1,
    refused by validation, would make the kernel's second bias correction 1 - 1**t = 0.)"""
    return not group["centered"] and group["momentum"] == 0 and scalar(group["alpha"]) < 1


# ---------------------------------------------------------------------------------- math
def rmsprop_reference(
    params: list[Tensor], grads: list[Tensor], steps: list[Tensor], square_avgs: list[Tensor],
    grad_avgs: list[Tensor] | None, bufs: list[Tensor] | None, *,
    lr: float, alpha: float, eps: float, weight_decay: float, momentum: float, maximize: bool,
) -> None:
    """Per-tensor reference: the equations of the module docstring, one tensor at a time.

    ``grad_avgs`` is given iff centered, ``bufs`` iff momentum > 0; all state is updated in place.
    """
    for i, (p, g) in enumerate(zip(params, grads)):
        steps[i] += 1  # t (kept for torch compatibility; RMSprop does not use it)
        if maximize:
            g = -g
        if weight_decay != 0:
            g = g.add(p, alpha=weight_decay)  # g + wd * theta
        v = square_avgs[i]
        v.mul_(alpha).addcmul_(g, g, value=1 - alpha)  # v_t = alpha v + (1 - alpha) g^2
        if grad_avgs is not None:
            m = grad_avgs[i]
            m.lerp_(g, 1 - alpha)  # m_t = alpha m + (1 - alpha) g
            # sqrt(max(v_t - m_t^2, 0)) + eps: rounding can make the variance of a gradient
            # that barely varies slightly negative (torch.optim.RMSprop then gives NaN)
            den = v.addcmul(m, m, value=-1).clamp_min_(0).sqrt_().add_(eps)
        else:
            den = v.sqrt().add_(eps)  # sqrt(v_t) + eps
        if bufs is not None:
            b = bufs[i]
            b.mul_(momentum).addcdiv_(g, den)  # b_t = momentum b + g / den
            p.add_(b, alpha=-lr)  # theta <- theta - lr b_t
        else:
            p.addcdiv_(g, den, value=-lr)  # theta <- theta - lr g / den


def rmsprop_foreach(
    params: list[Tensor], grads: list[Tensor], steps: list[Tensor], square_avgs: list[Tensor],
    grad_avgs: list[Tensor] | None, bufs: list[Tensor] | None, *,
    lr: float, alpha: float, eps: float, weight_decay: float, momentum: float, maximize: bool,
) -> None:
    """Multi-tensor path: the same equations with ``torch._foreach_*`` per (device, dtype)."""
    lists: list[list[Tensor]] = [params, grads, steps, square_avgs]
    if grad_avgs is not None:
        lists.append(grad_avgs)
    if bufs is not None:
        lists.append(bufs)
    for blists, _ in group_by_device_dtype(*lists).values():
        ps, gs, ts, vs = blists[:4]
        rest = blists[4:]
        ms = rest.pop(0) if grad_avgs is not None else None
        bs = rest.pop(0) if bufs is not None else None
        tc.increment_steps(ts)
        if maximize:
            gs = tc.foreach_neg(gs)
        if weight_decay != 0:
            gs = tc.foreach_add(gs, ps, alpha=weight_decay)
        tc.foreach_mul_(vs, alpha)
        tc.foreach_addcmul_(vs, gs, gs, value=1 - alpha)  # v_t
        if ms is not None:
            tc.foreach_lerp_(ms, gs, 1 - alpha)  # m_t
            den = tc.foreach_addcmul(vs, ms, ms, value=-1)  # v_t - m_t^2
            tc.foreach_maximum_(den, 0.0)  # >= 0 (see the reference)
            tc.foreach_sqrt_(den)
        else:
            den = tc.foreach_sqrt(vs)
        tc.foreach_add_(den, eps)
        if bs is not None:
            tc.foreach_mul_(bs, momentum)
            tc.foreach_addcdiv_(bs, gs, den)  # b_t
            tc.foreach_add_(ps, bs, alpha=-lr)
        else:
            tc.foreach_addcdiv_(ps, gs, den, value=-lr)


def rmsprop_fused(
    params: list[Tensor], grads: list[Tensor], steps: list[Tensor], square_avgs: list[Tensor],
    *, scratch: Any, lr: float, alpha: float, eps: float, weight_decay: float, maximize: bool,
) -> None:
    """Plain RMSprop as one pass of torch's fused Adam kernel, per (device, dtype) bucket.

    Mapping (module docstring): ``beta1 = 0``, ``beta2 = alpha``, coupled ``weight_decay``,
    bias corrections exactly 1; then the kernel computes ``m = g``, ``v = alpha v + (1 - alpha)
    g^2`` and ``theta -= lr * g / (sqrt(v) + eps)``, which is the reference update.
    ``scratch(device, dtype)`` returns a 1-D buffer the kernel may use as its first moment:
    tensors are cut into contiguous views and sent in chunks that fit in it.
    Non-contiguous tensors (their memory is not one flat run) take the foreach path.
    """
    buckets = group_by_device_dtype(params, grads, steps, square_avgs)
    for (device, dtype), ((ps, gs, ts, vs), _) in buckets.items():
        flat = [j for j in range(len(ps))
                if ps[j].is_contiguous() and gs[j].is_contiguous() and vs[j].is_contiguous()]
        if len(flat) < len(ps):
            on = set(flat)
            rest = [j for j in range(len(ps)) if j not in on]
            rmsprop_foreach(
                [ps[j] for j in rest], [gs[j] for j in rest], [ts[j] for j in rest],
                [vs[j] for j in rest], None, None, lr=lr, alpha=alpha, eps=eps,
                weight_decay=weight_decay, momentum=0.0, maximize=maximize,
            )
        if not flat:
            continue
        tc.increment_steps([ts[j] for j in flat])
        buf = scratch(device, dtype)
        cap = buf.numel()
        kstep = tc.fused_adam_unit_step(device)
        chunk: tuple[list[Tensor], list[Tensor], list[Tensor]] = ([], [], [])
        used = 0

        def flush() -> None:
            nonlocal used, chunk
            if not chunk[0]:
                return
            # m = beta1 m + (1 - beta1) g is g only if the old m is finite: clear it, so a
            # non-finite gradient in one chunk cannot leak into the next.
            buf[:used].zero_()
            ms, off = [], 0
            for p in chunk[0]:
                ms.append(buf[off:off + p.numel()])
                off += p.numel()
            tc.fused_adam_(
                chunk[0], chunk[1], ms, chunk[2], [], [kstep] * len(ms), amsgrad=False, lr=lr,
                beta1=0.0, beta2=alpha, weight_decay=weight_decay, eps=eps, maximize=maximize,
                grad_scale=None, found_inf=None,
            )
            chunk, used = ([], [], []), 0

        for j in flat:
            p, g, v = ps[j].view(-1), gs[j].view(-1), vs[j].view(-1)
            n, start = p.numel(), 0
            while start < n:
                if used == cap:
                    flush()
                k = min(n - start, cap - used)
                chunk[0].append(p[start:start + k])
                chunk[1].append(g[start:start + k])
                chunk[2].append(v[start:start + k])
                used += k
                start += k
        flush()


# ------------------------------------------------------------------- compile=True kernels
def _rmsprop_math(p: Tensor, g: Tensor, v: Tensor, ga: Tensor | None, buf: Tensor | None,
                  hp: Tensor) -> None:
    """The reference's equations for 1-D tensors, for inductor to fuse into one pass;
    ``ga`` is given iff centered, ``buf`` iff momentum > 0.

    ``hp = [lr, alpha, eps, weight_decay, momentum, sign]`` (``sign = -1`` maximizes): values,
    not branches, so lr schedules and options never recompile."""
    lr, alpha, eps, wd, mom, sign = hp.unbind(0)
    g = sign * g + wd * p  # wd = 0 adds exactly 0
    v_new = alpha * v + (1 - alpha) * g * g
    v.copy_(v_new)
    if ga is not None:
        ga_new = torch.lerp(ga, g, 1 - alpha)
        ga.copy_(ga_new)
        den = torch.sqrt(torch.clamp_min(v_new - ga_new * ga_new, 0)) + eps
    else:
        den = torch.sqrt(v_new) + eps
    if buf is not None:
        b_new = mom * buf + g / den
        buf.copy_(b_new)
        p.copy_(p - lr * b_new)
    else:
        p.copy_(p - lr * (g / den))


# One entry point per variant (which buffers exist): torch.compile keys its cache and its
# recompile limit on the code object, so each variant gets its own.
def _k_plain(p: Tensor, g: Tensor, v: Tensor, hp: Tensor) -> None:
    _rmsprop_math(p, g, v, None, None, hp)


def _k_centered(p: Tensor, g: Tensor, v: Tensor, ga: Tensor, hp: Tensor) -> None:
    _rmsprop_math(p, g, v, ga, None, hp)


def _k_momentum(p: Tensor, g: Tensor, v: Tensor, buf: Tensor, hp: Tensor) -> None:
    _rmsprop_math(p, g, v, None, buf, hp)


def _k_centered_momentum(p: Tensor, g: Tensor, v: Tensor, ga: Tensor, buf: Tensor,
                         hp: Tensor) -> None:
    _rmsprop_math(p, g, v, ga, buf, hp)


_KERNELS = {(False, False): _k_plain, (True, False): _k_centered, (False, True): _k_momentum,
            (True, True): _k_centered_momentum}


def rmsprop_compiled(
    params: list[Tensor], grads: list[Tensor], steps: list[Tensor], square_avgs: list[Tensor],
    grad_avgs: list[Tensor] | None, bufs: list[Tensor] | None, *,
    lr: float, alpha: float, eps: float, weight_decay: float, momentum: float, maximize: bool,
) -> None:
    """``compile=True``: the reference's equations as one compiled single-pass kernel per
    tensor (``optimkit._compiled``); tensors it does not take run the reference."""
    tc.increment_steps(steps)
    k = _compiled.kernel(_KERNELS[(grad_avgs is not None, bufs is not None)])
    sign = -1.0 if maximize else 1.0
    for i, (p, g, v) in enumerate(zip(params, grads, square_avgs)):
        ga = grad_avgs[i] if grad_avgs is not None else None
        b = bufs[i] if bufs is not None else None
        extra = [t for t in (ga, b) if t is not None]
        if _compiled.takes(p, v, *extra):
            k(*_compiled.flat1d(p, g, v, *extra),
              _compiled.scalars(p, lr, alpha, eps, weight_decay, momentum, sign))
        else:
            rmsprop_reference([p], [g], [torch.zeros(())], [v],
                              [ga] if ga is not None else None, [b] if b is not None else None,
                              lr=lr, alpha=alpha, eps=eps, weight_decay=weight_decay,
                              momentum=momentum, maximize=maximize)
