"""``optimkit explain NAME`` and the optimizer docs pages, both rendered from the registry.

Nothing here is written by hand per optimizer: the update rule, the hyperparameter table
(default, valid range, effect), tuning advice and pitfalls all come from the registry's
:class:`~optimkit.factory.OptimizerSpec`, and the corrections from :mod:`.rules`, so the
terminal, the docs and the code cannot disagree.
"""

from __future__ import annotations

import textwrap
from typing import Any

from ..factory import REGISTRY, OptimizerSpec
from .presets import preset_lines
from .rules import CORRECTIONS

__all__ = ["render_text", "render_markdown", "render_index", "default_text"]


def default_text(v: Any) -> str:
    """A hyperparameter default as a user would type it."""
    if isinstance(v, float):
        return "inf" if v == float("inf") else f"{v:g}"
    if isinstance(v, tuple):
        return "(" + ", ".join(default_text(x) for x in v) + ")"
    if isinstance(v, str):
        return repr(v)
    return str(v)


def _class_path(spec: OptimizerSpec) -> str:
    mod = spec.cls.__module__
    return f"optimkit.{spec.cls.__name__}" if mod.startswith("optimkit") else f"{mod}.{spec.cls.__name__}"


def _facts(spec: OptimizerSpec) -> list[tuple[str, str]]:
    preset = ", ".join(f"{k}={default_text(v)}" for k, v in spec.preset.items())
    return [
        ("class", _class_path(spec) + (f" with {preset}" if preset else "")),
        ("aliases", ", ".join(spec.aliases) or "none"),
        ("default lr (create_optimizer, compare)", default_text(spec.default_lr)),
        ("needs lr tuning", "yes" if spec.needs_lr_tuning else "no"),
        ("state", f"{spec.state_buffers} full-size buffer(s) per parameter = "
                  f"{4 * spec.state_buffers} bytes/param in fp32"),
    ]


def _wrap(text: str, indent: str, width: int = 92) -> str:
    return "\n".join(
        textwrap.fill(p, width=width, initial_indent=indent, subsequent_indent=indent) for p in text.split("\n") if p
    )


def render_text(spec: OptimizerSpec) -> str:
    """Plain-text explanation for the terminal."""
    out = [f"{spec.name}: {spec.description}", ""]
    for k, v in _facts(spec):
        out.append(f"  {k}: {v}")
    out += ["", "Update rule (per parameter theta, gradient g, step t):"]
    out += ["    " + line for line in spec.update_rule.splitlines()]
    out += ["", "Hyperparameters:"]
    for hp in spec.hyperparams:
        out.append(f"  {hp.name} = {default_text(hp.default)}    valid: {hp.valid}")
        out.append(_wrap(hp.doc, "      "))
    for title, text in (("When to use", spec.when_to_use), ("Tuning", spec.tuning), ("Pitfalls", spec.pitfalls),
                        ("Often gotten wrong", CORRECTIONS.get(spec.name, ""))):
        if text:
            out += ["", f"{title}:", _wrap(text, "  ")]
    if spec.name == "prodigy":
        out += ["", "Zero-tuning presets (optimkit recommend --no-tuning; measured):"]
        out += [_wrap(line, "  ") for line in preset_lines()]
    out += ["", f"Try it: optimkit compare --optimizers {spec.name}   |   "
                f"create_optimizer({spec.name!r}, model)"]
    return "\n".join(out) + "\n"


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render_markdown(spec: OptimizerSpec) -> str:
    """The docs page of one optimizer (``docs/optimizers/<name>.md``), as markdown."""
    out = [f"# {spec.name}", "", spec.description, ""]
    for k, v in _facts(spec):
        out.append(f"- **{k}**: {v}")
    out += ["", "## Update rule", "", "```text", spec.update_rule, "```", "", "## Hyperparameters", "",
            "| name | default | valid range | effect |", "|---|---|---|---|"]
    for hp in spec.hyperparams:
        out.append(f"| `{hp.name}` | `{_md_cell(default_text(hp.default))}` | {_md_cell(hp.valid)} | {_md_cell(hp.doc)} |")
    for title, text in (("When to use", spec.when_to_use), ("Tuning", spec.tuning), ("Pitfalls", spec.pitfalls),
                        ("Often gotten wrong", CORRECTIONS.get(spec.name, ""))):
        if text:
            out += ["", f"## {title}", "", text]
    if spec.name == "prodigy":
        out += ["", "## Zero-tuning presets (measured)", ""] + [f"- {line}" for line in preset_lines()]
    out += ["", "## Example", "", "```python", "import optimkit",
            f"opt = optimkit.create_optimizer({spec.name!r}, model)  # lr={default_text(spec.default_lr)}",
            "```", "", "```console", f"$ optimkit explain {spec.name}",
            f"$ optimkit compare --optimizers {spec.name} adamw", "```", "",
            "*Generated from the registry (`optimkit explain --markdown " + spec.name + "`).*", ""]
    return "\n".join(out)


def render_index() -> str:
    """A markdown table of every registered optimizer."""
    out = ["| optimizer | description | default lr | state bytes/param (fp32) |", "|---|---|---|---|"]
    for name, spec in REGISTRY.items():
        out.append(f"| [{name}]({name}.md) | {_md_cell(spec.description)} | {default_text(spec.default_lr)} "
                   f"| {4 * spec.state_buffers} |")
    return "\n".join(out) + "\n"
