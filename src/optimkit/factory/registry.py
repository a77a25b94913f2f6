"""The optimizer registry: the single source of truth for every optimizer optimkit names.

Every consumer reads this table: ``create_optimizer`` builds from it, ``list_optimizers``
lists it, ``optimkit explain`` / ``recommend`` / the docs render it, and the tests iterate
over it. (Interface fixed here; the table itself is filled in by the factory issue.)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class HyperParam:
    """One constructor argument, documented."""

    name: str
    default: Any
    valid: str  # human-readable valid range, e.g. "0 <= x < 1"
    doc: str  # one sentence: what it really does (units, direction of effect)


@dataclass(frozen=True)
class OptimizerSpec:
    """Everything optimkit knows about one optimizer."""

    name: str  # canonical registry name, lower case: "adamw"
    cls: type  # the class constructed
    description: str  # one line
    hyperparams: tuple[HyperParam, ...]
    when_to_use: str
    update_rule: str  # the math, plain text, several lines
    tuning: str = ""  # tuning advice
    pitfalls: str = ""
    aliases: tuple[str, ...] = ()
    # kwargs applied on top of the class defaults (e.g. "momentum" = SGD with momentum=0.9)
    preset: dict[str, Any] = field(default_factory=dict)
    # learning rate used when the user gives none (compare's "recommended default")
    default_lr: float | None = None
    needs_lr_tuning: bool = True  # False for Prodigy / Adadelta
    state_buffers: int = 0  # full-size state tensors per parameter (memory cost)
