r"""Adadelta: drop-in for ``torch.optim.Adadelta``.

The math, per parameter :math:`\theta` with gradient :math:`g_t` at step :math:`t`::

    g   <- -g                                         if maximize
    g   <- g + weight_decay * theta                   (L2 penalty, coupled)
    v_t = rho * v_{t-1} + (1 - rho) * g^2             running mean of squared gradients
    d   = sqrt(u_{t-1} + eps) / sqrt(v_t + eps) * g   step in parameter units
    u_t = rho * u_{t-1} + (1 - rho) * d^2             running mean of squared steps
    theta <- theta - lr * d

Both buffers start at zero. The ratio of the two root-mean-squares gives ``d`` the units of
the parameter, so ``lr`` is a dimensionless multiplier (1.0 is the paper's method) and
``eps`` is in squared gradient units in the denominator and squared parameter units in the
numerator, where it also sets the size of the first steps. State: ``step``, ``square_avg``
(v) and ``acc_delta`` (u), exactly as torch.optim stores them.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .. import _compiled
from .. import _torch_compat as tc
from .._base import PARAM_SHAPE, SCALAR, GroupWork, OptimizerBase, ParamsT
from .._impl import group_by_device_dtype
from .._validation import scalar, check_bool, check_eps, check_finite_nonnegative, check_range


class Adadelta(OptimizerBase):
    r"""Adadelta: a step sized by the ratio of recent step and gradient root-mean-squares.

    Args:
        params: parameters or param groups to optimize.
        lr: multiplier of the step ``d``, ``0 <= lr < inf``. Default ``1.0`` (the paper's method).
        rho: smoothing constant of both running averages, ``0 <= rho <= 1``.
        eps: added inside both square roots; also sets the first steps' size (with
            ``eps = 0`` every step is 0): ``1.1754943508222875e-38 <= eps < inf``
            (``torch.finfo(torch.float32).tiny``: a smaller eps rounds to 0 in float32).
        weight_decay: coupled L2 penalty coefficient, ``0 <= weight_decay < inf``.
        foreach: ``True`` multi-tensor path, ``False`` per-tensor reference, ``None`` fastest.
        capturable: must be ``False`` (CUDA-graph capture is not supported by optimkit).
        maximize: ascend the objective instead of descending.
        differentiable: must be ``False`` (not supported by optimkit).
        flat: lay the parameters, gradients and state out as views into one buffer per
            param group and (device, dtype), and step it in large chunks (see
            ``optimkit._flatten``): the same math, far less per-tensor overhead with many
            small tensors. Re-points each eligible ``p.data`` and ``p.grad`` into the buffers;
            ``zero_grad()`` then zeroes gradients instead of setting them to ``None``.
        compile: run the update as one ``torch.compile``-generated single-pass kernel
            (``optimkit._compiled``): fewer bytes moved per step, but the first step compiles
            (~9 s cold on a 2-core CPU) and needs a C++ compiler on CPU. Best with ``flat``.

    Example:
        >>> model = torch.nn.Linear(3, 1)
        >>> opt = Adadelta(model.parameters(), rho=0.9)
        >>> model(torch.randn(4, 3)).sum().backward(); opt.step()

    Reference: Zeiler, "ADADELTA: An Adaptive Learning Rate Method", arXiv:1212.5701, 2012.
    """

    _tensor_steps = True
    _pure_validation = True  # _validate_group reads only the group (step() may skip it)
    _state_keys = frozenset({"step", "square_avg", "acc_delta"})
    #: eps sits inside both square roots: beyond the dtype it makes the step inf / inf
    _dtype_bounded = ("lr", "weight_decay", "eps")
    _has_compiled = True

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1.0,
        rho: float = 0.9,
        eps: float = 1e-6,
        weight_decay: float = 0,
        foreach: bool | None = None,
        *,
        capturable: bool = False,
        maximize: bool = False,
        differentiable: bool = False,
        flat: bool = False,
        compile: bool = False,
    ) -> None:
        defaults = dict(
            lr=lr, rho=rho, eps=eps, weight_decay=weight_decay, maximize=maximize,
            capturable=capturable, foreach=foreach, differentiable=differentiable,
        )
        super().__init__(params, defaults, flat=flat, compile=compile)

    def _validate_group(self, g: dict[str, Any]) -> None:
        n = type(self).__name__
        check_finite_nonnegative(n, "lr", g["lr"])
        check_range(n, "rho", g["rho"], 0.0, 1.0)
        # with eps = 0 the first step is sqrt(0 / v) * g = 0 for ever, and 0/0 on a zero gradient
        check_eps(n, "eps", g["eps"])
        check_finite_nonnegative(n, "weight_decay", g["weight_decay"])
        check_bool(n, "maximize", g["maximize"])

    def _mixed_dtype_ok(self, group: dict[str, Any]) -> bool:
        return True  # torch's loop: mul_ / addcmul_ / add_ across dtypes

    def _init_state(self, group: dict[str, Any], p: Tensor, state: dict[str, Any]) -> None:
        state["step"] = torch.tensor(0.0, dtype=tc.scalar_dtype())
        state["square_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["acc_delta"] = torch.zeros_like(p, memory_format=torch.preserve_format)

    def _state_spec(self, group: dict[str, Any], p: Tensor) -> dict[str, Any]:
        return {"step": SCALAR, "square_avg": PARAM_SHAPE, "acc_delta": PARAM_SHAPE}

    def _update(self, work: GroupWork) -> None:
        g = work.group
        hp = dict(
            lr=scalar(g["lr"]), rho=scalar(g["rho"]), eps=scalar(g["eps"]),
            weight_decay=scalar(g["weight_decay"]), maximize=g["maximize"],
        )
        steps = [s["step"] for s in work.states]
        square_avgs = [s["square_avg"] for s in work.states]
        acc_deltas = [s["acc_delta"] for s in work.states]
        fn = {"reference": adadelta_reference, "foreach": adadelta_foreach,
              "compiled": adadelta_compiled}[work.impl]
        fn(work.params, work.grads, steps, square_avgs, acc_deltas, **hp)


# ---------------------------------------------------------------------------------- math
def adadelta_reference(
    params: list[Tensor], grads: list[Tensor], steps: list[Tensor], square_avgs: list[Tensor],
    acc_deltas: list[Tensor], *,
    lr: float, rho: float, eps: float, weight_decay: float, maximize: bool,
) -> None:
    """Per-tensor reference: the equations of the module docstring, one tensor at a time.

    ``steps``, ``square_avgs`` (v) and ``acc_deltas`` (u) are updated in place.
    """
    for p, g, step, v, u in zip(params, grads, steps, square_avgs, acc_deltas):
        step += 1  # t (kept for torch compatibility; Adadelta does not use it)
        if maximize:
            g = -g
        if weight_decay != 0:
            g = g.add(p, alpha=weight_decay)  # g + wd * theta
        v.mul_(rho).addcmul_(g, g, value=1 - rho)  # v_t = rho v + (1 - rho) g^2
        # d = sqrt(u_{t-1} + eps) / sqrt(v_t + eps) * g, as one root of the ratio: one pass
        # fewer than two roots (measured 15% faster on 1 MiB chunks); equal up to rounding
        d = u.add(eps).div_(v.add(eps)).sqrt_().mul_(g)
        u.mul_(rho).addcmul_(d, d, value=1 - rho)  # u_t = rho u + (1 - rho) d^2
        p.add_(d, alpha=-lr)  # theta <- theta - lr d


def adadelta_foreach(
    params: list[Tensor], grads: list[Tensor], steps: list[Tensor], square_avgs: list[Tensor],
    acc_deltas: list[Tensor], *,
    lr: float, rho: float, eps: float, weight_decay: float, maximize: bool,
) -> None:
    """Multi-tensor path: the same equations with ``torch._foreach_*`` per (device, dtype)."""
    lists = (params, grads, steps, square_avgs, acc_deltas)
    for (ps, gs, ts, vs, us), _ in group_by_device_dtype(*lists).values():
        tc.increment_steps(ts)
        if maximize:
            gs = tc.foreach_neg(gs)
        if weight_decay != 0:
            gs = tc.foreach_add(gs, ps, alpha=weight_decay)
        tc.foreach_mul_(vs, rho)
        tc.foreach_addcmul_(vs, gs, gs, value=1 - rho)  # v_t
        ds = tc.foreach_add(us, eps)
        tc.foreach_div_(ds, tc.foreach_add(vs, eps))
        tc.foreach_sqrt_(ds)
        tc.foreach_mul_(ds, gs)  # d = sqrt((u_{t-1} + eps) / (v_t + eps)) * g
        tc.foreach_mul_(us, rho)
        tc.foreach_addcmul_(us, ds, ds, value=1 - rho)  # u_t
        tc.foreach_add_(ps, ds, alpha=-lr)


def _adadelta_kernel(p: Tensor, g: Tensor, v: Tensor, u: Tensor, hp: Tensor) -> None:
    """One Adadelta update of 1-D tensors, written for inductor to fuse into one pass.

    ``hp = [lr, rho, eps, weight_decay, sign]`` (``sign = -1`` maximizes): values, not
    branches, so one compiled graph serves every option and schedule."""
    lr, rho, eps, wd, sign = hp.unbind(0)
    g = sign * g + wd * p  # wd = 0 adds exactly 0
    v_new = rho * v + (1 - rho) * g * g
    d = torch.sqrt((u + eps) / (v_new + eps)) * g
    u.copy_(rho * u + (1 - rho) * d * d)
    v.copy_(v_new)
    p.copy_(p - lr * d)


def adadelta_compiled(
    params: list[Tensor], grads: list[Tensor], steps: list[Tensor], square_avgs: list[Tensor],
    acc_deltas: list[Tensor], *,
    lr: float, rho: float, eps: float, weight_decay: float, maximize: bool,
) -> None:
    """``compile=True``: the same equations as one compiled single-pass kernel per tensor
    (see ``optimkit._compiled``); tensors it does not take run the reference."""
    tc.increment_steps(steps)
    sign = -1.0 if maximize else 1.0
    for p, g, v, u in zip(params, grads, square_avgs, acc_deltas):
        if _compiled.takes(p, v, u):
            _compiled.kernel(_adadelta_kernel)(
                *_compiled.flat1d(p, g, v, u), _compiled.scalars(p, lr, rho, eps, weight_decay, sign))
        else:
            adadelta_reference([p], [g], [torch.zeros(())], [v], [u], lr=lr, rho=rho, eps=eps,
                               weight_decay=weight_decay, maximize=maximize)
