"""The drop-in contract, proved by torch's own optimizer test database.

``torch.testing._internal.common_optimizers.optim_db`` ships in the torch wheel (it needs
``expecttest``). For every ``OptimizerInfo`` whose optimizer optimkit also has:

* every config of its ``optim_inputs_func`` is run by ``optimkit.<Name>`` and by
  ``torch.optim.<Name>`` on the same seeded float64 MLP, with the same batches, for
  ``STEPS`` steps, in every form torch accepts parameters in (``FORMS``); every parameter and
  the whole state_dict must agree to ``RTOL`` relative;
* every input of its ``optim_error_inputs_func`` must be refused by optimkit at the same
  phase (construction or step), with an exception of torch's type (or a subclass) whose
  message names the optimizer and the argument, or, where torch warns, with the same
  warning category. Where optimkit deliberately accepts more than torch, the input is
  instead run and must train exactly as torch does with the plain-float equivalent.

``DELIBERATE_DIFFERENCES`` (below) is the one list of where optimkit's accepted inputs
differ from torch.optim's, in both directions; docs/optimizers/README.md repeats it.

This module is written against the database, not copied from torch's test files.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

import optimkit

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # the internal test modules warn on import about optional deps
    _flags_were_frozen = torch.backends.flags_frozen()
    from torch.testing._internal.common_optimizers import (
        ErrorOptimizerInput,
        OptimizerErrorEnum,
        OptimizerInput,
        optim_db,
    )
if not _flags_were_frozen and torch.backends.flags_frozen():
    # torch's common_utils freezes the global backend flags on import (for its own suites);
    # undo that so the other test modules of this session see torch as they normally would.
    # (torch.backends is a module wrapper: the flag lives in its functions' globals)
    torch.backends.flags_frozen.__globals__["__allow_nonbracketed_mutation_flag"] = True
    assert not torch.backends.flags_frozen()

#: optimizers optimkit shares with torch.optim (matched on ``info.optim_cls.__name__``)
SHARED = ("Adadelta", "Adagrad", "Adam", "AdamW", "RAdam", "RMSprop", "SGD")
INFOS = [info for info in optim_db if info.optim_cls.__name__ in SHARED]

#: agreement demanded of optimkit vs torch.optim after STEPS float64 steps: relative, with an
#: absolute floor for entries that are (close to) zero
RTOL, ATOL = 1e-9, 1e-12
STEPS = 25


def test_database_covers_every_shared_optimizer():
    assert sorted(info.optim_cls.__name__ for info in INFOS) == sorted(SHARED)
    for name in SHARED:
        assert issubclass(getattr(optimkit, name), torch.optim.Optimizer)


# =====================================================================================
# Deliberate differences: the one place they are listed (docs/optimizers/README.md too)
# =====================================================================================
#: error inputs of torch's database that optimkit accepts on purpose, (optimizer, desc) ->
#: why. Each is run instead, and must train exactly as torch.optim with plain floats.
ACCEPTS_MORE: dict[tuple[str, str], str] = {}
for _name in ("Adam", "AdamW"):
    ACCEPTS_MORE.update({
        (_name, "lr as Tensor doesn't work with foreach & not capturable"):
            "a Tensor lr is read as a number once per step, so every implementation takes it",
        (_name, "betas must be either both floats or both Tensors"):
            "each beta is read as a number, so a float and a 1-element Tensor can be mixed",
        (_name, r"betas\[0\] as a Tensor is not supported for capturable=False and foreach=True"):
            "Tensor betas are read as numbers, so foreach=True takes them",
    })

#: inputs torch.optim accepts and optimkit refuses on purpose (every accepted hyperparameter
#: must give finite training on finite gradients, and a documented range is the checked one):
#: (optimizer, kwargs, the argument the message must name, why)
REFUSES_MORE: list[tuple[str, dict[str, Any], str, str]] = []
for _name in SHARED:
    REFUSES_MORE += [
        (_name, dict(lr=float("inf")), "lr", "an infinite step size gives inf/NaN parameters"),
        (_name, dict(lr=True), "lr", "a bool is not a learning rate (torch reads True as 1)"),
        (_name, dict(weight_decay=float("inf")), "weight_decay",
         "an infinite penalty gives inf/NaN parameters"),
    ]
for _name in ("Adagrad", "Adam", "AdamW", "RAdam", "RMSprop", "Adadelta"):
    REFUSES_MORE += [
        (_name, dict(eps=0.0), "eps",
         "eps is in a denominator that is 0 for a coordinate whose gradients were all 0 "
         "(0/0 = NaN); Adadelta's step is also stuck at 0 with eps=0"),
        (_name, dict(eps=1e-300), "eps",
         "below float32's smallest normal number eps rounds to 0 in float32 arithmetic: 0/0"),
    ]
for _name in ("Adam", "AdamW", "RAdam"):
    REFUSES_MORE.append((_name, dict(betas=torch.tensor([0.9, 0.99])), "betas",
                         "betas are a tuple (or list) of two values, not one 2-element tensor"))
REFUSES_MORE += [
    ("SGD", dict(momentum=1.5), "momentum", "momentum >= 1 makes the buffer grow without bound"),
    ("SGD", dict(momentum=0.9, dampening=-1.0), "dampening", "dampening outside [0, 1]"),
    ("Adagrad", dict(lr_decay=float("inf")), "lr_decay",
     "the decayed step lr / (1 + (t-1) lr_decay) is inf * 0 = NaN at the first step"),
    ("Adagrad", dict(initial_accumulator_value=float("inf")), "initial_accumulator_value",
     "an infinite accumulator freezes the parameters for ever"),
    ("RMSprop", dict(alpha=1.0), "alpha",
     "alpha=1 never lets a gradient into square_avg, so every step is lr * g / eps"),
    ("RMSprop", dict(alpha=1.5), "alpha", "alpha > 1 makes square_avg negative (sqrt -> NaN)"),
    ("RMSprop", dict(centered=True, alpha=0.0), "alpha",
     "centered with alpha=0 estimates the variance as exactly 0: every step is lr * g / eps"),
    ("RMSprop", dict(momentum=1.0), "momentum", "momentum >= 1 makes the buffer grow without bound"),
    ("Adadelta", dict(eps=float("inf")), "eps", "(u + inf) / (v + inf) is NaN"),
]
#: where optimkit computes more precisely than torch.optim: with a Tensor ``lr`` (or Tensor
#: betas), torch's Adam/AdamW/RAdam compute the step size ``lr / (1 - beta1^t)`` (and RAdam's
#: decoupled ``1 - lr * weight_decay``) in the *tensor's* dtype, so a float32
#: ``torch.tensor(0.001)`` rounds every step of float64 parameters to float32 precision
#: (~1e-8 relative after 25 steps here). optimkit reads the values as Python floats (double)
#: once per step. The torch.optim reference of these runs gets those tensors in float64.
TENSOR_HYPERPARAMETERS_IN_DOUBLE = ("Adam", "AdamW", "RAdam")
DELIBERATE_DIFFERENCES = dict(accepts_more=ACCEPTS_MORE, refuses_more=REFUSES_MORE,
                              tensor_hyperparameters_in_double=TENSOR_HYPERPARAMETERS_IN_DOUBLE)


# Distinct failure types, so a report names which part of the contract broke.
class EmptyStateEntries(AssertionError):
    """optimkit's state_dict has empty per-parameter entries where torch.optim has none."""


class MessageLacksOptimizerName(AssertionError):
    """The message is torch.optim.Optimizer's own, without the optimizer's name."""


# =====================================================================================
# The model, the forms of parameters, the runs
# =====================================================================================
class MLP(nn.Module):
    """A small seeded float64 MLP; two children so it splits naturally into two groups."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.l1 = nn.Linear(4, 5, dtype=torch.float64)
        self.l2 = nn.Linear(5, 3, dtype=torch.float64)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.l2(torch.tanh(self.l1(x)))


def _batches(steps: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 4, generator=g, dtype=torch.float64),
             torch.randn(8, 3, generator=g, dtype=torch.float64)) for _ in range(steps)]


BATCHES = _batches(STEPS)


def _group_overrides(cfg: OptimizerInput) -> list[dict[str, Any]]:
    """Per-group hyperparameters for the grouped forms: the config's own param groups when it
    gives any (their "params" are replaced by parts of the model), else two plain groups."""
    if isinstance(cfg.params, list) and cfg.params and all(isinstance(d, dict) for d in cfg.params):
        return [{k: v for k, v in d.items() if k != "params"} for d in cfg.params]
    return [{}, {}]


def _parts(model: MLP, n: int) -> list[Callable[[], Any]]:
    """``n`` generators over consecutive parts of the model's parameters (n = 2: l1, l2)."""
    if n == 2:
        return [model.l1.parameters, model.l2.parameters]
    ps = list(model.parameters())
    k = -(-len(ps) // n)
    return [lambda i=i: (p for p in ps[i * k:(i + 1) * k]) for i in range(n)]


def _form_list(cls, model, cfg, kw):
    return cls(list(model.parameters()), **kw)


def _form_generator(cls, model, cfg, kw):
    return cls(model.parameters(), **kw)


def _form_groups_of_generators(cls, model, cfg, kw):
    over = _group_overrides(cfg)
    gens = _parts(model, len(over))
    return cls([{"params": gen(), **copy.deepcopy(o)} for gen, o in zip(gens, over)], **kw)


def _form_named(cls, model, cfg, kw):
    return cls(model.named_parameters(), **kw)


def _form_add_param_group(cls, model, cfg, kw):
    over = _group_overrides(cfg)
    gens = _parts(model, len(over))
    opt = cls([{"params": gens[0](), **copy.deepcopy(over[0])}], **kw)
    for gen, o in zip(gens[1:], over[1:]):
        opt.add_param_group({"params": gen(), **copy.deepcopy(o)})
    return opt


#: every way torch.optim accepts parameters
FORMS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "list": _form_list,
    "generator": _form_generator,
    "groups-of-generators": _form_groups_of_generators,
    "named-parameters": _form_named,
    "add_param_group-generator": _form_add_param_group,
}


def _train(opt: torch.optim.Optimizer, model: MLP) -> None:
    for x, y in BATCHES:
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()


def _assert_close(a: Any, b: Any, where: str, *, as_numbers: bool = False) -> None:
    """``a`` (optimkit's) agrees with ``b`` (torch's); ``as_numbers``: a 1-element tensor and
    a number holding the same value agree (hyperparameters given in another form)."""
    if as_numbers and not isinstance(a, (list, tuple, bool, type(None))):
        if isinstance(a, (int, float, torch.Tensor)) and isinstance(b, (int, float, torch.Tensor)):
            if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
                assert a.shape == b.shape, f"{where}: shape {tuple(a.shape)} vs torch's {tuple(b.shape)}"
            assert float(a) == float(b), f"{where}: {a!r} vs torch's {b!r}"
            return
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        assert isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor), (
            f"{where}: {type(a).__name__} vs torch's {type(b).__name__}")
        torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL, msg=lambda m: f"{where}: {m}")
    elif isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), f"{where}: {a!r} vs torch's {b!r}"
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_close(x, y, f"{where}[{i}]", as_numbers=as_numbers)
    else:
        assert a == b and type(a) is type(b), f"{where}: {a!r} vs torch's {b!r}"


def assert_same_state_dict(ours: torch.optim.Optimizer, theirs: torch.optim.Optimizer, *,
                           groups_as_numbers: bool = False) -> None:
    """The two state_dicts agree: the same keys everywhere, every value close (group
    hyperparameters compared as numbers with ``groups_as_numbers``)."""
    sa, sb = ours.state_dict(), theirs.state_dict()
    assert sa.keys() == sb.keys()
    assert len(sa["param_groups"]) == len(sb["param_groups"])
    for i, (ga, gb) in enumerate(zip(sa["param_groups"], sb["param_groups"])):
        assert ga.keys() == gb.keys(), f"param group {i} keys: {sorted(ga)} vs torch's {sorted(gb)}"
        for k in ga:
            _assert_close(ga[k], gb[k], f"param_groups[{i}][{k!r}]", as_numbers=groups_as_numbers)
    if sa["state"].keys() != sb["state"].keys():
        extra = set(sa["state"]) - set(sb["state"])
        if set(sb["state"]) <= set(sa["state"]) and all(sa["state"][k] == {} for k in extra):
            raise EmptyStateEntries(f"empty state entries for parameters {sorted(extra)}")
    assert sa["state"].keys() == sb["state"].keys()
    for pid in sa["state"]:
        a, b = sa["state"][pid], sb["state"][pid]
        assert a.keys() == b.keys(), f"state[{pid}] keys: {sorted(a)} vs torch's {sorted(b)}"
        for k in a:
            _assert_close(a[k], b[k], f"state[{pid}][{k!r}]")


def _in_double(name: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """torch's kwargs for a run optimkit gets ``kwargs``: Tensor hyperparameters in float64
    for the optimizers of ``TENSOR_HYPERPARAMETERS_IN_DOUBLE`` (see there), else unchanged."""
    def has_tensor(v: Any) -> bool:
        return isinstance(v, torch.Tensor) or isinstance(v, tuple) and any(map(has_tensor, v))

    if name not in TENSOR_HYPERPARAMETERS_IN_DOUBLE or not any(map(has_tensor, kwargs.values())):
        return kwargs

    def f64(v: Any) -> Any:
        if isinstance(v, torch.Tensor):
            return v.to(torch.float64)
        return tuple(f64(x) for x in v) if isinstance(v, tuple) else v

    return {k: f64(v) for k, v in kwargs.items()}


def run_both(name: str, cfg: OptimizerInput, form: str, kwargs: dict[str, Any],
             torch_kwargs: dict[str, Any] | None = None) -> tuple[torch.optim.Optimizer, ...]:
    """optimkit.<name>(kwargs) and torch.optim.<name>(torch_kwargs, by default ``kwargs``
    with ``_in_double``), each on its own copy of the model in ``form``, trained on the same
    batches; asserts every parameter and the state_dicts agree."""
    make = FORMS[form]
    if torch_kwargs is None:
        torch_kwargs = _in_double(name, kwargs)
    ours_model, their_model = MLP(), MLP()
    ours = make(getattr(optimkit, name), ours_model, cfg, copy.deepcopy(kwargs))
    theirs = make(getattr(torch.optim, name), their_model, cfg, copy.deepcopy(torch_kwargs))
    assert [len(g["params"]) for g in ours.param_groups] == [len(g["params"]) for g in theirs.param_groups]
    _train(ours, ours_model)
    _train(theirs, their_model)
    for (pname, pa), pb in zip(ours_model.named_parameters(), their_model.parameters()):
        torch.testing.assert_close(pa, pb, rtol=RTOL, atol=ATOL, msg=lambda m: f"{pname}: {m}")
    assert_same_state_dict(ours, theirs, groups_as_numbers=torch_kwargs is not kwargs)
    return ours, theirs


# =====================================================================================
# (a) every config x every form of parameters
# =====================================================================================
def _same_kwargs(a: dict[str, Any], b: dict[str, Any]) -> bool:
    if a.keys() != b.keys():
        return False
    for k in a:
        x, y = a[k], b[k]
        if isinstance(x, (tuple, list)) and isinstance(y, (tuple, list)):
            if len(x) != len(y) or not all(_same_kwargs({0: u}, {0: v}) for u, v in zip(x, y)):
                return False
        elif isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor):
            if not (isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor)
                    and x.shape == y.shape and torch.equal(x, y)):
                return False
        elif x != y:
            return False
    return True


def _configs(info) -> list[tuple[str, OptimizerInput]]:
    """The CPU configs of ``info``, plus the CPU content of its CUDA-only ones.

    ``optim_inputs_func(device="cpu")`` leaves out the configs that need a CUDA device: those
    set ``capturable=True`` (CUDA-graph capture; optimkit refuses it, as it does
    ``differentiable=True``). They are the database's only configs with a Tensor lr or Tensor
    betas for most optimizers, so their other hyperparameters are kept and run on the CPU
    with ``capturable`` dropped (labelled "[capturable dropped]"); duplicates of a CPU config
    are left out. Any config setting ``differentiable``/``fused``/``foreach`` is skipped:
    those are implementation flags, never part of a config, and optimkit refuses
    ``differentiable=True``.
    """
    out: list[tuple[str, OptimizerInput]] = []
    for cfg in info.optim_inputs_func(device="cpu", dtype=torch.float64):
        if any(cfg.kwargs.get(f) for f in ("capturable", "differentiable", "fused", "foreach")):
            continue  # see the docstring
        out.append((cfg.desc, cfg))
    for cfg in info.optim_inputs_func(device="cuda", dtype=torch.float64):
        kw = {k: v for k, v in cfg.kwargs.items() if k != "capturable"}
        if not cfg.kwargs.get("capturable") or any(kw.get(f) for f in ("differentiable", "fused")):
            continue  # a CUDA config that is not capturable is also in the CPU list
        if any(_same_kwargs(kw, c.kwargs) for _, c in out):
            continue
        out.append((f"{cfg.desc} [capturable dropped]", OptimizerInput(cfg.params, kw, cfg.desc)))
    return out


def _config_marks(name: str, cfg: OptimizerInput) -> list[Any]:
    return []  # none left: empty state entries and unnamed messages were fixed in _base.py


CONFIG_CASES = [
    pytest.param(info.optim_cls.__name__, cfg, form, id=f"{info.optim_cls.__name__}-{desc}-{form}",
                 marks=_config_marks(info.optim_cls.__name__, cfg))
    for info in INFOS
    for desc, cfg in _configs(info)
    for form in FORMS
]


def test_tensor_lr_is_covered():
    """Configs with a Tensor lr are run (not skipped) for every optimizer that has one."""
    with_tensor_lr = {name for name, cfg, _ in (c.values for c in CONFIG_CASES)
                      if isinstance(cfg.kwargs.get("lr"), torch.Tensor)}
    assert with_tensor_lr == set(SHARED)


@pytest.mark.parametrize("name,cfg,form", CONFIG_CASES)
def test_config_matches_torch(name, cfg, form):
    ours, theirs = run_both(name, cfg, form, cfg.kwargs)
    if form == "named-parameters":
        for ga, gb in zip(ours.state_dict()["param_groups"], theirs.state_dict()["param_groups"]):
            assert ga["param_names"] == gb["param_names"] == [n for n, _ in MLP().named_parameters()]


# =====================================================================================
# (b) every error input
# =====================================================================================
ERROR_CASES = [
    pytest.param(info.optim_cls.__name__, err,
                 id=f"{info.optim_cls.__name__}-{i}-{err.optimizer_error_input.desc}",
                 marks=[])
    for info in INFOS
    for i, err in enumerate(info.optim_error_inputs_func(device="cpu", dtype=torch.float32))
]


def _params_of(err: ErrorOptimizerInput) -> Any:
    p = err.optimizer_error_input.params
    return [nn.Parameter(torch.randn(2, 2))] if p is None else p


def _bad_arguments(name: str, err: ErrorOptimizerInput) -> list[str]:
    """The argument(s) the input gets wrong: the keywords whose removal makes torch accept
    it; "param" when only the parameters are wrong."""
    kwargs = err.optimizer_error_input.kwargs
    out = []
    for k in kwargs:
        rest = {j: v for j, v in kwargs.items() if j != k}
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                getattr(torch.optim, name)([nn.Parameter(torch.randn(2))], **rest)
        except Exception:  # noqa: BLE001 - still refused without k: k is not (alone) the culprit
            continue
        out.append(k)
    return out or ["param"]


def _step(opt: torch.optim.Optimizer) -> None:
    for g in opt.param_groups:
        for p in g["params"]:
            p.grad = torch.ones_like(p)
    opt.step()


@pytest.mark.parametrize("name,err", ERROR_CASES)
def test_error_input_is_refused_at_the_same_phase(name, err):
    oi = err.optimizer_error_input
    cls = getattr(optimkit, name)
    if (name, oi.desc) in ACCEPTS_MORE:
        # accepted on purpose: it must train exactly as torch with the plain-float equivalent
        floats = {k: (float(v) if isinstance(v, torch.Tensor) else
                      tuple(float(b) for b in v) if k == "betas" else v)
                  for k, v in oi.kwargs.items()}
        run_both(name, oi, "list", oi.kwargs, torch_kwargs=floats)
        return
    assert err.error_on in (OptimizerErrorEnum.CONSTRUCTION_ERROR, OptimizerErrorEnum.STEP_ERROR)
    at_step = err.error_on == OptimizerErrorEnum.STEP_ERROR

    def trigger() -> None:
        opt = cls(_params_of(err), **oi.kwargs)
        if at_step:
            _step(opt)

    if issubclass(err.error_type, Warning):
        with pytest.warns(err.error_type) as record:
            trigger()
        msg = " | ".join(str(w.message) for w in record if issubclass(w.category, err.error_type))
    else:
        if at_step:  # construction must succeed; the step must fail
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                opt = cls(_params_of(err), **oi.kwargs)
            with pytest.raises(Exception) as exc_info:
                _step(opt)
        else:
            with pytest.raises(Exception) as exc_info:
                trigger()
        exc = exc_info.value
        assert isinstance(exc, err.error_type), (
            f"optimkit raised {type(exc).__name__}({exc}); torch raises {err.error_type.__name__}")
        msg = str(exc)
    if name not in msg:
        raise MessageLacksOptimizerName(f"the message does not name {name}: {msg!r}")
    args = _bad_arguments(name, err)
    assert any(a in msg for a in args), f"the message names none of {args}: {msg!r}"


@pytest.mark.parametrize("name,kwargs,arg,why", [
    pytest.param(*row, id=f"{row[0]}-" + ",".join(f"{k}={v!r}" for k, v in row[1].items()))
    for row in REFUSES_MORE
])
def test_refuses_more_than_torch(name, kwargs, arg, why):
    """torch.optim accepts these (so the list stays honest); optimkit refuses them with a
    ValueError (or a TypeError that is also one) naming the optimizer and the argument."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        getattr(torch.optim, name)([nn.Parameter(torch.randn(2))], **kwargs)
    with pytest.raises(ValueError) as exc_info:
        getattr(optimkit, name)([nn.Parameter(torch.randn(2))], **kwargs)
    msg = str(exc_info.value)
    assert msg.startswith(f"{name}: invalid {arg}") or f"{name}: invalid " in msg and arg in msg, msg
