"""Control over d: ``d_limit`` (a cap) and ``d_freeze_step`` (d stops updating, Adam goes on),
each against a hand-computed trajectory: a textbook Prodigy loop in float64 written here from
the paper's equations (prodigyopt's order of operations), with the cap / freeze applied to
its d update. Also their validation (one error format, nothing changed on a refused step)."""

from __future__ import annotations

import copy
import math

import pytest
import torch

import optimkit

N = 64
STEPS = 150


def _problem():
    g = torch.Generator().manual_seed(3)
    target = torch.randn(N, generator=g, dtype=torch.float64)
    scale = torch.rand(N, generator=g, dtype=torch.float64) + 0.5
    noise = torch.randn(STEPS, N, generator=g, dtype=torch.float64) * 0.3
    p_init = torch.randn(N, generator=g, dtype=torch.float64) * 0.1
    return target, scale, noise, p_init


def _grad(p, t, target, scale, noise):
    return scale * (p - target) + noise[t]


def textbook(*, d0=1e-6, d_coef=1.0, lr=1.0, betas=(0.9, 0.999), eps=1e-8, growth=math.inf,
             d_limit=None, freeze=None):
    """Prodigy (Mishchenko & Defazio 2023, Algorithm 1 as prodigyopt implements it) on one
    tensor; returns the d after every step and the final parameter."""
    target, scale, noise, p = _problem()
    p = p.clone()
    beta1, beta2 = betas
    beta3 = math.sqrt(beta2)
    p0 = p.clone()
    s = torch.zeros(N, dtype=torch.float64)
    m, v = torch.zeros_like(s), torch.zeros_like(s)
    d, d_max, r, k = d0, d0, 0.0, 0
    ds = []
    for t in range(STEPS):
        g = _grad(p, t, target, scale, noise)
        dlr = d * lr
        r = r * beta3 + (d / d0) * dlr * torch.dot(g, p0 - p).item()
        s = s * beta3 + (d / d0) * dlr * g
        m = m * beta1 + d * (1 - beta1) * g
        v = v * beta2 + d * d * (1 - beta2) * g * g
        den = s.abs().sum().item()
        if den > 0:
            d_hat = d_coef * r / den
            d_new = max(d, d_hat) if d == d0 else d
            d_max = max(d_max, d_hat)
            d_new = min(d_max, d_new * growth)
            if d_limit is not None:
                d_new = min(d_new, d_limit)  # the cap
            if freeze is not None and k >= freeze:
                d_new = d  # frozen from step `freeze` on
            p = p - dlr * m / (v.sqrt() + d_new * eps)
            d, k = d_new, k + 1
        ds.append(d)
    return ds, p


def ours(**kw):
    target, scale, noise, p_init = _problem()
    p = torch.nn.Parameter(p_init.clone())
    opt = optimkit.Prodigy([p], **kw)
    ds = []
    for t in range(STEPS):
        p.grad = _grad(p.detach(), t, target, scale, noise)
        opt.step()
        ds.append(opt.param_groups[0]["d"])
    return ds, p.detach(), opt


def _close(a, b):
    assert len(a) == len(b)
    for t, (x, y) in enumerate(zip(a, b)):
        assert x == pytest.approx(y, rel=1e-12), f"step {t}: {x} != {y}"


def test_textbook_matches_the_default_path():
    want, pw = textbook()
    got, pg, _ = ours()
    _close(got, want)
    torch.testing.assert_close(pg, pw, rtol=1e-10, atol=1e-12)
    assert want[-1] > 1e3 * 1e-6  # d moved


@pytest.mark.parametrize("foreach", [False, True])
def test_d_limit_caps_d_as_computed_by_hand(foreach):
    free, _ = textbook()
    cap = free[-1] / 20  # binds mid-run
    want, pw = textbook(d_limit=cap)
    got, pg, opt = ours(d_limit=cap, foreach=foreach)
    _close(got, want)
    torch.testing.assert_close(pg, pw, rtol=1e-10, atol=1e-12)
    assert max(got) == cap and sum(d == cap for d in got) > 20  # the cap bound
    assert opt.param_groups[0]["d_max"] > cap  # the estimate itself goes on (for logging)


@pytest.mark.parametrize("foreach", [False, True])
def test_d_freeze_step_freezes_d_and_adam_goes_on(foreach):
    want, pw = textbook(freeze=10)
    got, pg, opt = ours(d_freeze_step=10, foreach=foreach)
    _close(got, want)
    torch.testing.assert_close(pg, pw, rtol=1e-10, atol=1e-12)
    assert got[9] != got[8] and len(set(got[9:])) == 1  # moved until step 10, fixed after
    free, pf = textbook()
    assert free[-1] != got[-1] and not torch.equal(pf, pg)  # not vacuous
    assert opt.param_groups[0]["k"] == STEPS  # the steps (Adam part) continued


def test_d_freeze_and_limit_together_and_changed_mid_run():
    """Both are group values: setting them mid-run (e.g. when a LoRA starts to overcook)
    takes effect at the next step."""
    target, scale, noise, p_init = _problem()
    p = torch.nn.Parameter(p_init.clone())
    opt = optimkit.Prodigy([p])
    for t in range(STEPS):
        if t == 40:
            opt.param_groups[0]["d_freeze_step"] = 40
        p.grad = _grad(p.detach(), t, target, scale, noise)
        opt.step()
        if t == 39:
            d40 = opt.param_groups[0]["d"]
    assert opt.param_groups[0]["d"] == d40
    want, _ = textbook(freeze=40)
    assert want[-1] == pytest.approx(d40, rel=1e-12)


def test_d_limit_per_group_with_split_groups():
    a = torch.nn.Parameter(torch.randn(20, dtype=torch.float64))
    b = torch.nn.Parameter(torch.randn(20, dtype=torch.float64))
    opt = optimkit.Prodigy([{"params": [a], "d_limit": 1e-4}, {"params": [b]}], split_groups=True)
    for t in range(60):
        a.grad, b.grad = a.detach() - 3.0, b.detach() - 3.0
        opt.step()
    assert opt.param_groups[0]["d"] == 1e-4 < opt.param_groups[1]["d"]


@pytest.mark.parametrize("kw,msg", [
    (dict(d_limit=-1.0), "Prodigy: invalid d_limit=-1.0; expected d_limit > 0 or None"),
    (dict(d_limit=0.0), "Prodigy: invalid d_limit=0.0; expected d_limit > 0 or None"),
    (dict(d_limit=float("nan")), "Prodigy: invalid d_limit=nan; expected d_limit > 0 or None"),
    (dict(d_limit="1e-3"), "Prodigy: invalid d_limit='1e-3'; expected d_limit > 0 or None"),
    (dict(d_limit=True), "Prodigy: invalid d_limit=True; expected d_limit > 0 or None"),
    (dict(d_limit=1e-7), "Prodigy: invalid d_limit=1e-07; expected d_limit >= d0"),
    (dict(d_freeze_step=-1), "Prodigy: invalid d_freeze_step=-1; expected an int >= 0"),
    (dict(d_freeze_step=2.5), "Prodigy: invalid d_freeze_step=2.5; expected an int >= 0"),
    (dict(d_freeze_step=True), "Prodigy: invalid d_freeze_step=True; expected an int >= 0"),
    (dict(diagnose=1), "Prodigy: invalid diagnose=1"),
])
def test_invalid_values_are_refused_in_the_project_format(kw, msg):
    with pytest.raises(ValueError) as e:
        optimkit.Prodigy([torch.nn.Parameter(torch.zeros(2))], **kw)
    assert str(e.value).startswith(msg), str(e.value)


@pytest.mark.parametrize("key,value", [("d_limit", -1.0), ("d_freeze_step", -3)])
def test_invalid_value_set_after_construction_changes_nothing(key, value):
    p = torch.nn.Parameter(torch.randn(5, dtype=torch.float64))
    opt = optimkit.Prodigy([p])
    for _ in range(3):
        p.grad = p.detach() - 1
        opt.step()
    before = (p.detach().clone(), copy.deepcopy(opt.state_dict()), torch.get_rng_state())
    opt.param_groups[0][key] = value
    p.grad = p.detach() - 1
    with pytest.raises(ValueError, match=f"invalid {key}"):
        opt.step()
    opt.param_groups[0][key] = None
    after = opt.state_dict()
    assert torch.equal(before[0], p.detach()) and torch.equal(before[2], torch.get_rng_state())
    for pid, st in before[1]["state"].items():
        for k, v in st.items():
            assert torch.equal(v, after["state"][pid][k]) if isinstance(v, torch.Tensor) \
                else v == after["state"][pid][k]
    assert before[1]["param_groups"][0]["d"] == after["param_groups"][0]["d"]
