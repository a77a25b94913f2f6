"""The registry drives this file: every registered name is built, stepped and checked.

Anything the registry claims about an optimizer that can be checked against the class is
checked here: argument names and defaults against the constructor signature, the number of
full-size state buffers against the state after a few steps, the Prodigy d_coef direction
against the optimizer's behaviour.
"""

from __future__ import annotations

import inspect
import math

import pytest
import torch
from torch import nn

import optimkit
from optimkit.factory.registry import REGISTRY, HyperParam, OptimizerSpec, get_spec, list_optimizers

NAMES = sorted(REGISTRY)
# accepted by the signature but deliberately undocumented: optimkit rejects them (torch-only)
UNDOCUMENTED = {"params", "differentiable", "capturable"}


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.Tanh(), nn.Linear(8, 3))


def _build(name: str, model: nn.Module, **kw) -> torch.optim.Optimizer:
    try:
        return optimkit.create_optimizer(name, model, **kw)
    except NotImplementedError:
        pytest.skip(f"{name}: class not implemented yet (placeholder)")


def _three_steps(opt: torch.optim.Optimizer, model: nn.Module) -> None:
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        x = torch.randn(16, 6, generator=g)
        y = torch.randn(16, 3, generator=g)
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()


def _signature(spec: OptimizerSpec) -> dict[str, inspect.Parameter]:
    sig = inspect.signature(spec.cls)
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values()):
        pytest.skip(f"{spec.cls.__name__} is still a placeholder (takes **kwargs)")
    return dict(sig.parameters)


@pytest.mark.parametrize("name", NAMES)
def test_every_registered_optimizer_builds_and_steps(name: str) -> None:
    model = _model()
    before = [p.detach().clone() for p in model.parameters()]
    opt = _build(name, model)
    assert isinstance(opt, get_spec(name).cls)
    _three_steps(opt, model)
    for p, b in zip(model.parameters(), before):
        assert torch.isfinite(p).all(), name
    assert any(not torch.equal(p, b) for p, b in zip(model.parameters(), before)), f"{name} did not move"


@pytest.mark.parametrize("name", NAMES)
def test_lookahead_variant_builds_and_steps(name: str) -> None:
    model = _model()
    opt = _build("lookahead_" + name, model, optimizer_args="k=2")
    assert isinstance(opt, optimkit.Lookahead) and isinstance(opt.base, get_spec(name).cls)
    _three_steps(opt, model)
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("name", NAMES)
def test_hyperparams_match_the_class_signature(name: str) -> None:
    spec = get_spec(name)
    sig = _signature(spec)
    documented = [hp.name for hp in spec.hyperparams]
    assert len(documented) == len(set(documented)), f"{name}: duplicate hyperparameter rows"
    for hp in spec.hyperparams:
        assert isinstance(hp, HyperParam)
        assert hp.name in sig, f"{name}: documents {hp.name!r}, which {spec.cls.__name__} does not take"
        expected = spec.preset.get(hp.name, sig[hp.name].default)
        assert hp.default == expected and type(hp.default) in (type(expected), int, float), (
            f"{name}.{hp.name}: registry default {hp.default!r} != class default {expected!r}"
        )
        assert hp.valid.strip() and hp.doc.strip().endswith("."), f"{name}.{hp.name}: empty docs"
    # "every hyperparameter": nothing the constructor takes is left undocumented
    missing = set(sig) - UNDOCUMENTED - set(documented)
    assert not missing, f"{name}: undocumented constructor arguments {sorted(missing)}"
    for key in spec.preset:
        assert key in sig, f"{name}: preset sets {key!r}, which the class does not take"


@pytest.mark.parametrize("name", NAMES)
def test_spec_texts_and_fields(name: str) -> None:
    spec = get_spec(name)
    assert spec.name == name == name.lower()
    for text in (spec.description, spec.update_rule, spec.when_to_use, spec.tuning, spec.pitfalls):
        assert isinstance(text, str) and text.strip()
    assert "\n" in spec.update_rule, "update_rule should spell the equations out over lines"
    assert spec.default_lr is not None and spec.default_lr > 0
    assert isinstance(spec.state_buffers, int) and spec.state_buffers >= 0
    assert spec.needs_lr_tuning == (name not in ("prodigy", "adadelta"))
    for alias in spec.aliases:
        assert alias == alias.lower() and alias not in REGISTRY
        assert get_spec(alias) is spec and get_spec(alias.upper()) is spec


@pytest.mark.parametrize("name", NAMES)
def test_state_buffers_count_matches_the_state(name: str) -> None:
    """``state_buffers`` = tensors in a parameter's state as large as the parameter."""
    model = _model()
    opt = _build(name, model)
    _three_steps(opt, model)
    w = model[0].weight  # 48 elements, 2-D
    n_full = sum(1 for v in opt.state[w].values() if isinstance(v, torch.Tensor) and v.numel() == w.numel())
    assert n_full == get_spec(name).state_buffers


def test_presets() -> None:
    assert get_spec("momentum").preset == {"momentum": 0.9}
    assert get_spec("nesterov").preset == {"momentum": 0.9, "nesterov": True}
    assert get_spec("sgdnesterov") is get_spec("nesterov")
    model = _model()
    opt = optimkit.create_optimizer("SGDNesterov", model)
    g = opt.param_groups[0]
    assert g["momentum"] == 0.9 and g["nesterov"] is True and g["lr"] == get_spec("nesterov").default_lr


def test_default_lrs_are_the_documented_choices() -> None:
    lrs = {n: get_spec(n).default_lr for n in NAMES}
    assert lrs == {"sgd": 0.1, "momentum": 0.05, "nesterov": 0.05, "adagrad": 1e-2, "rmsprop": 1e-3,
                   "adam": 1e-3, "adamw": 1e-3, "radam": 1e-3, "adadelta": 1.0, "prodigy": 1.0}


def test_prodigy_d_coef_direction_is_as_documented() -> None:
    """The registry says a larger d_coef makes d larger (more aggressive): check the optimizer."""
    doc = get_spec("prodigy").hyperparam("d_coef").doc
    assert "larger" in doc and "more aggressive" in doc
    ds = {}
    for c in (0.5, 2.0):
        model = _model()
        opt = _build("prodigy", model, d_coef=c)
        for _ in range(5):
            _three_steps(opt, model)
        ds[c] = opt.param_groups[0]["d"]
    assert ds[2.0] > ds[0.5] > 0


# -------------------------------------------------------------------- get_spec / list
def test_get_spec_case_insensitive_and_whitespace() -> None:
    assert get_spec(" AdamW ") is REGISTRY["adamw"]
    assert get_spec("SGDM") is REGISTRY["momentum"]


def test_get_spec_unknown_name_suggests() -> None:
    with pytest.raises(ValueError, match=r"unknown optimizer 'adamww'.*Did you mean 'adamw'.*Valid names: adadelta"):
        get_spec("adamww")
    with pytest.raises(ValueError, match=r"Valid names"):
        get_spec("zzz")


def test_get_spec_lookahead_prefix_explains() -> None:
    with pytest.raises(ValueError, match=r"Lookahead wrapper around 'adam'.*get_spec\('adam'\)"):
        get_spec("lookahead_adam")
    with pytest.raises(TypeError):
        get_spec(3)  # type: ignore[arg-type]


def test_list_optimizers() -> None:
    assert list_optimizers() == sorted(REGISTRY)
    assert list_optimizers("*") == sorted(REGISTRY)  # no lookahead_ variants unless asked
    assert list_optimizers("*adam*") == ["adam", "adamw", "radam"]
    assert list_optimizers("ADAM?") == ["adamw"]
    assert list_optimizers("lookahead_*") == ["lookahead_" + n for n in sorted(REGISTRY)]
    assert list_optimizers("*lookahead_sgd") == ["lookahead_sgd"]
    assert list_optimizers("nothing*") == []


def test_registry_is_the_public_api() -> None:
    for n in ("Lookahead", "create_optimizer", "parse_optimizer_args", "list_optimizers", "param_groups", "get_spec"):
        assert hasattr(optimkit, n) and n in optimkit.__all__
    assert math.isinf(get_spec("prodigy").hyperparam("growth_rate").default)
    with pytest.raises(KeyError):
        get_spec("sgd").hyperparam("betas")
