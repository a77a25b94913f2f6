"""Which param groups share a d estimate, and the scalars one estimate steps with.

Without ``split_groups`` (prodigyopt's behaviour) every group shares one ``d``: its scalars
(``d``, ``d_max``, ``d_numerator``, ``d_hat``, ``d_denom``, ``k``) are mirrored into every
group, the hyperparameters prodigyopt reads from group 0 must agree across groups, and every
group's lr is the largest lr or 0. With ``split_groups=True`` each group is its own estimate:
its own scalars and hyperparameters, its lr multiplying its own ``d``; a step then computes
exactly what one Prodigy per group would (one host sync and one collective for all of them).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ..._base import GroupWork
from ..._validation import scalar
from .common import _bias_correction, _effective_lr, _norm

#: read from group 0 by prodigyopt; without split_groups they must agree across groups
GLOBAL_KEYS = ("betas", "beta3", "d0", "d_coef", "growth_rate", "use_bias_correction", "decouple",
               "fsdp_in_use", "strict_growth", "nonfinite", "split_groups", "d_limit",
               "d_freeze_step")
#: global even with split_groups: one collective and one refusal policy per step
ALWAYS_GLOBAL_KEYS = ("fsdp_in_use", "nonfinite", "split_groups")
#: an estimate's scalars, mirrored into every group that shares it (they round-trip through
#: state_dict and loggers read ``group["d"]``)
MIRRORED = ("d", "d_max", "d_numerator", "d_hat", "d_denom", "k", "skipped_steps")
FLOAT_SCALARS = ("d", "d_max", "d_numerator", "d_hat", "d_denom")


def check_groups(owner: str, groups: list[dict[str, Any]]) -> None:
    """Global hyperparameters agree and, without split_groups, lrs are max-or-0 (prodigyopt's
    rule); else ValueError."""
    g0 = groups[0]
    split = bool(g0.get("split_groups"))
    for gi, g in enumerate(groups[1:], start=1):
        for key in ALWAYS_GLOBAL_KEYS if split else GLOBAL_KEYS:
            if _norm(g.get(key)) != _norm(g0.get(key)):
                why = ("is global in Prodigy (one step, one collective)" if split else
                       "is global in Prodigy (one d for all groups)")
                hint = "" if split or key in ALWAYS_GLOBAL_KEYS else (
                    ", or pass split_groups=True (each group then estimates its own d)")
                raise ValueError(
                    f"{owner}: param group {gi} has {key}={g.get(key)!r} but param group 0 has "
                    f"{g0.get(key)!r}; {key} {why}: use the same value in every group{hint}"
                )
    if split:
        return
    lrs = [scalar(g["lr"]) for g in groups]
    nonzero = sorted({lr for lr in lrs if lr != 0.0})
    if len(nonzero) > 1:
        raise ValueError(
            f"{owner}: param groups have lr values {lrs}; Prodigy's step size d is global, so "
            f"every group's lr must be either the largest lr ({max(lrs)!r}) or 0 (frozen). "
            f"Tune the step with d_coef, or pass split_groups=True: each group then estimates "
            f"its own d and its lr multiplies it (text encoder / U-Net lrs, LoRA+ ratios)"
        )


class Estimate:
    """One d estimate this step: its groups and works, and the scalars read from its first
    group (host floats). ``pieces``, ``pmax`` and ``smax`` are filled by phase 1."""

    __slots__ = ("groups", "works", "active", "live", "beta1", "beta2", "beta3", "k", "d",
                 "d_max", "d0", "lr", "dlr", "c_num", "pieces", "pmax", "smax", "fast",
                 "compiled")

    def __init__(self, groups: list[dict[str, Any]], works: list[GroupWork]) -> None:
        g0 = groups[0]
        self.groups, self.works = groups, works
        self.beta1, self.beta2 = (scalar(b) for b in g0["betas"])
        self.beta3 = scalar(g0["beta3"]) if g0["beta3"] is not None else math.sqrt(self.beta2)
        self.k, self.d = int(g0["k"]), scalar(g0["d"])
        self.d_max, self.d0 = scalar(g0["d_max"]), scalar(g0["d0"])
        self.lr = max(scalar(g["lr"]) for g in groups)
        self.dlr = self.d * self.lr * _bias_correction(g0, self.k)  # this step's multiplier
        self.c_num = (self.d / self.d0) * self.dlr  # the numerator's per-step scale
        self.active = [w for w in works if w.params and float(w.group["lr"]) > 0]
        self.live = [g for g in groups if scalar(g["lr"]) > 0]
        self.pieces: list[tuple[Any, Any, Any]] = []
        self.pmax = self.smax = None
        self.fast: dict[int, bool] = {}
        self.compiled: dict[int, bool] = {}


def estimates(groups: list[dict[str, Any]], works: list[GroupWork]) -> list[Estimate]:
    """The step's d estimates: one over every group, or one per group with split_groups."""
    if groups and groups[0].get("split_groups"):
        return [Estimate([g], [w]) for g, w in zip(groups, works)]
    return [Estimate(groups, works)]


def n_live_estimates(groups: list[dict[str, Any]]) -> int:
    """How many estimates take part in this step's collective (decided from group values
    every rank shares)."""
    if groups and groups[0].get("split_groups"):
        return sum(scalar(g["lr"]) > 0 for g in groups)
    return int(any(scalar(g["lr"]) > 0 for g in groups))


class GroupsMixin:
    """Param groups of a Prodigy: a late group joins the running estimate (or, with
    split_groups, starts its own from its d0), and ``effective_lr`` stays current."""

    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        """torch's list of param groups. Reading it brings every group's ``effective_lr`` up
        to date with the group's current ``lr`` (a float lr; a tensor lr is read at the next
        step, never synced here), so after ``scheduler.step()`` it is what the next step
        applies: ``d * lr * bias_correction``."""
        try:
            groups = self.__dict__["param_groups"]
        except KeyError:
            raise AttributeError("param_groups") from None
        if not torch.compiler.is_compiling():
            for g in groups:
                if type(g.get("lr")) in (float, int) and "d" in g and "k" in g:
                    try:
                        g["effective_lr"] = _effective_lr(g)
                    except (TypeError, ValueError, RuntimeError, ZeroDivisionError, OverflowError):
                        pass  # an invalid value: step() refuses it, naming it
        return groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        self.__dict__["param_groups"] = value

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if self.param_groups:
            merged = {**self.defaults, **{k: v for k, v in param_group.items() if k != "params"}}
            self._validate_group(merged)
            check_groups(type(self).__name__, [*self.param_groups, merged])
        own_d0 = "d0" in param_group and "d" not in param_group  # (torch fills in defaults)
        super().add_param_group(param_group)
        new = self.param_groups[-1]
        if not new["split_groups"]:
            if len(self.param_groups) > 1:  # a late group joins the running estimate
                for key in MIRRORED:
                    new[key] = self.param_groups[0][key]
        elif own_d0:  # its own estimate, from its own d0
            new.update(d=new["d0"], d_max=new["d0"], d_hat=new["d0"])
        new["effective_lr"] = _effective_lr(new)

