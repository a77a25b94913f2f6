"""Parse optimizer arguments written as text: kohya / sd-scripts ``key=value`` style.

sd-scripts passes ``--optimizer_args "d_coef=2" "decouple=True" "betas=0.9,0.99"`` and
evaluates each value with ``ast.literal_eval``. We accept the same strings (and a single
comma-separated string, and a dict), but parse values with a small, explicit grammar instead
of ``literal_eval`` so that ``true``/``none``/``inf``/``nan`` work in any case and nothing is
ever evaluated:

    value   := tuple | atom
    tuple   := "(" items ")" | "[" items "]" | items-with-a-top-level-comma
    atom    := 'quoted' | "quoted" | true | false | none | null | int | float | inf | nan | word

A comma separates two *arguments* only when ``key=`` follows it; any other comma belongs to
the value (``"betas=0.9,0.99, eps=1e-8"`` is ``{"betas": (0.9, 0.99), "eps": 1e-8}``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from typing import Any

__all__ = ["parse_optimizer_args", "parse_value"]

# a top-level comma followed by `identifier =` starts a new argument; any other comma is part
# of a value
_ARG_START = re.compile(r"^\s*[A-Za-z_][A-Za-z0-9_]*\s*=")
_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_WORDS: dict[str, Any] = {
    "true": True, "false": False, "none": None, "null": None,
    "inf": math.inf, "+inf": math.inf, "-inf": -math.inf,
    "infinity": math.inf, "+infinity": math.inf, "-infinity": -math.inf,
    "nan": math.nan, "+nan": math.nan, "-nan": math.nan,
}
_INT = re.compile(r"^[+-]?\d+$")
_FLOAT = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


def parse_optimizer_args(args: str | Iterable[str] | Mapping[str, Any] | None) -> dict[str, Any]:
    """Turn optimizer arguments into a ``{name: value}`` dict.

    Args:
        args: one of
            * a list of ``"key=value"`` strings (sd-scripts' ``--optimizer_args`` nargs list);
            * one string of comma-separated ``key=value`` pairs (``"d_coef=2, decouple=True"``);
            * a dict (returned as a new dict; values are used as given, only keys are checked);
            * ``None`` or empty: ``{}``.

    Values: ``true``/``false``/``none``/``null`` (any case), ints, floats (``1e-3``, ``.5``),
    ``inf``/``-inf``/``nan``, tuples written ``0.9,0.99`` or ``(0.9, 0.99)`` or ``[0.9, 0.99]``,
    quoted strings, and bare words (kept as strings: ``pullback_momentum=reset``). A value may
    contain ``=`` (only the first ``=`` of an argument separates key from value).

    Raises:
        ValueError: an item without ``=``, an empty or malformed key, an empty value, unbalanced
            brackets or quotes, or the same key given twice (nothing is silently overridden).

    >>> parse_optimizer_args(["d_coef=2", "decouple=True", "betas=0.9,0.99"])
    {'d_coef': 2, 'decouple': True, 'betas': (0.9, 0.99)}
    """
    if args is None:
        return {}
    if isinstance(args, Mapping):
        out: dict[str, Any] = {}
        for k, v in args.items():
            if not isinstance(k, str) or not _KEY.match(k.strip()):
                raise ValueError(f"optimizer_args: invalid argument name {k!r}; expected an identifier")
            key = k.strip()
            if key in out:
                raise ValueError(f"optimizer_args: argument {key!r} given twice")
            out[key] = v
        return out
    if isinstance(args, str):
        items = [args]
    elif isinstance(args, Iterable):
        items = list(args)
    else:
        raise TypeError(
            f"optimizer_args must be a list of 'key=value' strings, one string or a dict, "
            f"got {type(args).__name__}"
        )
    out = {}
    for item in items:
        if not isinstance(item, str):
            raise TypeError(f"optimizer_args: expected 'key=value' strings, got {item!r}")
        for piece in _split_args(item):
            key, value = _split_pair(piece)
            if isinstance(value, str) and "'" not in piece and '"' not in piece:
                m = _TWO_IN_ONE.search(value)
                if m:  # "weight_decay=0.01 decouple=True": a space is not a separator
                    raise ValueError(
                        f"optimizer_args: {piece.strip()!r} holds two arguments ({key}=... and "
                        f"{m.group(1)}=...); separate them with a comma or give each as its own "
                        "item (sd-scripts: --optimizer_args \"weight_decay=0.01\" \"decouple=True\")")
            if key in out:
                raise ValueError(f"optimizer_args: argument {key!r} given twice")
            out[key] = value
    return out


#: a bare value that holds another ``key=``, after whitespace
_TWO_IN_ONE = re.compile(r"\s([A-Za-z_][A-Za-z0-9_]*)\s*=")


def _split_args(item: str) -> list[str]:
    """Split one string into ``key=value`` pieces at top-level commas followed by ``key=``."""
    pieces: list[str] = []
    try:
        parts = _split_top_level(item)
    except ValueError as e:
        raise ValueError(f"optimizer_args: {e}") from None
    for part in parts:
        if _ARG_START.match(part) or not pieces:
            pieces.append(part)
        else:
            pieces[-1] += "," + part  # the comma belongs to the value: "betas=0.9,0.99"
    # stray separators ("a=1,", "a=1,,b=2", "") are noise, not empty values
    return [p.strip().rstrip(",").strip() for p in pieces if p.strip().rstrip(",").strip()]


def _split_pair(piece: str) -> tuple[str, Any]:
    if "=" not in piece:
        raise ValueError(f"optimizer_args: expected 'key=value', got {piece.strip()!r}")
    key, _, text = piece.partition("=")
    key = key.strip()
    if not _KEY.match(key):
        raise ValueError(
            f"optimizer_args: invalid argument name {key!r} in {piece.strip()!r}; expected an identifier"
        )
    if not text.strip():
        raise ValueError(f"optimizer_args: argument {key!r} has an empty value")
    try:
        return key, parse_value(text)
    except ValueError as e:
        raise ValueError(f"optimizer_args: argument {key!r}: {e}") from None


def parse_value(text: str) -> Any:
    """Parse one value of the grammar in the module docstring (never evaluates code)."""
    text = text.strip()
    if not text:
        raise ValueError("empty value")
    parts = _split_top_level(text)
    if len(parts) > 1:
        # Python's rule: a top-level comma makes a tuple, a trailing comma is allowed ("0.9,")
        if not parts[-1].strip():
            parts = parts[:-1]
        return tuple(parse_value(p) if p.strip() else _raise_empty(text) for p in parts)
    if text[0] in "([":
        close = ")" if text[0] == "(" else "]"
        if text[-1] != close:
            raise ValueError(f"unbalanced brackets in {text!r}")
        inner = text[1:-1].strip()
        if not inner:
            return () if close == ")" else []
        items = [p for p in _split_top_level(inner)]
        if items and not items[-1].strip():  # trailing comma: "(0.9,)"
            items = items[:-1]
        values = [parse_value(p) if p.strip() else _raise_empty(text) for p in items]
        return tuple(values) if close == ")" else values
    if text[0] in "\"'":
        if len(text) < 2 or text[-1] != text[0]:
            raise ValueError(f"unterminated quote in {text!r}")
        return text[1:-1]
    low = text.lower()
    if low in _WORDS:
        return _WORDS[low]
    if _INT.match(text):
        return int(text)
    if _FLOAT.match(text):
        return float(text)
    if any(c in text for c in "()[]\"'"):
        raise ValueError(f"cannot parse {text!r}")
    return text  # a bare word: an option name such as "reset"


def _raise_empty(text: str) -> Any:
    raise ValueError(f"empty element in {text!r}")


def _split_top_level(text: str) -> list[str]:
    """Split on commas outside brackets and quotes."""
    parts, depth, quote, start = [], 0, "", 0
    for i, c in enumerate(text):
        if quote:
            if c == quote:
                quote = ""
        elif c in "\"'":
            quote = c
        elif c in "([":
            depth += 1
        elif c in ")]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"unbalanced brackets in {text!r}")
        elif c == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    if quote:
        raise ValueError(f"unterminated quote in {text!r}")
    if depth != 0:
        raise ValueError(f"unbalanced brackets in {text!r}")
    parts.append(text[start:])
    return parts
