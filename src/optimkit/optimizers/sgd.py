r"""SGD with optional (Nesterov) momentum: drop-in for ``torch.optim.SGD``.

The math, per parameter :math:`\theta` with gradient :math:`g_t` at step :math:`t`::

    g  <- -g                                  if maximize
    g  <- g + weight_decay * theta            (L2 penalty, coupled)
    b_1 = g                                   first step: buffer is the gradient itself
    b_t = momentum * b_{t-1} + (1 - dampening) * g
    d   = g + momentum * b_t                  if nesterov
        = b_t                                 if momentum != 0
        = g                                   otherwise
    theta <- theta - lr * d

``lr`` is in parameter units per gradient unit. State: ``momentum_buffer`` (only when
``momentum != 0``), exactly as torch.optim stores it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .. import _torch_compat as tc
from .._base import PARAM_SHAPE, GroupWork, OptimizerBase, ParamsT
from .._impl import group_by_device_dtype
from .._step import IS_NONE
from .._validation import scalar, check_bool, check_finite_nonnegative, check_range


class SGD(OptimizerBase):
    r"""Stochastic gradient descent, optionally with momentum or Nesterov momentum.

    Args:
        params: parameters or param groups to optimize.
        lr: learning rate (step size), ``0 <= lr < inf``. Default ``1e-3`` as in torch.optim.
        momentum: heavy-ball coefficient, ``0 <= momentum < 1``; 0.9 is the usual choice.
        dampening: fraction of the gradient kept out of the buffer, ``0 <= dampening <= 1``.
        weight_decay: coupled L2 penalty coefficient, ``0 <= weight_decay < inf``.
        nesterov: use Nesterov's look-ahead form; needs ``momentum > 0`` and ``dampening == 0``.
        maximize: ascend the objective instead of descending.
        foreach: ``True`` multi-tensor path, ``False`` per-tensor reference, ``None`` fastest.
        fused: ``True`` torch's fused single-pass kernel.
        flat: lay the parameters, gradients and state out as views into one buffer per
            param group and (device, dtype), and step it in large chunks (see
            ``optimkit._flatten``): the same math, far less per-tensor overhead with many
            small tensors. Re-points each eligible ``p.data`` and ``p.grad`` into the buffers;
            ``zero_grad()`` then zeroes gradients instead of setting them to ``None``.

    Example:
        >>> model = torch.nn.Linear(3, 1)
        >>> opt = SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True)
        >>> model(torch.randn(4, 3)).sum().backward(); opt.step()
    """

    _has_fused = True
    _pure_validation = True  # _validate_group reads only the group (step() may skip it)
    _state_keys = frozenset({"momentum_buffer"})
    _supports_sparse = True  # as torch.optim.SGD (the per-tensor reference runs them)
    # torch 2.12/2.13's CPU fused SGD kernel skips the update of every full SIMD block of a
    # float16/bfloat16 tensor (only the tail elements move; reproduced in
    # tests/test_integration.py), so half types on CPU take the foreach path.
    _fused_broken = frozenset({("cpu", torch.float16), ("cpu", torch.bfloat16)})

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1e-3,
        momentum: float = 0,
        dampening: float = 0,
        weight_decay: float | Tensor = 0,
        nesterov: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        differentiable: bool = False,
        fused: bool | None = None,
        flat: bool = False,
    ) -> None:
        defaults = dict(
            lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
            nesterov=nesterov, maximize=maximize, foreach=foreach,
            differentiable=differentiable, fused=fused,
        )
        super().__init__(params, defaults, flat=flat)

    def _validate_group(self, g: dict[str, Any]) -> None:
        n = type(self).__name__
        check_finite_nonnegative(n, "lr", g["lr"])
        check_range(n, "momentum", g["momentum"], 0.0, 1.0, hi_open=True)
        check_range(n, "dampening", g["dampening"], 0.0, 1.0)
        check_finite_nonnegative(n, "weight_decay", g["weight_decay"])
        check_bool(n, "nesterov", g["nesterov"])
        check_bool(n, "maximize", g["maximize"])
        if g["nesterov"] and (g["momentum"] <= 0 or g["dampening"] != 0):
            raise ValueError(
                f"{n}: invalid nesterov=True; expected momentum > 0 and dampening == 0 with it "
                f"(got momentum={g['momentum']!r}, dampening={g['dampening']!r})"
            )

    def _mixed_dtype_ok(self, group: dict[str, Any]) -> bool:
        return True  # torch's loop: buf.mul_().add_() and p.add_() across dtypes

    def _init_state(self, group: dict[str, Any], p: Tensor, state: dict[str, Any]) -> None:
        # The buffer is created from the first gradient (b_1 = g), not zeros.
        if group["momentum"] != 0:
            state["momentum_buffer"] = None

    def _state_spec(self, group: dict[str, Any], p: Tensor) -> dict[str, Any]:
        return {"momentum_buffer": PARAM_SHAPE} if group["momentum"] != 0 else {}

    def _keeps_state(self, group: dict[str, Any]) -> bool:
        return group["momentum"] != 0

    def _gather(self, gi: int, group: dict[str, Any]) -> GroupWork:
        work = super()._gather(gi, group)
        if not work.dense and any(g.is_sparse for g in work.grads):
            # As torch.optim.SGD: sparse gradients (nn.Embedding(sparse=True)) run the per-tensor
            # loop, which adds them into the parameter and the momentum buffer sparsely.
            # Refused here, before any write, where torch fails part-way through the step.
            n = type(self).__name__
            if self._fused_flag(group):
                raise RuntimeError(f"{n}: fused=True does not support sparse gradients "
                                   f"(param group {gi}); leave fused unset for this group")
            if scalar(group["weight_decay"]) != 0:
                raise RuntimeError(
                    f"{n}: weight_decay={group['weight_decay']!r} is not compatible with sparse "
                    f"gradients (param group {gi}): the L2 term is dense. Put the sparse "
                    "parameters (e.g. nn.Embedding(sparse=True)) in a group with weight_decay=0"
                )
            work.impl = "reference"
        return work

    def _update(self, work: GroupWork) -> None:
        g = work.group
        hp = dict(
            lr=scalar(g["lr"]), momentum=scalar(g["momentum"]), dampening=scalar(g["dampening"]),
            weight_decay=scalar(g["weight_decay"]), nesterov=g["nesterov"], maximize=g["maximize"],
        )
        use_buf = g["momentum"] != 0
        bufs = [s.get("momentum_buffer") for s in work.states] if use_buf else None
        fn = {"reference": sgd_reference, "foreach": sgd_foreach, "fused": sgd_fused}[work.impl]
        # the paths replace only the None entries (new buffers); the others are updated in place
        new = use_buf and any(map(IS_NONE, bufs))
        fn(work.params, work.grads, bufs, **hp)
        if new:
            for s, b in zip(work.states, bufs):
                s["momentum_buffer"] = b


# ---------------------------------------------------------------------------------- math
def sgd_reference(
    params: list[Tensor], grads: list[Tensor], bufs: list[Tensor | None] | None, *,
    lr: float, momentum: float, dampening: float, weight_decay: float, nesterov: bool,
    maximize: bool,
) -> None:
    """Per-tensor reference: the equations of the module docstring, one tensor at a time.

    ``bufs`` (when momentum != 0) is updated in place; a ``None`` entry becomes a new buffer.
    """
    for i, (p, g) in enumerate(zip(params, grads)):
        if maximize:
            g = -g
        if weight_decay != 0:
            g = g.add(p, alpha=weight_decay)  # g + wd * theta
        if momentum != 0:
            assert bufs is not None
            b = bufs[i]
            if b is None:
                b = torch.clone(g).detach()  # b_1 = g
                bufs[i] = b
            else:
                b.mul_(momentum).add_(g, alpha=1 - dampening)  # b_t = mu b + (1 - tau) g
            g = g.add(b, alpha=momentum) if nesterov else b
        p.add_(g, alpha=-lr)  # theta <- theta - lr d


def sgd_foreach(
    params: list[Tensor], grads: list[Tensor], bufs: list[Tensor | None] | None, *,
    lr: float, momentum: float, dampening: float, weight_decay: float, nesterov: bool,
    maximize: bool,
) -> None:
    """Multi-tensor path: the same equations with ``torch._foreach_*`` per (device, dtype)."""
    lists = (params, grads) if bufs is None else (params, grads, bufs)
    for (blists, idx) in group_by_device_dtype(*lists).values():
        ps, gs = blists[0], blists[1]
        if maximize:
            gs = tc.foreach_neg(gs)
        if weight_decay != 0:
            gs = tc.foreach_add(gs, ps, alpha=weight_decay)
        if momentum != 0:
            bs = blists[2]
            if all(b is not None for b in bs):
                tc.foreach_mul_(bs, momentum)
                tc.foreach_add_(bs, gs, alpha=1 - dampening)
            else:
                for j, b in enumerate(bs):
                    if b is None:
                        bs[j] = torch.clone(gs[j]).detach()
                    else:
                        b.mul_(momentum).add_(gs[j], alpha=1 - dampening)
                for j, i in enumerate(idx):
                    bufs[i] = bs[j]  # type: ignore[index]
            gs = tc.foreach_add(gs, bs, alpha=momentum) if nesterov else bs
        tc.foreach_add_(ps, gs, alpha=-lr)


def sgd_fused(
    params: list[Tensor], grads: list[Tensor], bufs: list[Tensor | None] | None, *,
    lr: float, momentum: float, dampening: float, weight_decay: float, nesterov: bool,
    maximize: bool,
) -> None:
    """torch's fused single-pass SGD kernel, per (device, dtype) bucket."""
    hp = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
              nesterov=nesterov, maximize=maximize)
    lists = (params, grads) if bufs is None else (params, grads, bufs)
    for (blists, idx) in group_by_device_dtype(*lists).values():
        ps, gs = blists[0], blists[1]
        bs: list[Tensor] = []
        first = False
        if momentum != 0:
            assert bufs is not None
            bs = blists[2]
            new = [j for j, b in enumerate(bs) if b is None]
            first = len(new) == len(bs)
            if first:
                # The kernel sets b_1 = g itself when told this is the first step.
                bs = [torch.empty_like(g) for g in gs]
                for j, i in enumerate(idx):
                    bufs[i] = bs[j]
            elif new:
                # The kernel's first-step flag covers a whole call; parameters stepping for
                # the first time next to older ones (e.g. after unfreezing) take the reference.
                sub: list[Tensor | None] = [None] * len(new)
                sgd_reference([ps[j] for j in new], [gs[j] for j in new], sub, **hp)
                for j, b in zip(new, sub):
                    bufs[idx[j]] = b
                keep = [j for j in range(len(ps)) if bs[j] is not None]
                ps, gs, bs = [ps[j] for j in keep], [gs[j] for j in keep], [bs[j] for j in keep]
        tc.fused_sgd_(
            ps, gs, bs, weight_decay=weight_decay, momentum=momentum, lr=lr,
            dampening=dampening, nesterov=nesterov, maximize=maximize,
            is_first_step=first, grad_scale=None, found_inf=None,
        )
