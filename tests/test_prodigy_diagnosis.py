"""Prodigy's diagnosis (``ProdigyDiagnosisWarning``: each likely cause of a ``d`` stuck at
``d0`` produces its message, a runaway ``d`` is reported, healthy runs warn nothing, no host
sync is added) and ``group["effective_lr"]`` after ``scheduler.step()``."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

import optimkit
from optimkit import ProdigyDiagnosisWarning
from test_prodigy import Net, _count_syncs, _grads, _tiny, train

N = 40


def _run(steps=120, *, dtype=torch.float64, gscale=1.0, linear=False, sched=None, noise=0.5,
         **kw):
    """A noisy quadratic (or linear: unbounded below) on one tensor; the diagnosis warnings."""
    g = torch.Generator().manual_seed(0)
    p = torch.nn.Parameter(torch.randn(N, generator=g, dtype=torch.float64).to(dtype))
    target = torch.randn(N, generator=g, dtype=torch.float64)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        opt = optimkit.Prodigy([p], **kw)
        s = sched(opt) if sched else None
        for _ in range(steps):
            eta = noise * torch.randn(N, generator=g, dtype=torch.float64)
            grad = torch.ones(N, dtype=torch.float64) if linear else p.detach().double() - target
            p.grad = ((grad + eta) * gscale).to(dtype)
            opt.step()
            if s is not None:
                s.step()
    return opt, [str(w.message) for w in rec if w.category is ProdigyDiagnosisWarning]


def _one(msgs, *needles):
    assert len(msgs) == 1, msgs
    for n in needles:
        assert n in msgs[0], (n, msgs[0])


def test_small_lr_warns_at_construction_naming_learning_rate_1():
    with pytest.warns(ProdigyDiagnosisWarning) as rec:
        optimkit.Prodigy([torch.nn.Parameter(torch.zeros(2))], lr=2e-6)
    assert len(rec) == 1
    msg = str(rec[0].message)
    assert "--learning_rate 1.0" in msg and "lr=1.0" in msg and "multiplies" in msg
    assert rec[0].filename == __file__  # points at the caller


def test_stuck_lr_far_below_one():
    opt, msgs = _run(lr=1e-3)
    assert opt.param_groups[0]["d"] == 1e-6
    assert "lr=0.001 is far below 1" in msgs[0]  # the construction warning
    _one(msgs[1:], "d is still d0=1e-06 (d=1e-06) after 100 steps", "lr=0.001 is far below 1",
         "--learning_rate 1.0")


def test_stuck_safeguard_warmup_from_lr_zero():
    _, msgs = _run(safeguard_warmup=True,
                   sched=lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda t: t / 2000))
    _one(msgs, "safeguard_warmup=True under an lr warm-up", "safeguard_warmup=False")


def test_stuck_gradients_clipped_to_a_tiny_norm():
    _, msgs = _run(gscale=1e-12)
    _one(msgs, "the gradients are tiny", "max_norm")


def test_stuck_bias_correction_early_in_training():
    _, msgs = _run(use_bias_correction=True, lr=0.15, noise=20.0)  # bc adds to a small lr
    _one(msgs, "use_bias_correction=True multiplies the early steps", "use_bias_correction=False")


def test_stuck_d0_far_below_the_parameter_scale():
    _, msgs = _run(dtype=torch.bfloat16, d0=1e-6)
    # at construction: bfloat16 rounded to nearest; after 100 steps: d still d0, and why
    assert len(msgs) == 2, msgs
    assert "bfloat16 parameters with stochastic_rounding=False" in msgs[0], msgs[0]
    _one(msgs[1:], "d0=1e-06 is far below the parameters' scale", "bfloat16",
         "stochastic_rounding=True")


def test_low_precision_parameters_warn_at_construction_unless_stochastic():
    for dtype in (torch.bfloat16, torch.float16):
        p = torch.nn.Parameter(torch.zeros(3, dtype=dtype))
        with pytest.warns(ProdigyDiagnosisWarning, match=rf"{str(dtype)[6:]} parameters with "
                          "stochastic_rounding=False.*stochastic_rounding=True"):
            optimkit.Prodigy([p])
        with warnings.catch_warnings():
            warnings.simplefilter("error", ProdigyDiagnosisWarning)
            optimkit.Prodigy([p], stochastic_rounding=True)
            optimkit.Prodigy([p], diagnose=False)
            optimkit.Prodigy([torch.nn.Parameter(torch.zeros(3))])


def test_runaway_d():
    opt, msgs = _run(steps=130, linear=True)
    _one(msgs, "d keeps growing", "d_limit", "d_freeze_step")
    capped, msgs = _run(steps=130, linear=True, d_limit=1.0)
    assert msgs == [] and capped.param_groups[0]["d"] == 1.0  # the cap stops it


def test_each_warning_once_and_diagnose_false_silences():
    opt, msgs = _run(steps=250, lr=1e-3)
    assert len(msgs) == 2  # construction + stuck, not repeated
    _, msgs = _run(lr=1e-3, diagnose=False)
    assert msgs == []


@pytest.mark.parametrize("kw", [dict(), dict(weight_decay=0.01, use_bias_correction=True,
                                              safeguard_warmup=True, d0=1e-9)])
def test_healthy_runs_warn_nothing(kw):
    with warnings.catch_warnings():
        warnings.simplefilter("error", ProdigyDiagnosisWarning)
        _, opt = train(lambda g: optimkit.Prodigy(g, **kw), 150)
        _run(steps=150, **kw)
    assert opt.param_groups[0]["d"] > 10 * kw.get("d0", 1e-6)


def test_diagnosis_adds_no_host_sync(monkeypatch):
    """Stuck runs are watched with the host floats the step already has: one sync per step,
    and one extra read only at the moment the d0 cause is examined (once)."""
    ps = _tiny()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = optimkit.Prodigy(ps, foreach=True, lr=1e-4)
    counter = _count_syncs(monkeypatch)
    for t in range(30):
        _grads(ps, t)
        before = counter["n"]
        opt.step()
        assert counter["n"] - before == 1, f"step {t}"


# ----------------------------------------------------------------------------- effective_lr
def _check_effective(opt):
    for g in opt.param_groups:
        b1, b2 = (float(b) for b in g["betas"])
        k = g["k"]
        bc = math.sqrt(1 - b2 ** (k + 1)) / (1 - b1 ** (k + 1)) if g["use_bias_correction"] else 1
        assert g["effective_lr"] == pytest.approx(g["d"] * g["lr"] * bc, rel=1e-14, abs=0)


@pytest.mark.parametrize("make_sched", [
    lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda t: 0.9 ** t),
    lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=1.0, total_steps=30),
    None,  # a manual lr change
], ids=["LambdaLR", "OneCycleLR", "manual"])
@pytest.mark.parametrize("split", [False, True])
def test_effective_lr_is_what_the_next_step_applies(make_sched, split):
    ps = _tiny()
    groups = [{"params": ps[:3]}, {"params": ps[3:], "lr": 0.5 if split else 0.0}]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ProdigyDiagnosisWarning)
        opt = optimkit.Prodigy(groups, use_bias_correction=True, split_groups=split)
        sched = make_sched(opt) if make_sched else None
    _check_effective(opt)
    for t in range(25):
        _grads(ps, t)
        eff = opt.param_groups[0]["effective_lr"]
        before = ps[0].detach().clone()
        opt.step()
        st, d_new = opt.state[ps[0]], opt.param_groups[0]["d"]
        want = -eff * st["exp_avg"] / (st["exp_avg_sq"].sqrt() + d_new * 1e-8)
        torch.testing.assert_close(ps[0].detach() - before, want, rtol=1e-9, atol=1e-15)
        if sched is not None:
            sched.step()
        else:
            for g in opt.param_groups:
                g["lr"] = g["lr"] * 0.8 if g["lr"] else 0.0
        _check_effective(opt)  # right after the schedule step: no lag
