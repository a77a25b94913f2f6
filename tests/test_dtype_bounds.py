"""Hyperparameters beyond the parameters' dtype: refused before anything is written.

``lr=1e300`` is in range for float64 parameters. For float32 ones torch's per-tensor loop
raises part-way through a step (``value cannot be converted to type float without
overflow``: with two groups the first one has already stepped) and its fused kernels write
inf. The oracle is torch.optim's per-tensor loop: where it raises (at construction or at
the step) or writes inf, optimkit raises ``ValueError`` naming the optimizer, the argument, the value and
the dtype's range, on every implementation, with nothing changed; where it steps, optimkit
steps too, to the same values.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch

import harness
import optimkit
from optimkit.optimizers._prodigy.nonfinite import NonFiniteStepError
from optim_db import IMPL_FLAGS, OPTIMS

_one_thread = pytest.fixture(autouse=True, scope="module")(harness.one_thread)

#: (dtype, a value beyond its largest finite one, the largest finite one as messages print it)
BEYOND = [(torch.float32, 1e300, "3.403e+38"), (torch.float32, 3.5e38, "3.403e+38"),
          (torch.float16, 1e5, "6.55e+04")]

CASES = [
    pytest.param(info, arg, dtype, v, top, id=f"{info.name}-{arg}-{str(dtype)[6:]}-{v:g}")
    for info in OPTIMS for arg, rng in info.ranges.items() if math.isinf(rng.hi)
    for dtype, v, top in BEYOND
]


def _params(dtype):
    g = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(torch.randn(4, 3, generator=g).to(dtype)),
            torch.nn.Parameter(torch.randn(5, generator=g).to(dtype))]


def _grads(params):
    g = torch.Generator().manual_seed(1)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g).to(p.dtype)


def _torch_outcome(info, arg, v, dtype):
    """torch's per-tensor loop with ``arg=v`` in group 1: ("raises", None) or ("steps",
    parameters after one step). Both at construction and set into the group afterwards."""
    try:  # (torch's Adagrad fills its state from the constructor's initial_accumulator_value)
        info.oracle(_params(dtype), **{arg: v}, foreach=False)
    except RuntimeError:
        return "raises", None
    ps = _params(dtype)
    opt = info.oracle([{"params": ps[:1]}, {"params": ps[1:]}], foreach=False)
    opt.param_groups[1][arg] = v
    _grads(ps)
    try:
        opt.step()
    except RuntimeError:
        return "raises", None
    if not all(bool(torch.isfinite(p).all()) for p in ps):
        return "raises", None  # steps, but to inf (addcdiv's value is not range-checked)
    return "steps", [p.detach().clone() for p in ps]


@pytest.mark.parametrize("info,arg,dtype,v,top", CASES)
def test_beyond_dtype_refused_like_torch_loop(info, arg, dtype, v, top):
    outcome, expected = _torch_outcome(info, arg, v, dtype)
    name = str(dtype).replace("torch.", "")
    for impl in info.impls:
        flags = IMPL_FLAGS[impl]
        # set into the group after construction (a scheduler, a user, a loaded config)
        ps = _params(dtype)
        opt = info.cls([{"params": ps[:1]}, {"params": ps[1:]}], **flags)
        opt.param_groups[1][arg] = v
        _grads(ps)
        before = harness.snapshot(opt)
        if outcome == "raises":
            with pytest.raises(ValueError) as err:
                opt.step()
            msg = str(err.value)
            shown = ("lr * weight_decay" if arg == "weight_decay"
                     and opt.param_groups[1].get("decoupled_weight_decay") else arg)
            assert msg.startswith(f"{info.name}: invalid {arg}={v!r}; expected |{shown}| <= {top}"), msg
            assert f"for {name} parameters" in msg and "param group 1, at step()" in msg, msg
            harness.assert_unchanged(opt, before)
            # at construction and at add_param_group, the same refusal
            with pytest.raises(ValueError, match=f"invalid {arg}="):
                info.cls([{"params": _params(dtype)}], **{arg: v}, **flags)
            opt2 = info.cls([{"params": _params(dtype)}], **flags)
            snap = harness.snapshot(opt2)
            with pytest.raises(ValueError, match=f"invalid {arg}="):
                opt2.add_param_group({"params": _params(dtype), arg: v})
            harness.assert_unchanged(opt2, snap)
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                opt.step()
            for mine, ref in zip(ps, expected):
                # float16: torch's loop rounds its scalars and ops to float16, optimkit's
                # default computes in float32 and rounds once (one float16 ulp apart)
                tol = dict(rtol=1e-3, atol=1e-3) if dtype == torch.float16 else harness.tolerances(dtype)
                torch.testing.assert_close(mine.detach(), ref, **tol)


@pytest.mark.parametrize("info", [pytest.param(i, id=i.name) for i in OPTIMS])
def test_model_half_after_construction(info):
    """A value fine for float64 parameters, refused once the model is moved to float16."""
    ps = _params(torch.float64)
    opt = info.cls([{"params": ps[:1]}, {"params": ps[1:], "lr": 1e5}])
    for p in ps:
        p.data = p.data.half()
    _grads(ps)
    before = harness.snapshot(opt)
    with pytest.raises(ValueError, match=r"invalid lr=100000.0; expected \|lr\| <= 6.55e\+04 "
                       r"\(the largest float16\) for float16 parameters.*param group 1"):
        opt.step()
    harness.assert_unchanged(opt, before)


@pytest.mark.parametrize("info", [pytest.param(i, id=i.name) for i in OPTIMS])
def test_load_state_dict_beyond_dtype_refused(info):
    src = info.cls(_params(torch.float64), lr=1e300)
    opt = info.cls(_params(torch.float32))
    before = harness.snapshot(opt)
    with pytest.raises(ValueError, match=r"param group 0: .*invalid lr=1e\+300; expected \|lr\| <= "
                       r"3.403e\+38 \(the largest float32\)"):
        opt.load_state_dict(src.state_dict())
    harness.assert_unchanged(opt, before)


@pytest.mark.parametrize("kw,key", [
    (dict(lr=1e300), "c_s = (d / d0) * dlr = 1e+294 overflows float32"),
    (dict(lr=1e300, safeguard_warmup=True), None),
    (dict(weight_decay=1e300, decouple=False), "weight_decay = 1e+300 overflows float32"),
])
@pytest.mark.parametrize("impl", ["default", "reference", "foreach", "flat"])
def test_prodigy_phase1_scalars_beyond_float32(kw, key, impl):
    """Prodigy: phase 1's scalars (``c_s``, coupled weight decay) beyond float32 refuse the
    step as a non-finite one (``NonFiniteStepError``, or skipped and counted with
    ``nonfinite='skip'``), naming the scalar, with nothing changed; float64 parameters take
    them."""
    flags = {"default": {}, "reference": dict(foreach=False), "foreach": dict(foreach=True),
             "flat": dict(flat=True)}[impl]
    for mode in ("raise", "skip"):
        ps = _params(torch.float32)
        opt = optimkit.Prodigy(ps, nonfinite=mode, **kw, **flags)
        _grads(ps)
        before = harness.snapshot(opt)
        if mode == "raise":
            with pytest.raises(NonFiniteStepError) as err:
                opt.step()
            assert "overflows float32" in str(err.value) and "unchanged" in str(err.value)
            if key is not None:
                assert key in str(err.value), str(err.value)
            harness.assert_unchanged(opt, before)
        else:
            with pytest.warns(RuntimeWarning, match="overflows float32"):
                opt.step()
            assert opt.param_groups[0]["skipped_steps"] == 1
            for a, b in zip(harness.opt_params(opt), before["values"]):
                assert harness.bitwise_equal(a.detach(), b)
    if "weight_decay" in kw:  # representable in float64: phase 1 runs (the output checks decide)
        ps = _params(torch.float64)
        opt = optimkit.Prodigy(ps, **kw, **flags)
        _grads(ps)
        try:
            opt.step()
        except NonFiniteStepError as e:
            assert "phase 1" not in str(e), str(e)
