"""One error format for every optimizer.

Every invalid hyperparameter raises with the same shape of message::

    Adam: invalid betas[0]=1.0; expected 0 <= betas[0] < 1

so a user (or a config tool) can tell which optimizer, which parameter, what value was given
and what would have been accepted. A value of the right type outside its range (NaN included)
raises ``ValueError``; a value of the wrong type (a string lr, a dict betas, ``None``, a bool
where a number is expected) raises :class:`HyperparameterTypeError`, which is both a
``TypeError`` (what torch.optim raises for those) and a ``ValueError`` (so one ``except
ValueError`` catches every invalid hyperparameter).
"""

from __future__ import annotations

import math
from numbers import Real
from collections.abc import Callable
from typing import Any

import torch


class HyperparameterTypeError(TypeError, ValueError):
    """A hyperparameter of the wrong type: a ``TypeError`` that is also a ``ValueError``."""


def _message(owner: str, name: str, value: Any, expected: str) -> str:
    try:
        shown = repr(value)
    except ValueError:  # an int too long for repr (sys.set_int_max_str_digits)
        shown = f"<an int of {value.bit_length()} bits>"
    return f"{owner}: invalid {name}={shown}; expected {expected}"


def fail(owner: str, name: str, value: Any, expected: str) -> None:
    """Raise the canonical ``ValueError`` for one bad hyperparameter."""
    raise ValueError(_message(owner, name, value, expected))


def fail_type(owner: str, name: str, value: Any, expected: str) -> None:
    """Raise the canonical :class:`HyperparameterTypeError` for a value of the wrong type."""
    raise HyperparameterTypeError(_message(owner, name, value, expected))


def _as_real(owner: str, name: str, value: Any, expected: Callable[[], str]) -> float:
    """``value`` as a float (NaN and +-inf included: the range check refuses them, naming the
    range); a number (not a bool) or a 1-element real tensor, else an error naming
    ``expected()`` (built only then: step() validates every group at every step)."""
    if type(value) is float:
        return value
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:  # torch.optim: ValueError("Tensor lr must be 1-element")
            fail(owner, name, value, f"a number or a 1-element tensor, {expected()}")
        if value.is_complex() or value.dtype == torch.bool:
            fail_type(owner, name, value, f"a real number, {expected()}")
        return float(value.item())
    if isinstance(value, bool) or not isinstance(value, Real):
        fail_type(owner, name, value, f"a real number, {expected()}")
    try:
        return float(value)
    except OverflowError:  # an int beyond float range: its sign decides which side it fails
        return math.inf if value > 0 else -math.inf


def scalar(value: Any) -> float:
    """A (validated) numeric hyperparameter as a Python float, as every step reads it: a
    tensor through ``.item()`` (``float()`` warns for one that requires grad)."""
    return value.item() if isinstance(value, torch.Tensor) else float(value)


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

    ``None`` for a bound leaves that side unbounded; ``hi=math.inf, hi_open=True`` asks for
    a finite value. NaN is always refused. The error names the range, e.g.
    ``expected 0 <= lr < inf``.
    """
    def expected() -> str:
        return range_text(name, lo, hi, lo_open=lo_open, hi_open=hi_open)

    v = _as_real(owner, name, value, expected)
    ok = not math.isnan(v)
    if lo is not None:
        ok &= v > lo if lo_open else v >= lo
    if hi is not None:
        ok &= v < hi if hi_open else v <= hi
    if not ok:
        fail(owner, name, value, expected())
    return v


def range_text(name: str, lo: float | None = None, hi: float | None = None, *,
               lo_open: bool = False, hi_open: bool = False) -> str:
    """The range as error messages and docs write it: ``0 <= lr < inf``, ``0 < eps < inf``."""
    parts = []
    if lo is not None:
        parts.append(f"{_fmt(lo)} {'<' if lo_open else '<='} ")
    parts.append(name)
    if hi is not None:
        parts.append(f" {'<' if hi_open else '<='} {_fmt(hi)}")
    if lo is None and hi is None:
        parts.append(" a number, not NaN")
    return "".join(parts)


def check_finite_nonnegative(owner: str, name: str, value: Any) -> float:
    """``0 <= value < inf``: learning rates, weight decay and other unbounded coefficients."""
    return check_range(owner, name, value, 0.0, math.inf, hi_open=True)


#: the smallest eps the classic optimizers accept: ``torch.finfo(torch.float32).tiny``, the
#: smallest normal float32 (and bfloat16). eps keeps a denominator such as ``sqrt(v) + eps``
#: away from 0 where a coordinate's gradients were all 0; a smaller eps rounds to 0 (or, with
#: flush-to-zero, is dropped) in float32/bfloat16 arithmetic and the step is 0/0 = NaN.
EPS_MIN = float(torch.finfo(torch.float32).tiny)


def check_eps(owner: str, name: str, value: Any) -> float:
    """``EPS_MIN <= value < inf``: a term that keeps a denominator away from 0."""
    return check_range(owner, name, value, EPS_MIN, math.inf, hi_open=True)


def check_bool(owner: str, name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        fail_type(owner, name, value, "True or False")
    return value


def check_betas(owner: str, betas: Any, n: int = 2, *, allow_zero_first: bool = True) -> None:
    """Betas are a length-``n`` tuple or list with every entry in ``[0, 1)`` (a number or a
    1-element tensor): another type is a :class:`HyperparameterTypeError`, another length a
    ``ValueError``."""
    expected = f"a tuple of {n} numbers in [0, 1)"
    if not isinstance(betas, (tuple, list)):
        fail_type(owner, "betas", betas, expected)
    if len(betas) != n:
        fail(owner, "betas", betas, expected)
    for i, b in enumerate(betas):
        check_range(owner, f"betas[{i}]", b, 0.0, 1.0, hi_open=True,
                    lo_open=(i == 0 and not allow_zero_first))


#: every float dtype torch stores parameters in holds values up to float16's largest, 65504:
#: a hyperparameter inside it fits whatever the parameters' dtype (the cheap common case)
_FITS_EVERY_DTYPE = float(torch.finfo(torch.float16).max)


def check_fits_dtypes(owner: str, group: dict[str, Any], keys: tuple[str, ...],
                      params: Any) -> None:
    """Refuse a hyperparameter of ``keys`` (already range-checked) whose magnitude exceeds the
    largest finite value of a parameter's dtype in ``params``: the update hands it to torch as a
    scalar in that dtype, where torch's per-tensor and foreach ops raise part-way through the
    step (``value cannot be converted to type float without overflow``) and its fused kernels
    and ``addcdiv`` write inf silently. ``weight_decay`` with ``decoupled_weight_decay=True``
    (AdamW) enters as ``lr * weight_decay``, which is what must fit. ``lr=1e300`` is in range
    for float64 parameters, not for float32 ones, so this is checked against the parameters a
    group holds: at construction, at ``add_param_group``, at ``load_state_dict`` and at every
    ``step`` (``model.half()`` after construction changes the bound), always before anything
    is written. (A huge ``eps`` is not refused: it rounds to inf in a denominator and the
    update to 0, the exact update rounded, as in torch.)

    Raises ``ValueError``, e.g. ``SGD: invalid lr=1e+300; expected |lr| <= 3.403e+38 (the
    largest float32) for float32 parameters``. Cheap when every value is at most 65504 (the
    usual case): the parameters' dtypes are read only otherwise."""
    big = []
    for k in keys:
        v = group.get(k)
        if v is None or type(v) is bool:
            continue
        x, shown = abs(scalar(v)), k  # range-checked already: a number or a 1-element tensor
        if k == "weight_decay" and group.get("decoupled_weight_decay") is True:
            x, shown = x * abs(scalar(group["lr"])), "lr * weight_decay"
        if x > _FITS_EVERY_DTYPE:
            big.append((k, v, shown, x))
    if not big:
        return
    dtypes = {(p[1] if isinstance(p, tuple) else p).dtype for p in params}
    tops = sorted((float(torch.finfo(d).max), str(d).replace("torch.", ""))
                  for d in dtypes if d.is_floating_point)
    for k, v, shown, x in big:
        for top, name in tops:
            if x > top:
                fail(owner, k, v, f"|{shown}| <= {top:.4g} (the largest {name}) for {name} "
                     "parameters: the update would overflow them")


def _fmt(x: float) -> str:
    if x == math.inf:
        return "inf"
    if float(x).is_integer():
        return str(int(x))
    return repr(x)


def refuse_unsupported(owner: str, group: dict[str, Any]) -> None:
    """Refuse torch.optim flags optimkit does not implement (``capturable``, ``differentiable``)."""
    for flag in ("capturable", "differentiable"):
        v = group.get(flag)
        try:
            on = bool(v)
        except (RuntimeError, ValueError, TypeError):  # e.g. a 2-element tensor
            fail(owner, flag, v, "False (optimkit supports neither capturable nor "
                 "differentiable steps)")
        if on:
            raise ValueError(
                f"{owner}: {flag}=True is not supported by optimkit; use torch.optim.{owner} "
                "if you need it"
            )
