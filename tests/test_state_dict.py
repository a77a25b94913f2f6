"""state_dict: checkpoints cross between torch.optim and optimkit, resume bit for bit, and
malformed ones are rejected before anything changes.

Every state_dict goes through ``torch.save`` / ``torch.load(weights_only=True)``
(``harness.roundtrip``), as a real checkpoint would. Runs are the parity model of
``harness`` (two param groups, a 0-dim and an empty parameter, a frozen layer and a dropped
gradient) in float64 (and float32 for the bit-identical resume).

Tolerances (stated): torch <-> optimkit continuations agree to ``harness.tolerances(float64)``
(1e-12 relative); a save/load inside optimkit is bit-identical (rtol=0, atol=0).
"""

from __future__ import annotations

import copy

import pytest
import torch

import harness
import optimkit
from optim_db import IMPL_FLAGS, OPTIMS, config_id

#: torch.optim has no flat buffers: its side of a flat case runs its default path
ORACLE_FLAGS = {**IMPL_FLAGS, "flat": {}}

SPLIT = 50  # torch <-> optimkit: the checkpoint is taken after 50 steps ...
REST = 20  # ... and both runs continue 20 more
# save/load inside optimkit: split during the frozen-layer window, continue past the step
# that drops a gradient (harness.FREEZE, harness.DROP_BIAS_STEP)
SPLIT_B, REST_B = 24, 20

_one_thread = pytest.fixture(autouse=True, scope="module")(harness.one_thread)

CASES = [
    pytest.param(info, cfg, impl, id=f"{info.name}-{impl}-{config_id(cfg)}")
    for info in OPTIMS
    for cfg in info.configs
    for impl in info.impls
]


def _resume(make, net, sd, second):
    """A fresh optimizer over ``net`` that loads ``sd`` (after a checkpoint round trip)."""
    opt = make(net.groups(second))
    opt.load_state_dict(harness.roundtrip(sd))
    return opt


def _hyper(opt):
    return [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]


# ---------------------------------------------------------------------------- (a) cross
@pytest.mark.parametrize("info,cfg,impl", CASES)
def test_torch_checkpoint_continues_in_optimkit(info, cfg, impl):
    """torch.optim runs 50 steps and saves; optimkit loads and continues as torch does."""
    flags = IMPL_FLAGS[impl]
    second = info.second_group
    net_t, opt_t, _ = harness.run(lambda g: info.oracle(g, **cfg, **ORACLE_FLAGS[impl]), steps=SPLIT,
                                  second=second)
    net_o = copy.deepcopy(net_t)
    opt_o = _resume(lambda g: info.cls(g, **cfg, **flags), net_o, opt_t.state_dict(), second)
    assert _hyper(opt_o) == _hyper(opt_t)
    harness.run(None, net=net_t, opt=opt_t, start=SPLIT, steps=REST)
    harness.run(None, net=net_o, opt=opt_o, start=SPLIT, steps=REST)
    harness.assert_same_trajectory(net_o, opt_o, net_t, opt_t, **harness.tolerances(torch.float64))


@pytest.mark.parametrize("info,cfg,impl", CASES)
def test_optimkit_checkpoint_continues_in_torch(info, cfg, impl):
    """optimkit runs 50 steps and saves; torch.optim loads and continues as optimkit does."""
    flags = IMPL_FLAGS[impl]
    second = info.second_group
    net_o, opt_o, _ = harness.run(lambda g: info.cls(g, **cfg, **flags), steps=SPLIT,
                                  second=second)
    net_t = copy.deepcopy(net_o)
    opt_t = _resume(lambda g: info.oracle(g, **cfg, **ORACLE_FLAGS[impl]), net_t, opt_o.state_dict(), second)
    assert _hyper(opt_t) == _hyper(opt_o)
    harness.run(None, net=net_o, opt=opt_o, start=SPLIT, steps=REST)
    harness.run(None, net=net_t, opt=opt_t, start=SPLIT, steps=REST)
    harness.assert_same_trajectory(net_t, opt_t, net_o, opt_o, **harness.tolerances(torch.float64))


# ----------------------------------------------------------------------- (b) bit resume
# float64 for every config; float32 for each row's last config
RESUME_CASES = [pytest.param(*c.values, torch.float64, id=f"{c.id}-f64") for c in CASES] + [
    pytest.param(info, info.configs[-1], impl, torch.float32,
                 id=f"{info.name}-{impl}-{config_id(info.configs[-1])}-f32")
    for info in OPTIMS for impl in info.impls
]


@pytest.mark.parametrize("info,cfg,impl,dtype", RESUME_CASES)
def test_resume_is_bit_identical(info, cfg, impl, dtype):
    """Save mid-run, load into a fresh optimizer: the rest of the run is bit for bit the same
    as an uninterrupted one."""
    make = lambda g: info.cls(g, **cfg, **IMPL_FLAGS[impl])  # noqa: E731
    second = info.second_group
    net_a, opt_a, _ = harness.run(make, steps=SPLIT_B, dtype=dtype, second=second)
    net_b = copy.deepcopy(net_a)
    opt_b = _resume(make, net_b, opt_a.state_dict(), second)
    assert harness.bitwise_equal(_hyper(opt_b), _hyper(opt_a))
    _, _, loss_a = harness.run(None, net=net_a, opt=opt_a, start=SPLIT_B, steps=REST_B, dtype=dtype)
    _, _, loss_b = harness.run(None, net=net_b, opt=opt_b, start=SPLIT_B, steps=REST_B, dtype=dtype)
    assert loss_a == loss_b
    harness.assert_same_trajectory(net_b, opt_b, net_a, opt_a, rtol=0, atol=0)
    # assert_close(rtol=0, atol=0) equates -0.0 and 0.0 and ignores int/float scalar types:
    # check the state bit for bit, value types included.
    for pa, pb in zip(net_a.parameters(), net_b.parameters()):
        assert harness.bitwise_equal(dict(opt_a.state.get(pa, {})), dict(opt_b.state.get(pb, {})))


# ------------------------------------------------------------------- (c) malformed dicts
def _stepped(info, cfg):
    """An optimizer of ``info`` with state: three steps of the parity model."""
    _, opt, _ = harness.run(lambda g: info.cls(g, **cfg), steps=3, events=False,
                            second=info.second_group)
    return opt


def _assert_rejected(opt, sd, *fragments):
    before = harness.snapshot(opt)
    with pytest.raises(ValueError) as err:
        opt.load_state_dict(sd)
    msg = str(err.value)
    assert type(opt).__name__ in msg, msg
    for f in fragments:
        assert f in msg, f"{f!r} not in {msg!r}"
    harness.assert_unchanged(opt, before)


@pytest.mark.parametrize("info", OPTIMS, ids=lambda i: i.name)
def test_rejects_non_dict_and_missing_sections(info):
    opt = _stepped(info, info.configs[-1])
    good = harness.roundtrip(opt.state_dict())
    for bad in (None, [], "state", 3, [good["state"], good["param_groups"]],
                {"state": good["state"]}, {"param_groups": good["param_groups"]},
                {"state": [], "param_groups": good["param_groups"]},
                {"state": good["state"], "param_groups": tuple(good["param_groups"])}):
        _assert_rejected(opt, bad)
    opt.load_state_dict(good)  # the optimizer is still usable and takes a good one


@pytest.mark.parametrize("info", OPTIMS, ids=lambda i: i.name)
def test_rejects_wrong_number_of_groups(info):
    opt = _stepped(info, info.configs[-1])
    fewer = harness.roundtrip(opt.state_dict())
    fewer["param_groups"] = fewer["param_groups"][:1]
    _assert_rejected(opt, fewer, "param groups")
    more = harness.roundtrip(opt.state_dict())
    more["param_groups"].append(copy.deepcopy(more["param_groups"][-1]))
    _assert_rejected(opt, more, "param groups")


@pytest.mark.parametrize("info", OPTIMS, ids=lambda i: i.name)
def test_rejects_wrong_param_count(info):
    opt = _stepped(info, info.configs[-1])
    fewer = harness.roundtrip(opt.state_dict())
    dropped = fewer["param_groups"][0]["params"].pop()
    fewer["state"].pop(dropped, None)
    _assert_rejected(opt, fewer, "parameters")
    more = harness.roundtrip(opt.state_dict())
    more["param_groups"][1]["params"].append(1000)
    _assert_rejected(opt, more, "parameters")


@pytest.mark.parametrize("info", OPTIMS, ids=lambda i: i.name)
def test_rejects_state_of_unknown_parameter(info):
    opt = _stepped(info, info.configs[-1])
    sd = harness.roundtrip(opt.state_dict())
    sd["state"][1000] = copy.deepcopy(next(iter(sd["state"].values()), {}))
    _assert_rejected(opt, sd, "1000")


def _stateful_configs(info):
    """(config, stepped optimizer, its state_dict) for every config that keeps state."""
    out = []
    for cfg in info.configs:
        opt = _stepped(info, cfg)
        sd = harness.roundtrip(opt.state_dict())
        if any(sd["state"].values()):
            out.append((cfg, opt, sd))
    assert out, f"no config of {info.name} keeps any state; the table needs one"
    return out


@pytest.mark.parametrize("info", OPTIMS, ids=lambda i: i.name)
def test_rejects_missing_state_key(info):
    """Every key a stepped parameter has is needed to continue: dropping any is an error.

    An empty state means "not stepped yet" and is valid, so where dropping the key would
    leave the state empty, a foreign key stands in (a checkpoint of another optimizer).
    """
    checked = 0
    for cfg, opt, sd in _stateful_configs(info):
        for pid, st in sd["state"].items():
            for key in st:
                bad = copy.deepcopy(sd)
                del bad["state"][pid][key]
                if not bad["state"][pid]:
                    bad["state"][pid]["not_a_state_key"] = torch.zeros(())
                _assert_rejected(opt, bad, repr(key))
                checked += 1
    assert checked > 0


#: a bad replacement for one state tensor, and what the refusal must say (besides the key)
BAD_STATE_TENSORS = {
    # a trailing extra dimension (so also a wrong element count for 0-dim and empty parameters)
    "shape": (lambda v: torch.zeros(*v.shape, 2, dtype=v.dtype), ""),
    # a checkpoint from an optimizer whose model was built on the meta device: torch's loader
    # fails part-way with "Cannot copy out of meta tensor"
    "meta": (lambda v: torch.empty(v.shape, dtype=v.dtype, device="meta"), "is a meta tensor"),
}


@pytest.mark.parametrize("kind", sorted(BAD_STATE_TENSORS))
@pytest.mark.parametrize("info", OPTIMS, ids=lambda i: i.name)
def test_rejects_bad_state_tensor(info, kind):
    """Each state tensor in turn replaced by a bad one is refused by name, nothing changed."""
    make, fragment = BAD_STATE_TENSORS[kind]
    checked = 0
    for cfg, opt, sd in _stateful_configs(info):
        for pid, st in sd["state"].items():
            for key, v in st.items():
                if not isinstance(v, torch.Tensor):
                    continue
                bad = copy.deepcopy(sd)
                bad["state"][pid][key] = make(v)
                _assert_rejected(opt, bad, repr(key), fragment)
                checked += 1
    assert checked > 0


@pytest.mark.parametrize("info", OPTIMS, ids=lambda i: i.name)
def test_rejects_invalid_hyperparameter_in_saved_group(info):
    """Each of the row's invalid constructor inputs, written into a saved param group (of an
    optimizer built with the defaults, as the error inputs assume), is rejected on load with
    the same message fragment."""
    opt = _stepped(info, {})
    for kwargs, fragment in info.error_inputs:
        for gi in (0, 1):
            sd = harness.roundtrip(opt.state_dict())
            sd["param_groups"][gi].update(copy.deepcopy(kwargs))
            _assert_rejected(opt, sd, fragment, f"param group {gi}")


@pytest.mark.parametrize("info", OPTIMS, ids=lambda i: i.name)
def test_rejects_flags_the_constructor_refuses(info):
    """A saved group may not bring in what the constructor refuses: foreach=True with
    fused=True, fused=True without a fused kernel, capturable=True / differentiable=True."""
    opt = _stepped(info, {})
    bad_groups = [dict(foreach=True, fused=True), dict(capturable=True), dict(differentiable=True)]
    if "fused" not in info.impls:
        bad_groups.append(dict(fused=True))
    for overrides in bad_groups:
        sd = harness.roundtrip(opt.state_dict())
        sd["param_groups"][1].update(overrides)
        _assert_rejected(opt, sd, "param group 1", next(iter(overrides)))


def test_prodigy_rejects_meta_state_tensor():
    ps = [torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(5))]
    opt = optimkit.Prodigy(ps)
    for p in ps:
        p.grad = torch.randn_like(p)
    opt.step()
    sd = opt.state_dict()
    for key in ("s", "p0", "exp_avg", "exp_avg_sq"):
        bad = copy.deepcopy(sd)
        bad["state"][1][key] = torch.empty(bad["state"][1][key].shape, device="meta")
        _assert_rejected(opt, bad, "is a meta tensor", repr(key))
