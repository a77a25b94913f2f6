"""``create_optimizer``: build any optimizer from a name or a class path and checked arguments.

Names come from the registry (case-insensitive, aliases, ``lookahead_<name>``); anything with a
dot is a class path imported as sd-scripts does (``torch.optim.NAdam``, ``prodigyopt.Prodigy``,
``mypkg.MyOpt``). Every argument is checked against the class's signature and coerced to the
type its annotation (or default) says; an unknown argument raises with a suggestion. Nothing
is ever dropped silently; value ranges are left to the optimizer's own validation.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import logging
from collections.abc import Iterable, Mapping
from numbers import Real
from typing import Any

import torch
from torch import Tensor, nn

from .._validation import fail
from ..wrappers.lookahead import Lookahead
from .args import parse_optimizer_args, parse_value
from .groups import param_groups
from .registry import LOOKAHEAD_PREFIX, OptimizerSpec, get_spec, unknown_name_message

__all__ = ["create_optimizer", "resolve_optimizer"]

_log = logging.getLogger(__name__)
_LOOKAHEAD_ARGS = ("k", "alpha", "pullback_momentum")
_LA = "Lookahead"


def resolve_optimizer(name: str | type) -> tuple[type, OptimizerSpec | None, bool]:
    """``(class, registry spec or None, wrapped in Lookahead?)`` for a name or class path."""
    if isinstance(name, type):
        _check_optimizer_class(name, name.__name__)
        return name, None, False
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"optimizer name must be a non-empty string, got {name!r}")
    raw = name.strip()
    lookahead = raw.lower().startswith(LOOKAHEAD_PREFIX)
    if lookahead:
        raw = raw[len(LOOKAHEAD_PREFIX):]
    if "." in raw:
        return _import_class(raw), None, lookahead
    try:
        spec = get_spec(raw)
    except ValueError:
        raise ValueError(unknown_name_message(name)) from None
    return spec.cls, spec, lookahead


def _import_class(path: str) -> type:
    """``"pkg.module.Class"`` -> the class, imported the way sd-scripts does it."""
    module_name, _, cls_name = path.rpartition(".")
    if not module_name or not cls_name:
        raise ValueError(f"invalid optimizer class path {path!r}; expected 'module.ClassName'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"cannot import module {module_name!r} for optimizer {path!r}: {e}") from None
    cls = getattr(module, cls_name, None)
    if cls is None:
        options = [n for n in dir(module) if not n.startswith("_")]
        close = difflib.get_close_matches(cls_name, options, n=3)
        hint = f" Did you mean {' or '.join(repr(f'{module_name}.{c}') for c in close)}?" if close else ""
        raise ValueError(f"module {module_name!r} has no optimizer class {cls_name!r}.{hint}")
    _check_optimizer_class(cls, path)
    return cls


def _check_optimizer_class(cls: Any, path: str) -> None:
    if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
        raise ValueError(f"{path!r} is not a torch.optim.Optimizer subclass (got {cls!r})")
    if issubclass(cls, Lookahead):
        raise ValueError(
            f"{path!r} is a wrapper, not an optimizer; prefix the base optimizer's name with "
            f"{LOOKAHEAD_PREFIX!r} instead (e.g. 'lookahead_adamw')"
        )


def create_optimizer(
    name: str | type,
    params_or_model: nn.Module | Iterable[Tensor] | Iterable[dict[str, Any]],
    lr: float | None = None,
    optimizer_args: str | Iterable[str] | Mapping[str, Any] | None = None,
    **kwargs: Any,
) -> torch.optim.Optimizer:
    """Build an optimizer by name.

    Args:
        name: a registry name or alias, any case (``"adamw"``, ``"SGDNesterov"``), optionally
            prefixed ``"lookahead_"``; or a dotted class path (``"torch.optim.NAdam"``,
            ``"prodigyopt.Prodigy"``, ``"mypkg.MyOpt"``); or an optimizer class.
        params_or_model: an ``nn.Module`` (then :func:`param_groups` builds the groups: no weight
            decay on biases and normalisation weights), or parameters / param groups as for any
            torch optimizer.
        lr: learning rate. ``None``: the registry's ``default_lr`` for a registry name (e.g.
            0.1 for ``sgd``, 1e-3 for ``adamw``, 1.0 for ``prodigy``), the class's own default
            for a class path.
        optimizer_args: text arguments as :func:`parse_optimizer_args` accepts them (a list of
            ``"key=value"``, one comma-separated string, or a dict). For ``lookahead_<name>``,
            ``k``, ``alpha``, ``pullback_momentum`` (or ``lookahead_k`` ...) configure the
            wrapper; a plain name the base optimizer also takes (RMSprop's ``alpha``) goes to
            the base, the ``lookahead_`` spelling always to the wrapper.
        **kwargs: more constructor arguments (typed Python values). The same argument given in
            two places raises.

    Returns:
        the constructed optimizer (a :class:`optimkit.Lookahead` for ``lookahead_<name>``).

    Raises:
        ValueError: unknown optimizer or argument (with a "did you mean" suggestion and the valid
            names), a value of the wrong type (naming the argument), or an out-of-range value
            (from the optimizer's own validation).

    Example:
        >>> model = torch.nn.Linear(4, 2)
        >>> opt = create_optimizer("prodigy", model, optimizer_args=["d_coef=0.5", "betas=0.9,0.99"])
    """
    cls, spec, lookahead = resolve_optimizer(name)
    owner = cls.__name__
    args = parse_optimizer_args(optimizer_args)
    both = sorted(set(args) & set(kwargs))
    if both:
        raise ValueError(f"{owner}: argument(s) {both} given both in optimizer_args and as keywords")
    merged: dict[str, Any] = {**args, **kwargs}
    if "lr" in merged:
        if lr is not None:
            raise ValueError(f"{owner}: lr given twice (lr={lr!r} and lr={merged['lr']!r} in the arguments)")
        lr = merged.pop("lr")

    sig_params, var_kw = _signature(cls)
    la_kwargs: dict[str, Any] = {}
    if lookahead:
        la_sig, _ = _signature(Lookahead)
        for key in _LOOKAHEAD_ARGS:
            for spelled in (LOOKAHEAD_PREFIX + key, key):
                if spelled not in merged or (spelled == key and key in sig_params):
                    continue
                if key in la_kwargs:
                    raise ValueError(f"{_LA}: {key!r} given twice (as {key!r} and {LOOKAHEAD_PREFIX + key!r})")
                la_kwargs[key] = _coerce(_LA, key, merged.pop(spelled), la_sig[key])

    final: dict[str, Any] = dict(spec.preset) if spec is not None else {}
    for key, value in merged.items():
        if key not in sig_params:
            if var_kw:  # the class takes **kwargs: only it can say what it accepts
                final[key] = value
                continue
            raise ValueError(_unknown_arg(owner, key, sig_params, lookahead))
        final[key] = _coerce(owner, key, value, sig_params[key])
    if lr is None and spec is not None:
        lr = spec.default_lr
        if lr is not None:
            _log.info("%s: no lr given; using the registry default lr=%g", spec.name, lr)
    if lr is not None:
        if "lr" not in sig_params and not var_kw:
            raise ValueError(f"{owner} takes no lr argument (got lr={lr!r})")
        final["lr"] = _coerce(owner, "lr", lr, sig_params["lr"]) if "lr" in sig_params else lr

    params: Any = params_or_model
    if isinstance(params_or_model, nn.Module):
        if "weight_decay" in sig_params:
            wd = final.get("weight_decay", sig_params["weight_decay"].default)
            params = param_groups(params_or_model, weight_decay=None if wd is inspect.Parameter.empty else wd)
        else:
            params = [p for p in params_or_model.parameters() if p.requires_grad]
            if not params:
                raise ValueError(f"{owner}: the model has no trainable parameters")
    opt = cls(params, **final)
    return Lookahead(opt, **la_kwargs) if lookahead else opt



def _signature(cls: type) -> tuple[dict[str, inspect.Parameter], bool]:
    """Named constructor arguments after ``params``, and whether ``**kwargs`` is taken."""
    sig = inspect.signature(cls)
    named: dict[str, inspect.Parameter] = {}
    var_kw = False
    for i, p in enumerate(sig.parameters.values()):
        if p.kind is inspect.Parameter.VAR_KEYWORD:
            var_kw = True
        elif p.kind is inspect.Parameter.VAR_POSITIONAL or i == 0:
            continue  # the first argument is params (or the base optimizer)
        else:
            named[p.name] = p
    return named, var_kw


def _unknown_arg(owner: str, key: str, valid: Mapping[str, Any], lookahead: bool) -> str:
    names = sorted(valid) + ([LOOKAHEAD_PREFIX + k for k in _LOOKAHEAD_ARGS] if lookahead else [])
    close = difflib.get_close_matches(key, names, n=3, cutoff=0.6)
    hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    return f"{owner}: unknown argument {key!r}.{hint} Valid arguments: {', '.join(names)}"


# ------------------------------------------------------------------------- coercion
#: dtype spellings accepted where a parameter is a dtype (``state_dtype=bf16``)
DTYPE_NAMES: dict[str, torch.dtype] = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "float64": torch.float64, "fp64": torch.float64, "double": torch.float64,
}


def _kinds(param: inspect.Parameter) -> set[str]:
    """What a value may be, from the annotation if there is one, else from the default.

    Returns a subset of {"bool", "int", "float", "str", "tuple", "Tensor", "None", "any"}.
    """
    ann = param.annotation
    if ann is not inspect.Parameter.empty:
        text = ann if isinstance(ann, str) else inspect.formatannotation(ann)
        return _kinds_of_annotation(text)
    d = param.default
    if d is inspect.Parameter.empty or d is None:
        return {"any"}
    if isinstance(d, bool):
        return {"bool"}
    if isinstance(d, int):
        return {"int", "float"}  # unannotated 0 often means a float (weight_decay=0)
    if isinstance(d, float):
        return {"float"}
    if isinstance(d, str):
        return {"str"}
    if isinstance(d, (tuple, list)):
        return {"tuple"}
    if isinstance(d, torch.dtype):
        return {"dtype"}
    return {"any"}


_HEADS = {
    "bool": "bool", "int": "int", "float": "float", "str": "str", "Tensor": "Tensor",
    "None": "None", "NoneType": "None", "tuple": "tuple", "Tuple": "tuple", "list": "tuple",
    "List": "tuple", "Sequence": "tuple", "Iterable": "tuple", "dtype": "dtype",
}


def _kinds_of_annotation(text: str) -> set[str]:
    kinds: set[str] = set()
    for alt in _split_union(text):
        head = alt.split("[", 1)[0].strip().split(".")[-1]
        if head in ("Optional", "Union"):
            kinds |= _kinds_of_annotation(alt[alt.index("[") + 1: alt.rindex("]")])
            if head == "Optional":
                kinds.add("None")
        elif head == "Literal":
            kinds.add("str")
        else:
            kinds.add(_HEADS.get(head, "any"))
    return kinds


def _split_union(text: str) -> list[str]:
    parts, depth, start = [], 0, 0
    for i, c in enumerate(text):
        if c == "[":
            depth += 1
        elif c == "]":
            depth -= 1
        elif c == "|" and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [p.strip() for p in parts if p.strip()]


def _expected(kinds: set[str], default: Any) -> str:
    words = {
        "bool": "True or False", "int": "an integer", "float": "a number", "str": "a string",
        "Tensor": "a tensor", "None": "None",
        "dtype": f"a dtype ({', '.join(sorted(DTYPE_NAMES))})",
        "tuple": (f"a tuple of {len(default)} numbers" if isinstance(default, tuple) else "a tuple"),
    }
    if {"int", "float"} <= kinds:
        kinds = kinds - {"int"}
    order = ("bool", "int", "float", "tuple", "str", "dtype", "Tensor", "None")
    return " or ".join(words[k] for k in order if k in kinds)


def _coerce(owner: str, name: str, value: Any, param: inspect.Parameter) -> Any:
    """Check ``value`` against the parameter's type and convert it (int -> float, list -> tuple)."""
    kinds = _kinds(param)
    default = param.default
    if "any" in kinds:
        return value
    if value is None:
        if "None" in kinds or default is None:
            return None
    elif isinstance(value, torch.dtype):
        if "dtype" in kinds:
            return value
    elif isinstance(value, Tensor):
        if "Tensor" in kinds:
            return value
    elif isinstance(value, bool):
        if "bool" in kinds:
            return value
    elif isinstance(value, str):
        if "str" in kinds:
            return value
        if "dtype" in kinds:  # "bfloat16", "bf16", "torch.bfloat16"
            dt = DTYPE_NAMES.get(value.strip().lower().removeprefix("torch."))
            # an unknown name goes to the class as given: its own check (state_dtype's)
            # names the values it accepts, so the factory and the class say the same thing
            return value if dt is None else dt
        # text given through a dict ({"lr": "1e-3"}): parse it like optimizer_args would
        try:
            parsed = parse_value(value)
        except ValueError:
            parsed = value
        if not isinstance(parsed, str):
            return _coerce(owner, name, parsed, param)
    elif isinstance(value, (tuple, list)):
        if "tuple" in kinds:
            if isinstance(default, tuple) and len(value) != len(default):
                fail(owner, name, value, _expected(kinds, default))
            out = []
            for i, v in enumerate(value):
                like = default[i] if isinstance(default, tuple) else None
                if isinstance(like, float) and isinstance(v, Real) and not isinstance(v, bool):
                    v = float(v)
                elif isinstance(like, float) and not isinstance(v, Tensor):
                    fail(owner, f"{name}[{i}]", v, "a number")
                out.append(v)
            return tuple(out)
    elif isinstance(value, Real):
        if "float" in kinds and "int" in kinds:
            return value
        if "float" in kinds:
            return float(value)
        if "int" in kinds:
            if isinstance(value, int):
                return value
            if float(value).is_integer():
                return int(value)
    fail(owner, name, value, _expected(kinds, default))
    raise AssertionError  # unreachable: fail raises

