"""Prodigy's CPU float32 fast path: phase 1 in batched runs and cache-sized pieces, phase 2
through torch's single-pass fused Adam(W) kernel (``_torch_compat.fused_adam_unit_step``).
Which groups take it: :meth:`optimkit.optimizers._prodigy.paths.PathsMixin._fast`."""

from __future__ import annotations

import torch
from torch import Tensor

from ... import _torch_compat as tc
from .common import _absmax, _acc_dtype
from ..._impl import group_by_device_dtype


#: the fast path (see ``Prodigy._fast``): dtypes and device types, and the ``d`` for which
#: ``1/d`` is a normal float32 (the fused kernel's ``grad_scale``); outside it the foreach path
_FAST_DTYPES = (torch.float32,)
_FAST_DEVICES = ("cpu",)
_FAST_D_RANGE = (1e-30, 1e30)
_PLAIN = (torch.Tensor, torch.nn.Parameter)
#: largest ``beta3 / c_s`` for which phase 1 sums ``|g + (beta3 / c_s) s|`` (see
#: :func:`prodigy_stats_fast`)
_MAX_RATIO = 1e20
#: smallest ``c_s`` for which phase 2 updates ``s`` through the fused SGD kernel (its
#: ``1 - dampening`` recovers ``c_s`` to ~1.1e-16 / c_s relative: below float32's rounding)
_MIN_C_SGD = 1e-8


def prodigy_stats_fast(
    params: list[Tensor], grads: list[Tensor], s: list[Tensor], p0: list[Tensor], *,
    slice_p: int, beta3: float, c_s: float, coupled_wd: float, scratch: Tensor,
    exact_probe: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """Phase 1 for plain contiguous same-dtype tensors: :func:`prodigy_stats_foreach`'s sums,
    rounded differently.

    Returns partial sums whose totals are the sums of ``<g_sl, p0 - p_sl>`` and ``||s'||_1``
    (one value per piece, not per tensor) and the probe. Large tensors are cut into pieces of
    at most ``scratch.numel() // 2`` elements whose temporaries live in ``scratch``: fresh
    megabyte temporaries cost page faults on CPU (the allocator hands such blocks back to the
    OS), which measured here as 2x on this phase. Runs of small tensors are reduced with a few
    multi-tensor ops and one ``cat`` into ``scratch`` instead of ~6 ops per tensor (per-op
    overhead dominates below ~10^4 elements). Float32 sums in another order than the
    reference: agreement to float32 rounding, not bitwise. A NaN/inf anywhere in ``g``
    (``slice_p == 1``), ``p``, ``p0`` or ``s`` makes a sum non-finite, as in the reference.
    The probe is an upper bound on max |g| (the output checks need no more): the largest
    ``||g||_2`` of a run of small tensors (one ``foreach_norm``; the exact max took a ``cat``
    and an ``aminmax``, 0.4 ms of a 2 ms step on a 6-tensor MLP), ``||g_piece||_2`` for the
    pieces of large tensors (a dot while the piece is in cache; ``aminmax`` cost ~0.27x a
    fused AdamW step on its own), or
    the exact max over whole gradients (``slice_p > 1``: the slices do not see every entry).
    A piece whose ``<g, g>`` overflows float32 (``||g_piece||_2 > 1.8e19``) makes the probe
    inf; ``Prodigy._apply`` then takes the exact max before deciding (``_exact_gmax``).
    ``exact_probe`` (sharded steps, whose ranks could not re-check alike without another
    collective) takes the exact max |g| instead.
    ``||s'||_1`` of a large piece is ``c_s * ||g + (beta3 / c_s) s||_1`` (one op where the
    literal form takes two). Measured (1 thread, 2^24 float32, 2^18-element pieces, ratio to
    a fused AdamW step over the same size): this phase 1.67-1.80x before, 1.29-1.39x after.
    """
    dev = params[0].device
    acc = _acc_dtype(dev)
    piece = scratch.numel() // 3
    buf_a, buf_b, buf_c = scratch[:piece], scratch[piece:2 * piece], scratch[2 * piece:3 * piece]
    dots: list[Tensor] = []
    l1s: list[Tensor] = []
    gmax: list[Tensor] = []
    small: list[int] = []  # indices of a run of small tensors, reduced together
    sqs: list[Tensor] = []  # per large piece <g, g>
    l1_over_c: list[Tensor] = []  # per large piece ||s'||_1 / c_s
    # ||s'||_1 = c_s * ||g + (beta3 / c_s) s||_1 (c_s > 0): one op instead of mul + add_. The
    # ratio stays far from float32's range in practice (s / c_s is a decayed sum of past
    # gradients while d, hence c_s, does not decrease); a ratio outside the guard takes
    # the two-op form.
    scaled = c_s > 0 and beta3 / c_s < _MAX_RATIO
    ratio = beta3 / c_s if scaled else 0.0

    def probe(gg: Tensor) -> None:
        """The bound on max |g| of one contiguous piece (``slice_p == 1``)."""
        if exact_probe:
            gmax.append(_absmax([gg]))
        else:  # ||g_piece||_2 >= max |g_piece|: a bound is all the output checks need
            sqs.append(torch.dot(gg, gg))

    def flush() -> None:
        """A run of small tensors: copied into the scratch buffers (one ``cat`` per buffer,
        ~10 ops for the run), then reduced as one piece. On CPU a multi-tensor op is a loop
        of per-tensor ops, so the ``foreach`` form took ~36 ops for a 6-tensor run."""
        if not small:
            return
        n = sum(-(-params[i].numel() // slice_p) for i in small)
        if any(p0[i].dim() == 0 for i in small):  # a zero p0 kept as a 0-dim placeholder
            flush_foreach()
            return
        gg = torch.cat([_sl(grads[i], slice_p) for i in small], out=buf_a[:n])
        pp = torch.cat([_sl(params[i], slice_p) for i in small], out=buf_b[:n])
        if slice_p == 1:
            probe(gg)
        if coupled_wd != 0:
            gg.add_(pp, alpha=coupled_wd)  # the copy, not p.grad
        diff = torch.cat([p0[i] for i in small], out=buf_c[:n]).sub_(pp)
        dots.append(torch.dot(gg, diff))
        ss = torch.cat([s[i] for i in small], out=buf_c[:n])
        if scaled:
            l1_over_c.append(torch.add(gg, ss, alpha=ratio, out=ss).abs_().sum())
        else:
            l1s.append(ss.mul_(beta3).add_(gg, alpha=c_s).abs_().sum())
        small.clear()

    def flush_foreach() -> None:
        p_sl = [_sl(params[i], slice_p) for i in small]
        g_sl = [_sl(grads[i], slice_p) for i in small]
        if slice_p == 1 and exact_probe:
            gmax.append(_absmax(g_sl))
        elif slice_p == 1:  # max over tensors of ||g||_2 >= max |g|
            gmax.append(torch.stack(tc.foreach_norm(g_sl, ord=2)).max())
        if coupled_wd != 0:
            g_sl = tc.foreach_add(g_sl, p_sl, alpha=coupled_wd)  # new tensors: p.grad untouched
        diffs = tc.foreach_sub([p0[i] for i in small], p_sl)  # a 0-dim (zero) p0 broadcasts
        tc.foreach_mul_(diffs, g_sl)
        n = sum(x.numel() for x in diffs)
        dots.append(torch.cat(diffs, out=buf_a[:n]).sum())
        del diffs
        s_new = tc.foreach_mul([s[i] for i in small], beta3)
        tc.foreach_add_(s_new, g_sl, alpha=c_s)
        l1s.append(torch.stack(tc.foreach_norm(s_new, ord=1)).sum())
        small.clear()

    run = 0
    for i, p in enumerate(params):
        n = -(-p.numel() // slice_p)
        if n == 0:
            continue  # an empty tensor adds nothing
        if n <= piece // 8:  # small: joins the current run
            if run + n > piece:
                flush()
                run = 0
            small.append(i)
            run += n
            continue
        p_sl, g_sl, q = p.view(-1)[::slice_p], grads[i].view(-1)[::slice_p], p0[i]
        for lo in range(0, n, piece):
            hi = min(n, lo + piece)
            pp, gg, ss = p_sl[lo:hi], g_sl[lo:hi], s[i][lo:hi]
            qq = q if q.dim() == 0 else q[lo:hi]  # 0-dim: a zero p0 (broadcasts)
            if slice_p == 1:
                probe(gg)  # while the piece is in cache
            if coupled_wd != 0:
                gg = torch.add(gg, pp, alpha=coupled_wd, out=buf_b[:hi - lo])
            dots.append(torch.dot(gg, torch.sub(qq, pp, out=buf_a[:hi - lo])))
            if scaled:  # ||s'||_1 / c_s in one pass over s: add with alpha, abs, sum
                l1_over_c.append(torch.add(gg, ss, alpha=ratio, out=buf_a[:hi - lo]).abs_().sum())
            else:
                l1s.append(torch.mul(ss, beta3, out=buf_a[:hi - lo]).add_(gg, alpha=c_s)
                           .abs_().sum())
    flush()
    if sqs:  # max over pieces of ||g_piece||_2 (an inf here is re-checked exactly on the host)
        gmax.append(torch.stack(sqs).max().sqrt())
    # back to the tensors' dtype per piece: an s' entry that overflows it makes its piece's
    # ||s'||_1 inf (the step is refused before phase 2 writes s'), as in the literal form
    scaled_l1 = ((torch.stack(l1_over_c).to(acc) * c_s).to(params[0].dtype)
                 if l1_over_c else None)
    chk = torch.zeros((), dtype=acc, device=dev)
    nonempty = [g for g in grads if g.numel()]
    if gmax:
        chk = torch.stack(gmax).to(acc).max()
    elif nonempty and slice_p > 1:  # NaN/inf iff a gradient entry is (slices miss some)
        for (gs,), _ in group_by_device_dtype(nonempty).values():
            chk = chk + _absmax(gs).to(acc)
    if not dots:
        zero = torch.zeros(1, dtype=acc, device=dev)
        return zero, zero, chk
    l1 = torch.stack(l1s).to(acc) if l1s else torch.zeros(0, dtype=acc, device=dev)
    if scaled_l1 is not None:
        l1 = torch.cat([l1, scaled_l1.to(acc)])
    return torch.stack(dots).to(acc), l1, chk


def prodigy_apply_fused(
    params: list[Tensor], grads: list[Tensor], s: list[Tensor], exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor], *, slice_p: int, beta3: float, c_s: float, coupled_wd: float,
    beta1: float, beta2: float, d: float, d_new: float, dlr: float, eps: float,
    decoupled_wd: float, scratch: Tensor,
) -> None:
    """Phase 2 through torch's single-pass fused Adam(W) kernel (beta1 > 0, one dtype).

    The kernel computes, with ``grad_scale = 1/d``, ``lr = dlr``, ``eps = d' * eps`` and bias
    corrections of exactly 1 (``_torch_compat.fused_adam_unit_step``)::

        theta = theta - (dlr * wd) * theta      (decoupled: a foreach op before the kernel)
        gk    = g / (1/d)  (+ (d * wd) * theta when coupled: gk = d * (g + wd * theta))
        m     = lerp(m, gk, 1 - beta1)      = beta1 m + d (1 - beta1) g
        v     = beta2 v + (1 - beta2) gk^2  = beta2 v + d^2 (1 - beta2) g^2
        theta = theta - dlr * m / (sqrt(v) + d' * eps)

    which is :func:`prodigy_apply_foreach`'s update up to float32 rounding (``1/d`` rounded to
    float32, lerp, and ``c_s * g + (c_s * wd) * theta`` for ``c_s * (g + wd * theta)`` in ``s``).

    With a ``grad_scale`` the kernel writes the unscaled gradient back into its gradient
    argument (it mirrors GradScaler's in-place unscale), so the kernel never sees ``p.grad``:
    the work goes in pieces of at most ``scratch.numel()`` elements (whole small tensors, or
    slices of large ones), each piece's gradients are copied into ``scratch`` (cache-sized, so
    the kernel reads them from cache), ``s`` is updated from that copy, then the kernel runs.
    """
    dev = params[0].device
    inv_d = torch.tensor(1.0 / d, dtype=torch.float32, device=dev)
    step = tc.fused_adam_unit_step(dev)
    for piece in _pieces([p.numel() for p in params], scratch.numel()):
        ps = [_flat(params[i], a, b) for i, a, b in piece]
        gs = [_flat(grads[i], a, b) for i, a, b in piece]
        sizes = [b - a for _, a, b in piece]
        # one copy op for the piece (a multi-tensor copy is a per-tensor loop on CPU)
        gk = list(torch.cat(gs, out=scratch[:sum(sizes)]).split(sizes))
        # s covers elements 0, slice_p, 2 slice_p, ... of each tensor: those inside [a, b)
        firsts = [-(-a // slice_p) * slice_p for _, a, _ in piece]
        ss = [s[i][f // slice_p:-(-b // slice_p)] for (i, _, b), f in zip(piece, firsts)]
        if slice_p == 1 and beta3 > 0 and c_s >= _MIN_C_SGD:
            # s <- beta3 s + c_s g as the momentum-buffer update of torch's fused SGD kernel
            # (buf <- momentum buf + (1 - dampening) g): one call for the whole list where the
            # two multi-tensor ops below are two per-tensor loops on CPU. lr = 0 leaves its
            # "parameter" (our gradient copy) as it is: s' is finite (phase 1 checked
            # ||s'||_1), so lr * buf is 0. Equal to the two ops bitwise in the kernel's
            # vectorised body and within one ulp of the larger operand in its scalar tail
            # (tested), also for c_s near the guard, where 1 - (1 - c_s) in double is exact
            # to ~1e-8 of c_s.
            tc.fused_sgd_(gk, gk, ss, weight_decay=0.0, momentum=beta3, lr=0.0,
                          dampening=1.0 - c_s, nesterov=False, maximize=False,
                          is_first_step=False)
        else:
            tc.foreach_mul_(ss, beta3)
            tc.foreach_add_(ss, [g[f - a::slice_p] for g, (_, a, _), f in zip(gk, piece, firsts)],
                            alpha=c_s)
        if coupled_wd != 0:  # s <- beta3 s + c_s (g + wd theta)_sl, without a temporary
            tc.foreach_add_(ss, [x[f - a::slice_p] for x, (_, a, _), f in zip(ps, piece, firsts)],
                            alpha=c_s * coupled_wd)
        if decoupled_wd != 0:
            # Not the kernel's decoupled decay: it multiplies by (1 - dlr * wd) rounded to
            # float32, and while dlr * wd is near float32's epsilon (Prodigy's first steps,
            # d ~ d0) that factor is off by up to half an ulp of 1 in the same direction for
            # every element: a bias in p - p0 that moved d by 0.5% in 30 steps. Adding
            # -dlr*wd*theta rounds once per element, as the foreach path does.
            tc.foreach_add_(ps, ps, alpha=-decoupled_wd * dlr)
        tc.fused_adam_(ps, gk, [_flat(exp_avgs[i], a, b) for i, a, b in piece],
                       [_flat(exp_avg_sqs[i], a, b) for i, a, b in piece], [],
                       [step] * len(piece), amsgrad=False, lr=dlr, beta1=beta1, beta2=beta2,
                       weight_decay=coupled_wd * d, eps=d_new * eps, maximize=False,
                       grad_scale=inv_d, found_inf=None)


def _sl(t: Tensor, slice_p: int) -> Tensor:
    """Every ``slice_p``-th element of ``t``, 1-D."""
    return t.view(-1) if slice_p == 1 else t.view(-1)[::slice_p]


def _flat(t: Tensor, a: int, b: int) -> Tensor:
    """Elements ``[a, b)`` of ``t`` as a 1-D view (no slice op for the whole tensor)."""
    v = t.view(-1)
    return v if a == 0 and b == v.numel() else v[a:b]


def _pieces(numels: list[int], cap: int) -> list[list[tuple[int, int, int]]]:
    """Group ``(tensor index, start, end)`` element ranges into pieces of at most ``cap``
    elements: consecutive whole tensors while they fit, a larger tensor cut into slices."""
    out: list[list[tuple[int, int, int]]] = []
    cur: list[tuple[int, int, int]] = []
    size = 0
    for i, n in enumerate(numels):
        for a in range(0, n, cap):
            b = min(n, a + cap)
            if size + (b - a) > cap:
                out.append(cur)
                cur, size = [], 0
            cur.append((i, a, b))
            size += b - a
    if cur:
        out.append(cur)
    return out
