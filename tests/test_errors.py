"""Errors: every bad input is refused with a clear message, and a refused step or group
changes nothing (checked bit for bit)."""

from __future__ import annotations

import inspect
import math

import pytest
import torch

import harness
from optim_db import BY_NAME, IMPL_FLAGS, OPTIMS

_one_thread = pytest.fixture(autouse=True, scope="module")(harness.one_thread)

ROWS = [pytest.param(info, id=info.name) for info in OPTIMS]

ERROR_CASES = [
    pytest.param(info, kwargs, fragment, id=f"{info.name}-{i}-{fragment}")
    for info in OPTIMS
    for i, (kwargs, fragment) in enumerate(info.error_inputs)
]


def _p(*shape, dtype=torch.float64):
    return torch.nn.Parameter(torch.randn(*shape, dtype=dtype))


@pytest.mark.parametrize("info,kwargs,fragment", ERROR_CASES)
def test_error_inputs(info, kwargs, fragment):
    with pytest.raises(ValueError) as err:
        info.cls([_p(3)], **kwargs)
    msg = str(err.value)
    assert info.name in msg, msg
    assert fragment in msg, msg
    assert "expected" in msg, f"no 'expected <valid range>' in {msg!r}"


@pytest.mark.parametrize("info", ROWS)
def test_empty_parameter_list(info):
    for empty in ([], iter([]), (p for p in [])):
        with pytest.raises(ValueError, match=f"{info.name}.*empty"):
            info.cls(empty)


@pytest.mark.parametrize("info", ROWS)
def test_non_leaf_tensor(info):
    leaf = torch.randn(3, requires_grad=True)
    with pytest.raises(ValueError, match=f"{info.name}.*non-leaf"):
        info.cls([leaf * 2])
    opt = info.cls([_p(3)])
    with pytest.raises(ValueError, match="non-leaf"):
        opt.add_param_group({"params": [leaf + 1]})
    assert len(opt.param_groups) == 1


@pytest.mark.parametrize("info", ROWS)
def test_same_parameter_in_two_groups(info):
    p, q = _p(3), _p(2)
    with pytest.raises(ValueError, match="more than one parameter group"):
        info.cls([{"params": [p]}, {"params": [q, p]}])
    opt = info.cls([p])
    before = harness.snapshot(opt)
    with pytest.raises(ValueError, match="more than one parameter group"):
        opt.add_param_group({"params": [q, p]})
    harness.assert_unchanged(opt, before)


@pytest.mark.parametrize("info", ROWS)
def test_add_param_group_invalid_hyperparameter(info):
    """Each constructor error input, given to add_param_group, raises the same error and
    leaves the optimizer's groups (and state) exactly as they were."""
    p = _p(3)
    opt = info.cls([p])
    p.grad = torch.randn(3, dtype=torch.float64)
    opt.step()  # so there is state to keep
    before = harness.snapshot(opt)
    for kwargs, fragment in info.error_inputs:
        with pytest.raises(ValueError, match=None) as err:
            opt.add_param_group({"params": [_p(2)], **kwargs})
        assert fragment in str(err.value) and info.name in str(err.value), str(err.value)
        harness.assert_unchanged(opt, before)
    opt.add_param_group({"params": [_p(2)]})  # a valid group is still accepted
    assert len(opt.param_groups) == 2


def _takes(info, kw: str) -> bool:
    """Whether the class takes keyword ``kw``; where it does not, torch.optim must not either
    (so passing it is a TypeError in both, and there is nothing more to check)."""
    if kw in inspect.signature(info.cls.__init__).parameters:
        return True
    assert kw not in inspect.signature(info.oracle.__init__).parameters, (
        f"torch.optim.{info.name} takes {kw}=, optimkit.{info.name} does not")
    with pytest.raises(TypeError, match=kw):
        info.cls([_p(3)], **{kw: True})
    return False


@pytest.mark.parametrize("info", ROWS)
def test_foreach_and_fused_together(info):
    if _takes(info, "fused"):
        with pytest.raises(ValueError, match=f"{info.name}.*(foreach|fused)"):
            info.cls([_p(3)], foreach=True, fused=True)
    opt = info.cls([_p(3)])
    with pytest.raises(ValueError, match=f"{info.name}.*(foreach|fused)"):
        opt.add_param_group({"params": [_p(2)], "foreach": True, "fused": True})
    assert len(opt.param_groups) == 1


@pytest.mark.parametrize("info", ROWS)
def test_fused_only_where_there_is_a_fused_path(info):
    if "fused" in info.impls:
        info.cls([_p(3)], fused=True)  # accepted
        return
    if _takes(info, "fused"):
        with pytest.raises(ValueError, match=f"{info.name}.*fused=True"):
            info.cls([_p(3)], fused=True)
    opt = info.cls([_p(3)])
    with pytest.raises(ValueError, match=f"{info.name}.*fused=True"):
        opt.add_param_group({"params": [_p(2)], "fused": True})
    assert len(opt.param_groups) == 1


@pytest.mark.parametrize("flag", ["capturable", "differentiable"])
@pytest.mark.parametrize("info", ROWS)
def test_capturable_and_differentiable_refused(info, flag):
    """Where the keyword exists (as in torch.optim) True raises a ValueError naming the
    optimizer and the flag; where torch.optim has no such keyword, neither do we."""
    if _takes(info, flag):
        with pytest.raises(ValueError, match=f"{info.name}.*{flag}=True"):
            info.cls([_p(3)], **{flag: True})
        opt = info.cls([_p(3)], **{flag: False})
    else:
        opt = info.cls([_p(3)])
    # nor can a later param group switch it on
    with pytest.raises(ValueError, match=f"{info.name}.*{flag}=True"):
        opt.add_param_group({"params": [_p(2)], flag: True})
    assert len(opt.param_groups) == 1


@pytest.mark.parametrize("info", ROWS)
def test_complex_params_refused(info):
    z = torch.nn.Parameter(torch.randn(3, dtype=torch.complex64))
    with pytest.raises(ValueError, match=f"{info.name}.*complex"):
        info.cls([z])
    opt = info.cls([_p(3)])
    with pytest.raises(ValueError, match="complex"):
        opt.add_param_group({"params": [z]})
    assert len(opt.param_groups) == 1


# ------------------------------------------------------------- a refused step is atomic
def _two_group_opt(info, impl, **second):
    """An optimizer (last config of the row, so it keeps state) over two groups, stepped
    twice with valid gradients; returns (opt, group-0 params, group-1 params)."""
    g = torch.Generator().manual_seed(0)
    a = [torch.nn.Parameter(torch.randn(4, 3, dtype=torch.float64, generator=g)),
         torch.nn.Parameter(torch.randn((), dtype=torch.float64, generator=g))]
    b = [torch.nn.Parameter(torch.randn(5, 2, dtype=torch.float64, generator=g)),
         torch.nn.Parameter(torch.randn(3, dtype=torch.float64, generator=g))]
    opt = info.cls([{"params": a}, {"params": b, **info.second_group, **second}], **info.configs[-1],
                   **IMPL_FLAGS[impl])
    for _ in range(2):
        for p in a + b:
            p.grad = torch.randn(p.shape, dtype=p.dtype, generator=g)
        opt.step()
    for p in a + b:  # valid gradients for the step that must fail
        p.grad = torch.randn(p.shape, dtype=p.dtype, generator=g)
    return opt, a, b


IMPL_ROWS = [pytest.param(info, impl, id=f"{info.name}-{impl}") for info in OPTIMS for impl in info.impls]


@pytest.mark.parametrize("info,impl", IMPL_ROWS)
def test_sparse_grad_in_second_group_changes_nothing(info, impl):
    # An optimizer that takes sparse gradients (SGD, Adagrad) refuses them, as torch does, in a
    # group with weight_decay != 0 (the L2 term would make them dense).
    opt, a, b = _two_group_opt(info, impl, **({"weight_decay": 1e-2} if info.supports_sparse else {}))
    b[0].grad = b[0].grad.to_sparse()
    before = harness.snapshot(opt)
    with pytest.raises(RuntimeError, match=f"{info.name}.*sparse"):
        opt.step()
    harness.assert_unchanged(opt, before)


@pytest.mark.parametrize("info,impl", IMPL_ROWS)
def test_grad_shape_mismatch_changes_nothing(info, impl):
    opt, a, b = _two_group_opt(info, impl)
    with torch.no_grad():
        b[1].grad.set_(torch.randn(4, dtype=torch.float64))  # the setter would refuse it
    before = harness.snapshot(opt)
    with pytest.raises((RuntimeError, ValueError), match=f"{info.name}.*shape"):
        opt.step()
    harness.assert_unchanged(opt, before)


@pytest.mark.parametrize("info", ROWS)
def test_table_sparse_flag_matches_class(info):
    """The table's ``supports_sparse`` (which drives the test above) is the class's."""
    assert info.cls._supports_sparse == info.supports_sparse


# ------------------------------------------------- every argument against a table of probes
# Each numeric hyperparameter of every row is probed with the same values; the expected
# outcome follows from the row's ``ranges`` (the checked and documented range): a number
# inside is accepted, a number outside (NaN, +-inf, an int beyond float range) raises
# ValueError; a value of the wrong type raises a TypeError that is also a ValueError
# (HyperparameterTypeError); a tensor of 2 elements raises ValueError, as in torch.optim.
# Every message names the optimizer, the argument, the value and the valid range.
from optimkit._validation import EPS_MIN, HyperparameterTypeError  # noqa: E402

NUMBER_PROBES = [float("nan"), float("inf"), float("-inf"), -1, -1.0, 0, 1e300, 10**400,
                 5e-324]
WRONG_TYPES = ["0.1", None, [0.1], (0.1,), {"lr": 0.1}, True, False, 1j,
               torch.tensor(True)]
TWO_ELEMENTS = torch.tensor([0.1, 0.2])


def _shown(value):
    try:
        return repr(value)
    except ValueError:
        return f"<an int of {value.bit_length()} bits>"


def _refused(info, kwargs, exc_type):
    """The constructor and add_param_group both raise ``exc_type`` (the same message), and the
    refused group leaves the optimizer unchanged."""
    with pytest.raises(exc_type) as err:
        info.cls([_p(3)], **kwargs)
    opt = info.cls([_p(3)])
    before = harness.snapshot(opt)
    with pytest.raises(exc_type) as err2:
        opt.add_param_group({"params": [_p(2)], **kwargs})
    harness.assert_unchanged(opt, before)
    assert str(err.value) == str(err2.value)
    return str(err.value)


NUMERIC_CASES = [
    pytest.param(info, arg, id=f"{info.name}-{arg}") for info in OPTIMS for arg in info.ranges
]


@pytest.mark.parametrize("info,arg", NUMERIC_CASES)
def test_numeric_hyperparameter_probes(info, arg):
    rng = info.ranges[arg]
    expected = rng.text(arg)
    base = dict(momentum=0.9) if arg == "dampening" else {}
    for v in NUMBER_PROBES:
        kwargs = {**base, arg: v}
        as_float = float("inf") if v == 10**400 else float(v)
        if as_float in rng:
            info.cls([_p(3)], **kwargs)
            info.cls([_p(3)], **{**base, arg: torch.tensor(as_float, dtype=torch.float64)})
            continue
        msg = _refused(info, kwargs, ValueError)
        assert msg == f"{info.name}: invalid {arg}={_shown(v)}; expected {expected}", msg
    for v in WRONG_TYPES:
        msg = _refused(info, {**base, arg: v}, HyperparameterTypeError)
        assert msg.startswith(f"{info.name}: invalid {arg}={v!r}; expected ") and expected in msg, msg
    msg = _refused(info, {**base, arg: TWO_ELEMENTS}, ValueError)
    assert msg.startswith(f"{info.name}: invalid {arg}=") and "1-element" in msg and expected in msg
    with pytest.raises(TypeError):  # a TypeError, as torch.optim raises for a string
        info.cls([_p(3)], **{**base, arg: "0.1"})


FLAG_CASES = [pytest.param(info, flag, id=f"{info.name}-{flag}") for info in OPTIMS for flag in info.flags]


@pytest.mark.parametrize("info,flag", FLAG_CASES)
def test_flag_probes(info, flag):
    base = dict(momentum=0.9) if flag == "nesterov" else {}
    for v in (True, False):
        info.cls([_p(3)], **{**base, flag: v})
    for v in (float("nan"), float("inf"), -1, 1, 0, 1e300, "True", None, [True], TWO_ELEMENTS,
              torch.tensor(True)):
        msg = _refused(info, {**base, flag: v}, HyperparameterTypeError)
        assert msg == f"{info.name}: invalid {flag}={v!r}; expected True or False", msg


BETAS_ROWS = [pytest.param(info, id=info.name) for info in OPTIMS if info.betas]


@pytest.mark.parametrize("info", BETAS_ROWS)
def test_betas_probes(info):
    n = info.name
    for ok in ([0.9, 0.99], (0, 0), (0.0, math.nextafter(1.0, 0.0)),
               (torch.tensor(0.9), 0.99), (torch.tensor([[0.9]]), torch.tensor(0.99))):
        info.cls([_p(3)], betas=ok)
    for v in (float("nan"), 0.9, None, "0.9,0.99", {"beta1": 0.9, "beta2": 0.99}, TWO_ELEMENTS, True):
        msg = _refused(info, dict(betas=v), HyperparameterTypeError)
        assert msg == f"{n}: invalid betas={v!r}; expected a tuple of 2 numbers in [0, 1)", msg
    for v in ((), (0.9,), (0.9, 0.99, 0.5)):
        msg = _refused(info, dict(betas=v), ValueError)
        assert msg == f"{n}: invalid betas={v!r}; expected a tuple of 2 numbers in [0, 1)", msg
    for i in (0, 1):
        for bad in (float("nan"), float("inf"), -float("inf"), -1.0, 1.0, 1e300):
            betas = tuple(bad if j == i else 0.9 for j in (0, 1))
            msg = _refused(info, dict(betas=betas), ValueError)
            assert msg == f"{n}: invalid betas[{i}]={bad!r}; expected 0 <= betas[{i}] < 1", msg
        for bad in ("0.9", None, True, [0.9]):
            betas = tuple(bad if j == i else 0.9 for j in (0, 1))
            msg = _refused(info, dict(betas=betas), HyperparameterTypeError)
            assert msg.startswith(f"{n}: invalid betas[{i}]={bad!r}; expected"), msg


def test_combination_rules():
    """Ranges that depend on another argument."""
    msg = _refused(BY_NAME["RMSprop"], dict(centered=True, alpha=0.0), ValueError)
    assert msg.startswith("RMSprop: invalid alpha=0.0; expected 0 < alpha < 1 with centered=True")
    BY_NAME["RMSprop"].cls([_p(3)], centered=True, alpha=5e-324)
    BY_NAME["RMSprop"].cls([_p(3)], centered=False, alpha=0.0)
    msg = _refused(BY_NAME["SGD"], dict(nesterov=True, momentum=0.9, dampening=0.5), ValueError)
    assert msg.startswith("SGD: invalid nesterov=True; expected momentum > 0 and dampening == 0")


# --------------------------------------- every accepted boundary value trains finitely
def _boundaries(rng) -> list[float]:
    """The extreme accepted values of a range (its finite ends, or the nearest inside)."""
    out = [math.nextafter(rng.lo, math.inf) if rng.lo_open else rng.lo]
    if math.isfinite(rng.hi):
        out.append(math.nextafter(rng.hi, -math.inf) if rng.hi_open else rng.hi)
    return out


def _boundary_configs(info) -> list[dict]:
    cfgs = []
    for arg, rng in info.ranges.items():
        for v in _boundaries(rng):
            cfgs.append({**(dict(momentum=0.9) if arg == "dampening" else {}), arg: v})
    if info.betas:
        top = math.nextafter(1.0, 0.0)
        cfgs += [dict(betas=(0.0, 0.0)), dict(betas=(top, top)), dict(betas=(0.0, top)),
                 dict(betas=(top, 0.0))]
    if info.name == "RMSprop":
        # (centered with a small alpha: see test_centered_rmsprop_zero_variance_stays_finite)
        cfgs += [dict(centered=True, momentum=0.9, alpha=math.nextafter(1.0, 0.0))]
    if info.name == "SGD":
        cfgs += [dict(nesterov=True, momentum=math.nextafter(1.0, 0.0))]
    return cfgs


BOUNDARY_ROWS = [pytest.param(info, impl, dtype, id=f"{info.name}-{impl}-{str(dtype)[6:]}")
                 for info in OPTIMS for impl in info.impls
                 for dtype in (torch.float32, torch.float64)]


@pytest.mark.parametrize("info,impl,dtype", BOUNDARY_ROWS)
def test_accepted_boundaries_train_finitely(info, impl, dtype):
    """Every accepted extreme (eps = EPS_MIN, decay rates at 0 and just below 1, ...) gives
    finite parameters and state on finite gradients, including coordinates whose gradient
    is always 0 (where eps alone keeps a denominator away from 0)."""
    g = torch.Generator().manual_seed(0)
    for cfg in _boundary_configs(info):
        ps = [torch.nn.Parameter(torch.randn(6, 5, dtype=dtype, generator=g)),
              torch.nn.Parameter(torch.randn(4, dtype=dtype, generator=g))]
        opt = info.cls(ps, **cfg, **IMPL_FLAGS[impl])
        for _ in range(4):
            for p in ps:
                grad = torch.randn(p.shape, dtype=dtype, generator=g)
                grad.view(-1)[::2] = 0  # half the coordinates never see a gradient
                p.grad = grad
            opt.step()
        for i, p in enumerate(ps):
            assert torch.isfinite(p).all(), f"{cfg}: parameter {i} not finite: {p}"
            for k, v in opt.state[p].items():
                if isinstance(v, torch.Tensor):
                    assert torch.isfinite(v).all(), f"{cfg}: state {k} of parameter {i} not finite"


class NonFiniteStep(AssertionError):
    """A step with finite gradients gave a non-finite parameter."""


@pytest.mark.parametrize("impl", BY_NAME["RMSprop"].impls)
@pytest.mark.parametrize("alpha", [0.5, 0.9])
def test_centered_rmsprop_zero_variance_stays_finite(impl, alpha):
    """A constant gradient (variance exactly 0): every accepted alpha must stay finite.
    Rounding makes ``square_avg - grad_avg^2`` slightly negative here; torch.optim.RMSprop
    takes its square root (NaN); optimkit clamps the variance at 0 (rmsprop.py)."""
    g = torch.Generator().manual_seed(0)
    p = torch.nn.Parameter(torch.randn(1000, generator=g))
    grad = torch.randn(1000, generator=g)
    opt = BY_NAME["RMSprop"].cls([p], lr=1e-3, centered=True, alpha=alpha, **IMPL_FLAGS[impl])
    for _ in range(300):
        p.grad = grad.clone()
        opt.step()
    if not torch.isfinite(p).all():
        raise NonFiniteStep(f"{int((~torch.isfinite(p)).sum())} of 1000 coordinates not finite")


def test_eps_floor_is_float32_tiny():
    assert EPS_MIN == torch.finfo(torch.float32).tiny == torch.finfo(torch.bfloat16).tiny


# -------------------------------------------- the documented range is the checked one
def _docs_page() -> str:
    import pathlib

    return (pathlib.Path(__file__).parents[1] / "docs" / "optimizers" / "README.md").read_text()


@pytest.mark.parametrize("info", ROWS)
def test_documented_ranges_are_the_checked_ones(info):
    """The class docstring, the registry (``optimkit explain``) and docs/optimizers/README.md
    state each range exactly as the error message does."""
    from optimkit.factory.registry import REGISTRY

    doc = info.cls.__doc__
    page = _docs_page()
    specs = [s for s in REGISTRY.values() if s.cls is info.cls]
    assert specs
    for arg, rng in info.ranges.items():
        text = rng.text(arg)
        assert f"``{text}``" in doc, f"{info.name} docstring: {arg} should say ``{text}``"
        assert f"`{text}`" in page, f"docs/optimizers/README.md: {info.name} {arg}: `{text}`"
        for spec in specs:
            hp = {h.name: h for h in spec.hyperparams}[arg]
            assert hp.valid.startswith(text), f"registry {spec.name}.{arg}: {hp.valid!r} vs {text!r}"
