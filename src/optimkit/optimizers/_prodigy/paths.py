"""Which implementation steps a param group, and the calls into it: the per-tensor reference
(``prodigy.py``), the multi-tensor path (``foreach.py``), the CPU float32 fast path
(``fused.py``), ``compile=True`` (``compiled.py``), and a narrower ``state_dtype`` (upcast per
chunk, written back with stochastic rounding). Every path computes the same equations."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ... import _compiled
from ..._base import GroupWork
from ..._rounding import chunk_budget, chunks
from ..._validation import scalar
from .common import _c_s, _local, _sliced_local, _stat_dtype
from .compiled import prodigy_apply_compiled, prodigy_stats_compiled
from .foreach import _CHUNK_BYTES, _CHUNK_BYTES_DEFAULT, prodigy_apply_foreach, prodigy_stats_foreach
from .fused import (_FAST_D_RANGE, _FAST_DEVICES, _FAST_DTYPES, _PLAIN, prodigy_apply_fused,
                    prodigy_stats_fast)


class PathsMixin:
    """Phase 1 and phase 2 of one param group, on the implementation that fits it."""

    def _phase1(self, w: GroupWork, beta3: float, d: float, dlr: float, *, fast: bool,
                compiled: bool) -> tuple[Any, Any, Any]:
        """Phase 1 of group ``w`` (reads only): per tensor (or piece) ``<g_sl, p0 - p_sl>``
        and ``||s'||_1``, and max |g| (the bound of the output checks)."""
        from ..prodigy import prodigy_stats_reference  # the reference lives with the class

        grp = w.group
        if compiled:
            return prodigy_stats_compiled(
                w.params, w.grads, [st["s"] for st in w.states],
                [st["p0"] for st in w.states], **self._s_hp(grp, beta3, d, dlr))
        if fast:  # plain tensors: no DTensor unwrapping needed
            return prodigy_stats_fast(
                w.params, w.grads, [st["s"] for st in w.states],
                [st["p0"] for st in w.states], **self._s_hp(grp, beta3, d, dlr),
                scratch=self._scratch_for(w.params[0]),
                exact_probe=self._dist_mode() not in ("local", "replicated"))
        fn = prodigy_stats_reference if w.impl == "reference" else prodigy_stats_foreach
        sp = grp["slice_p"]
        return fn(
            [_local(p) for p in w.params], [_local(g) for g in w.grads],
            [_sliced_local(st["s"], p, sp) for p, st in zip(w.params, w.states)],
            [_sliced_local(st["p0"], p, sp) for p, st in zip(w.params, w.states)],
            **self._s_hp(grp, beta3, d, dlr),
        )

    def _s_hp(self, grp: dict[str, Any], beta3: float, d: float, dlr: float) -> dict[str, Any]:
        """The s-update hyperparameters of one group: s' = beta3 * s + c_s * g_sl."""
        d0 = scalar(grp["d0"])
        return dict(
            slice_p=grp["slice_p"], beta3=beta3,
            c_s=_c_s(grp, d, d0, dlr),
            coupled_wd=0.0 if grp["decouple"] else scalar(grp["weight_decay"]),
        )

    def _fast(self, w: GroupWork, beta1: float) -> bool:
        """Whether group ``w`` takes the fast path (:func:`prodigy_stats_fast` and
        :func:`prodigy_apply_fused`): the multi-tensor implementation, ``beta1 > 0`` (the fused
        kernel needs ``exp_avg``), and every tensor a plain contiguous tensor of a dtype in
        ``_FAST_DTYPES`` on a device in ``_FAST_DEVICES``.

        float64 stays on the foreach path, which matches prodigyopt to ~1e-10: the fused
        kernel's ``grad_scale`` is float32 only, and ``1/d`` rounded to float32 would cost that.
        float16/bfloat16 keep float32 state, which the fused kernel (one dtype) cannot take.
        """
        if w.impl == "reference" or beta1 <= 0:
            return False
        for p, g, st in zip(w.params, w.grads, w.states):
            if (type(p) not in _PLAIN or p.dtype not in _FAST_DTYPES
                    or p.device.type not in _FAST_DEVICES or not p.is_contiguous()
                    or not g.is_contiguous() or g.dtype != p.dtype or g.is_sparse
                    or not st["exp_avg"].is_contiguous() or not st["exp_avg_sq"].is_contiguous()
                    or st["exp_avg"].dtype != p.dtype or st["exp_avg_sq"].dtype != p.dtype
                    or st["s"].dtype != p.dtype or st["p0"].dtype != p.dtype):
                return False
        return True

    def _scratch_for(self, p: Tensor) -> Tensor:
        """Three chunk-sized buffers for the fast path's temporaries (per device and dtype;
        not state): phase 1 uses all three, phase 2 the first two as one."""
        key = (p.device, p.dtype)
        buf = self._scratch.get(key)
        if buf is None:
            n = 3 * (_CHUNK_BYTES.get(p.device.type, _CHUNK_BYTES_DEFAULT) // 4)
            buf = self._scratch[key] = torch.empty(n, dtype=p.dtype, device=p.device)
        return buf

    def _phase2_scratch(self, p: Tensor) -> Tensor:
        """Phase 2's scratch: the first two of :meth:`_scratch_for`'s three buffers."""
        buf = self._scratch_for(p)
        return buf[:2 * (buf.numel() // 3)]

    def _compiled_applies(self, w: GroupWork) -> bool:
        """``compile=True`` runs this group compiled: slice_p 1 (the kernels take whole
        tensors), and every tensor plain, contiguous, with state in its own dtype."""
        if w.impl != "compiled" or w.group["slice_p"] != 1:
            return False
        return all(type(p) in _PLAIN and p.dtype in (torch.float32, torch.float64)
                   and _compiled.takes(p, *(st[k] for k in ("s", "exp_avg", "exp_avg_sq")
                                            if k in st))
                   and st["exp_avg_sq"].dtype == p.dtype and st["s"].dtype == p.dtype
                   for p, st in zip(w.params, w.states))

    def _phase2(self, w: GroupWork, beta1: float, beta2: float, beta3: float, d: float,
                d_new: float, dlr: float, *, update_params: bool, fast: bool = False,
                compiled: bool = False) -> None:
        grp = w.group
        if update_params and compiled:
            decouple = grp["decouple"]
            prodigy_apply_compiled(
                w.params, w.grads, [st["s"] for st in w.states],
                [st["exp_avg"] for st in w.states] if beta1 > 0 else None,
                [st["exp_avg_sq"] for st in w.states],
                **self._s_hp(grp, beta3, d, dlr), beta1=beta1, beta2=beta2, d=d, d_new=d_new,
                dlr=dlr, eps=scalar(grp["eps"]),
                decoupled_wd=scalar(grp["weight_decay"]) if decouple else 0.0,
            )
            return
        if update_params and fast and _FAST_D_RANGE[0] < d < _FAST_D_RANGE[1]:
            decouple = grp["decouple"]
            prodigy_apply_fused(
                w.params, w.grads, [st["s"] for st in w.states],
                [st["exp_avg"] for st in w.states], [st["exp_avg_sq"] for st in w.states],
                **self._s_hp(grp, beta3, d, dlr), beta1=beta1, beta2=beta2, d=d, d_new=d_new,
                dlr=dlr, eps=scalar(grp["eps"]),
                decoupled_wd=scalar(grp["weight_decay"]) if decouple else 0.0,
                scratch=self._phase2_scratch(w.params[0]),
            )
            return
        from ..prodigy import prodigy_apply_reference  # the reference lives with the class

        fn = prodigy_apply_reference if w.impl == "reference" else prodigy_apply_foreach
        if any(st["exp_avg_sq"].dtype != _stat_dtype(_local(p))
               for p, st in zip(w.params, w.states)):
            self._phase2_upcast(w, fn, beta1, beta2, beta3, d, d_new, dlr,
                                update_params=update_params)
            return
        fn(
            [_local(p) for p in w.params], [_local(g) for g in w.grads],
            [_sliced_local(st["s"], p, grp["slice_p"]) for p, st in zip(w.params, w.states)],
            [_local(st["exp_avg"]) for st in w.states] if beta1 > 0 else None,
            [_local(st["exp_avg_sq"]) for st in w.states],
            **self._s_hp(grp, beta3, d, dlr),
            beta1=beta1, beta2=beta2, d=d, d_new=d_new, dlr=dlr, eps=scalar(grp["eps"]),
            decoupled_wd=scalar(grp["weight_decay"]) if grp["decouple"] else 0.0,
            stochastic_rounding=grp["stochastic_rounding"], update_params=update_params,
        )

    def _phase2_upcast(self, w: GroupWork, fn: Any, beta1: float, beta2: float, beta3: float,
                       d: float, d_new: float, dlr: float, *, update_params: bool) -> None:
        """Phase 2 with state in a narrower dtype (``state_dtype``): per chunk, upcast ``s``,
        ``m`` and ``v`` to the compute dtype, run ``fn`` (the same math), then write them back
        with stochastic rounding, tensor by tensor in input order so that every implementation
        draws the same random numbers."""
        grp = w.group
        sp = grp["slice_p"]
        decoupled = scalar(grp["weight_decay"]) if grp["decouple"] else 0.0
        params = [_local(p) for p in w.params]
        stored = {"s": [_sliced_local(st["s"], p, sp) for p, st in zip(w.params, w.states)],
                  "exp_avg_sq": [_local(st["exp_avg_sq"]) for st in w.states]}
        if beta1 > 0:
            stored["exp_avg"] = [_local(st["exp_avg"]) for st in w.states]
        for lo, hi in chunks(params, chunk_budget(params[0].device)):
            cds = [_stat_dtype(p) for p in params[lo:hi]]
            work = {k: [t.to(c) for t, c in zip(v[lo:hi], cds)] for k, v in stored.items()}
            fn(params[lo:hi], [_local(g) for g in w.grads[lo:hi]], work["s"],
               work.get("exp_avg"), work["exp_avg_sq"], **self._s_hp(grp, beta3, d, dlr),
               beta1=beta1, beta2=beta2, d=d, d_new=d_new, dlr=dlr, eps=scalar(grp["eps"]),
               decoupled_wd=decoupled, stochastic_rounding=grp["stochastic_rounding"],
               update_params=update_params)
            for i in range(hi - lo):
                for k in ("s", "exp_avg", "exp_avg_sq"):
                    if k in work and work[k][i] is not stored[k][lo + i]:
                        self._round_into(stored[k][lo + i], work[k][i])
