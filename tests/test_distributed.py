"""optimkit under torch.distributed: DDP, ZeroRedundancyOptimizer and FSDP2 on CPU/gloo, 2 ranks.

One real 2-process job (``torch.multiprocessing`` spawn, gloo, MASTER_ADDR=127.0.0.1, a free
port) runs every scenario for every optimizer (see tests/dist_workers.py); the tests compare
what each rank ended with against a single-process run of the same model on the full batch.

Tolerances: the runs are float64 (see dist_workers.DTYPE for why), and parameters and
Prodigy's d after 50 steps must agree with the single-process run to ``rtol=1e-7,
atol=1e-9`` (well inside float32 tolerance; measured agreement is ~1e-11 relative: the ranks
average two half-batch gradients where one process takes a full-batch mean, so sums round
differently). Across ranks parameters and d must be bitwise identical, and a resumed run must
equal the uninterrupted run exactly, optimizer state included.

The job has a hard wall-clock limit (``JOB_TIMEOUT_S``) and gloo collectives a 30 s timeout,
so a rank stuck in a collective fails the tests instead of hanging CI.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch

import dist_workers as dw

if not torch.distributed.is_available():  # pragma: no cover - CPU wheels ship gloo
    pytest.skip("torch.distributed is not available", allow_module_level=True)

JOB_TIMEOUT_S = 180
TOL = dict(rtol=1e-7, atol=1e-9)
EXACT = dict(rtol=0.0, atol=0.0)

NAMES = dw.case_names()
PRODIGY = [n for n in NAMES if dw.is_prodigy(n)]


def _subset(*want: str) -> list[str]:
    """One case per kind of state, for the slower scenarios (checkpoints, missing grads)."""
    picked = []
    for cls_name, needs_momentum in want:
        for n in NAMES:
            cls, kw = dw.optimizer_spec(n)
            if cls.__name__ == cls_name and bool(kw.get("momentum")) == needs_momentum:
                picked.append(n)
                break
    return picked


# momentum_buffer; sum; step + exp_avg + exp_avg_sq; Prodigy's global d, d_max, k, s, p0
STATEFUL = _subset(("SGD", True), ("Adagrad", False), ("Adam", False), ("Prodigy", False))
PLAN = [
    ("ddp", NAMES),
    ("ddp_flat", NAMES),
    ("zero", NAMES),
    ("zero_noreduce", PRODIGY),
    ("zero_ckpt", STATEFUL),
    ("fsdp2", NAMES),
    ("fsdp2_ckpt", STATEFUL),
    # last: a failure here (a rank stuck in a collective) cannot disturb the others
    ("zero_nograd", STATEFUL),
]


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """Run the whole plan once for the module: ([rank0, rank1] results, job error or None)."""
    outdir = tmp_path_factory.mktemp("dist")
    dw.save_digits(str(outdir / "digits.pt"))
    results, error = dw.launch(PLAN, str(outdir), timeout=JOB_TIMEOUT_S)
    return results, error, torch.load(outdir / "digits.pt", weights_only=True)


@pytest.fixture(scope="module")
def reference(job):
    """Single-process run on the full batch, cached per (optimizer, dropped parameters)."""
    data = job[2]

    @functools.lru_cache(maxsize=None)
    def run(name: str, drop: tuple[str, ...] = ()):
        return dw.train_single(name, data, drop_names=drop,
                               drop_steps=dw.NOGRAD_STEPS if drop else ())

    return run


def outcome(job, scenario: str, name: str) -> tuple[dict, dict]:
    """Both ranks' results for one scenario and optimizer; fails on a rank's error or absence."""
    results, error = job[0], job[1]
    rs = [r.get(scenario, {}).get(name) for r in results]
    if any(r is None for r in rs):
        pytest.fail(f"{scenario}/{name}: no result from rank(s) "
                    f"{[i for i, r in enumerate(rs) if r is None]}; {error or 'job ended early'}")
    for i, r in enumerate(rs):
        if "error" in r:
            pytest.fail(f"{scenario}/{name} failed on rank {i}:\n{r['error']}")
    return rs[0], rs[1]


def assert_ranks_identical(r0: dict, r1: dict) -> None:
    for k, p0 in r0["params"].items():
        assert torch.equal(p0, r1["params"][k]), f"param {k} differs between ranks"
    assert r0["d"] == r1["d"], f"Prodigy's d differs between ranks: {r0['d'][-3:]} vs {r1['d'][-3:]}"


def assert_matches(got: dict, want: tuple[dict, list[float]], tol: dict, what: str) -> None:
    want_params, want_d = want
    assert set(got["params"]) == set(want_params)
    for k, p in want_params.items():
        torch.testing.assert_close(got["params"][k], p, **tol, msg=lambda m: f"{what}: param {k}: {m}")
    assert len(got["d"]) == len(want_d), f"{what}: d recorded for {len(got['d'])} steps, want {len(want_d)}"
    if want_d:
        torch.testing.assert_close(torch.tensor(got["d"], dtype=torch.float64),
                                   torch.tensor(want_d, dtype=torch.float64), **tol,
                                   msg=lambda m: f"{what}: Prodigy's d per step: {m}")


def assert_same_state(got: dict, want: dict, what: str) -> None:
    """Every optimizer state entry and param-group value of this rank, exactly.

    One allowance: torch's ``Optimizer.load_state_dict`` injects ``differentiable=False`` into
    ``defaults`` and optimkit's ``__setstate__`` copies defaults into the groups, so an
    optimizer whose defaults lack that key (Prodigy) gains it on load. It is torch's default
    and changes nothing; any other key difference fails."""
    extra = {k for k in set(got) - set(want) if k.endswith(".differentiable") and got[k] is False}
    assert set(got) - extra == set(want), \
        f"{what}: state keys differ: {sorted((set(got) - extra) ^ set(want))}"
    for k, w in want.items():
        g = got[k]
        if isinstance(w, torch.Tensor):
            torch.testing.assert_close(g, w, rtol=0.0, atol=0.0, equal_nan=True,
                                       msg=lambda m: f"{what}: state {k}: {m}")
        elif isinstance(w, float) and math.isnan(w):
            assert isinstance(g, float) and math.isnan(g), f"{what}: state {k}: {g} != nan"
        else:
            assert g == w, f"{what}: state {k}: {g!r} != {w!r}"


def assert_trained(params: dict) -> None:
    init = dict(dw.DigitsMLP().named_parameters())
    moved = [k for k, p in params.items() if not torch.equal(p, init[k].detach())]
    assert moved, "no parameter changed in 50 steps: the comparison would be vacuous"


# ----------------------------------------------------------------------------------- DDP
@pytest.mark.parametrize("name", NAMES)
def test_ddp_matches_single_process(job, reference, name):
    r0, r1 = outcome(job, "ddp", name)
    assert_ranks_identical(r0, r1)
    assert_matches(r0, reference(name), TOL, f"DDP {name}")
    assert_trained(r0["params"])


@pytest.mark.parametrize("name", NAMES)
def test_ddp_with_flat_buffers_matches_single_process(job, reference, name):
    r0, r1 = outcome(job, "ddp_flat", name)
    assert_ranks_identical(r0, r1)
    assert_matches(r0, reference(name), TOL, f"DDP flat=True {name}")
    assert_trained(r0["params"])


# ---------------------------------------------------------------------------------- ZeRO
@pytest.mark.parametrize("name", NAMES)
def test_zero_matches_single_process(job, reference, name):
    r0, r1 = outcome(job, "zero", name)
    # the optimizer really was sharded: each rank steps a strict, disjoint part of the model
    assert r0["total_numel"] == r1["total_numel"] == r0["local_numel"] + r1["local_numel"]
    assert 0 < r0["local_numel"] < r0["total_numel"] and 0 < r1["local_numel"]
    assert r0["state_numel"] <= r0["local_numel"] and r1["state_numel"] <= r1["local_numel"]
    assert_ranks_identical(r0, r1)
    assert_matches(r0, reference(name), TOL, f"ZeRO {name}")
    if dw.is_prodigy(name):
        assert len(r0["d"]) == dw.STEPS and r0["d"][-1] > r0["d"][0], "d never grew"


@pytest.mark.parametrize("name", PRODIGY)
def test_zero_prodigy_without_fsdp_in_use_is_detected_and_reduced(job, name):
    """Without fsdp_in_use each rank would estimate d from its own shard only; Prodigy sees at
    the first step that the ranks hold different parameters, warns, and all-reduces: the same
    d as with the flag (two ranks sum in one order), never silently per rank."""
    r0, r1 = outcome(job, "zero_noreduce", name)
    flagged = outcome(job, "zero", name)[0]["d"]
    assert r0["d"] == r1["d"] == flagged[:len(r0["d"])]
    assert len(r0["warnings"]) == len(r1["warnings"]) == 1


@pytest.mark.parametrize("name", STATEFUL)
def test_zero_checkpoint_resume_equals_uninterrupted(job, name):
    full = outcome(job, "zero", name)
    r0, r1 = outcome(job, "zero_ckpt", name)
    assert_ranks_identical(r0, r1)
    assert_matches(r0, (full[0]["params"], full[0]["d"]), EXACT, f"ZeRO {name} resumed")
    for rank, (got, want) in enumerate(zip((r0, r1), full)):
        assert_same_state(got["state"], want["state"], f"ZeRO {name} resumed, rank {rank}")


@pytest.mark.parametrize("name", STATEFUL)
def test_rank_without_grads_does_not_hang(job, reference, name):
    """Every parameter rank 1 owns under ZeRO gets no gradient for a few steps: rank 1's local
    optimizer has nothing to update but must still join any collective (Prodigy's d
    reduction); a rank that skips it leaves the other stuck, and the gloo timeout or the
    job's hard timeout turns that into a failure here."""
    r0, r1 = outcome(job, "zero_nograd", name)
    dropped = tuple(r0["dropped"])
    assert dropped and set(dropped) != set(r0["params"]), "rank 1 should own a strict subset"
    assert_ranks_identical(r0, r1)
    assert_matches(r0, reference(name, dropped), TOL, f"ZeRO {name} with rank 1 gradient-free")


# --------------------------------------------------------------------------------- FSDP2
@pytest.mark.parametrize("name", NAMES)
def test_fsdp2_matches_single_process(job, reference, name):
    r0, r1 = outcome(job, "fsdp2", name)
    # DTensor shards: each rank holds about half of every parameter (rank 1 none of `gain`)
    assert r0["local_numel"] + r1["local_numel"] == sum(p.numel() for p in r0["params"].values())
    assert r1["local_numel"] < r0["local_numel"]
    assert_ranks_identical(r0, r1)
    assert_matches(r0, reference(name), TOL, f"FSDP2 {name}")


@pytest.mark.parametrize("name", STATEFUL)
def test_fsdp2_dcp_checkpoint_resume_equals_uninterrupted(job, name):
    full = outcome(job, "fsdp2", name)
    r0, r1 = outcome(job, "fsdp2_ckpt", name)
    assert_ranks_identical(r0, r1)
    assert_matches(r0, (full[0]["params"], full[0]["d"]), EXACT, f"FSDP2 {name} resumed")
    # each rank's shard of the state, not only the parameters: a checkpoint that restored one
    # rank's shard on the other would still reproduce the parameters once Prodigy's d stops
    # growing, but not the state
    for rank, (got, want) in enumerate(zip((r0, r1), full)):
        assert_same_state(got["state"], want["state"], f"FSDP2 {name} resumed, rank {rank}")


def test_job_finished_cleanly(job):
    """The job itself (spawn, init, teardown) finished within its limit without a crash."""
    assert job[1] is None, job[1]
