"""One error format for every optimizer.

Every invalid hyperparameter raises ``ValueError`` with the same shape of message::

    Adam: invalid betas[0]=1.0; expected 0 <= betas[0] < 1

so a user (or a config tool) can tell which optimizer, which parameter, what value was given
and what would have been accepted.
"""

from __future__ import annotations

import math
from numbers import Real
from typing import Any

import torch


def fail(owner: str, name: str, value: Any, expected: str) -> None:
    """Raise the canonical ``ValueError`` for one bad hyperparameter."""
    raise ValueError(f"{owner}: invalid {name}={value!r}; expected {expected}")


def _as_real(owner: str, name: str, value: Any) -> float:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            fail(owner, name, value, "a number or a 1-element tensor")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, Real):
        fail(owner, name, value, "a real number")
    value = float(value)
    if math.isnan(value):
        fail(owner, name, value, "a number, not NaN")
    return value


def check_range(
    owner: str,
    name: str,
    value: Any,
    lo: float | None = None,
    hi: float | None = None,
    *,
    lo_open: bool = False,
    hi_open: bool = False,
) -> float:
    """Check ``lo <= value <= hi`` (``<`` on an open side) and return ``value`` as float.

    ``None`` for a bound leaves that side unbounded.
    """
    v = _as_real(owner, name, value)
    ok = True
    if lo is not None:
        ok &= v > lo if lo_open else v >= lo
    if hi is not None:
        ok &= v < hi if hi_open else v <= hi
    if not ok:
        parts = []
        if lo is not None:
            parts.append(f"{_fmt(lo)} {'<' if lo_open else '<='} ")
        parts.append(name)
        if hi is not None:
            parts.append(f" {'<' if hi_open else '<='} {_fmt(hi)}")
        fail(owner, name, value, "".join(parts))
    return v


def check_bool(owner: str, name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        fail(owner, name, value, "True or False")
    return value


def check_betas(owner: str, betas: Any, n: int = 2, *, allow_zero_first: bool = True) -> None:
    """Betas are a length-``n`` sequence with every entry in ``[0, 1)``."""
    if isinstance(betas, torch.Tensor) or not isinstance(betas, (tuple, list)) or len(betas) != n:
        fail(owner, "betas", betas, f"a tuple of {n} numbers in [0, 1)")
    for i, b in enumerate(betas):
        check_range(owner, f"betas[{i}]", b, 0.0, 1.0, hi_open=True,
                    lo_open=(i == 0 and not allow_zero_first))


def _fmt(x: float) -> str:
    if x == math.inf:
        return "inf"
    if float(x).is_integer():
        return str(int(x))
    return repr(x)
