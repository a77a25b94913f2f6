"""Zero-tuning Prodigy presets, chosen from measurements: the data ``optimkit recommend
--no-tuning`` and ``optimkit explain prodigy`` read.

``CANDIDATES`` are the presets measured by ``benchmarks/presets.py``; ``NO_TUNING`` maps a kind
of model to the chosen preset and the measurement behind it. The measure is the gap

    gap = (L_preset - L_best) / (L_init - L_best)

on the final training loss: the fraction of the progress of the best AdamW of a log lr grid
(7 points, 3e-4 to 0.3 by half decades, the best picked by final training loss) that the
preset, run once at lr=1, leaves undone. ``gap <= 0.01`` is the target (issue 13); a negative gap
means the preset beat the tuned AdamW. The numbers are copied from the JSON file named in
``EVIDENCE`` (``docs/presets-<date>.json``); docs/choosing.md shows the whole table and the
command that produced it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["CANDIDATES", "NO_TUNING", "EVIDENCE", "TARGET_GAP", "DECIDED", "NoTuningPreset", "no_tuning_preset",
           "preset_lines"]

#: the candidate presets: name -> Prodigy constructor arguments (lr=1.0 in every one)
CANDIDATES: dict[str, dict[str, Any]] = {
    "default": {},
    "bc_sw": {"use_bias_correction": True, "safeguard_warmup": True},
    "betas_0.99": {"betas": (0.9, 0.99)},
    "wd_0.01": {"weight_decay": 0.01},  # decouple=True, Prodigy's default: AdamW-style decay
    "split": {"split_groups": True},  # each param group estimates its own d
    # combinations of the single changes, measured after them (docs/choosing.md)
    "betas_0.99_wd": {"betas": (0.9, 0.99), "weight_decay": 0.01},
    "betas_0.99_dcoef_2": {"betas": (0.9, 0.99), "d_coef": 2.0},
    # mlp follow-ups (mnist1d only: the one task where betas_0.99_wd missed the target)
    "betas_0.95_wd": {"betas": (0.9, 0.95), "weight_decay": 0.01},
    "betas_0.99_wd_0.1": {"betas": (0.9, 0.99), "weight_decay": 0.1},
    "betas_0.99_wd_dcoef_0.5": {"betas": (0.9, 0.99), "weight_decay": 0.01, "d_coef": 0.5},
    "betas_0.99_wd_0.03": {"betas": (0.9, 0.99), "weight_decay": 0.03},
    "betas_0.99_wd_0.003": {"betas": (0.9, 0.99), "weight_decay": 0.003},
    "betas_0.98_wd": {"betas": (0.9, 0.98), "weight_decay": 0.01},
    "betas_0.99_wd_bc": {"betas": (0.9, 0.99), "weight_decay": 0.01, "use_bias_correction": True},
    # for param groups with different lrs (measured on fortunes_ft with the body at half lr)
    "split_betas_0.99_dcoef_2": {"split_groups": True, "betas": (0.9, 0.99), "d_coef": 2.0},
}

#: Prodigy arguments a preset decides (a no-tuning recommendation takes them from the preset only)
DECIDED = ("lr", "d_coef", "betas", "weight_decay", "decouple", "use_bias_correction", "safeguard_warmup",
           "split_groups")

#: where the numbers below come from (written by benchmarks/presets.py)
EVIDENCE = "docs/presets-2026-11-30.json"
#: the target of issue 13 for the gap on every task
TARGET_GAP = 0.01


@dataclass(frozen=True)
class NoTuningPreset:
    """The preset for one kind of model, with the measurement that chose it."""

    preset: str  # a key of CANDIDATES
    tasks: tuple[str, ...]  # compare tasks of this kind it was measured on ((): none)
    gaps: dict[str, float] = field(default_factory=dict)  # task -> measured gap of this preset
    note: str = ""

    @property
    def args(self) -> dict[str, Any]:
        """Prodigy's constructor arguments: ``lr=1.0`` plus the preset's."""
        return {"lr": 1.0, **CANDIDATES[self.preset]}

    @property
    def worst_gap(self) -> float | None:
        return max(self.gaps.values()) if self.gaps else None


#: kind of model ("any": no kind given, or a kind no task measures) -> preset
#: (``python benchmarks/presets.py --choose docs/presets-2026-11-30.json`` prints these rows)
NO_TUNING: dict[str, NoTuningPreset] = {
    "linear": NoTuningPreset("default", ("logreg",), {"logreg": -0.0054}),
    "cnn": NoTuningPreset("betas_0.99", ("cnn",), {"cnn": -0.0031},
                          note="default, weight decay and betas+decay tie within 0.0001 here"),
    "transformer": NoTuningPreset("betas_0.99_dcoef_2", ("charlm", "fortunes"),
                                  {"charlm": 0.0003, "fortunes": 0.0038}),
    "mlp": NoTuningPreset("betas_0.99_wd", ("mnist1d",), {"mnist1d": 0.0163},
                          note="none of 14 candidates reaches the target on mnist1d (600 steps): Prodigy's slow "
                               "start costs more than elsewhere; defaults leave 0.146"),
    "sparse": NoTuningPreset("default", ("docbow",), {"docbow": 0.0005}),
    "fine_tune": NoTuningPreset("default", ("fortunes_ft",), {"fortunes_ft": -0.0132},
                                note="one fine-tuning task (a char transformer, full fine-tune, one lr), not "
                                     "LoRA. With param groups at different lrs (text encoder / U-Net) add "
                                     "split_groups=True: measured gap +0.013 with the body at half lr "
                                     "(docs/choosing.md)"),
    "any": NoTuningPreset("betas_0.99_wd", ("charlm", "logreg", "cnn", "fortunes", "docbow", "mnist1d", "fortunes_ft"),
                          {"charlm": 0.018, "logreg": 0.0135, "cnn": -0.0031, "fortunes": 0.0006, "docbow": 0.004,
                           "mnist1d": 0.0163, "fortunes_ft": 0.0058},
                          note="for a kind no task measures (rnn, gan) or none given: the smallest worst gap "
                               "over every task; no single preset meets the target on all seven"),
}


def no_tuning_preset(model: str | None = None, sparse: bool = False, fine_tune: bool = False) -> tuple[str, NoTuningPreset]:
    """The measured preset for these traits, and the table key it came from.

    Precedence: ``fine_tune`` (its own row when measured), then ``sparse``, then the model kind,
    then ``"any"`` (the preset with the smallest worst gap over every task).
    """
    for key, wanted in (("fine_tune", fine_tune), ("sparse", sparse), (model, model is not None)):
        if wanted and key in NO_TUNING:
            return key, NO_TUNING[key]
    return "any", NO_TUNING["any"]


def _args_text(args: dict[str, Any]) -> str:
    def v(x: Any) -> str:
        return "(" + ",".join(map(str, x)) + ")" if isinstance(x, tuple) else f"{x:g}" if isinstance(x, float) else str(x)

    return ", ".join(f"{k}={v(x)}" for k, x in args.items())


def preset_lines() -> list[str]:
    """The table as text lines (``optimkit explain prodigy``, docs)."""
    out = []
    for key, p in NO_TUNING.items():
        gaps = ", ".join(f"{t} {g:+.3f}" for t, g in p.gaps.items())
        measured = f"gap {gaps}" if gaps else "no task of this kind measured"
        miss = [t for t, g in p.gaps.items() if g > TARGET_GAP]
        verdict = f"; misses the {TARGET_GAP} target on {', '.join(miss)}" if miss else (
            f"; within the {TARGET_GAP} target" if gaps else "")
        out.append(f"{key}: {p.preset} ({_args_text(p.args)}) - {measured}{verdict}"
                   + (f". {p.note}" if p.note else ""))
    out.append(f"gap = (L_preset - L_best) / (L_init - L_best) vs the best AdamW of an lr grid, final "
               f"training loss; numbers: {EVIDENCE}; docs/choosing.md")
    return out
