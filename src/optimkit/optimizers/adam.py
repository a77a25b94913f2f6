r"""Adam and AdamW: drop-in for ``torch.optim.Adam`` and ``torch.optim.AdamW``.

The math, per parameter :math:`\theta` with gradient :math:`g_t` at its step :math:`t`
(``t`` counts the steps *this* parameter has taken, so a frozen layer's counter pauses)::

    g  <- -g                                   if maximize
    theta <- theta * (1 - lr * weight_decay)   if decoupled_weight_decay (AdamW)
    g  <- g + weight_decay * theta             otherwise (coupled L2 penalty)
    m_t = beta1 * m_{t-1} + (1 - beta1) * g            first moment  (exp_avg)
    v_t = beta2 * v_{t-1} + (1 - beta2) * g^2          second moment (exp_avg_sq)
    vmax_t = max(vmax_{t-1}, v_t); v_t <- vmax_t       if amsgrad    (max_exp_avg_sq)
    m_hat = m_t / (1 - beta1^t)                        bias corrections
    v_hat = v_t / (1 - beta2^t)
    theta <- theta - lr * m_hat / (sqrt(v_hat) + eps)

``lr`` is in parameter units: once the moments settle, each element moves by about ``lr``
per step whatever the gradient's scale. ``eps`` is in gradient units (it is added to
``sqrt(v_hat)``). ``weight_decay`` is per unit of lr when decoupled (the parameter shrinks by
the factor ``1 - lr * weight_decay`` each step), and a gradient coefficient when coupled.

AdamW is this same algorithm with ``decoupled_weight_decay=True`` and ``weight_decay=1e-2``
by default: an alias with one default changed (as in optax), the math is written once here.

State, exactly as torch.optim stores it (so checkpoints load both ways): ``step`` (a 0-dim
CPU tensor of dtype ``_torch_compat.scalar_dtype()``), ``exp_avg``, ``exp_avg_sq`` and, with
``amsgrad``, ``max_exp_avg_sq``.

References:
    Kingma & Ba, Adam: A Method for Stochastic Optimization, https://arxiv.org/abs/1412.6980
    Loshchilov & Hutter, Decoupled Weight Decay Regularization, https://arxiv.org/abs/1711.05101
    Reddi et al., On the Convergence of Adam and Beyond, https://openreview.net/forum?id=ryQu7f-RZ
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .. import _torch_compat as tc
from .._base import PARAM_SHAPE, SCALAR, GroupWork, OptimizerBase, ParamsT, _materialize_params
from .._impl import _large_cpu_tensors, group_by_device_dtype, same_dtypes
from .._rounding import LowPrecisionStateMixin, chunk_budget, chunks, compute_dtype
from .._validation import scalar, check_betas, check_bool, check_eps, check_finite_nonnegative


class Adam(LowPrecisionStateMixin, OptimizerBase):
    r"""Adam, optionally with AMSGrad and decoupled (AdamW-style) weight decay.

    Args:
        params: parameters or param groups to optimize.
        lr: learning rate, ``0 <= lr < inf``, in parameter units per step. Default ``1e-3``.
        betas: ``(beta1, beta2)``, each in ``[0, 1)``: decay rates of the first and second
            moment averages. Default ``(0.9, 0.999)``. Numbers or 1-element tensors, mixed
            freely (torch.optim wants both floats or both tensors).
        eps: added to ``sqrt(v_hat)``, which is 0 for a coordinate whose gradients were all
            0 (gradient units): ``1.1754943508222875e-38 <= eps < inf``
            (``torch.finfo(torch.float32).tiny``: a smaller eps rounds to 0 in float32).
        weight_decay: ``0 <= weight_decay < inf``; coupled L2 coefficient, or decoupled
            shrink rate per unit lr when ``decoupled_weight_decay`` is set.
        amsgrad: normalize by the running maximum of ``v`` (AMSGrad).
        foreach: ``True`` multi-tensor path, ``False`` per-tensor reference, ``None`` fastest.
        maximize: ascend the objective instead of descending.
        capturable: not supported (``True`` raises); present for signature compatibility.
        differentiable: not supported (``True`` raises); present for signature compatibility.
        fused: ``True`` torch's fused single-pass kernel (the default when ``None`` and every
            tensor is a CPU/CUDA floating tensor).
        decoupled_weight_decay: apply weight decay to the parameter directly (AdamW).
        state_dtype: dtype of ``exp_avg``, ``exp_avg_sq`` and ``max_exp_avg_sq``: ``None``
            (default) the parameter's dtype, as torch.optim; ``torch.bfloat16`` or
            ``torch.float16`` halve the state of float32 parameters (8 -> 4 bytes/param). Each
            step then computes in float32 and writes the moments back with unbiased stochastic
            rounding (generators seeded from torch's global RNG, saved in ``state_dict``).
            Runs the foreach path (or the loop on large CPU tensors); ``fused=True`` with a
            state dtype other than a parameter's dtype raises.
        flat: lay the parameters, gradients and state out as views into one buffer per
            param group and (device, dtype), and step it in large chunks (see
            ``optimkit._flatten``): the same math, far less per-tensor overhead with many
            small tensors. Re-points each eligible ``p.data`` and ``p.grad`` into the buffers;
            ``zero_grad()`` then zeroes gradients instead of setting them to ``None``.

    Example:
        >>> model = torch.nn.Linear(3, 1)
        >>> opt = Adam(model.parameters(), lr=1e-3, amsgrad=True)
        >>> model(torch.randn(4, 3)).sum().backward(); opt.step()
    """

    _tensor_steps = True
    _state_keys = frozenset({"step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"})
    _has_fused = True
    _pure_validation = True  # _validate_group reads only the group (step() may skip it)

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1e-3,
        betas: tuple[float | Tensor, float | Tensor] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0,
        amsgrad: bool = False,
        *,
        foreach: bool | None = None,
        maximize: bool = False,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        decoupled_weight_decay: bool = False,
        state_dtype: torch.dtype | None = None,
        flat: bool = False,
    ) -> None:
        # On the optimizer, not in the groups: torch.optim.Adam's group keys stay exactly its own.
        self._setup_state_dtype(state_dtype)
        defaults = dict(
            lr=lr, betas=_as_tuple(betas, squeeze=True), eps=eps, weight_decay=weight_decay,
            amsgrad=amsgrad, maximize=maximize, foreach=foreach, capturable=capturable,
            differentiable=differentiable, fused=fused,
            decoupled_weight_decay=decoupled_weight_decay,
        )
        super().__init__(params, defaults, flat=flat)

    def _validate_group(self, g: dict[str, Any]) -> None:
        n = type(self).__name__
        check_finite_nonnegative(n, "lr", g["lr"])
        check_betas(n, g["betas"])
        # sqrt(v_hat) is 0 for a coordinate whose gradients were all 0
        check_eps(n, "eps", g["eps"])
        check_finite_nonnegative(n, "weight_decay", g["weight_decay"])
        check_bool(n, "amsgrad", g["amsgrad"])
        check_bool(n, "maximize", g["maximize"])
        check_bool(n, "decoupled_weight_decay", g["decoupled_weight_decay"])

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        sd = self._state_dtype
        params = param_group.get("params") if isinstance(param_group, dict) else None
        if sd is not None and params is not None:
            plist = _materialize_params(type(self).__name__, param_group)
            param_group["params"] = plist  # in the caller's dict, as torch: read once
            fused = param_group.get("fused", getattr(self, "defaults", {}).get("fused"))
            dts = {(p[1] if isinstance(p, tuple) else p).dtype for p in plist}
            if fused and any(dt != sd for dt in dts):
                raise ValueError(
                    f"{type(self).__name__}: invalid fused=True with state_dtype={sd}; torch's "
                    f"fused kernel needs the state in the parameters' dtype "
                    f"({', '.join(sorted(str(d) for d in dts))}). Leave fused unset (the "
                    f"foreach path runs) or drop state_dtype"
                )
        super().add_param_group(param_group)

    def _state_dtype_of(self, p: Tensor) -> torch.dtype:
        return self._state_dtype or p.dtype

    def _init_state(self, group: dict[str, Any], p: Tensor, state: dict[str, Any]) -> None:
        # torch.optim's non-fused layout (a CPU counter), so checkpoints move both ways.
        dt = self._state_dtype_of(p)
        state["step"] = torch.tensor(0.0, dtype=tc.scalar_dtype())
        state["exp_avg"] = torch.zeros_like(p, dtype=dt, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(p, dtype=dt, memory_format=torch.preserve_format)
        if group["amsgrad"]:
            state["max_exp_avg_sq"] = torch.zeros_like(p, dtype=dt,
                                                       memory_format=torch.preserve_format)

    def _gather(self, gi: int, group: dict[str, Any]) -> GroupWork:
        work = super()._gather(gi, group)
        if (work.impl == "fused" and self._state_dtype is not None
                and any(self._state_dtype_of(p) != p.dtype for p in work.params)):
            # torch's fused kernel takes one dtype for parameters and state: the default policy
            # falls back as it does without a fused kernel (fused=True was refused earlier).
            work.impl = "reference" if _large_cpu_tensors(work.params) else "foreach"
        return work

    def _after_load(self, sd: dict[str, Any]) -> None:
        """Moments loaded from ours or torch.optim's state_dict are kept in this optimizer's
        ``state_dtype`` whatever dtype they were saved in."""
        if self._state_dtype is not None:
            self._recast_loaded_state(sd, ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"),
                                      self._state_dtype_of)

    def _state_spec(self, group: dict[str, Any], p: Tensor) -> dict[str, Any]:
        spec = {"step": SCALAR, "exp_avg": PARAM_SHAPE, "exp_avg_sq": PARAM_SHAPE}
        if group["amsgrad"]:
            spec["max_exp_avg_sq"] = PARAM_SHAPE
        return spec

    def _update(self, work: GroupWork) -> None:
        g = work.group
        beta1, beta2 = (scalar(b) for b in g["betas"])
        hp = dict(
            lr=scalar(g["lr"]), beta1=beta1, beta2=beta2, eps=scalar(g["eps"]),
            weight_decay=scalar(g["weight_decay"]), amsgrad=g["amsgrad"], maximize=g["maximize"],
            decoupled_weight_decay=g["decoupled_weight_decay"],
        )
        maxes = None
        if g["amsgrad"]:
            # amsgrad switched on for a parameter that already has state: its running max
            # starts from zero, i.e. from the current v, as if freshly enabled.
            for s in work.states:
                if s.get("max_exp_avg_sq") is None:
                    s["max_exp_avg_sq"] = torch.zeros_like(s["exp_avg_sq"])
            maxes = [s["max_exp_avg_sq"] for s in work.states]
        fn = {"reference": adam_reference, "foreach": adam_foreach, "fused": adam_fused}[work.impl]
        exp_avgs = [s["exp_avg"] for s in work.states]
        if not same_dtypes(work.params, exp_avgs):
            self._update_upcast(work, fn, hp)
            return
        fn(
            work.params, work.grads, exp_avgs, [s["exp_avg_sq"] for s in work.states],
            maxes, [s["step"] for s in work.states], **hp,
        )


    def _update_upcast(self, work: GroupWork, fn: Any, hp: dict[str, Any]) -> None:
        """State in another dtype than the parameters (``state_dtype``): per chunk, upcast
        parameters, gradients and moments to the compute dtype, run ``fn`` (the same math),
        then write the parameters back (round to nearest, as a cast) and the moments back
        (stochastically when narrower), tensor by tensor in input order so every
        implementation draws the same random numbers."""
        keys = ["exp_avg", "exp_avg_sq"] + (["max_exp_avg_sq"] if hp["amsgrad"] else [])
        for lo, hi in chunks(work.params, chunk_budget(work.params[0].device)):
            ps, sts = work.params[lo:hi], work.states[lo:hi]
            cds = [compute_dtype(p.dtype) for p in ps]
            pw = [p.to(c) for p, c in zip(ps, cds)]  # the same tensor when already that dtype
            gw = [g.to(c) for g, c in zip(work.grads[lo:hi], cds)]  # p.grad itself untouched
            bufs = {k: [st[k].to(c) for st, c in zip(sts, cds)] for k in keys}
            fn(pw, gw, bufs["exp_avg"], bufs["exp_avg_sq"], bufs.get("max_exp_avg_sq"),
               [st["step"] for st in sts], **hp)
            for i, (p, st) in enumerate(zip(ps, sts)):
                if pw[i] is not p:
                    p.copy_(pw[i])
                for k in keys:
                    if bufs[k][i] is not st[k]:
                        self._round_into(st[k], bufs[k][i])


class AdamW(Adam):
    r"""AdamW: :class:`Adam` with decoupled weight decay and ``weight_decay=1e-2`` by default.

    An alias with one default changed; the math is :class:`Adam`'s (see the module docstring).
    Each step first shrinks the parameter, ``theta <- theta * (1 - lr * weight_decay)``, then
    applies the Adam update computed from the raw gradient.

    Args:
        params: parameters or param groups to optimize.
        lr: learning rate, ``0 <= lr < inf``, in parameter units per step. Default ``1e-3``.
        betas: ``(beta1, beta2)``, each in ``[0, 1)``. Default ``(0.9, 0.999)``.
        eps: added to ``sqrt(v_hat)`` (gradient units), ``1.1754943508222875e-38 <= eps < inf``
            (``torch.finfo(torch.float32).tiny``: a smaller eps rounds to 0 in float32).
        weight_decay: ``0 <= weight_decay < inf``, decoupled shrink rate per unit lr.
            Default ``1e-2``.
        amsgrad: normalize by the running maximum of ``v`` (AMSGrad).
        maximize: ascend the objective instead of descending.
        foreach: ``True`` multi-tensor path, ``False`` per-tensor reference, ``None`` fastest.
        capturable: not supported (``True`` raises); present for signature compatibility.
        differentiable: not supported (``True`` raises); present for signature compatibility.
        fused: ``True`` torch's fused single-pass kernel.
        state_dtype: dtype of the moment buffers (``None``: the parameter's); see :class:`Adam`.
        flat: one flat buffer per param group and (device, dtype); see :class:`Adam`.

    Example:
        >>> model = torch.nn.Linear(3, 1)
        >>> opt = AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
        >>> model(torch.randn(4, 3)).sum().backward(); opt.step()
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1e-3,
        betas: tuple[float | Tensor, float | Tensor] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        state_dtype: torch.dtype | None = None,
        flat: bool = False,
    ) -> None:
        super().__init__(
            params, lr, betas, eps, weight_decay, amsgrad, foreach=foreach, maximize=maximize,
            capturable=capturable, differentiable=differentiable, fused=fused,
            decoupled_weight_decay=True, state_dtype=state_dtype, flat=flat,
        )

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        # As torch.optim.AdamW: whatever was saved (e.g. an Adam state_dict), AdamW decouples.
        for group in self.param_groups:
            group["decoupled_weight_decay"] = True


# ------------------------------------------------------------------------------- helpers
def _as_tuple(betas: Any, *, squeeze: bool = False) -> Any:
    # torch stores betas as a tuple; anything else is left for _validate_group to reject.
    # squeeze: a tensor beta becomes 0-dim, as torch.optim.Adam stores it (so a state_dict
    # loads into torch.optim.Adam, whose step cannot broadcast a [[0.9]] beta).
    if not isinstance(betas, (tuple, list)):
        return betas
    if squeeze:
        return tuple(b.squeeze() if isinstance(b, Tensor) and b.dim() != 0 else b for b in betas)
    return tuple(betas)


def advance_steps(steps: list[Tensor]) -> list[float]:
    """Add one to every 0-dim ``step`` counter in place; return the new values as floats.

    One host transfer for the whole list (``stack().tolist()``), not one ``.item()`` each.
    """
    tc.increment_steps(steps)
    if len({(s.device, s.dtype) for s in steps}) > 1:
        steps = [s.to("cpu", torch.float64) for s in steps]
    return torch.stack(steps).tolist()


# ---------------------------------------------------------------------------------- math
def adam_reference(
    params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor], max_exp_avg_sqs: list[Tensor] | None, steps: list[Tensor], *,
    lr: float, beta1: float, beta2: float, eps: float, weight_decay: float, amsgrad: bool,
    maximize: bool, decoupled_weight_decay: bool,
) -> None:
    """Per-tensor reference: the equations of the module docstring, one tensor at a time.

    Parameters, moments and ``steps`` (0-dim counters) are updated in place.
    """
    for i, (p, g) in enumerate(zip(params, grads)):
        m, v = exp_avgs[i], exp_avg_sqs[i]
        steps[i].add_(1)
        t = float(steps[i])
        adam_moments_(p, g, m, v, lr=lr, beta1=beta1, beta2=beta2, weight_decay=weight_decay,
                      maximize=maximize, decoupled_weight_decay=decoupled_weight_decay)
        bias_correction1 = 1 - beta1**t
        bias_correction2 = 1 - beta2**t
        if amsgrad:
            assert max_exp_avg_sqs is not None
            vmax = max_exp_avg_sqs[i]
            torch.maximum(vmax, v, out=vmax)  # vmax_t = max(vmax, v_t)
            v = vmax
        denom = (v.sqrt() / bias_correction2**0.5).add_(eps)  # sqrt(v_hat) + eps
        p.addcdiv_(m, denom, value=-lr / bias_correction1)  # theta -= lr m_hat / denom


def adam_moments_(
    p: Tensor, g: Tensor, m: Tensor, v: Tensor, *, lr: float, beta1: float, beta2: float,
    weight_decay: float, maximize: bool, decoupled_weight_decay: bool,
) -> None:
    """The part Adam and RAdam share, for one tensor: sign, weight decay, both moments."""
    if maximize:
        g = -g
    if weight_decay != 0:
        if decoupled_weight_decay:
            p.mul_(1 - lr * weight_decay)  # theta <- theta (1 - lr lambda)
        else:
            g = g.add(p, alpha=weight_decay)  # g <- g + lambda theta
    m.lerp_(g, 1 - beta1)  # m_t = beta1 m + (1 - beta1) g
    v.mul_(beta2).addcmul_(g, g, value=1 - beta2)  # v_t = beta2 v + (1 - beta2) g^2


def adam_moments_foreach_(
    ps: list[Tensor], gs: list[Tensor], ms: list[Tensor], vs: list[Tensor], *, lr: float,
    beta1: float, beta2: float, weight_decay: float, maximize: bool,
    decoupled_weight_decay: bool,
) -> None:
    """``adam_moments_`` over one (device, dtype) bucket; temporaries die on return."""
    if maximize:
        gs = tc.foreach_neg(gs)
    if weight_decay != 0:
        if decoupled_weight_decay:
            tc.foreach_mul_(ps, 1 - lr * weight_decay)
        elif maximize:
            tc.foreach_add_(gs, ps, alpha=weight_decay)  # gs is already our own copy
        else:
            gs = tc.foreach_add(gs, ps, alpha=weight_decay)
    tc.foreach_lerp_(ms, gs, 1 - beta1)
    tc.foreach_mul_(vs, beta2)
    tc.foreach_addcmul_(vs, gs, gs, 1 - beta2)


def adam_foreach(
    params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor], max_exp_avg_sqs: list[Tensor] | None, steps: list[Tensor], *,
    lr: float, beta1: float, beta2: float, eps: float, weight_decay: float, amsgrad: bool,
    maximize: bool, decoupled_weight_decay: bool,
) -> None:
    """Multi-tensor path: the same equations with ``torch._foreach_*`` per (device, dtype)."""
    lists = [params, grads, exp_avgs, exp_avg_sqs, steps]
    if amsgrad:
        assert max_exp_avg_sqs is not None
        lists.append(max_exp_avg_sqs)
    for blists, _ in group_by_device_dtype(*lists).values():
        ps, gs, ms, vs, ss = blists[:5]
        ts = advance_steps(ss)
        # (the maximize / weight-decay temporaries are freed before denom is allocated)
        adam_moments_foreach_(ps, gs, ms, vs, lr=lr, beta1=beta1, beta2=beta2,
                              weight_decay=weight_decay, maximize=maximize,
                              decoupled_weight_decay=decoupled_weight_decay)
        if amsgrad:
            vmax = blists[5]
            tc.foreach_maximum_(vmax, vs)
            denom = tc.foreach_sqrt(vmax)
        else:
            denom = tc.foreach_sqrt(vs)
        tc.foreach_div_(denom, [(1 - beta2**t) ** 0.5 for t in ts])
        tc.foreach_add_(denom, eps)
        tc.foreach_addcdiv_(ps, ms, denom, [-lr / (1 - beta1**t) for t in ts])


def adam_fused(
    params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor], max_exp_avg_sqs: list[Tensor] | None, steps: list[Tensor], *,
    lr: float, beta1: float, beta2: float, eps: float, weight_decay: float, amsgrad: bool,
    maximize: bool, decoupled_weight_decay: bool,
) -> None:
    """torch's fused single-pass Adam/AdamW kernel, per (device, dtype) bucket."""
    kernel = tc.fused_adamw_ if decoupled_weight_decay else tc.fused_adam_
    lists = [params, grads, exp_avgs, exp_avg_sqs, steps]
    if amsgrad:
        assert max_exp_avg_sqs is not None
        lists.append(max_exp_avg_sqs)
    for (device, _), (blists, _) in group_by_device_dtype(*lists).items():
        ps, gs, ms, vs, ss = blists[:5]
        vmax = blists[5] if amsgrad else []
        if device.type == "cpu":
            tc.increment_steps(ss)
            kernel_steps = ss  # the CPU kernel reads each counter on the host
        else:
            # The device kernel reads float32 counters on the device; ours stay on the CPU
            # (torch's non-fused layout), so send this step's values over in one transfer.
            ts = advance_steps(ss)
            kernel_steps = list(torch.tensor(ts, dtype=torch.float32).to(device).unbind(0))
        kernel(
            ps, gs, ms, vs, vmax, kernel_steps, amsgrad=amsgrad, lr=lr, beta1=beta1,
            beta2=beta2, weight_decay=weight_decay, eps=eps, maximize=maximize,
            grad_scale=None, found_inf=None,
        )
