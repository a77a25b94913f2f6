"""``optimkit recommend``: rank the registry's optimizers for a task's traits, from the rules."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from ..factory import get_spec
from .explain import _wrap, terminal_width
from .presets import DECIDED, EVIDENCE, TARGET_GAP, no_tuning_preset
from .rules import CORRECTIONS, RULES, TRAITS, Rule

__all__ = ["Traits", "Recommendation", "recommend", "render_recommendations", "spec_string"]


@dataclass(frozen=True)
class Traits:
    """What the user told us about the task (``None``/``False``: not said)."""

    model: str | None = None
    sparse: bool = False
    data_size: str | None = None
    memory_tight: bool = False
    no_tuning: bool = False
    fine_tune: bool = False

    def __post_init__(self) -> None:
        for name in ("model", "data_size"):
            v = getattr(self, name)
            if v is not None and v not in TRAITS[name]:
                raise ValueError(f"invalid {name}={v!r}; expected one of {', '.join(TRAITS[name])}")

    def describe(self) -> str:
        parts = [f"model={self.model}" if self.model else "", "sparse" if self.sparse else "",
                 f"data={self.data_size}" if self.data_size else "", "memory-tight" if self.memory_tight else "",
                 "no-tuning" if self.no_tuning else "", "fine-tune" if self.fine_tune else ""]
        return ", ".join(p for p in parts if p) or "no traits given"


@dataclass
class Recommendation:
    optimizer: str
    score: float
    hyperparams: dict[str, Any]
    reasons: list[str]
    setup: list[str] = field(default_factory=list)
    evidence: list[str] = field(default_factory=list)
    correction: str | None = None
    state_buffers: int = 0
    measured: str | None = None  # the zero-tuning preset and its measurement (Prodigy, --no-tuning)

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["spec"] = spec_string(self.optimizer, self.hyperparams)
        return d


def _matches(rule: Rule, traits: Traits) -> bool:
    return all(getattr(traits, k) == v for k, v in rule.when.items())


def _value_text(v: Any) -> str:
    if isinstance(v, tuple):
        return "(" + ",".join(_value_text(x) for x in v) + ")"
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def spec_string(name: str, hyperparams: dict[str, Any]) -> str:
    """The ``name:key=value,...`` form ``optimkit compare --optimizers`` and the factory parse."""
    if not hyperparams:
        return name
    return name + ":" + ",".join(f"{k}={_value_text(v)}" for k, v in hyperparams.items())


def recommend(traits: Traits, top: int = 3) -> list[Recommendation]:
    """Score every optimizer named by a matching rule; return the best ``top`` (score > 0)."""
    by_name: dict[str, list[Rule]] = {}
    for rule in RULES:
        if _matches(rule, traits):
            by_name.setdefault(rule.optimizer, []).append(rule)
    recs = []
    for name, rules in by_name.items():
        spec = get_spec(name)
        score = sum(r.score for r in rules)
        hp: dict[str, Any] = {"lr": spec.default_lr} if spec.default_lr is not None else {}
        # more specific rules (more conditions) override the general ones
        for r in sorted(rules, key=lambda r: len(r.when)):
            hp.update(r.hyperparams)
        ordered = sorted(rules, key=lambda r: (-len(r.when), -abs(r.score)))
        evidence = {e for r in rules for e in r.evidence}
        measured = None
        if spec.name == "prodigy" and traits.no_tuning:
            # the measured preset decides Prodigy's algorithm arguments; other advice
            # (slice_p for memory) stays
            key, preset = no_tuning_preset(traits.model, traits.sparse, traits.fine_tune)
            hp = {**preset.args, **{k: v for k, v in hp.items() if k not in DECIDED}}
            evidence |= set(preset.tasks)
            measured = _measured_text(key, preset)
        setup = [r.setup for r in ordered if r.setup]
        if traits.sparse and not getattr(spec.cls, "_supports_sparse", False):
            setup.append(f"{spec.name} takes dense gradients only: keep embeddings at "
                         "nn.Embedding(sparse=False) (of optimkit's optimizers only Adagrad and "
                         "SGD take sparse ones)")
        recs.append(Recommendation(
            optimizer=spec.name,
            score=score,
            hyperparams=hp,
            reasons=[r.reason for r in ordered if r.score > 0] or [r.reason for r in ordered],
            setup=setup,
            evidence=sorted(evidence),
            correction=CORRECTIONS.get(spec.name),
            state_buffers=spec.state_buffers,
            measured=measured,
        ))
    # ties: with no_tuning, an optimizer that needs no lr search first (then by name)
    recs.sort(key=lambda r: (-r.score, traits.no_tuning and get_spec(r.optimizer).needs_lr_tuning,
                             r.optimizer))
    return [r for r in recs if r.score > 0][:top]


def _measured_text(key: str, preset: Any) -> str:
    if not preset.gaps:
        return (f"zero-tuning preset {preset.preset!r} for {key}: no task of this kind was measured; "
                f"this is the preset with the smallest worst gap over every task ({EVIDENCE})")
    gaps = ", ".join(f"{t} {g:+.3f}" for t, g in preset.gaps.items())
    miss = [t for t, g in preset.gaps.items() if g > TARGET_GAP]
    verdict = (f"misses the {TARGET_GAP} target on {', '.join(miss)}" if miss
               else f"within the {TARGET_GAP} target")
    note = f". {preset.note}" if preset.note else ""
    return (f"zero-tuning preset {preset.preset!r} for {key}, chosen by measurement: gap to the best AdamW "
            f"of an lr grid {gaps} ({verdict}; {EVIDENCE}, docs/choosing.md){note}")


def _avoid(traits: Traits) -> list[tuple[str, str]]:
    out = []
    totals: dict[str, float] = {}
    worst: dict[str, Rule] = {}
    for rule in RULES:
        if _matches(rule, traits):
            totals[rule.optimizer] = totals.get(rule.optimizer, 0) + rule.score
            if rule.score < 0 and (rule.optimizer not in worst or rule.score < worst[rule.optimizer].score):
                worst[rule.optimizer] = rule
    for name, rule in sorted(worst.items(), key=lambda kv: totals[kv[0]]):
        if totals[name] <= 0:
            out.append((name, rule.reason))
    return out


def render_recommendations(traits: Traits, recs: list[Recommendation],
                           width: int | None = None) -> str:
    """Plain text for the terminal, wrapped to ``width`` (default: the terminal's, as
    ``optimkit explain``); a command to copy is never broken."""
    w = terminal_width() if width is None else width

    def add(text: str, indent: str, sub: str) -> None:
        lines.append(_wrap(text, indent, w, sub))

    lines = [f"Recommendations for: {traits.describe()}", ""]
    for i, r in enumerate(recs, 1):
        add(f"{i}. {r.optimizer}  (score {r.score:g}; state: {r.state_buffers} buffer(s), "
            f"{4 * r.state_buffers} bytes/param in fp32)", "", "   ")
        args = ", ".join(f"{k}={_value_text(v)}" for k, v in r.hyperparams.items())
        add(f"start with: {args or 'the defaults'}", "   ", "     ")
        cmd = f"optimkit compare --optimizers '{spec_string(r.optimizer, r.hyperparams)}'"
        lines += ([f"   compare it: {cmd}"] if len(cmd) + 15 <= w
                  else ["   compare it:", f"     {cmd}"])  # a command is never broken
        lines.append("   why:")
        for reason in r.reasons:
            add(f"- {reason}", "     ", "       ")
        if r.measured:
            add(f"measured: {r.measured}", "   ", "     ")
        for s in r.setup:
            add(f"recipe: {s}", "   ", "     ")
        if r.evidence:
            tasks = ", ".join(r.evidence)
            add(f"backed by optimkit compare task(s): {tasks}", "   ", "     ")
            lines.append(f"     (optimkit compare --tasks {' '.join(r.evidence)})")
        if r.correction:
            add(f"note: {r.correction}", "   ", "     ")
        lines.append("")
    avoid = _avoid(traits)
    if avoid:
        lines.append("Avoid here:")
        for name, reason in avoid:
            add(f"- {name}: {reason}", "  ", "    ")
        lines.append("")
    lines.append("Details of any optimizer: optimkit explain NAME")
    return "\n".join(lines) + "\n"
