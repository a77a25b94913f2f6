r"""RMSprop, optionally centered and with momentum: drop-in for ``torch.optim.RMSprop``.

The math, per parameter :math:`\theta` with gradient :math:`g_t` at step :math:`t`::

    g   <- -g                                  if maximize
    g   <- g + weight_decay * theta            (L2 penalty, coupled)
    v_t = alpha * v_{t-1} + (1 - alpha) * g^2  running mean of squared gradients
    m_t = alpha * m_{t-1} + (1 - alpha) * g    running mean of gradients    (if centered)
    den = sqrt(v_t - m_t^2) + eps              if centered (variance estimate)
        = sqrt(v_t) + eps                      otherwise
    b_t = momentum * b_{t-1} + g / den         if momentum > 0
    theta <- theta - lr * b_t                  if momentum > 0
    theta <- theta - lr * g / den              otherwise

All buffers start at zero (no bias correction, as in torch). ``lr`` is in parameter units per
normalised gradient unit, ``eps`` in gradient units. State: ``step``, ``square_avg`` (v),
``momentum_buffer`` (b, only when ``momentum > 0``) and ``grad_avg`` (m, only when
``centered``), exactly as torch.optim stores them.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .. import _torch_compat as tc
from .._base import PARAM_SHAPE, SCALAR, GroupWork, OptimizerBase, ParamsT
from .._impl import group_by_device_dtype
from .._validation import check_bool, check_range


class RMSprop(OptimizerBase):
    r"""RMSprop: divide the gradient by a running root-mean-square of recent gradients.

    Args:
        params: parameters or param groups to optimize.
        lr: learning rate (step size), ``lr >= 0``. Default ``1e-2`` as in torch.optim.
        alpha: smoothing constant of the running averages, ``[0, 1]``; 0.99 keeps about the
            last 100 steps.
        eps: added to the root-mean-square in the denominator, ``>= 0``, in gradient units.
        weight_decay: coupled L2 penalty coefficient, ``>= 0``.
        momentum: heavy-ball coefficient applied to the normalised step, ``[0, 1)``.
        centered: normalise by an estimate of the gradient's variance instead of its second
            moment (subtracts the squared running mean).
        capturable: must be ``False`` (CUDA-graph capture is not supported by optimkit).
        foreach: ``True`` multi-tensor path, ``False`` per-tensor reference, ``None`` fastest.
        maximize: ascend the objective instead of descending.
        differentiable: must be ``False`` (not supported by optimkit).

    Example:
        >>> model = torch.nn.Linear(3, 1)
        >>> opt = RMSprop(model.parameters(), lr=1e-3, centered=True, momentum=0.9)
        >>> model(torch.randn(4, 3)).sum().backward(); opt.step()

    Reference: Hinton, "Neural Networks for Machine Learning", lecture 6e (2012); centered
    form: Graves, "Generating Sequences With Recurrent Neural Networks", 2013.
    """

    _tensor_steps = True

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
    ) -> None:
        defaults = dict(
            lr=lr, momentum=momentum, alpha=alpha, eps=eps, centered=centered,
            weight_decay=weight_decay, capturable=capturable, foreach=foreach,
            maximize=maximize, differentiable=differentiable,
        )
        super().__init__(params, defaults)

    def _validate_group(self, g: dict[str, Any]) -> None:
        n = type(self).__name__
        check_range(n, "lr", g["lr"], 0.0)
        check_range(n, "alpha", g["alpha"], 0.0, 1.0)
        check_range(n, "eps", g["eps"], 0.0)
        check_range(n, "weight_decay", g["weight_decay"], 0.0)
        check_range(n, "momentum", g["momentum"], 0.0, 1.0, hi_open=True)
        check_bool(n, "centered", g["centered"])
        check_bool(n, "maximize", g["maximize"])

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
            lr=float(g["lr"]), alpha=g["alpha"], eps=g["eps"],
            weight_decay=float(g["weight_decay"]), momentum=g["momentum"], maximize=g["maximize"],
        )
        use_buf, centered = g["momentum"] > 0, g["centered"]
        for s, p in zip(work.states, work.params):
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
        fn = {"reference": rmsprop_reference, "foreach": rmsprop_foreach}[work.impl]
        fn(work.params, work.grads, steps, square_avgs, grad_avgs, bufs, **hp)


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
            den = v.addcmul(m, m, value=-1).sqrt_().add_(eps)  # sqrt(v_t - m_t^2) + eps
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
        _increment(ts)
        if maximize:
            gs = tc.foreach_neg(gs)
        if weight_decay != 0:
            gs = tc.foreach_add(gs, ps, alpha=weight_decay)
        tc.foreach_mul_(vs, alpha)
        tc.foreach_addcmul_(vs, gs, gs, value=1 - alpha)  # v_t
        if ms is not None:
            tc.foreach_lerp_(ms, gs, 1 - alpha)  # m_t
            den = tc.foreach_addcmul(vs, ms, ms, value=-1)  # v_t - m_t^2
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


def _increment(steps: list[Tensor]) -> None:
    """t <- t + 1 for a list of 0-dim step tensors."""
    if steps[0].is_cpu:
        # A CPU tensor operand avoids wrapping the Python 1 into a tensor once per step tensor.
        tc.foreach_add_(steps, torch.tensor(1.0), alpha=1.0)
    else:
        tc.foreach_add_(steps, 1)
