"""Prodigy with ``compile=True``: both phases as ``torch.compile``-generated single-pass
kernels over 1-D views (``optimkit._compiled``)."""

from __future__ import annotations

import torch
from torch import Tensor

from ... import _compiled
from .common import _acc_dtype


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
        else:  # one element: the reference (imported here: prodigy.py imports this module)
            from ..prodigy import prodigy_apply_reference

            prodigy_apply_reference(
                [p], [g], [s[i]], m or None, [exp_avg_sqs[i]], slice_p=1, beta3=beta3,
                c_s=c_s, coupled_wd=coupled_wd, beta1=beta1, beta2=beta2, d=d, d_new=d_new,
                dlr=dlr, eps=eps, decoupled_wd=decoupled_wd, stochastic_rounding=False)
