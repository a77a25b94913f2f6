"""step()'s fast gather (optimkit._step) and its validation snapshot decide exactly as the
general walk did, and nothing they skip can hide a change made between steps."""

import math

import pytest
import torch

import optimkit
from optimkit import _step
from optimkit._impl import OneDeviceDtype

CLASSIC = [
    (optimkit.SGD, dict(lr=0.1)),
    (optimkit.SGD, dict(lr=0.1, momentum=0.9, nesterov=True)),
    (optimkit.Adam, dict(lr=0.1)),
    (optimkit.AdamW, dict(lr=0.1)),
    (optimkit.Adagrad, dict(lr=0.1)),
    (optimkit.RMSprop, dict(lr=0.1)),
    (optimkit.RAdam, dict(lr=0.1)),
    (optimkit.Adadelta, dict(lr=0.1)),
]
IDS = [f"{c.__name__}-{i}" for i, (c, _) in enumerate(CLASSIC)]


def _params(n=3):
    g = torch.Generator().manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(4, 3, generator=g)) for _ in range(n)]
    for p in ps:
        p.grad = torch.randn(4, 3, generator=g)
    return ps


def _impl_via_general_walk(opt, gi=0):
    """The general walk's work for group gi (the fast gather switched off)."""
    saved = _step.gather_dense
    try:
        import optimkit._base as base
        base.gather_dense = lambda *a: None
        return opt._gather(gi, opt.param_groups[gi])
    finally:
        base.gather_dense = saved


@pytest.mark.parametrize("cls,kw", CLASSIC, ids=IDS)
@pytest.mark.parametrize("case", ["plain", "some_none", "strides", "fused_true", "foreach"])
def test_fast_gather_decides_as_the_general_walk(cls, kw, case):
    ps = _params()
    kw = dict(kw)
    if case == "fused_true" and cls._has_fused:
        kw["fused"] = True
    if case == "foreach":
        kw["foreach"] = True
    opt = cls(ps, **kw)
    opt.step()
    if case == "some_none":
        ps[1].grad = None
    if case == "strides":  # a hand-made gradient with another memory layout
        ps[2].grad = torch.randn(3, 4).t()
    fast = _step.gather_dense(opt, 0, opt.param_groups[0])
    assert fast is not None
    with pytest.warns(RuntimeWarning) if (case == "strides" and kw.get("fused")) else _nowarn():
        work = opt._gather(0, opt.param_groups[0])
    assert isinstance(work.params, OneDeviceDtype) and work.dense
    with pytest.warns(RuntimeWarning) if (case == "strides" and kw.get("fused")) else _nowarn():
        ref = _impl_via_general_walk(opt)
    assert work.impl == ref.impl
    assert [id(p) for p in work.params] == [id(p) for p in ref.params]
    assert [id(g) for g in work.grads] == [id(g) for g in ref.grads]


class _nowarn:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def test_fast_gather_steps_aside_for_what_it_does_not_handle():
    ps = _params()
    opt = optimkit.SGD(ps, lr=0.1)
    group = opt.param_groups[0]
    ps[0].grad = ps[0].grad.to_sparse()
    assert _step.gather_dense(opt, 0, group) is None  # sparse: the general walk handles it
    ps[0].grad = torch.randn(4, 3)
    ps[1].data = ps[1].data.double()  # two dtypes in one group
    assert _step.gather_dense(opt, 0, group) is None
    ps[1].data = ps[1].data.float()
    for p in ps:
        p.grad = None
    assert _step.gather_dense(opt, 0, group) is None  # nothing to step


@pytest.mark.parametrize("cls,kw", CLASSIC, ids=IDS)
def test_shape_change_between_steps_still_raises(cls, kw):
    """p.data replaced by another shape keeps every object identity: caught at the next step."""
    ps = _params()
    opt = cls(ps, **kw)
    opt.step()
    ps[1].data = torch.randn(5, 3)
    before = [p.detach().clone() for p in ps]
    with pytest.raises(RuntimeError, match="gradient shape"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, ps))


@pytest.mark.parametrize("cls,kw", CLASSIC, ids=IDS)
@pytest.mark.parametrize("bad", ["negative", "bool", "nan", "tensor_nan", "list_beta"])
def test_settings_changed_between_steps_are_validated(cls, kw, bad):
    ps = _params()
    opt = cls(ps, **kw)
    opt.step()
    opt.step()  # the settings' snapshot is now stored
    group = opt.param_groups[0]
    if bad == "negative":
        group["lr"] = -1.0
    elif bad == "bool":
        group["lr"] = 1  # valid, and stored as passed ...
        opt.step()
        group["lr"] = True  # ... then a bool, equal to 1 but refused
    elif bad == "nan":
        group["lr"] = math.nan
    elif bad == "tensor_nan":
        group["lr"] = torch.tensor(0.1)
        opt.step()
        group["lr"].fill_(math.nan)  # a scheduler writing in place
    elif bad == "list_beta":
        if "betas" not in group:
            pytest.skip("no betas")
        group["betas"] = [0.9, 0.999]
        opt.step()
        group["betas"][0] = 1.5  # changed in place
    before = [p.detach().clone() for p in ps]
    with pytest.raises(ValueError, match=rf"{cls.__name__}: invalid .*param group 0, at step\(\)"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, ps))


def test_settings_key_types_and_values():
    key = _step.settings_key
    assert key({"params": [torch.zeros(1)], "lr": 1}) != key({"params": [], "lr": True})
    assert key({"lr": 1.0, "betas": (0.9, 0.99)}) == key({"lr": 1.0, "betas": (0.9, 0.99)})
    assert key({"lr": 1.0, "betas": [0.9, 0.99]}) != key({"lr": 1.0, "betas": (0.9, 0.99)})
    assert key({"lr": torch.tensor(1.0)}) is None
    assert key({"betas": (torch.tensor(0.9), 0.99)}) is None


def test_model_moved_to_double_between_steps():
    """model.to() replaces p.data and p.grad.data in place (same objects): the fast gather
    sees the new dtype and the step behaves as before (SGD: the per-tensor reference)."""
    model = torch.nn.Linear(3, 2)
    ref = torch.nn.Linear(3, 2)
    ref.load_state_dict(model.state_dict())
    a = optimkit.SGD(model.parameters(), lr=0.1, momentum=0.9)
    b = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    x = torch.randn(5, 3)
    for m, o in ((model, a), (ref, b)):
        m(x).sum().backward()
        o.step()
        m.double()
        m(x.double()).sum().backward()
        o.step()
    for p, q in zip(model.parameters(), ref.parameters()):
        assert p.dtype == torch.float64
        assert torch.equal(p, q)


def test_stateless_sgd_keeps_no_state_and_momentum_switched_on_later():
    ps = _params()
    opt = optimkit.SGD(ps, lr=0.1)
    opt.step()
    assert len(opt.state) == 0 and opt.state_dict()["state"] == {}
    opt.param_groups[0]["momentum"] = 0.9
    opt.step()
    assert all("momentum_buffer" in opt.state[p] for p in ps)
