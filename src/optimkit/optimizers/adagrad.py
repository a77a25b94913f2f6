r"""Adagrad: drop-in for ``torch.optim.Adagrad``, including sparse gradients.

The math, per parameter :math:`\theta` with gradient :math:`g_t` at step :math:`t`::

    s_0 = initial_accumulator_value           (state "sum", set in the constructor)
    g   <- -g                                  if maximize
    g   <- g + weight_decay * theta            (L2 penalty, coupled)
    clr = lr / (1 + (t - 1) * lr_decay)        decayed step size
    s_t = s_{t-1} + g * g                      running sum of squared gradients
    theta <- theta - clr * g / (sqrt(s_t) + eps)

``lr`` is in parameter units per normalised gradient unit (the ratio ``g / sqrt(s)`` has no
units), ``eps`` in gradient units. State: ``step`` (0-dim tensor) and ``sum``, exactly as
torch.optim stores them, created in the constructor as torch does so state_dicts match.

Sparse gradients (``nn.Embedding(sparse=True)``) update only the rows they touch: the
accumulator and the parameter change only at the gradient's indices. They always take the
per-tensor reference path. As in torch, ``weight_decay != 0`` is refused with sparse
gradients (the penalty would make the gradient dense); ``maximize`` works.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .. import _torch_compat as tc
from .._base import PARAM_SHAPE, SCALAR, GroupWork, OptimizerBase, ParamsT
from .._impl import group_by_device_dtype
from .._validation import scalar, check_bool, check_eps, check_finite_nonnegative


class Adagrad(OptimizerBase):
    r"""Adagrad: per-coordinate step sizes shrinking with the accumulated squared gradient.

    Args:
        params: parameters or param groups to optimize.
        lr: learning rate (step size), ``0 <= lr < inf``. Default ``1e-2`` as in torch.optim.
        lr_decay: step-size decay per step, ``clr = lr / (1 + (t - 1) * lr_decay)``,
            ``0 <= lr_decay < inf``.
        weight_decay: coupled L2 penalty coefficient, ``0 <= weight_decay < inf`` (not with sparse
            gradients).
        initial_accumulator_value: starting value of the squared-gradient sum,
            ``0 <= initial_accumulator_value < inf``.
            Each param group's own value is used (torch uses the constructor's value for
            every group).
        eps: added to ``sqrt(sum)`` in the denominator (gradient units), which is 0 for a
            coordinate whose gradients were all 0: ``1.1754943508222875e-38 <= eps < inf``
            (``torch.finfo(torch.float32).tiny``: a smaller eps rounds to 0 in float32).
        foreach: ``True`` multi-tensor path, ``False`` per-tensor reference, ``None`` fastest.
        maximize: ascend the objective instead of descending.
        differentiable: must be ``False`` (not supported by optimkit).
        fused: ``True`` torch's fused single-pass kernel (dense gradients; sparse ones still
            take the reference path).
        flat: lay the parameters, gradients and state out as views into one buffer per
            param group and (device, dtype), and step it in large chunks (see
            ``optimkit._flatten``): the same math, far less per-tensor overhead with many
            small tensors. Re-points each eligible ``p.data`` and ``p.grad`` into the buffers;
            ``zero_grad()`` then zeroes gradients instead of setting them to ``None``.

    Example:
        >>> emb = torch.nn.Embedding(100, 8, sparse=True)
        >>> opt = Adagrad(emb.parameters(), lr=0.1)
        >>> emb(torch.tensor([1, 5, 5])).sum().backward(); opt.step()

    Reference: Duchi, Hazan, Singer, "Adaptive Subgradient Methods for Online Learning and
    Stochastic Optimization", JMLR 2011.
    """

    _tensor_steps = True
    _pure_validation = True  # _validate_group reads only the group (step() may skip it)
    #: initial_accumulator_value fills the state in the parameters' dtype
    _dtype_bounded = ("lr", "weight_decay", "initial_accumulator_value")
    _state_keys = frozenset({"step", "sum"})
    _has_fused = True
    _supports_sparse = True

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1e-2,
        lr_decay: float = 0,
        weight_decay: float = 0,
        initial_accumulator_value: float = 0,
        eps: float = 1e-10,
        foreach: bool | None = None,
        *,
        maximize: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        flat: bool = False,
    ) -> None:
        defaults = dict(
            lr=lr, lr_decay=lr_decay, eps=eps, weight_decay=weight_decay,
            initial_accumulator_value=initial_accumulator_value, foreach=foreach,
            maximize=maximize, differentiable=differentiable, fused=fused,
        )
        super().__init__(params, defaults, flat=flat)
        # torch.optim.Adagrad creates its state here rather than at the first step; doing the
        # same keeps state_dicts interchangeable (also before the first step).
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state[p]
                if len(state) == 0:
                    self._init_state(group, p, state)

    def _validate_group(self, g: dict[str, Any]) -> None:
        n = type(self).__name__
        check_finite_nonnegative(n, "lr", g["lr"])
        check_finite_nonnegative(n, "lr_decay", g["lr_decay"])
        check_finite_nonnegative(n, "weight_decay", g["weight_decay"])
        check_finite_nonnegative(n, "initial_accumulator_value", g["initial_accumulator_value"])
        # sqrt(sum) is 0 for a coordinate whose gradients were all 0: eps keeps g / (..) finite
        check_eps(n, "eps", g["eps"])
        check_bool(n, "maximize", g["maximize"])

    def _mixed_dtype_ok(self, group: dict[str, Any]) -> bool:
        return True  # torch's loop: addcmul_ / addcdiv_ across dtypes

    def _init_state(self, group: dict[str, Any], p: Tensor, state: dict[str, Any]) -> None:
        state["step"] = torch.tensor(0.0, dtype=tc.scalar_dtype())
        state["sum"] = torch.full_like(
            p, scalar(group["initial_accumulator_value"]), memory_format=torch.preserve_format
        )

    def _state_spec(self, group: dict[str, Any], p: Tensor) -> dict[str, Any]:
        return {"step": SCALAR, "sum": PARAM_SHAPE}

    def _gather(self, gi: int, group: dict[str, Any]) -> GroupWork:
        work = super()._gather(gi, group)
        # Refused here, while step() is still gathering, so nothing has been touched yet.
        if group["weight_decay"] != 0 and not work.dense:
            for pi, g in enumerate(work.grads):
                if g.is_sparse:
                    raise RuntimeError(
                        f"Adagrad: weight_decay={group['weight_decay']!r} is not compatible with "
                        f"sparse gradients (param group {gi}, shape {tuple(g.shape)}); the L2 "
                        "penalty would make the gradient dense. Use weight_decay=0 for this "
                        "group, or put the sparse parameters in their own group without it"
                    )
        return work

    def _update(self, work: GroupWork) -> None:
        g = work.group
        hp = dict(
            lr=scalar(g["lr"]), lr_decay=scalar(g["lr_decay"]), weight_decay=scalar(g["weight_decay"]),
            eps=scalar(g["eps"]), maximize=g["maximize"],
        )
        sums = [s["sum"] for s in work.states]
        steps = [s["step"] for s in work.states]
        fn = {"reference": adagrad_reference, "foreach": adagrad_foreach,
              "fused": adagrad_fused}[work.impl]
        if work.dense:  # (the lists as they are: a copy would lose their OneDeviceDtype note)
            fn(work.params, work.grads, sums, steps, **hp)
            return
        dense = [i for i, gr in enumerate(work.grads) if not gr.is_sparse]
        if len(dense) < len(work.grads):
            sparse = [i for i, gr in enumerate(work.grads) if gr.is_sparse]
            adagrad_reference(*_pick(sparse, work.params, work.grads, sums, steps), **hp)
        if not dense:
            return
        fn(*_pick(dense, work.params, work.grads, sums, steps), **hp)


def _pick(idx: list[int], *lists: list[Tensor]) -> list[list[Tensor]]:
    if len(idx) == len(lists[0]):
        return list(lists)
    return [[lst[i] for i in idx] for lst in lists]


# ---------------------------------------------------------------------------------- math
def adagrad_reference(
    params: list[Tensor], grads: list[Tensor], sums: list[Tensor], steps: list[Tensor], *,
    lr: float, lr_decay: float, weight_decay: float, eps: float, maximize: bool,
) -> None:
    """Per-tensor reference: the equations of the module docstring, one tensor at a time.

    ``sums`` and ``steps`` are updated in place. Sparse gradients update only their rows.
    """
    for p, g, s, step in zip(params, grads, sums, steps):
        step += 1  # t
        if maximize:
            g = -g
        if weight_decay != 0:
            if g.is_sparse:
                raise RuntimeError(
                    "Adagrad: weight_decay != 0 is not compatible with sparse gradients"
                )
            g = g.add(p, alpha=weight_decay)  # g + wd * theta
        clr = lr / (1 + (step.item() - 1) * lr_decay)  # lr / (1 + (t - 1) * lr_decay)
        if g.is_sparse:
            # The update is non-linear in g, so repeated indices must be summed first.
            g = g.coalesce()
            rows, vals = tuple(g.indices()), g.values()
            s.index_put_(rows, vals * vals, accumulate=True)  # s_t = s + g^2 at the rows of g
            std = s[rows].sqrt_().add_(eps)  # sqrt(s_t) + eps at the same rows
            p.index_put_(rows, vals / std * -clr, accumulate=True)
        else:
            s.addcmul_(g, g, value=1)  # s_t = s_{t-1} + g^2
            std = s.sqrt().add_(eps)  # sqrt(s_t) + eps
            p.addcdiv_(g, std, value=-clr)  # theta <- theta - clr g / (sqrt(s_t) + eps)


def adagrad_foreach(
    params: list[Tensor], grads: list[Tensor], sums: list[Tensor], steps: list[Tensor], *,
    lr: float, lr_decay: float, weight_decay: float, eps: float, maximize: bool,
) -> None:
    """Multi-tensor path (dense gradients): the same equations with ``torch._foreach_*``."""
    for (ps, gs, ss, ts), _ in group_by_device_dtype(params, grads, sums, steps).values():
        tc.increment_steps(ts)  # t
        if maximize:
            gs = tc.foreach_neg(gs)
        if weight_decay != 0:
            gs = tc.foreach_add(gs, ps, alpha=weight_decay)
        tc.foreach_addcmul_(ss, gs, gs, value=1)  # s_t = s_{t-1} + g^2
        std = tc.foreach_sqrt(ss)
        tc.foreach_add_(std, eps)  # sqrt(s_t) + eps
        if lr_decay == 0:
            tc.foreach_addcdiv_(ps, gs, std, value=-lr)
        else:
            # One host read for the whole bucket, not one .item() per tensor.
            minus_clr = [-lr / (1 + (t - 1) * lr_decay) for t in torch.stack(ts).tolist()]
            tc.foreach_addcdiv_(ps, tc.foreach_mul(gs, minus_clr), std)


def adagrad_fused(
    params: list[Tensor], grads: list[Tensor], sums: list[Tensor], steps: list[Tensor], *,
    lr: float, lr_decay: float, weight_decay: float, eps: float, maximize: bool,
) -> None:
    """torch's fused single-pass Adagrad kernel (dense gradients), per (device, dtype) bucket."""
    buckets = group_by_device_dtype(params, grads, sums, steps)
    for (device, _), ((ps, gs, ss, ts), _) in buckets.items():
        tc.increment_steps(ts)  # the kernel reads t, it does not advance it
        if ts and ts[0].device != device:
            # Steps live on the CPU (as in torch's non-fused Adagrad); one copy per bucket.
            ts = list(torch.stack(ts).to(device, non_blocking=True).unbind(0))
        tc.fused_adagrad_(
            ps, gs, ss, ts, lr=lr, lr_decay=lr_decay, weight_decay=weight_decay, eps=eps,
            maximize=maximize, grad_scale=None, found_inf=None,
        )
