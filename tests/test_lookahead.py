"""Lookahead: against a textbook loop in float64, against pytorch_optimizer, and as an Optimizer.

The oracle is written out below as plain tensor arithmetic (SGD with heavy-ball momentum plus
the Lookahead rule of Zhang et al. 2019, each pullback mode), independent of optimkit.

Where ``pytorch_optimizer.Lookahead`` (3.x) and ours agree, and where they differ (read from
its source, pytorch_optimizer/optimizer/lookahead.py):

* agree: the update ``phi <- phi + alpha (theta - phi); theta <- phi`` every k steps with slow
  weights starting at the initial parameters; "reset" zeroes SGD's ``momentum_buffer``;
  "pullback" sets ``m <- alpha m + (1 - alpha) m_slow; m_slow <- m`` with ``m_slow``
  starting at 0 (a copy, not an alias). So with one param group, SGD-momentum as the base,
  every parameter receiving a gradient at every sync step and ``alpha < 1``, the two
  trajectories are the same (up to rounding: the lerps run in opposite directions).
* differ: (1) pytorch_optimizer syncs only parameters that have a gradient at the sync step,
  ours all parameters; (2) it counts steps per param group in a ``counter`` key it adds to the
  base's param groups (a group added later syncs on its own phase), ours counts once;
  (3) "reset"/"pullback" touch only ``momentum_buffer`` (creating one for Adam, which Adam
  ignores), ours use ``momentum_buffer`` or ``exp_avg`` and raise when there is neither;
  (4) it rejects ``alpha = 1``; (5) it captures slow weights at construction, ours at the first
  step (the same unless the parameters change in between); (6) its state_dict nests the base's
  and keys slow weights by (group, index) tuples, ours extends the base's and keeps
  torch's integer ids. The comparison below therefore stays inside the agreeing region.
"""

from __future__ import annotations

import copy
import functools
import io
import math
import warnings
from collections import OrderedDict

import pytest
import torch
from torch import nn

import optimkit
from optimkit import Lookahead

F64 = torch.float64
MODES = ("none", "reset", "pullback")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: intra-op threads only add OpenMP wake-ups, which on a loaded machine cost
    milliseconds per op (measured: 51 s of CPU for this file with 2 threads, 5 s with 1)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ------------------------------------------------------------------------ a small problem
def _data(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(128, 5, generator=g, dtype=F64)
    w_true = torch.randn(5, 3, generator=g, dtype=F64)
    return x, torch.tanh(x @ w_true) + 0.1 * torch.randn(128, 3, generator=g, dtype=F64)


def _init(seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(5, 3, generator=g, dtype=F64) * 0.5, torch.randn(3, generator=g, dtype=F64) * 0.1]


def _loss(params: list[torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    w, b = params
    return ((torch.tanh(x @ w + b) - y) ** 2).mean()


@functools.lru_cache(maxsize=None)
def _batch_list(steps: int, seed: int = 2) -> tuple[tuple[torch.Tensor, torch.Tensor], ...]:
    x, y = _data()
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        idx = torch.randint(0, 128, (32,), generator=g)
        out.append((x[idx], y[idx]))
    return tuple(out)


def _batches(steps: int):
    return iter(_batch_list(steps))


def _grads(params: list[torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
    ps = [p.detach().requires_grad_(True) for p in params]
    return list(torch.autograd.grad(_loss(ps, x, y), ps))


# ------------------------------------------------------------------- the textbook oracle
@functools.lru_cache(maxsize=None)
def textbook_lookahead_sgd(steps, lr, mu, k, alpha, mode):
    """SGD with momentum (torch's convention: b_1 = g) inside Lookahead, written plainly."""
    theta = [p.clone() for p in _init()]
    phi = [p.clone() for p in theta]  # slow weights start at the initial parameters
    b = [None for _ in theta]  # momentum buffers
    b_slow = [torch.zeros_like(p) for p in theta]
    for t, (x, y) in enumerate(_batches(steps), start=1):
        g = _grads(theta, x, y)
        for i in range(len(theta)):
            b[i] = g[i].clone() if b[i] is None else mu * b[i] + g[i]
            theta[i] = theta[i] - lr * b[i]
        if t % k == 0:
            for i in range(len(theta)):
                phi[i] = phi[i] + alpha * (theta[i] - phi[i])
                theta[i] = phi[i].clone()
                if mode == "reset":
                    b[i] = torch.zeros_like(b[i])
                elif mode == "pullback":
                    b[i] = alpha * b[i] + (1 - alpha) * b_slow[i]
                    b_slow[i] = b[i].clone()
    return theta


def run_wrapped(make_opt, steps, stop_after=None, opt_and_params=None):
    """Train the same problem through ``make_opt(params)``; returns (params, optimizer)."""
    if opt_and_params is None:
        params = [nn.Parameter(p.clone()) for p in _init()]
        opt = make_opt(params)
    else:
        opt, params = opt_and_params
    for t, (x, y) in enumerate(_batches(steps), start=1):
        if stop_after is not None and t > stop_after:
            break
        opt.zero_grad()
        _loss(params, x, y).backward()
        opt.step()
    return params, opt


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("base", ["optimkit", "torch"])
def test_matches_textbook_float64(mode: str, base: str) -> None:
    steps, lr, mu, k, alpha = 300, 0.1, 0.9, 5, 0.6  # alpha != 0.5: alpha and 1 - alpha differ
    expected = textbook_lookahead_sgd(steps, lr, mu, k, alpha, mode)
    sgd = optimkit.SGD if base == "optimkit" else torch.optim.SGD
    got, _ = run_wrapped(lambda ps: Lookahead(sgd(ps, lr=lr, momentum=mu), k=k, alpha=alpha,
                                              pullback_momentum=mode), steps)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g.detach(), e, rtol=1e-11, atol=1e-12)


def test_textbook_check_can_fail() -> None:
    """The oracle distinguishes the modes and the sync (so the comparison above is not vacuous)."""
    a = textbook_lookahead_sgd(60, 0.1, 0.9, 5, 0.5, "none")
    b = textbook_lookahead_sgd(60, 0.1, 0.9, 5, 0.5, "pullback")
    c = textbook_lookahead_sgd(60, 0.1, 0.9, 5, 0.5, "reset")
    plain = textbook_lookahead_sgd(60, 0.1, 0.9, 10**6, 0.5, "none")
    for other in (b, c, plain):
        assert not torch.allclose(a[0], other[0], atol=1e-6)


def test_k1_alpha1_is_the_base_optimizer() -> None:
    got, _ = run_wrapped(lambda ps: Lookahead(torch.optim.SGD(ps, lr=0.1, momentum=0.9), k=1, alpha=1.0), 40)
    ref, _ = run_wrapped(lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9), 40)
    for g, r in zip(got, ref):
        assert torch.equal(g, r)


def test_first_sync_pulls_back_to_the_initial_parameters() -> None:
    k, alpha = 3, 0.25
    init = _init()
    fast, _ = run_wrapped(lambda ps: torch.optim.SGD(ps, lr=0.1), k)  # k plain steps
    got, _ = run_wrapped(lambda ps: Lookahead(torch.optim.SGD(ps, lr=0.1), k=k, alpha=alpha), k)
    for g, f, p0 in zip(got, fast, init):
        torch.testing.assert_close(g.detach(), p0 + alpha * (f.detach() - p0), rtol=0, atol=1e-15)
        assert not torch.allclose(g, f)


@pytest.mark.parametrize("mode", MODES)
def test_matches_pytorch_optimizer_lookahead(mode: str) -> None:
    po = pytest.importorskip("pytorch_optimizer")
    steps, k, alpha = 200, 4, 0.6
    ours, _ = run_wrapped(lambda ps: Lookahead(torch.optim.SGD(ps, lr=0.05, momentum=0.9), k=k, alpha=alpha,
                                               pullback_momentum=mode), steps)
    theirs, _ = run_wrapped(lambda ps: po.Lookahead(torch.optim.SGD(ps, lr=0.05, momentum=0.9), k=k,
                                                    alpha=alpha, pullback_momentum=mode), steps)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-11, atol=1e-12)


def test_matches_pytorch_optimizer_lookahead_adam_none() -> None:
    po = pytest.importorskip("pytorch_optimizer")
    ours, _ = run_wrapped(lambda ps: Lookahead(optimkit.Adam(ps, lr=1e-2), k=6, alpha=0.5), 120)
    theirs, _ = run_wrapped(lambda ps: po.Lookahead(torch.optim.Adam(ps, lr=1e-2), k=6, alpha=0.5), 120)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-10, atol=1e-11)


# -------------------------------------------------------------- momentum handling, others
def test_reset_and_pullback_act_on_adam_exp_avg() -> None:
    params = [nn.Parameter(p.clone()) for p in _init()]
    opt = Lookahead(optimkit.Adam(params, lr=1e-2), k=2, alpha=0.5, pullback_momentum="reset")
    run_wrapped(None, 2, opt_and_params=(opt, params))
    st = opt.state[params[0]]
    assert torch.count_nonzero(st["exp_avg"]) == 0 and torch.count_nonzero(st["exp_avg_sq"]) > 0

    params = [nn.Parameter(p.clone()) for p in _init()]
    opt = Lookahead(optimkit.Adam(params, lr=1e-2), k=2, alpha=0.5, pullback_momentum="pullback")
    run_wrapped(None, 1, opt_and_params=(opt, params))
    m_before_sync = None
    x, y = next(iter(_batches(2)))
    # second step by hand to see the buffer just before the sync
    opt.zero_grad()
    _loss(params, x, y).backward()
    opt.base.step()
    m_before_sync = opt.base.state[params[0]]["exp_avg"].clone()
    opt._lookahead_step += 1
    opt._synchronise()
    torch.testing.assert_close(opt.state[params[0]]["exp_avg"], 0.5 * m_before_sync)  # m_slow was 0
    torch.testing.assert_close(opt.state[params[0]]["slow_momentum"], 0.5 * m_before_sync)


def test_reset_without_a_momentum_buffer_raises() -> None:
    params = [nn.Parameter(p.clone()) for p in _init()]
    opt = Lookahead(optimkit.Adadelta(params), k=2, pullback_momentum="reset")
    with pytest.raises(RuntimeError, match=r"pullback_momentum='reset' needs a momentum buffer.*Adadelta"):
        run_wrapped(None, 2, opt_and_params=(opt, params))
    params = [nn.Parameter(p.clone()) for p in _init()]
    opt = Lookahead(optimkit.Adadelta(params), k=2)  # "none" is fine
    run_wrapped(None, 4, opt_and_params=(opt, params))


@pytest.mark.parametrize("make", [
    lambda ps: optimkit.Prodigy(ps),
    lambda ps: __import__("prodigyopt").Prodigy(ps),
    lambda ps: optimkit.AdamW(ps, lr=1e-2),
    lambda ps: torch.optim.RMSprop(ps, lr=1e-3, momentum=0.9),
], ids=["optimkit.Prodigy", "prodigyopt.Prodigy", "optimkit.AdamW", "torch.RMSprop"])
def test_wraps_other_optimizers(make) -> None:
    mode = "pullback"
    params = [nn.Parameter(p.clone()) for p in _init()]
    try:
        opt = Lookahead(make(params), k=3, pullback_momentum=mode)
    except NotImplementedError:
        pytest.skip("placeholder")
    losses = []
    for x, y in _batches(30):
        opt.zero_grad()
        loss = _loss(params, x, y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(p).all() for p in params)
    assert sum(losses[-5:]) < sum(losses[:5])


# ------------------------------------------------------------------ Optimizer behaviour
def _sgd_la(**kw):
    params = [nn.Parameter(p.clone()) for p in _init()]
    base = optimkit.SGD(params, lr=0.1, momentum=0.9)
    return params, base, Lookahead(base, **kw)


def test_is_an_optimizer_sharing_the_base() -> None:
    params, base, opt = _sgd_la(k=2)
    assert isinstance(opt, torch.optim.Optimizer)
    assert opt.param_groups is base.param_groups
    assert opt.defaults is base.defaults
    opt.param_groups[0]["lr"] = 0.01
    assert base.param_groups[0]["lr"] == 0.01
    run_wrapped(None, 1, opt_and_params=(opt, params))
    st = opt.state[params[0]]
    assert torch.is_tensor(st["momentum_buffer"]) and torch.is_tensor(st["slow_param"])
    assert "slow_param" not in base.state[params[0]]
    assert set(opt.state) == set(params) and len(opt.state) == 2
    assert "Lookahead(k=2" in repr(opt)


def test_zero_grad_and_closure() -> None:
    params, _, opt = _sgd_la(k=2)
    x, y = next(iter(_batches(1)))
    calls = []

    def closure():
        calls.append(1)
        opt.zero_grad()
        loss = _loss(params, x, y)
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert len(calls) == 1 and torch.isfinite(loss)
    opt.zero_grad()
    assert all(p.grad is None for p in params)
    _loss(params, x, y).backward()
    opt.zero_grad(set_to_none=False)
    assert all(torch.count_nonzero(p.grad) == 0 for p in params)


def test_add_param_group_gets_slow_weights() -> None:
    params, base, opt = _sgd_la(k=2, alpha=0.5)
    extra = nn.Parameter(torch.ones(3, dtype=F64))
    opt.add_param_group({"params": [extra], "lr": 0.5})
    assert base.param_groups[-1]["params"][0] is extra
    for _ in range(2):
        opt.zero_grad()
        (extra ** 2).sum().backward()
        opt.step()
    # two SGD-momentum steps from 1: g=2 -> 1 - 0.5*2 = 0; g=0 -> b=0.9*2 = 1.8 -> 0 - 0.9 = -0.9
    # sync: phi = 1 + 0.5 * (-0.9 - 1) = 0.05
    torch.testing.assert_close(extra.detach(), torch.full((3,), 0.05, dtype=F64))


@pytest.mark.parametrize("kw, match", [
    (dict(k=0), r"Lookahead: invalid k=0; expected an integer k >= 1"),
    (dict(k=1.5), r"invalid k=1.5"),
    (dict(k=True), r"invalid k=True"),
    (dict(alpha=0.0), r"Lookahead: invalid alpha=0.0; expected 0 < alpha <= 1"),
    (dict(alpha=1.5), r"invalid alpha=1.5"),
    (dict(alpha=float("nan")), r"invalid alpha=nan"),
    (dict(pullback_momentum="Pullback"), r"invalid pullback_momentum='Pullback'; expected 'none' or 'reset' or 'pullback'"),
])
def test_validation(kw, match) -> None:
    params = [nn.Parameter(torch.zeros(2))]
    with pytest.raises(ValueError, match=match):
        Lookahead(torch.optim.SGD(params, lr=0.1), **kw)


def test_validation_of_base() -> None:
    # parameters without the base optimizer's name (Lookahead(params, optimizer="prodigy") builds it)
    with pytest.raises(ValueError, match=r"Lookahead: invalid base=list; expected a constructed torch.optim.Optimizer"):
        Lookahead([nn.Parameter(torch.zeros(2))])  # type: ignore[arg-type]
    _, _, opt = _sgd_la()
    with pytest.raises(ValueError, match="already a Lookahead"):
        Lookahead(opt)


# ------------------------------------------------------------------------- state_dict
def _roundtrip(sd):
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("mode, make", [
    ("none", lambda ps: optimkit.Adam(ps, lr=1e-2)),
    ("reset", lambda ps: optimkit.SGD(ps, lr=0.1, momentum=0.9)),
    ("pullback", lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9)),
    ("pullback", lambda ps: optimkit.Prodigy(ps)),
])
def test_resume_is_bit_identical(mode, make) -> None:
    steps, cut = 23, 12  # the cut is not a multiple of k: the counter must survive
    try:
        full, _ = run_wrapped(lambda ps: Lookahead(make(ps), k=5, alpha=0.7, pullback_momentum=mode), steps)
    except NotImplementedError:
        pytest.skip("placeholder")
    part, opt = run_wrapped(lambda ps: Lookahead(make(ps), k=5, alpha=0.7, pullback_momentum=mode), steps,
                            stop_after=cut)
    sd = _roundtrip(opt.state_dict())
    saved_params = [p.detach().clone() for p in part]
    assert sd["lookahead"]["step"] == cut and sd["lookahead"]["pullback_momentum"] == mode

    params = [nn.Parameter(p) for p in saved_params]
    # a fresh wrapper with different hyperparameters: the checkpoint's win, as for lr in torch
    resumed = Lookahead(make(params), k=2, alpha=0.1)
    resumed.load_state_dict(sd)
    assert (resumed.k, resumed.alpha, resumed.pullback_momentum) == (5, 0.7, mode)
    batches = list(_batches(steps))[cut:]
    for x, y in batches:
        resumed.zero_grad()
        _loss(params, x, y).backward()
        resumed.step()
    for a, b in zip(params, full):
        assert torch.equal(a, b)


def test_state_dict_extends_the_base_one() -> None:
    params, base, opt = _sgd_la(k=2, pullback_momentum="pullback")
    run_wrapped(None, 3, opt_and_params=(opt, params))
    sd = opt.state_dict()
    base_sd = base.state_dict()
    assert sd["param_groups"] == base_sd["param_groups"] and set(sd["state"]) == set(base_sd["state"])
    assert set(sd["lookahead"]["slow_state"]) == {0, 1}
    assert set(sd["lookahead"]["slow_state"][0]) == {"slow_param", "slow_momentum"}


def test_load_state_dict_errors_change_nothing() -> None:
    params, base, opt = _sgd_la(k=2)
    run_wrapped(None, 3, opt_and_params=(opt, params))
    good = opt.state_dict()
    slow_before = opt.state[params[0]]["slow_param"].clone()
    with pytest.raises(ValueError, match=r"no 'lookahead' entry.*lookahead.base.load_state_dict"):
        opt.load_state_dict(base.state_dict())
    bad = _roundtrip(good)
    bad["lookahead"]["slow_state"][0]["slow_param"] = torch.zeros(7, dtype=F64)
    with pytest.raises(ValueError, match=r"has shape \(7,\), the parameter has \(5, 3\)"):
        opt.load_state_dict(bad)
    bad = _roundtrip(good)
    bad["lookahead"]["slow_state"][9] = bad["lookahead"]["slow_state"][0]
    with pytest.raises(ValueError, match="unknown parameter index 9"):
        opt.load_state_dict(bad)
    bad = _roundtrip(good)
    bad["lookahead"]["alpha"] = 2.0
    with pytest.raises(ValueError, match="invalid alpha=2.0"):
        opt.load_state_dict(bad)
    bad = _roundtrip(good)
    bad["lookahead"]["step"] = -1
    with pytest.raises(ValueError, match="step=-1"):
        opt.load_state_dict(bad)
    assert torch.equal(opt.state[params[0]]["slow_param"], slow_before) and opt.k == 2


def test_lr_scheduler_accepts_it() -> None:
    params, base, opt = _sgd_la(k=3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10, eta_min=0.0)
    lrs = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "scheduler before optimizer" warning
        for x, y in _batches(10):
            opt.zero_grad()
            _loss(params, x, y).backward()
            opt.step()
            sched.step()
            lrs.append(base.param_groups[0]["lr"])
    expected = [0.1 * (1 + math.cos(math.pi * t / 10)) / 2 for t in range(1, 11)]
    assert lrs == pytest.approx(expected, abs=1e-12)


# ------------------------------------------------- the state view: where each key lives
def _walk_and_write_back(opt, move=lambda t: t.clone()):
    """What Lightning's ``_optimizer_to_device`` does after every ``load_state_dict``
    (lightning/fabric/utilities/optimizer.py, 2.x): write each entry back into the mapping."""
    from collections.abc import MutableMapping

    for p, v in opt.state.items():
        if not isinstance(v, MutableMapping):
            opt.state[p] = {k: move(x) for k, x in v.items()}
            continue
        for key, val in v.items():
            if key != "step":
                v[key] = move(val)


@pytest.mark.parametrize("make", [
    lambda ps: optimkit.AdamW(ps, lr=1e-2),
    lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9),
], ids=["optimkit.AdamW", "torch.SGD"])
def test_writing_state_entries_back_keeps_slow_weights_out_of_the_base(make) -> None:
    """Regression: ``state[p]`` was a ChainMap whose writes all went to the base's dict, so
    Lightning's device move after a resume copied ``slow_param``/``slow_momentum`` into the
    base optimizer's state (and from there into every later checkpoint)."""
    steps, cut = 14, 7
    full, _ = run_wrapped(lambda ps: Lookahead(make(ps), k=3, pullback_momentum="pullback"), steps)
    params, opt = run_wrapped(lambda ps: Lookahead(make(ps), k=3, pullback_momentum="pullback"), steps,
                              stop_after=cut)
    slow_before = {p: dict(opt._slow[p]) for p in params}
    _walk_and_write_back(opt)
    for p in params:
        assert not set(opt.base.state[p]) & {"slow_param", "slow_momentum"}
        assert set(opt._slow[p]) == {"slow_param", "slow_momentum"}
        for key, old in slow_before[p].items():  # the written value is the one Lookahead uses
            assert opt._slow[p][key] is not old and torch.equal(opt._slow[p][key], old)
            assert opt.state[p][key] is opt._slow[p][key]
    sd = opt.state_dict()
    assert all(not set(st) & {"slow_param", "slow_momentum"} for st in sd["state"].values())
    # the whole-entry form splits the same way: Lightning 1.x did optimizer.state[p] =
    # apply_to_collection(state[p], ...), which rebuilds the mapping as type(m)(OrderedDict(...))
    for p in params:
        v = opt.state[p]
        opt.state[p] = type(v)(OrderedDict((k, x.clone()) for k, x in v.items()))
        assert not set(opt.base.state[p]) & {"slow_param", "slow_momentum"}
        assert set(opt._slow[p]) == {"slow_param", "slow_momentum"}
    for x, y in list(_batches(steps))[cut:]:
        opt.zero_grad()
        _loss(params, x, y).backward()
        opt.step()
    for a, b in zip(params, full):
        assert torch.equal(a, b)


def test_state_view_mapping_behaviour() -> None:
    params, base, opt = _sgd_la(k=2, pullback_momentum="pullback")
    assert opt.state[params[0]] is base.state[params[0]]  # no slow weights yet: the base's dict
    run_wrapped(None, 2, opt_and_params=(opt, params))
    st = opt.state[params[0]]
    assert set(st) == {"momentum_buffer", "slow_param", "slow_momentum"} and len(st) == 3
    assert "slow_param" in st and "exp_avg" not in st and "slow_param" in repr(st)
    # copies are plain dicts of the entries, never copies of the optimizer behind the view
    deep = copy.deepcopy(st)
    assert type(deep) is dict and set(deep) == set(st)
    assert all(torch.equal(deep[k], st[k]) for k in st)
    assert deep["slow_param"] is not st["slow_param"] and copy.copy(st)["slow_param"] is st["slow_param"]
    # a slow key without slow weights is refused, and nothing changes
    with pytest.raises(ValueError, match="no 'slow_param'"):
        opt.state[params[0]] = {"momentum_buffer": torch.zeros(5, 3), "slow_momentum": torch.zeros(5, 3)}
    assert set(opt.state[params[0]]) == {"momentum_buffer", "slow_param", "slow_momentum"}
    # state[p] = base-only entries: the slow weights restart from the parameter at the next step
    opt.state[params[1]] = {"momentum_buffer": base.state[params[1]]["momentum_buffer"]}
    assert params[1] not in opt._slow and set(opt.state[params[1]]) == {"momentum_buffer"}
    del opt.state[params[0]]["slow_param"]  # deleting slow_param forgets p's slow weights
    assert params[0] not in opt._slow
    run_wrapped(None, 1, opt_and_params=(opt, params))
    assert set(opt._slow) == set(params)
    del opt.state[params[0]]
    assert params[0] not in base.state and params[0] not in opt._slow
    with pytest.raises(KeyError):
        del opt.state[params[0]]


def test_loads_a_checkpoint_whose_base_state_holds_slow_copies() -> None:
    """Checkpoints written by Lightning with the old state view have slow keys in the base's
    per-parameter state too; the copies in "lookahead" are the real ones and win."""
    steps, cut = 12, 5
    full, _ = run_wrapped(lambda ps: Lookahead(optimkit.AdamW(ps, lr=1e-2), k=3, pullback_momentum="pullback"),
                          steps)
    part, opt = run_wrapped(lambda ps: Lookahead(optimkit.AdamW(ps, lr=1e-2), k=3, pullback_momentum="pullback"),
                            steps, stop_after=cut)
    sd = _roundtrip(opt.state_dict())
    for pid, st in sd["state"].items():  # what the old view left there: stale copies
        st.update({k: torch.full_like(v, 123.0) for k, v in sd["lookahead"]["slow_state"][pid].items()})
    params = [nn.Parameter(p.detach().clone()) for p in part]
    resumed = Lookahead(optimkit.AdamW(params, lr=1e-2), k=3)
    resumed.load_state_dict(sd)
    assert all(not set(resumed.base.state[p]) & {"slow_param", "slow_momentum"} for p in params)
    for x, y in list(_batches(steps))[cut:]:
        resumed.zero_grad()
        _loss(params, x, y).backward()
        resumed.step()
    for a, b in zip(params, full):
        assert torch.equal(a, b)


# ------------------------------------------------------- load_state_dict: refusals, atomic
def _snapshot(opt) -> dict:
    """Every tensor and value a load could change, cloned; compared bit for bit."""
    def freeze(v):
        return v.detach().clone() if isinstance(v, torch.Tensor) else v

    return {
        "base_state": {id(p): {k: freeze(v) for k, v in st.items()} for p, st in opt.base.state.items()},
        "slow": {id(p): {k: freeze(v) for k, v in st.items()} for p, st in opt._slow.items()},
        "groups": [{k: ([id(p) for p in v] if k == "params" else freeze(v)) for k, v in g.items()}
                   for g in opt.param_groups],
        "lookahead": (opt.k, opt.alpha, opt.pullback_momentum, opt._lookahead_step),
        "params": [freeze(p) for g in opt.param_groups for p in g["params"]],
        "rng": torch.get_rng_state(),
    }


def _assert_same(a, b, path="") -> None:
    if isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), path
        for k in a:
            _assert_same(a[k], b[k], f"{path}/{k}")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{path}/{i}")
    elif isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, path
        assert torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)), path  # bits
    else:
        assert a == b and type(a) is type(b), path


def _la_at(make, steps, k=3, alpha=0.5):
    params = [nn.Parameter(p.clone()) for p in _init()]
    opt = Lookahead(make(params), k=k, alpha=alpha, pullback_momentum="pullback")
    run_wrapped(None, steps, opt_and_params=(opt, params))
    return params, opt


def _break_lookahead(sd, how):
    la = sd["lookahead"]
    if how == "alpha":
        la["alpha"] = 1.5
    elif how == "shape":
        la["slow_state"][0]["slow_param"] = torch.zeros(7, dtype=F64)
    elif how == "index":
        la["slow_state"][9] = la["slow_state"][0]
    elif how == "bool_index":
        la["slow_state"][True] = la["slow_state"].pop(1)
    elif how == "slow_state_type":
        la["slow_state"] = [la["slow_state"][0]]
    elif how == "extra_key":
        la["slow_state"][0]["exp_avg"] = la["slow_state"][0]["slow_param"]
    elif how == "missing":
        del la["step"]
    return sd


BASES = {
    "optimkit.AdamW": lambda ps: optimkit.AdamW(ps, lr=1e-2),
    "torch.SGD": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9),
}


@pytest.mark.parametrize("how", ["alpha", "shape", "index", "bool_index", "slow_state_type", "extra_key", "missing"])
@pytest.mark.parametrize("base", sorted(BASES))
def test_rejected_lookahead_part_changes_nothing_not_even_the_base(base, how) -> None:
    """The base part of the state_dict is valid and differs from the current state: had the
    base been loaded before Lookahead's checks, its state would have changed."""
    _, other = _la_at(BASES[base], 8, k=4, alpha=0.3)
    sd = _break_lookahead(_roundtrip(other.state_dict()), how)
    _, opt = _la_at(BASES[base], 5)
    before = _snapshot(opt)
    with pytest.raises(ValueError, match=r"Lookahead(\.load_state_dict)?: "):
        opt.load_state_dict(sd)
    _assert_same(before, _snapshot(opt))


def _break_base(sd, how):
    if how == "groups":
        sd["param_groups"].append(dict(sd["param_groups"][0], params=[]))
    elif how == "group_size":
        sd["param_groups"][0]["params"] = sd["param_groups"][0]["params"][:1]
    elif how == "state_shape":
        key = "exp_avg" if "exp_avg" in sd["state"][0] else "momentum_buffer"
        sd["state"][0][key] = torch.zeros(2, dtype=F64)
    return sd


@pytest.mark.parametrize("base, how", [
    ("optimkit.AdamW", "groups"), ("optimkit.AdamW", "group_size"), ("optimkit.AdamW", "state_shape"),
    ("torch.SGD", "groups"), ("torch.SGD", "group_size"),
])
def test_rejected_base_part_changes_nothing_not_even_lookahead(base, how) -> None:
    _, other = _la_at(BASES[base], 8, k=4, alpha=0.3)
    sd = _break_base(_roundtrip(other.state_dict()), how)
    _, opt = _la_at(BASES[base], 5)
    before = _snapshot(opt)
    with pytest.raises(ValueError):
        opt.load_state_dict(sd)
    _assert_same(before, _snapshot(opt))


def test_snapshot_comparison_can_fail() -> None:
    _, opt = _la_at(BASES["optimkit.AdamW"], 5)
    _, other = _la_at(BASES["optimkit.AdamW"], 8, k=4, alpha=0.3)
    before = _snapshot(opt)
    opt.load_state_dict(other.state_dict())
    with pytest.raises(AssertionError):
        _assert_same(before, _snapshot(opt))


@pytest.mark.parametrize("base", sorted(BASES))
def test_plain_state_dict_into_lookahead_is_refused_with_the_way_to_load_it(base) -> None:
    _, opt = _la_at(BASES[base], 5)
    plain = _roundtrip(opt.base.state_dict())
    before = _snapshot(opt)
    name = type(opt.base).__name__
    with pytest.raises(ValueError, match=rf"no 'lookahead' entry; to load a plain {name} state_dict use "
                                         r"lookahead\.base\.load_state_dict"):
        opt.load_state_dict(plain)
    _assert_same(before, _snapshot(opt))
    opt.base.load_state_dict(plain)  # the way the message names works


def test_lookahead_state_dict_into_a_bare_optimkit_optimizer_is_refused() -> None:
    _, la = _la_at(BASES["optimkit.AdamW"], 5)
    sd = _roundtrip(la.state_dict())
    params = [nn.Parameter(p.clone()) for p in _init()]
    bare = optimkit.AdamW(params, lr=1e-2)
    run_wrapped(None, 2, opt_and_params=(bare, params))
    before = {id(p): {k: v.clone() for k, v in st.items()} for p, st in bare.state.items()}
    with pytest.raises(ValueError, match=r"AdamW\.load_state_dict: this is a Lookahead state_dict.*"
                                         r"optimkit\.Lookahead\(AdamW\(\.\.\.\)\) with Lookahead\.load_state_dict"):
        bare.load_state_dict(sd)
    _assert_same(before, {id(p): {k: v.clone() for k, v in st.items()} for p, st in bare.state.items()})


def test_lookahead_state_dict_into_a_bare_torch_optimizer_loads_silently_without_slow_weights() -> None:
    """torch.optim's load_state_dict ignores keys it does not know, and optimkit cannot change
    it: the base state loads and the slow weights are dropped (documented in docs/lookahead.md).
    If this starts failing, torch began refusing unknown keys: update the docs."""
    _, la = _la_at(BASES["torch.SGD"], 5)
    sd = _roundtrip(la.state_dict())
    params = [nn.Parameter(p.clone()) for p in _init()]
    bare = torch.optim.SGD(params, lr=0.1, momentum=0.9)
    bare.load_state_dict(sd)
    assert torch.equal(bare.state[params[0]]["momentum_buffer"], la.base.state[la.param_groups[0]["params"][0]]["momentum_buffer"])
    assert "lookahead" not in bare.state_dict()


def test_load_pre_hook_runs_before_the_checks() -> None:
    """As in torch (PR#105953): a pre-hook may adapt a checkpoint, e.g. a plain one."""
    _, src = _la_at(BASES["optimkit.AdamW"], 5)
    plain = _roundtrip(src.base.state_dict())
    _, opt = _la_at(BASES["optimkit.AdamW"], 2)

    def to_lookahead(o, sd):
        return dict(sd, lookahead={"k": 7, "alpha": 0.25, "pullback_momentum": "none", "step": 0, "slow_state": {}})

    opt.register_load_state_dict_pre_hook(to_lookahead)
    opt.load_state_dict(plain)
    assert (opt.k, opt.alpha, opt._lookahead_step, opt._slow) == (7, 0.25, 0, {})
