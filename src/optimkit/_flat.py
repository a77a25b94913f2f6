r"""Prototype, not wired into the optimizers: Adam over one flat fp32 buffer, one compiled pass.

Why: an optimizer step is bound by memory bandwidth, and on models with many small tensors
per-tensor overhead (Python loops, one kernel launch or one OpenMP region per tensor)
dominates (DESIGN.md section 4). Keeping every parameter, gradient and state buffer of a
param group in one contiguous buffer lets a single fused loop read ``p, g, m, v`` once and
write ``p, m, v`` once: the 28 bytes/parameter floor, whatever the number of tensors. And
``torch.compile`` over one flat buffer compiles one small graph (seconds) instead of one
graph per tensor list (minutes).

The math (Kingma & Ba, torch.optim.Adam's defaults), per element, step :math:`t`::

    g   <- g + weight_decay * theta               (coupled L2, Adam; decoupled=False)
    theta <- theta * (1 - lr * weight_decay)      (decoupled, AdamW; decoupled=True)
    m_t = beta1 * m + (1 - beta1) * g
    v_t = beta2 * v + (1 - beta2) * g^2
    theta <- theta - lr / (1 - beta1^t) * m_t / (sqrt(v_t) / sqrt(1 - beta2^t) + eps)

Used by ``optimkit.bench`` as the row "optimkit flat-compiled (prototype)". Limits (it is a
prototype): one param group, float32 parameters on one device, dense gradients, no
``maximize``/``amsgrad``, no state_dict loading.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor


def flat_view(tensors: list[Tensor]) -> Tensor | None:
    """One 1-D view covering ``tensors`` if they are contiguous, back-to-back views of one storage.

    Returns ``None`` otherwise (the caller then has to copy).
    """
    if not tensors:
        return None
    first = tensors[0]
    storage = first.untyped_storage()
    offset = first.storage_offset()
    for t in tensors:
        if (
            not t.is_contiguous()
            or t.dtype != first.dtype
            or t.device != first.device
            or t.untyped_storage().data_ptr() != storage.data_ptr()
            or t.storage_offset() != offset
        ):
            return None
        offset += t.numel()
    n = offset - first.storage_offset()
    return torch.empty(0, dtype=first.dtype, device=first.device).set_(
        storage, first.storage_offset(), (n,)
    )


def _adam_flat_math(p: Tensor, g: Tensor, m: Tensor, v: Tensor, s: Tensor, decoupled: bool) -> None:
    # s = [lr, beta1, beta2, eps, weight_decay, 1 - beta1^t, sqrt(1 - beta2^t)] as one tensor:
    # values that change every step (bias corrections, a scheduled lr) are inputs of the
    # compiled graph, not constants baked into it, so they never trigger a recompile.
    lr, b1, b2, eps, wd, bc1, bc2_sqrt = s.unbind(0)
    if decoupled:
        p_in = p * (1 - lr * wd)
    else:
        p_in = p
        g = g + wd * p
    m_new = m * b1 + (1 - b1) * g
    v_new = v * b2 + (1 - b2) * g * g
    p_new = p_in - (lr / bc1) * m_new / (v_new.sqrt() / bc2_sqrt + eps)
    # Written as copies of freshly computed values so inductor emits one loop that reads
    # p, g, m, v once and stores p, m, v once.
    m.copy_(m_new)
    v.copy_(v_new)
    p.copy_(p_new)


class FlatAdam(torch.optim.Optimizer):
    r"""Adam / AdamW over one flat buffer per state, the update compiled into one pass.

    If the parameters are not already back-to-back views of one storage (see
    :func:`flat_view`), they are copied into one buffer and each ``p.data`` is re-pointed to
    its slice of it (the usual "flat parameters" trick). Gradients that are views of one
    buffer in the same layout are used in place; otherwise they are gathered into a
    preallocated scratch buffer each step (8 more bytes/parameter of traffic).

    Args:
        params: float32 tensors of one device (a single param group).
        lr: step size, ``lr >= 0``, parameter units.
        betas: decay rates of the first and second moment, each in ``[0, 1)``.
        eps: added to the denominator, ``eps >= 0``, gradient units.
        weight_decay: coupled L2 (Adam) or decoupled (AdamW) coefficient, ``>= 0``.
        decoupled: ``True`` for AdamW's decoupled weight decay.
        compile: compile the update with ``torch.compile`` (``False``: the same math eagerly,
            several passes; used to check the math cheaply).
    """

    def __init__(
        self,
        params: Iterable[Tensor],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        decoupled: bool = False,
        compile: bool = True,
    ) -> None:
        owner = type(self).__name__
        if not lr >= 0:
            raise ValueError(f"{owner}: invalid lr={lr!r}; expected lr >= 0")
        for i, b in enumerate(betas):
            if not 0 <= b < 1:
                raise ValueError(f"{owner}: invalid betas[{i}]={b!r}; expected 0 <= betas[{i}] < 1")
        if not eps >= 0:
            raise ValueError(f"{owner}: invalid eps={eps!r}; expected eps >= 0")
        if not weight_decay >= 0:
            raise ValueError(f"{owner}: invalid weight_decay={weight_decay!r}; expected weight_decay >= 0")
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        super().__init__(params, defaults)
        if len(self.param_groups) != 1:
            raise ValueError(f"{owner}: the prototype supports exactly one param group")
        ps: list[Tensor] = self.param_groups[0]["params"]
        if any(p.dtype != torch.float32 for p in ps) or len({p.device for p in ps}) != 1:
            raise ValueError(f"{owner}: the prototype needs float32 parameters on one device")
        flat = flat_view(ps)
        if flat is None:
            flat = torch.cat([p.detach().reshape(-1) for p in ps])
            off = 0
            for p in ps:
                p.data = flat[off : off + p.numel()].view_as(p)
                off += p.numel()
        self._flat_p = flat
        self._m = torch.zeros_like(flat)
        self._v = torch.zeros_like(flat)
        self._g_scratch: Tensor | None = None
        self._decoupled = decoupled
        self._t = 0
        # Per-parameter views into the flat state, so code that walks optimizer.state
        # (loggers, the benchmark's state-size count) sees torch.optim's layout.
        off = 0
        for p in ps:
            n = p.numel()
            self.state[p] = {
                "exp_avg": self._m[off : off + n].view_as(p),
                "exp_avg_sq": self._v[off : off + n].view_as(p),
            }
            off += n
        # dynamic=False: each buffer size gets its own static kernel; no symbolic shapes.
        self._kernel = torch.compile(_adam_flat_math, dynamic=False) if compile else _adam_flat_math

    def _flat_grad(self, ps: list[Tensor]) -> Tensor:
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in ps]
        g = flat_view(grads)
        if g is not None and g.numel() == self._flat_p.numel():
            return g
        if self._g_scratch is None:
            self._g_scratch = torch.empty_like(self._flat_p)
        torch.cat([x.reshape(-1) for x in grads], out=self._g_scratch)
        return self._g_scratch

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        """One Adam step over the whole flat buffer (parameters without a gradient see g = 0)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        group = self.param_groups[0]
        ps = group["params"]
        if all(p.grad is None for p in ps):
            return loss
        self._t += 1
        b1, b2 = group["betas"]
        s = torch.tensor(
            [group["lr"], b1, b2, group["eps"], group["weight_decay"],
             1 - b1**self._t, (1 - b2**self._t) ** 0.5],
            dtype=torch.float32, device=self._flat_p.device,
        )
        self._kernel(self._flat_p, self._flat_grad(ps), self._m, self._v, s, self._decoupled)
        return loss
