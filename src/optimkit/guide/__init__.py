"""Choosing an optimizer: ``recommend`` rules (data in :mod:`.rules`) and ``explain`` texts,
both rendered from the registry that builds the optimizers."""

from .explain import render_index, render_markdown, render_text
from .presets import CANDIDATES, NO_TUNING, NoTuningPreset, no_tuning_preset
from .recommend import Recommendation, Traits, recommend, render_recommendations
from .rules import CORRECTIONS, RULES, Rule

__all__ = [
    "Traits",
    "Recommendation",
    "recommend",
    "render_recommendations",
    "render_text",
    "render_markdown",
    "render_index",
    "Rule",
    "RULES",
    "CORRECTIONS",
    "CANDIDATES",
    "NO_TUNING",
    "NoTuningPreset",
    "no_tuning_preset",
]
