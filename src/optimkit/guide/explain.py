"""``optimkit explain NAME`` and the optimizer docs pages, both rendered from the registry.

Nothing here is written by hand per optimizer: the update rule, the hyperparameter table
(default, valid range, effect), tuning advice and pitfalls all come from the registry's
:class:`~optimkit.factory.OptimizerSpec`, and the corrections from :mod:`.rules`, so the
terminal, the docs and the code cannot disagree.
"""

from __future__ import annotations

import re
import shutil
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


def _wrap(text: str, indent: str, width: int = 92, sub: str | None = None) -> str:
    """``text`` filled to ``width`` per paragraph (words are never split)."""
    return "\n".join(
        textwrap.fill(p, width=width, initial_indent=indent,
                      subsequent_indent=indent if sub is None else sub,
                      break_long_words=False, break_on_hyphens=False)
        for p in text.split("\n") if p
    )


#: a rule line: the formula, two or more spaces, then a parenthesised comment
_RULE_COMMENT = re.compile(r"^(\s*\S.*?)\s{2,}(\(.*\))$")


def _rule_lines(rule: str, width: int) -> list[str]:
    """The update rule, indented 4; a line too wide for ``width`` puts its trailing comment
    on the next line(s), then splits at ``" ; "`` (the formulas themselves are never
    re-flowed)."""
    out = []
    for line in rule.splitlines():
        line = "    " + line
        if len(line) > width:
            m = _RULE_COMMENT.match(line)
            if m:
                lead = len(m.group(1)) - len(m.group(1).lstrip())
                out += _split_statements(m.group(1), width)
                out.append(_wrap(m.group(2), " " * (lead + 4), width))
                continue
        out += _split_statements(line, width)
    return out


def _split_statements(line: str, width: int) -> list[str]:
    if len(line) <= width or " ;  " not in line:
        return [line]
    lead = line[:len(line) - len(line.lstrip())]
    return [lead + part.strip() for part in line.split(" ;  ")]


def terminal_width() -> int:
    """The width ``optimkit explain`` renders for: the terminal's (``COLUMNS`` when set),
    clamped to 60-100 columns."""
    return max(60, min(100, shutil.get_terminal_size((92, 24)).columns))


def render_text(spec: OptimizerSpec, width: int | None = None) -> str:
    """Plain-text explanation for the terminal, no line wider than ``width`` (default:
    :func:`terminal_width`) where words allow."""
    w = terminal_width() if width is None else width
    out = [_wrap(f"{spec.name}: {spec.description}", "", w, "  "), ""]
    for k, v in _facts(spec):
        out.append(_wrap(f"{k}: {v}", "  ", w, "    "))
    out += ["", "Update rule (per parameter theta, gradient g, step t):"]
    out += _rule_lines(spec.update_rule, w)
    out += ["", "Hyperparameters:"]
    for hp in spec.hyperparams:
        out.append(_wrap(f"{hp.name} = {default_text(hp.default)}    valid: {hp.valid}", "  ", w,
                         "      "))
        out.append(_wrap(hp.doc, "      ", w))
    for title, text in (("When to use", spec.when_to_use), ("Tuning", spec.tuning), ("Pitfalls", spec.pitfalls),
                        ("Often gotten wrong", CORRECTIONS.get(spec.name, ""))):
        if text:
            out += ["", f"{title}:", _wrap(text, "  ", w)]
    if spec.name == "prodigy":
        out += ["", "Zero-tuning presets (optimkit recommend --no-tuning; measured):"]
        out += [_wrap(line, "  ", w, "    ") for line in preset_lines()]
    try_cli = f"optimkit compare --optimizers {spec.name}"
    try_py = f"create_optimizer({spec.name!r}, model)"
    one = f"Try it: {try_cli}   |   {try_py}"
    out += ["", one] if len(one) <= w else ["", f"Try it: {try_cli}", f"        {try_py}"]
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
