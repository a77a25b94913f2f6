"""Build param groups from a model: no weight decay on biases / norms, per-pattern lr scales."""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Mapping
from typing import Any

from torch import nn

__all__ = ["param_groups", "NORM_TYPES"]

#: module types whose parameters are never decayed (scales and shifts of a normalisation:
#: decaying them pulls the normalised activations towards 0, which only hurts)
NORM_TYPES: tuple[type, ...] = tuple(
    t for t in (
        getattr(nn.modules.batchnorm, "_NormBase", None),  # BatchNorm*, InstanceNorm*, SyncBatchNorm
        nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm, getattr(nn, "RMSNorm", None),
    ) if t is not None
)


def _matches(name: str, pattern: str) -> bool:
    """A pattern with a wildcard is an fnmatch over the full name; otherwise a substring."""
    n, p = name.lower(), pattern.lower()
    if any(c in p for c in "*?["):
        return fnmatch.fnmatchcase(n, p)
    return p in n


def _declared_no_weight_decay(model: nn.Module) -> tuple[str, ...]:
    """The names the model declares undecayed through timm's ``no_weight_decay()`` convention.

    timm's ``create_optimizer_v2`` calls ``model.no_weight_decay()`` (a set of names such as
    ``{"pos_embed", "cls_token"}``) and exempts the parameters those names match. Here every
    submodule that has the method counts too, its names taken relative to that submodule (a
    timm backbone inside a wrapper model keeps its exemptions).
    """
    out: list[str] = []
    for prefix, module in model.named_modules():
        fn = getattr(module, "no_weight_decay", None)
        if not callable(fn):
            continue
        names = fn()
        where = f"{type(module).__name__}.no_weight_decay()" + (f" (module {prefix!r})" if prefix else "")
        if isinstance(names, (str, bytes)) or not isinstance(names, Iterable):
            raise TypeError(f"param_groups: {where} must return a collection of parameter names, "
                            f"got {type(names).__name__}")
        for n in names:
            if not isinstance(n, str):
                raise TypeError(f"param_groups: {where} returned {n!r}; expected parameter names (str)")
            out.append(f"{prefix}.{n}" if prefix else n)
    return tuple(out)


def _declared_match(name: str, declared: str) -> bool:
    """timm's matching (exact name, or an fnmatch pattern), plus a module path: ``"pos_embed"``
    also covers ``"pos_embed.proj.weight"`` (timm models name modules there too, e.g. XCiT's
    ``pos_embeder``)."""
    if name == declared or name.startswith(declared + "."):
        return True
    return any(c in declared for c in "*?[") and fnmatch.fnmatchcase(name, declared)


def param_groups(
    model: nn.Module,
    weight_decay: float | None = None,
    no_decay: Iterable[str] = ("bias", "norm"),
    lr_scales: Mapping[str, float] | None = None,
    base_lr: float | None = None,
    *,
    no_decay_1d: bool = True,
    model_no_weight_decay: bool = True,
) -> list[dict[str, Any]]:
    """Split a model's trainable parameters into optimizer param groups.

    A parameter gets **no weight decay** (``weight_decay=0.0`` in its group) when any of:

    * it belongs directly to a normalisation module (:data:`NORM_TYPES`: BatchNorm, InstanceNorm,
      LayerNorm, GroupNorm, RMSNorm, ...);
    * it has at most one dimension (``no_decay_1d``: biases, norm scales, 0-dim scalars);
    * its qualified name matches a ``no_decay`` pattern (case-insensitive; a pattern with
      ``* ? [`` is an fnmatch over the full name such as ``"*.pos_embed"``, any other pattern a
      substring: ``"bias"`` matches ``"attn.qkv_bias"``);
    * the model declares it (``model_no_weight_decay``, timm's convention): the model, or any
      submodule, has a method ``no_weight_decay()`` returning names such as
      ``{"pos_embed", "cls_token"}``; a name covers the parameter of that name, every
      parameter under a module of that name (``"pos_embed"`` -> ``"pos_embed.proj.weight"``),
      or is an fnmatch pattern; a submodule's names are relative to it. Names that match
      nothing are ignored (timm's ViT lists ``dist_token`` whether or not it has one).

    All other parameters get ``weight_decay`` (left unset when ``None``, so the optimizer's
    default applies).

    ``lr_scales`` maps (case-sensitive) fnmatch patterns over the full name to lr multipliers, e.g.
    ``{"text_encoder.*": 0.5}``; the first matching pattern (in dict order) wins, unmatched
    parameters have scale 1. Each group then carries ``lr = base_lr * scale`` (``base_lr`` is
    required with ``lr_scales``). A pattern that matches no trainable parameter raises, so a
    typo cannot silently do nothing.

    Every trainable parameter (``requires_grad=True``; shared parameters once) appears in
    exactly one group; frozen parameters are left out; empty groups are never returned. Group
    order is deterministic: by first appearance in ``model.named_parameters()``.

    Args:
        model: the module whose parameters to group.
        weight_decay: decay for the decayed group, ``>= 0``; ``None`` = optimizer default.
        no_decay: name patterns whose parameters are never decayed.
        lr_scales: ``{pattern: multiplier}`` with multipliers ``>= 0``.
        base_lr: the learning rate the multipliers scale.
        no_decay_1d: exempt every parameter with ``ndim <= 1`` from decay.
        model_no_weight_decay: honour ``no_weight_decay()`` methods of the model and its
            submodules (timm's convention).

    Returns:
        a list of dicts ``{"params": [...], "weight_decay": ..., "lr": ...}`` for any
        ``torch.optim.Optimizer``.

    Example:
        >>> model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
        >>> [len(g["params"]) for g in param_groups(model, weight_decay=0.1)]
        [1, 3]
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"param_groups: expected an nn.Module, got {type(model).__name__}")
    if weight_decay is not None and (isinstance(weight_decay, bool) or not weight_decay >= 0):
        raise ValueError(f"param_groups: invalid weight_decay={weight_decay!r}; expected weight_decay >= 0")
    if isinstance(no_decay, str):
        no_decay = (no_decay,)
    no_decay = tuple(no_decay)
    scales = dict(lr_scales or {})
    for pat, s in scales.items():
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not s >= 0:
            raise ValueError(f"param_groups: invalid lr scale {pat!r}: {s!r}; expected a number >= 0")
    if scales and base_lr is None:
        raise ValueError("param_groups: lr_scales needs base_lr (the learning rate they multiply)")

    declared = _declared_no_weight_decay(model) if model_no_weight_decay else ()
    norm_params = {
        id(p) for m in model.modules() if isinstance(m, NORM_TYPES) for p in m.parameters(recurse=False)
    }
    groups: dict[tuple[bool, float], dict[str, Any]] = {}
    used: set[str] = set()
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decay = not (
            id(p) in norm_params
            or (no_decay_1d and p.ndim <= 1)
            or any(_matches(name, pat) for pat in no_decay)
            or any(_declared_match(name, d) for d in declared)
        )
        scale = 1.0
        for pat, s in scales.items():
            if fnmatch.fnmatchcase(name, pat):
                scale, _ = float(s), used.add(pat)
                break
        key = (decay, scale)
        if key not in groups:
            g: dict[str, Any] = {"params": []}
            if not decay:
                g["weight_decay"] = 0.0
            elif weight_decay is not None:
                g["weight_decay"] = float(weight_decay)
            if base_lr is not None:
                g["lr"] = base_lr * scale
            groups[key] = g
        groups[key]["params"].append(p)
    unused = [pat for pat in scales if pat not in used]
    if unused:
        raise ValueError(
            f"param_groups: lr_scales pattern(s) {unused} match no trainable parameter "
            f"(or only parameters an earlier pattern already claimed); "
            f"names look like {[n for n, _ in list(model.named_parameters())[:5]]}"
        )
    if not groups:
        raise ValueError("param_groups: the model has no trainable parameters (all requires_grad=False?)")
    return list(groups.values())
