"""A step that cannot be taken raises before it writes anything, on every implementation.

torch.optim steps param groups one after another, so an input that fails in group 1 leaves
group 0 stepped (and its state advanced). Two such inputs, each reachable only by replacing
a tensor's ``.data`` (autograd and the ``p.grad`` setter refuse both), fail in torch's kernels
part-way: a gradient of another dtype than its parameter, and a parameter whose data was
replaced by a tensor of another shape after its state was created. optimkit checks both
while gathering the step, names the parameter, and changes nothing; after the input is put
right the optimizer steps on as if the failed call had not happened.
"""

from __future__ import annotations

import pytest
import torch

import harness
import optimkit
from optim_db import IMPL_FLAGS, OPTIMS

_one_thread = pytest.fixture(autouse=True, scope="module")(harness.one_thread)

ROWS = [(i.name, i.cls, i.impls) for i in OPTIMS] + [
    ("Prodigy", optimkit.Prodigy, ("reference", "foreach", "flat"))]
CASES = [pytest.param(cls, impl, id=f"{name}-{impl}")
         for name, cls, impls in ROWS for impl in ("default", *impls)]


def _setup(cls, impl):
    g = torch.Generator().manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(4, 3, generator=g)),
          torch.nn.Parameter(torch.randn(5, 3, generator=g))]
    kw = dict(momentum=0.9) if cls is optimkit.SGD else {}
    opt = cls([{"params": ps[:1]}, {"params": ps[1:]}], **kw,
              **({} if impl == "default" else IMPL_FLAGS[impl]))
    return ps, opt


def _grads(ps, seed):
    g = torch.Generator().manual_seed(seed)
    for p in ps:
        p.grad = torch.randn(p.shape, generator=g)


def _twin_run(cls, impl, fault):
    """Two optimizers stepped alike, except that the first meets ``fault`` (which must raise
    and is then undone) before its second step: both must end bit for bit equal."""
    runs = []
    for faulty in (True, False):
        ps, opt = _setup(cls, impl)
        _grads(ps, 1)
        opt.step()
        _grads(ps, 2)
        if faulty:
            undo = fault(ps)
            before = harness.snapshot(opt)
            with pytest.raises(RuntimeError) as err:
                opt.step()
            harness.assert_unchanged(opt, before)
            undo()
            msg = str(err.value)
        opt.step()
        runs.append((ps, opt))
    (pa, oa), (pb, ob) = runs
    for a, b in zip(pa, pb):
        assert harness.bitwise_equal(a.detach(), b.detach())
        assert harness.bitwise_equal(dict(oa.state[a]), dict(ob.state[b]))
    return msg


@pytest.mark.parametrize("cls,impl", CASES)
def test_integer_gradient_refused(cls, impl):
    def fault(ps):
        g = ps[1].grad
        ps[1].grad_dtype = None  # torch's switch that lets p.grad take another dtype
        ps[1].grad = torch.ones(ps[1].shape, dtype=torch.int64)

        def undo():
            ps[1].grad = None
            ps[1].grad_dtype = ps[1].dtype
            ps[1].grad = g
        return undo

    msg = _twin_run(cls, impl, fault)
    assert cls.__name__ in msg and "gradient dtype torch.int64" in msg, msg
    assert "param group 1, parameter 0" in msg and "nothing was changed" in msg, msg


MIXED = [pytest.param(i, impl, id=f"{i.name}-{impl}") for i in OPTIMS
         for impl in ("default", *i.impls)]


@pytest.mark.parametrize("info,impl", MIXED)
def test_float32_gradients_of_bfloat16_parameters(info, impl):
    """torch's ``p.grad_dtype = torch.float32`` on bfloat16 weights (autograd then hands
    float32 gradients to the optimizer). Where torch.optim's per-tensor loop steps it (its
    in-place ops promote: SGD, Adagrad, RMSprop, Adadelta), every optimkit implementation
    gives its values bit for bit; where the loop fails part-way (Adam, AdamW, RAdam: ``lerp_``
    across dtypes), optimkit raises before anything is written."""
    def run(cls, flags):
        g = torch.Generator().manual_seed(0)
        ps = [torch.nn.Parameter(torch.randn(4, 3, generator=g).bfloat16()),
              torch.nn.Parameter(torch.randn(5, generator=g).bfloat16())]
        for p in ps[1:]:
            p.grad_dtype = torch.float32
        kw = dict(momentum=0.9) if info.name == "SGD" else {}
        opt = cls([{"params": ps[:1]}, {"params": ps[1:], **info.second_group}], **kw, **flags)
        for t in range(4):
            gg = torch.Generator().manual_seed(10 + t)
            for p in ps:
                p.grad = torch.randn(p.shape, generator=gg).to(p.grad_dtype or p.dtype)
            if t == 0:
                before = harness.snapshot(opt)
            opt.step()
        return ps, opt, before

    try:
        expected, _, _ = run(info.oracle, dict(foreach=False))
    except RuntimeError:
        expected = None
    flags = {} if impl == "default" else IMPL_FLAGS[impl]
    if expected is None:
        with pytest.raises(RuntimeError, match=rf"{info.name}: gradient dtype torch.float32 does "
                           r"not match parameter dtype torch.bfloat16 \(param group 1"):
            run(info.cls, flags)
        return
    got, opt, _ = run(info.cls, flags)
    for a, b in zip(got, expected):
        assert harness.bitwise_equal(a.detach(), b.detach())
        assert a.grad.dtype == b.grad.dtype


@pytest.mark.parametrize("cls,impl", CASES)
@pytest.mark.parametrize("shape", [(7,), (0, 3), (3, 5)])
def test_parameter_data_replaced_by_another_shape(cls, impl, shape):
    def fault(ps):
        data, grad = ps[1].data, ps[1].grad
        ps[1].data = torch.randn(shape)
        ps[1].grad = torch.randn(shape)

        def undo():
            ps[1].data = data
            ps[1].grad = grad
        return undo

    msg = _twin_run(cls, impl, fault)
    assert cls.__name__ in msg and "param group 1" in msg, msg
    assert "shape" in msg and "nothing was changed" in msg, msg


# ------------------------------------- tensor hyperparameters are read as Python floats
TENSOR_CASES = [pytest.param(i, impl, arg, id=f"{i.name}-{impl}-{arg}") for i in OPTIMS
                for impl in ("default", *i.impls) for arg in i.ranges]


@pytest.mark.parametrize("info,impl,arg", TENSOR_CASES)
def test_tensor_hyperparameter_steps_as_its_float(info, impl, arg):
    """Every numeric hyperparameter may be a 1-element tensor (also one that requires grad,
    or a float32 one); each step reads it as a Python float, so the run equals the same run
    with ``float(tensor)``, bit for bit, on every implementation. Some paths once handed the
    tensor itself to torch's fused kernels, which refuse a tensor that requires grad
    (part-way through the step) and round a float32 one differently."""
    flags = {} if impl == "default" else IMPL_FLAGS[impl]
    base = dict(momentum=0.9) if info.name == "SGD" else {}
    value = {**base, **info.second_group}.get(arg)
    if value is None:  # a value inside the range that is not the default
        rng = info.ranges[arg]
        value = 0.5 if rng.hi <= 1 and arg != "dampening" else 0.05
        if arg == "dampening":
            value = 0.1
    if arg == "dampening":
        base = dict(momentum=0.9)
    for t in (torch.tensor(value, dtype=torch.float64, requires_grad=True),
              torch.tensor(value, dtype=torch.float32)):
        runs = []
        for v in (t, t.item()):
            g = torch.Generator().manual_seed(0)
            ps = [torch.nn.Parameter(torch.randn(4, 3, generator=g)),
                  torch.nn.Parameter(torch.randn(5, generator=g))]
            opt = info.cls([{"params": ps[:1]}, {"params": ps[1:], arg: v}], **base, **flags)
            for s in range(3):
                _grads(ps, s)
                opt.step()
            runs.append(ps)
        for a, b in zip(*runs):
            assert harness.bitwise_equal(a.detach(), b.detach()), (arg, t)


@pytest.mark.parametrize("info", [pytest.param(i, id=i.name) for i in OPTIMS])
def test_implementation_flags_edited_after_construction(info):
    """``foreach``/``fused``/``capturable``/``differentiable`` written into a group after
    construction are checked at step() as at construction, before anything is written."""
    bad = [("foreach", "yes"), ("foreach", torch.tensor([1.0, 2.0])),
           ("capturable", True), ("differentiable", True),
           ("capturable", torch.tensor([1.0, 2.0]))]
    if info.cls._fused_in_group:
        bad += [("fused", "yes"), ("fused", torch.tensor([1.0, 2.0]))]
        if not info.cls._has_fused:
            bad.append(("fused", True))
    for key, v in bad:
        ps, opt = _setup(info.cls, "default")
        _grads(ps, 1)
        opt.step()
        _grads(ps, 2)
        opt.param_groups[1][key] = v
        before = harness.snapshot(opt)
        with pytest.raises(ValueError, match=rf"{info.name}: .*{key}.*param group 1, at step\(\); "
                           "nothing was changed"):
            opt.step()
        harness.assert_unchanged(opt, before)


def test_prodigy_slice_p_changed_after_state():
    """Prodigy's ``s`` holds every ``slice_p``-th element: a slice_p changed after the state
    was created no longer fits it; refused before anything is written."""
    ps, opt = _setup(optimkit.Prodigy, "default")
    _grads(ps, 1)
    opt.step()
    _grads(ps, 2)
    for g in opt.param_groups:
        g["slice_p"] = 2
    before = harness.snapshot(opt)
    with pytest.raises(RuntimeError, match=r"Prodigy: state 's' of parameter 0 in param group 0 "
                       r"has shape \(12,\), expected \(6,\)"):
        opt.step()
    harness.assert_unchanged(opt, before)
