"""The drop-in contract over every optimizer, ``flat=True`` and Lookahead, for the kinds of fault
found by using optimkit as people do:

* every way torch.optim accepts parameters (generators in param-group dicts, ``add_param_group``
  with a generator, named parameters, ``filter``) gives the same optimizer as a list;
* ``load_state_dict`` runs the pre-hooks first (as torch.optim does), then refuses a malformed
  or foreign state_dict before anything changes: parameters, state, group values, Lookahead's
  slow weights and torch's RNG state are bit for bit as they were, and the optimizer still
  steps exactly as one that never saw the bad checkpoint.

torch.optim's own database (tests/test_torch_optim_db.py) covers the seven classes torch has;
this module covers every optimkit optimizer with the same forms.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

import harness
import optimkit
from optimkit._rounding import RNG_KEY

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

MAKERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "SGD": lambda ps, **kw: optimkit.SGD(ps, lr=0.05, momentum=0.9, weight_decay=1e-2, **kw),
    "Adagrad": lambda ps, **kw: optimkit.Adagrad(ps, lr=0.05, lr_decay=1e-3, **kw),
    "RMSprop": lambda ps, **kw: optimkit.RMSprop(ps, lr=1e-2, momentum=0.5, centered=True, **kw),
    "Adam": lambda ps, **kw: optimkit.Adam(ps, lr=1e-2, amsgrad=True, **kw),
    "AdamW": lambda ps, **kw: optimkit.AdamW(ps, lr=1e-2, **kw),
    "AdamW-bf16-state": lambda ps, **kw: optimkit.AdamW(ps, lr=1e-2, state_dtype=torch.bfloat16, **kw),
    "RAdam": lambda ps, **kw: optimkit.RAdam(ps, lr=1e-2, weight_decay=1e-2, **kw),
    "Adadelta": lambda ps, **kw: optimkit.Adadelta(ps, lr=1.0, weight_decay=1e-2, **kw),
    "Prodigy": lambda ps, **kw: optimkit.Prodigy(ps, weight_decay=1e-2, **kw),
    "Prodigy-bf16-state": lambda ps, **kw: optimkit.Prodigy(ps, state_dtype=torch.bfloat16, **kw),
}
VARIANTS = ["plain", "flat", "lookahead"]


def _build(name: str, variant: str, params: Any) -> torch.optim.Optimizer:
    torch.manual_seed(42)  # stochastic-rounding generators are seeded from torch's RNG
    opt = MAKERS[name](params, **({"flat": True} if variant == "flat" else {}))
    return optimkit.Lookahead(opt, k=2) if variant == "lookahead" else opt


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double()


def _train(model: nn.Module, opt: torch.optim.Optimizer, steps: int, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        opt.zero_grad()
        model(torch.randn(16, 6, generator=g, dtype=torch.float64)).pow(2).mean().backward()
        opt.step()


# ------------------------------------------------------------------ forms of parameters
FORMS: dict[str, Callable[[nn.Module, Callable[[Any], torch.optim.Optimizer]], torch.optim.Optimizer]] = {
    "list-of-group-lists": lambda m, mk: mk([{"params": list(m[0].parameters())},
                                            {"params": list(m[2].parameters()), "weight_decay": 0.0}]),
    "group-generators": lambda m, mk: mk([{"params": m[0].parameters()},
                                         {"params": m[2].parameters(), "weight_decay": 0.0}]),
    "group-generator-expressions": lambda m, mk: mk([
        {"params": (p for p in m[0].parameters())},
        {"params": filter(lambda p: p.requires_grad, m[2].parameters()), "weight_decay": 0.0}]),
    "add_param_group-generator": lambda m, mk: _add_later(m, mk),
    "named-group-generators": lambda m, mk: mk([{"params": m[0].named_parameters()},
                                               {"params": m[2].named_parameters(), "weight_decay": 0.0}]),
}


def _add_later(m: nn.Module, mk: Callable[[Any], torch.optim.Optimizer]) -> torch.optim.Optimizer:
    opt = mk(m[0].parameters())
    opt.add_param_group({"params": m[2].parameters(), "weight_decay": 0.0})
    return opt


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("form", [f for f in FORMS if f != "list-of-group-lists"])
@pytest.mark.parametrize("name", list(MAKERS))
def test_every_param_form_builds_the_same_optimizer(name, form, variant):
    """The PyTorch docs' per-layer idiom ``[{"params": model.base.parameters()}, ...]`` passes
    generators; each group must hold its parameters and train them exactly as lists do."""
    def mk(ps: Any) -> torch.optim.Optimizer:
        return _build(name, variant, ps)

    ref_model, model = _model(), _model()
    ref = FORMS["list-of-group-lists"](ref_model, mk)
    opt = FORMS[form](model, mk)
    assert [len(g["params"]) for g in opt.param_groups] == [2, 2]
    assert all(isinstance(g["params"], list) for g in opt.param_groups)
    _train(ref_model, ref, 6)
    _train(model, opt, 6)
    for a, b in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    if form.startswith("named"):
        names = [g.get("param_names") for g in opt.state_dict()["param_groups"]]
        assert names == [["weight", "bias"], ["weight", "bias"]]


@pytest.mark.parametrize("name", list(MAKERS))
def test_a_set_of_parameters_is_refused_as_torch_refuses_it(name):
    p = nn.Parameter(torch.zeros(3))
    with pytest.raises(TypeError, match="set"):
        MAKERS[name]([{"params": {p}}])
    with pytest.raises(TypeError):
        torch.optim.SGD([{"params": {p}}])


# -------------------------------------------------------------------- load_state_dict
def _snapshot(opt: torch.optim.Optimizer) -> dict[str, Any]:
    snap = harness.snapshot(opt)
    snap["rng"] = torch.get_rng_state()
    if isinstance(opt, optimkit.Lookahead):
        snap["slow"] = {id(p): copy.deepcopy(dict(st)) for p, st in opt._slow.items()}
        snap["la"] = (opt.k, opt.alpha, opt.pullback_momentum, opt._lookahead_step)
    base = getattr(opt, "base", opt)
    rr = getattr(base, "_rounding_rng", None)
    if rr is not None:
        snap["rounding"] = copy.deepcopy(rr.state_dict())
    return snap


def _assert_unchanged(opt: torch.optim.Optimizer, before: dict[str, Any]) -> None:
    harness.assert_unchanged(opt, before)
    now = _snapshot(opt)
    assert torch.equal(before["rng"], now["rng"]), "torch's RNG state changed"
    for key in ("slow", "la", "rounding"):
        assert harness.bitwise_equal(before.get(key), now.get(key)), f"{key} changed"


def _first_state(sd: dict[str, Any]) -> dict[str, Any]:
    return sd["state"][min(sd["state"])]


def _tensor_key(st: dict[str, Any]) -> str:
    return next(k for k, v in st.items() if isinstance(v, torch.Tensor) and v.dim() > 0 and k != "p0")


def _bad_step(value: Any) -> Callable[[dict[str, Any]], None]:
    def f(sd: dict[str, Any]) -> None:
        st = _first_state(sd)
        if "step" not in st:
            pytest.skip("this optimizer keeps no step counter")
        st["step"] = torch.tensor(value) if isinstance(st["step"], torch.Tensor) else value
    return f


def _foreign_key(sd: dict[str, Any]) -> None:
    st = _first_state(sd)
    k = _tensor_key(st)
    st["s" if "s" not in st else "momentum_buffer"] = st[k].clone()


def _int_state(sd: dict[str, Any]) -> None:
    st = _first_state(sd)
    k = _tensor_key(st)
    st[k] = st[k].to(torch.int64)


def _wrong_shape(sd: dict[str, Any]) -> None:
    st = _first_state(sd)
    k = _tensor_key(st)
    st[k] = torch.zeros(st[k].numel() + 1, dtype=st[k].dtype)


def _bad_rng(sd: dict[str, Any]) -> None:
    if RNG_KEY not in sd:
        pytest.skip("no stochastic-rounding generators")
    sd[RNG_KEY] = {"seed": sd[RNG_KEY]["seed"], "generators": {"cpu": torch.zeros(3, dtype=torch.uint8)}}


def _bad_group_value(sd: dict[str, Any]) -> None:
    sd["param_groups"][1]["lr"] = -1.0


def _lookahead_entry(sd: dict[str, Any]) -> None:
    if "lookahead" in sd:
        sd.pop("lookahead")  # a bare optimizer's state_dict into a Lookahead
    else:
        sd["lookahead"] = {"k": 2, "alpha": 0.5, "pullback_momentum": "none", "step": 0,
                           "slow_state": {}}


def _foreign_last(sd: dict[str, Any]) -> None:
    # the error is in the LAST parameter's state: everything before it must not be loaded
    st = sd["state"][max(sd["state"])]
    k = _tensor_key(st)
    st[k] = torch.zeros(st[k].numel() + 2, dtype=st[k].dtype)


BAD: dict[str, Callable[[dict[str, Any]], None]] = {
    "step=-1": _bad_step(-1),
    "step=1.5": _bad_step(1.5),
    "step=nan": _bad_step(float("nan")),
    "step=inf": _bad_step(float("inf")),
    "another optimizer's key": _foreign_key,
    "integer state tensor": _int_state,
    "wrong shape": _wrong_shape,
    "wrong shape in the last parameter": _foreign_last,
    "bad rounding generator": _bad_rng,
    "invalid group value": _bad_group_value,
    "Lookahead and bare mixed up": _lookahead_entry,
}


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("bad", list(BAD))
@pytest.mark.parametrize("name", list(MAKERS))
def test_rejected_load_changes_nothing(name, bad, variant):
    model = _model()
    opt = _build(name, variant, [{"params": list(model[0].parameters())},
                                 {"params": list(model[2].parameters())}])
    _train(model, opt, 3)
    sd = copy.deepcopy(opt.state_dict())
    BAD[bad](sd)
    _train(model, opt, 1, seed=7)  # the live optimizer differs from the checkpoint
    before = _snapshot(opt)
    with pytest.raises(ValueError) as err:
        opt.load_state_dict(sd)
    assert type(getattr(opt, "base", opt)).__name__ in str(err.value) or "Lookahead" in str(err.value)
    _assert_unchanged(opt, before)
    # and it still steps exactly as a twin that never saw the bad checkpoint
    twin_model = _model()
    twin = _build(name, variant, [{"params": list(twin_model[0].parameters())},
                                  {"params": list(twin_model[2].parameters())}])
    _train(twin_model, twin, 3)
    _train(twin_model, twin, 1, seed=7)
    if hasattr(getattr(twin, "base", twin), "_rounding_rng") and getattr(twin, "base", twin)._rounding_rng:
        getattr(twin, "base", twin)._rounding_rng.load_state_dict(
            getattr(opt, "base", opt)._rounding_rng.state_dict())
    _train(model, opt, 2, seed=9)
    _train(twin_model, twin, 2, seed=9)
    for a, b in zip(model.parameters(), twin_model.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("name", list(MAKERS))
def test_load_pre_hooks_run_before_the_checks(name, variant):
    """torch.optim runs ``register_load_state_dict_pre_hook`` hooks first: a hook that adapts an
    old checkpoint layout (here: the state_dict wrapped in an old container) must work."""
    model = _model()
    opt = _build(name, variant, model.parameters())
    _train(model, opt, 3)
    old = {"format": 1, "optimizer": copy.deepcopy(opt.state_dict())}
    want = [p.detach().clone() for p in model.parameters()]

    model2 = _model(seed=5)
    with torch.no_grad():
        for p, w in zip(model2.parameters(), model.parameters()):
            p.copy_(w)
    opt2 = _build(name, variant, model2.parameters())
    calls = []
    opt2.register_load_state_dict_pre_hook(lambda o, sd: calls.append("pre") or sd["optimizer"])
    opt2.register_load_state_dict_post_hook(lambda o: calls.append("post"))
    opt2.load_state_dict(old)
    assert calls == ["pre", "post"]
    _train(model, opt, 2, seed=3)
    _train(model2, opt2, 2, seed=3)
    for a, b in zip(model.parameters(), model2.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not all(torch.equal(a, b) for a, b in zip(model.parameters(), want))


@pytest.mark.parametrize("name", ["Adam", "SGD", "RAdam", "Adagrad"])
def test_prodigy_state_dict_is_refused_by_another_optimizer(name):
    """Keys that happen to fit (Prodigy keeps step, exp_avg, exp_avg_sq like Adam) do not make
    another optimizer's state_dict loadable: its extra keys (s, p0) give it away."""
    model = _model()
    prod = optimkit.Prodigy(model.parameters())
    _train(model, prod, 2)
    opt = MAKERS[name](model.parameters())
    _train(model, opt, 1)
    before = _snapshot(opt)
    with pytest.raises(ValueError, match="another optimizer"):
        opt.load_state_dict(prod.state_dict())
    _assert_unchanged(opt, before)


# ------------------------------------------------------------------------------ step()
@pytest.mark.parametrize("variant", ["plain", "flat"])
@pytest.mark.parametrize("bad", [("lr", -1.0), ("lr", float("nan")), ("lr", "0.1"),
                                 ("weight_decay", float("inf"))], ids=str)
@pytest.mark.parametrize("name", list(MAKERS))
def test_group_value_changed_after_construction_is_checked_at_step(name, bad, variant):
    """A scheduler or the user may write into param_groups; a value the constructor would
    refuse is refused by step() before anything changes (torch.optim would train on it)."""
    model = _model()
    opt = _build(name, variant, model.parameters())
    _train(model, opt, 2)
    key, value = bad
    opt.param_groups[0][key] = value
    g = torch.Generator().manual_seed(3)
    opt.zero_grad()
    model(torch.randn(16, 6, generator=g, dtype=torch.float64)).pow(2).mean().backward()
    before = _snapshot(opt)
    with pytest.raises((ValueError, TypeError), match=f"{key}.*param group 0"):
        opt.step()
    _assert_unchanged(opt, before)
