"""Errors: every bad input is refused with a clear message, and a refused step or group
changes nothing (checked bit for bit)."""

from __future__ import annotations

import inspect

import pytest
import torch

import harness
from optim_db import IMPL_FLAGS, OPTIMS

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
