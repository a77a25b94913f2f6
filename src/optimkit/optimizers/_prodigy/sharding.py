"""Prodigy across ranks: the step's one host sync and, when parameters are sharded, its one
collective (the d statistics all-reduced with the overflow bounds and a failure flag), the
detection of sharding (DTensor, FSDP1 flat parameters, or ranks holding different
parameters), and a failed rank still joining the collective."""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
from torch import Tensor

from ... import _torch_compat as tc
from ..._base import GroupWork
from ..._impl import group_by_device_dtype
from .common import _acc_dtype, _is_dtensor, _local, dist
from .groups import n_live_estimates
from .nonfinite import _caller_level, _limits


class ShardingMixin:
    """The host sync and the collective of :meth:`Prodigy._apply`."""

    def _global_sums(self, ests: list[Any], fresh: list[tuple[Tensor, dict[str, Any]]],
                     active: list[GroupWork]) -> _Sums:
        """The step's statistics with one host sync: per d estimate (``ests``, see
        ``groups.Estimate``) the sum of c_num * dots, ``||s'||_1`` and the bounds (max |g| per
        tensor, summed; max |p| and max |s'| where needed); the dtype limits; the p0 flags.

        Unsharded, the per-tensor values come to the host and are summed there in parameter
        order, exactly as prodigyopt sums its per-parameter ``.item()`` values, so the result is
        bitwise the same whatever the implementation. Sharded, each rank sums on its device and
        one vector, every estimate's sums stacked (``_HEADER`` + ``_PER_EST`` per estimate), is
        all-reduced there (ranks without gradients contribute zeros; a rank that failed before
        this point contributes its failure flag, see :meth:`_join_failed`): one collective
        per step whatever the number of estimates. The first step with several ranks and no
        sharding declared all-gathers that vector with a fingerprint of each rank's
        parameters instead (see :meth:`_dist_mode`).
        """
        dev = self._main_device()
        acc = _acc_dtype(dev)
        mode = self._dist_mode()
        n = _n_reduce(len(ests))
        flags = [torch.any(_local(p)).reshape(1).to(device=dev, dtype=acc) for p, _ in fresh]
        narrow = float(self._narrowest_is_float32(active))
        half = float(any(p.dtype == torch.float16 for w in active for p in w.params))
        bounds = [x.reshape(1).to(device=dev, dtype=acc) if x is not None
                  else torch.zeros(1, dtype=acc, device=dev) for e in ests for x in (e.pmax, e.smax)]
        if mode in ("reduce", "check"):
            red = torch.zeros(n, dtype=acc, device=dev)
            for i, e in enumerate(ests):
                o = _HEADER + _PER_EST * i
                for dots, l1s, chk in e.pieces:
                    if isinstance(dots, Tensor):
                        red[o:o + 3] += torch.stack([dots.sum() * e.c_num, l1s.sum(),
                                                     chk.sum()]).to(red)
                    else:
                        red[o:o + 3] += torch.tensor([e.c_num * sum(dots), sum(l1s), chk],
                                                     dtype=acc, device=dev)
                red[o + 3:o + 5] = torch.cat(bounds[2 * i:2 * i + 2])
            red[1], red[2] = narrow, half
        if mode == "reduce":
            self._collective(mode, red)
            vals = torch.cat([red, *flags]).tolist()
            return _Sums(vals[:n], vals[n:], len(ests))
        on_dev = [t.reshape(-1).to(device=dev, dtype=acc) for e in ests for piece in e.pieces
                  if isinstance(piece[0], Tensor) for t in piece]
        tail = torch.cat(bounds)
        if mode == "check":
            vec = torch.cat([red, self._fingerprint(dev, acc)])
            tail = torch.cat([tail, self._collective(mode, vec).reshape(-1)])
        host = iter(torch.cat(on_dev + flags + [tail]).tolist())
        row = [0.0, narrow, half]
        per = []
        for e in ests:
            delta = den = chk = 0.0
            for dots, l1s, probe in e.pieces:
                if isinstance(dots, Tensor):
                    dots = [next(host) for _ in range(dots.numel())]
                    l1s = [next(host) for _ in range(l1s.numel())]
                    probe = sum(next(host) for _ in range(probe.numel()))
                for x in dots:
                    delta += e.c_num * x
                for x in l1s:
                    den += x
                chk += probe
            per.append([delta, den, chk])
        p0_flags = [next(host) for _ in fresh]
        for x in per:
            row += x + [next(host), next(host)]  # + max |p|, max |s'|
        local = _Sums(row, p0_flags, len(ests))
        if mode != "check":
            return local
        rows = list(host)
        width = len(rows) // dist.get_world_size()
        rows = [rows[i:i + width] for i in range(0, len(rows), width)]
        failed = sum(r[0] for r in rows)
        if failed:
            local.failed_ranks = failed
            return local
        if _same_parameters([r[n:] for r in rows]):
            self._replica_key = self._groups_key()  # data parallel: never communicate again
            return local
        # Sharded without fsdp_in_use (ZeroRedundancyOptimizer): reduce, now and from now on
        self._shard_key = self._groups_key()
        warnings.warn(_sharded_warning(type(self).__name__, rows, n), UserWarning,
                      stacklevel=_caller_level())
        tot = [sum(r[i] for r in rows) for i in range(n)]
        tot[0], tot[1], tot[2] = 0.0, max(r[1] for r in rows), max(r[2] for r in rows)
        return _Sums(tot, p0_flags, len(ests))

    def _groups_key(self) -> tuple[int, ...]:
        return tuple(len(g["params"]) for g in self.param_groups)

    def _dist_mode(self) -> str:
        """How this step's d sums combine across ranks.

        ``"local"``: one process (or ``independent_ranks``). ``"reduce"``: sharded
        (``fsdp_in_use``, DTensor or FSDP1 flat parameters): the sums are all-reduced every
        step. ``"check"``: several ranks, no sharding declared or detected, not yet verified:
        the step (the first, and the first after the param groups change) all-gathers the
        sums with a fingerprint of each rank's parameters. Identical fingerprints (data
        parallel: every rank holds every parameter) make it ``"replicated"``, which never
        communicates; different ones (ZeroRedundancyOptimizer without ``fsdp_in_use``) make
        it ``"reduce"`` with a warning, so every rank uses the d of the whole model.
        """
        if (self.__dict__.get("_independent_ranks") or dist is None or not dist.is_available()
                or not dist.is_initialized() or dist.get_world_size() < 2):
            return "local"
        if self.param_groups[0]["fsdp_in_use"] or self._has_sharded_params():
            return "reduce"
        key = self._groups_key()
        if self.__dict__.get("_shard_key") == key:
            return "reduce"
        return "replicated" if self.__dict__.get("_replica_key") == key else "check"

    def _has_sharded_params(self) -> bool:
        """Whether any parameter (with a grad or not) is a DTensor or an FSDP1 flat parameter."""
        # Scanning every parameter each step costs ~0.5 ms per 2000 tensors: redo it only when
        # the groups change (a parameter does not turn into a DTensor under an optimizer).
        key = self._groups_key()
        if self.__dict__.get("_sharded_key") != key:
            self._sharded_params = any(_is_dtensor(p) or hasattr(p, "_fsdp_flattened")
                                       for g in self.param_groups for p in g["params"])
            self._sharded_key = key
        return self._sharded_params

    def _collective(self, mode: str, vec: Tensor) -> Tensor:
        """The step's one collective: all-reduce (``"reduce"``) or all-gather (``"check"``)."""
        self._joined = True
        if mode == "reduce":
            dist.all_reduce(vec, op=dist.ReduceOp.SUM)
            return vec
        out = [torch.empty_like(vec) for _ in range(dist.get_world_size())]
        dist.all_gather(out, vec)
        return torch.stack(out)

    def _join_failed(self) -> None:
        """This rank raised before the step's collective: join it anyway with a failure flag,
        so the other ranks raise too instead of waiting. Joins exactly when the others reach
        it: the mode and the frozen-step rule depend only on values every rank shares."""
        try:
            mode = self._dist_mode()
            n_est = n_live_estimates(self.param_groups)
            if mode not in ("reduce", "check") or n_est == 0:
                return
            dev = self._main_device()
            acc = _acc_dtype(dev)
            n = _n_reduce(n_est) + (_N_FINGERPRINT if mode == "check" else 0)
            vec = torch.zeros(n, dtype=acc, device=dev)
            vec[0] = 1.0  # the failure flag
            self._collective(mode, vec)
        except Exception:  # the error being raised is the one to report
            pass

    def _fingerprint(self, dev: torch.device, acc: torch.dtype) -> Tensor:
        """This rank's parameter set: count, elements, a hash of the shapes, and the L1 and
        squared L2 norms of the values (data-parallel ranks hold the same values)."""
        ps = [_local(p) for g in self.param_groups for p in g["params"]]
        h = 0
        for p in ps:
            h = (h * 1000003 + hash(tuple(p.shape))) % 2147483647
        l1 = l2 = torch.zeros((), dtype=acc, device=dev)
        nonempty = [p.detach() for p in ps if p.numel()]
        if nonempty:
            for (ts,), _ in group_by_device_dtype(nonempty).values():
                l1 = l1 + torch.stack(tc.foreach_norm(ts, ord=1)).to(dev, acc).sum()
                l2 = l2 + torch.stack(tc.foreach_norm(ts, ord=2)).to(dev, acc).square().sum()
        head = torch.tensor([len(ps), sum(p.numel() for p in ps), h], dtype=acc, device=dev)
        return torch.cat([head, l1.reshape(1), l2.reshape(1)])

    def _narrowest_is_float32(self, active: list[GroupWork]) -> bool:
        """Whether this step computes or stores anything in float32 range (a float32, bfloat16
        or float16 parameter, or a narrower ``state_dtype``), else everything is float64."""
        if self._state_dtype is not None:
            return True
        return any(p.dtype != torch.float64 for w in active for p in w.params)

    def _main_device(self) -> torch.device:
        """The device of the step's scalars and collective: the first parameter's, in any
        group (group 0 may be empty); with none on this rank (a ZeRO shard with no
        parameters) the process group's device."""
        for g in self.param_groups:
            for p in g["params"]:
                return _local(p).device
        if dist is not None and dist.is_available() and dist.is_initialized():
            backend = str(dist.get_backend())
            if "nccl" in backend and torch.cuda.is_available():
                return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")


#: the all-reduced vector: a header [failed ranks, float32 range in use, float16 parameters],
#: then per d estimate [c_num * sum dots, sum ||s'||_1, max |g| (summed over groups and ranks),
#: max |p|, max |s'|]
_HEADER = 3
_PER_EST = 5
#: count, elements, shape hash, L1, squared L2 (see Prodigy._fingerprint)
_N_FINGERPRINT = 5


def _n_reduce(n_est: int) -> int:
    return _HEADER + _PER_EST * n_est


class _Sums:
    """What the step's host sync returns (see ``Prodigy._global_sums``): ``est[i]`` is
    estimate i's ``[delta, den, gmax, pmax, smax]``."""

    __slots__ = ("failed_ranks", "limits", "half", "flags", "est")

    def __init__(self, vec: list[float], flags: list[float], n_est: int) -> None:
        self.failed_ranks, self.limits, self.half = vec[0], _limits(vec[1] > 0), vec[2] > 0
        self.flags = flags
        self.est = [vec[_HEADER + _PER_EST * i:_HEADER + _PER_EST * (i + 1)]
                    for i in range(n_est)]


def _same_parameters(fps: list[list[float]]) -> bool:
    """Whether every rank's fingerprint is the same: counts and the shape hash exactly, the
    norms to 1e-6 relative (identical values summed the same way agree exactly; the tolerance
    only absorbs another reduction order on other hardware; NaN weights are reported by the
    non-finite check, not here)."""
    first = fps[0]
    return all(fp[:3] == first[:3] and all(
        abs(a - b) <= 1e-6 * max(abs(a), abs(b)) or not (math.isfinite(a) and math.isfinite(b))
        for a, b in zip(fp[3:], first[3:])) for fp in fps[1:])


def _sharded_warning(owner: str, rows: list[list[float]], n: int) -> str:
    desc = "; ".join(f"rank {i}: {int(r[n])} tensors, {int(r[n + 1])} elements"
                     for i, r in enumerate(rows))
    return (
        f"{owner}: the ranks hold different parameters ({desc}, or the same shapes with other "
        "values): the optimizer is sharded across ranks (e.g. ZeroRedundancyOptimizer), so "
        "Prodigy all-reduces its d statistics every step from now on and every rank uses the "
        "d of the whole model. Pass fsdp_in_use=True to say so (and silence this warning), "
        "or independent_ranks=True if each rank trains its own model"
    )
