"""Prodigy's multi-tensor path (``foreach=True`` for tensors the fused fast path does not
take): the reference's equations with one multi-tensor op per (device, dtype) chunk and no
host sync (phase 1 returns its sums as tensors)."""

from __future__ import annotations

import torch
from torch import Tensor

from ... import _torch_compat as tc
from ..._impl import group_by_device_dtype
from ..._rounding import chunks, stochastic_round_
from .common import _LOW_PRECISION, _absmax, _acc_dtype


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


def _chunks(tensors: list[Tensor]) -> list[tuple[int, int]]:
    """Consecutive index ranges whose float32-equivalent size stays within the chunk budget."""
    return chunks(tensors, _CHUNK_BYTES.get(tensors[0].device.type, _CHUNK_BYTES_DEFAULT))
