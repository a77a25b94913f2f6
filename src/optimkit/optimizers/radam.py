r"""RAdam (rectified Adam): drop-in for ``torch.optim.RAdam``.

The math, per parameter :math:`\theta` with gradient :math:`g_t` at its step :math:`t`::

    g  <- -g                                   if maximize
    theta <- theta * (1 - lr * weight_decay)   if decoupled_weight_decay
    g  <- g + weight_decay * theta             otherwise (coupled L2 penalty)
    m_t = beta1 * m_{t-1} + (1 - beta1) * g            first moment  (exp_avg)
    v_t = beta2 * v_{t-1} + (1 - beta2) * g^2          second moment (exp_avg_sq)
    m_hat = m_t / (1 - beta1^t)
    rho_inf = 2 / (1 - beta2) - 1                      max length of the approximated SMA
    rho_t = rho_inf - 2 t beta2^t / (1 - beta2^t)      its length at step t
    if rho_t > 5:                                      variance is tractable: rectify
        r_t = sqrt((rho_t - 4)(rho_t - 2) rho_inf / ((rho_inf - 4)(rho_inf - 2) rho_t))
        l_t = sqrt(1 - beta2^t) / (sqrt(v_t) + eps)    adaptive learning rate
        theta <- theta - lr * m_hat * r_t * l_t
    else:                                              early steps: momentum SGD
        theta <- theta - lr * m_hat

``lr`` is in parameter units once rectified (each element moves by about ``lr * r_t`` per
step), and in parameter units per gradient unit during the first, unrectified steps (about
five with ``beta2=0.999``). ``eps`` is in gradient units.

State, exactly as torch.optim stores it: ``step`` (a 0-dim CPU tensor of dtype
``_torch_compat.scalar_dtype()``), ``exp_avg``, ``exp_avg_sq``.

Fused path (torch has no fused RAdam; we reuse its fused Adam kernel): a rectified step is
Adam's update with both bias corrections folded into the step size. Handing the kernel step
counters of ``2**100`` makes its own corrections exactly 1 (``beta**(2**100) == 0``), and
``lr_k = lr * r_t * sqrt(1 - beta2^t) / (1 - beta1^t)`` makes its update
``theta -= lr_k * m_t / (sqrt(v_t) + eps)``, the rectified line above. Decoupled decay uses
the AdamW kernel (``theta *= 1 - lr_k * wd_k``) with ``wd_k = lr * weight_decay / lr_k``.
Tensors whose step is not rectified (the first steps, or a layer whose counter lags), and
non-contiguous ones, take the foreach path; the rest go to the kernel in one call per
distinct step value.

Reference:
    Liu et al., On the Variance of the Adaptive Learning Rate and Beyond,
    https://arxiv.org/abs/1908.03265
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .. import _torch_compat as tc
from .._base import PARAM_SHAPE, SCALAR, GroupWork, OptimizerBase, ParamsT
from .._impl import group_by_device_dtype
from .._validation import scalar, check_betas, check_bool, check_eps, check_finite_nonnegative
from .adam import _as_tuple, adam_moments_, adam_moments_foreach_, advance_steps


class RAdam(OptimizerBase):
    r"""RAdam: Adam whose adaptive step is switched on only once its variance is tractable.

    Args:
        params: parameters or param groups to optimize.
        lr: learning rate, ``0 <= lr < inf``. Default ``1e-3``.
        betas: ``(beta1, beta2)``, each in ``[0, 1)``. Default ``(0.9, 0.999)``.
        eps: added to ``sqrt(v)``, which is 0 for a coordinate whose gradients were all 0
            (gradient units): ``1.1754943508222875e-38 <= eps < inf``
            (``torch.finfo(torch.float32).tiny``: a smaller eps rounds to 0 in float32).
        weight_decay: ``0 <= weight_decay < inf``; coupled L2 coefficient, or decoupled
            shrink rate per unit lr when ``decoupled_weight_decay`` is set.
        decoupled_weight_decay: apply weight decay to the parameter directly (AdamW-style).
        foreach: ``True`` multi-tensor path, ``False`` per-tensor reference, ``None`` fastest.
        maximize: ascend the objective instead of descending.
        capturable: not supported (``True`` raises); present for signature compatibility.
        differentiable: not supported (``True`` raises); present for signature compatibility.
        fused: ``True`` single-pass path (torch's fused Adam kernel with mapped
            hyperparameters, see the module docstring), the default when ``None`` and every
            tensor is a CPU/CUDA floating tensor. Not a param-group key (torch's RAdam has
            none); the choice is the optimizer's.
        flat: lay the parameters, gradients and state out as views into one buffer per
            param group and (device, dtype), and step it in large chunks (see
            ``optimkit._flatten``): the same math, far less per-tensor overhead with many
            small tensors. Re-points each eligible ``p.data`` and ``p.grad`` into the buffers;
            ``zero_grad()`` then zeroes gradients instead of setting them to ``None``.

    Example:
        >>> model = torch.nn.Linear(3, 1)
        >>> opt = RAdam(model.parameters(), lr=1e-3, weight_decay=1e-2, decoupled_weight_decay=True)
        >>> model(torch.randn(4, 3)).sum().backward(); opt.step()
    """

    _tensor_steps = True
    _pure_validation = True  # _validate_group reads only the group (step() may skip it)
    _state_keys = frozenset({"step", "exp_avg", "exp_avg_sq"})
    _has_fused = True
    _fused_in_group = False  # torch.optim's class has no "fused" group key

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0,
        decoupled_weight_decay: bool = False,
        *,
        foreach: bool | None = None,
        maximize: bool = False,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        flat: bool = False,
    ) -> None:
        defaults = dict(
            lr=lr, betas=_as_tuple(betas), eps=eps, weight_decay=weight_decay, maximize=maximize,
            foreach=foreach, capturable=capturable,
            decoupled_weight_decay=decoupled_weight_decay, differentiable=differentiable,
            fused=fused,
        )
        super().__init__(params, defaults, flat=flat)

    def _validate_group(self, g: dict[str, Any]) -> None:
        n = type(self).__name__
        check_finite_nonnegative(n, "lr", g["lr"])
        check_betas(n, g["betas"])
        # sqrt(v) is 0 for a coordinate whose gradients were all 0
        check_eps(n, "eps", g["eps"])
        check_finite_nonnegative(n, "weight_decay", g["weight_decay"])
        check_bool(n, "decoupled_weight_decay", g["decoupled_weight_decay"])
        check_bool(n, "maximize", g["maximize"])

    def _init_state(self, group: dict[str, Any], p: Tensor, state: dict[str, Any]) -> None:
        # torch.optim's non-capturable layout (a CPU counter), so checkpoints move both ways.
        state["step"] = torch.tensor(0.0, dtype=tc.scalar_dtype())
        state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)

    def _state_spec(self, group: dict[str, Any], p: Tensor) -> dict[str, Any]:
        return {"step": SCALAR, "exp_avg": PARAM_SHAPE, "exp_avg_sq": PARAM_SHAPE}

    def _update(self, work: GroupWork) -> None:
        g = work.group
        beta1, beta2 = (scalar(b) for b in g["betas"])
        hp = dict(
            lr=scalar(g["lr"]), beta1=beta1, beta2=beta2, eps=scalar(g["eps"]),
            weight_decay=scalar(g["weight_decay"]), maximize=g["maximize"],
            decoupled_weight_decay=g["decoupled_weight_decay"],
        )
        fn = {"reference": radam_reference, "foreach": radam_foreach, "fused": radam_fused}[work.impl]
        fn(
            work.params, work.grads,
            [s["exp_avg"] for s in work.states], [s["exp_avg_sq"] for s in work.states],
            [s["step"] for s in work.states], **hp,
        )


# ---------------------------------------------------------------------------------- math
def _rectification(t: float, beta2: float) -> float | None:
    """``r_t`` of the module docstring, or ``None`` while ``rho_t <= 5`` (not rectified)."""
    rho_inf = 2 / (1 - beta2) - 1
    rho_t = rho_inf - 2 * t * (beta2**t) / (1 - beta2**t)
    if rho_t <= 5:
        return None
    return ((rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t)) ** 0.5


def radam_reference(
    params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor], steps: list[Tensor], *,
    lr: float, beta1: float, beta2: float, eps: float, weight_decay: float, maximize: bool,
    decoupled_weight_decay: bool,
) -> None:
    """Per-tensor reference: the equations of the module docstring, one tensor at a time.

    Parameters, moments and ``steps`` (0-dim counters) are updated in place.
    """
    for i, (p, g) in enumerate(zip(params, grads)):
        m, v = exp_avgs[i], exp_avg_sqs[i]
        steps[i].add_(1)
        t = float(steps[i])
        # the moments are Adam's (adam_moments_: sign, weight decay, m_t, v_t)
        adam_moments_(p, g, m, v, lr=lr, beta1=beta1, beta2=beta2, weight_decay=weight_decay,
                      maximize=maximize, decoupled_weight_decay=decoupled_weight_decay)
        bias_correction1 = 1 - beta1**t  # m_hat = m_t / bias_correction1
        rect = _rectification(t, beta2)
        if rect is None:
            p.add_(m, alpha=-lr / bias_correction1)  # theta -= lr m_hat
        else:
            # theta -= lr m_hat r_t l_t, with l_t = sqrt(1 - beta2^t) / (sqrt(v_t) + eps)
            denom = v.sqrt().add_(eps)
            p.addcdiv_(m, denom, value=-lr * rect * (1 - beta2**t) ** 0.5 / bias_correction1)


def radam_foreach(
    params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor], steps: list[Tensor], *,
    lr: float, beta1: float, beta2: float, eps: float, weight_decay: float, maximize: bool,
    decoupled_weight_decay: bool,
) -> None:
    """Multi-tensor path: the same equations with ``torch._foreach_*`` per (device, dtype).

    Within a bucket, counters can differ (a layer frozen for a while lags behind), so the
    rectified and the unrectified tensors are updated as two sub-lists.
    """
    for blists, _ in group_by_device_dtype(params, grads, exp_avgs, exp_avg_sqs, steps).values():
        ps, gs, ms, vs, ss = blists
        ts = advance_steps(ss)
        _radam_foreach_advanced(
            ps, gs, ms, vs, ts, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
            weight_decay=weight_decay, maximize=maximize,
            decoupled_weight_decay=decoupled_weight_decay,
        )


@tc.not_traced  # branches on this step's counters: traced, it would recompile every step
def _radam_foreach_advanced(
    ps: list[Tensor], gs: list[Tensor], ms: list[Tensor], vs: list[Tensor], ts: list[float], *,
    lr: float, beta1: float, beta2: float, eps: float, weight_decay: float, maximize: bool,
    decoupled_weight_decay: bool,
) -> None:
    """The foreach update of one (device, dtype) bucket whose counters already read ``ts``."""
    if not ps:
        return
    adam_moments_foreach_(ps, gs, ms, vs, lr=lr, beta1=beta1, beta2=beta2,
                          weight_decay=weight_decay, maximize=maximize,
                          decoupled_weight_decay=decoupled_weight_decay)
    del gs
    rects = [_rectification(t, beta2) for t in ts]
    on = [j for j, r in enumerate(rects) if r is not None]
    off = [j for j, r in enumerate(rects) if r is None]
    if on:
        denom = tc.foreach_sqrt([vs[j] for j in on])
        tc.foreach_add_(denom, eps)
        tc.foreach_addcdiv_(
            [ps[j] for j in on], [ms[j] for j in on], denom,
            [-lr * rects[j] * (1 - beta2 ** ts[j]) ** 0.5 / (1 - beta1 ** ts[j]) for j in on],
        )
    if off:
        upd = tc.foreach_mul([ms[j] for j in off], [-lr / (1 - beta1 ** ts[j]) for j in off])
        tc.foreach_add_([ps[j] for j in off], upd)




def radam_fused(
    params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor], steps: list[Tensor], *,
    lr: float, beta1: float, beta2: float, eps: float, weight_decay: float, maximize: bool,
    decoupled_weight_decay: bool,
) -> None:
    """Rectified steps through torch's fused Adam/AdamW kernel (mapping: module docstring).

    Per (device, dtype) bucket the counters are advanced and read back once; tensors are
    grouped by step value (one group unless a layer was frozen for a while), and every group
    that is not yet rectified takes the foreach path.
    """
    kernel = tc.fused_adamw_ if decoupled_weight_decay else tc.fused_adam_
    buckets = group_by_device_dtype(params, grads, exp_avgs, exp_avg_sqs, steps)
    for (device, _), ((ps, gs, ms, vs, ss), _) in buckets.items():
        ts = advance_steps(ss)
        by_step: dict[float, list[int]] = {}
        off: list[int] = []
        for j, t in enumerate(ts):
            # torch 2.13's CPU kernel walks each tensor's memory linearly: a parameter whose
            # layout differs from its gradient's (a transposed view) would be updated with
            # the wrong elements, so anything not contiguous goes through foreach.
            if all(x.is_contiguous() for x in (ps[j], gs[j], ms[j], vs[j])):
                by_step.setdefault(t, []).append(j)
            else:
                off.append(j)
        kstep = None
        for t, idx in by_step.items():
            rect = _rectification(t, beta2)
            if rect is None:
                off.extend(idx)
                continue
            lr_k = lr * rect * (1 - beta2**t) ** 0.5 / (1 - beta1**t)
            # decoupled: the kernel shrinks by 1 - lr_k * wd_k, torch's RAdam by 1 - lr * wd
            wd_k = lr * weight_decay / lr_k if decoupled_weight_decay and lr_k > 0 else (
                0.0 if decoupled_weight_decay else weight_decay)
            if kstep is None:
                kstep = tc.fused_adam_unit_step(device)
            kernel(
                [ps[j] for j in idx], [gs[j] for j in idx], [ms[j] for j in idx],
                [vs[j] for j in idx], [], [kstep] * len(idx), amsgrad=False, lr=lr_k,
                beta1=beta1, beta2=beta2, weight_decay=wd_k, eps=eps, maximize=maximize,
                grad_scale=None, found_inf=None,
            )
        if off:
            _radam_foreach_advanced(
                [ps[j] for j in off], [gs[j] for j in off], [ms[j] for j in off],
                [vs[j] for j in off], [ts[j] for j in off], lr=lr, beta1=beta1, beta2=beta2,
                eps=eps, weight_decay=weight_decay, maximize=maximize,
                decoupled_weight_decay=decoupled_weight_decay,
            )
