"""optimkit compare as a study: budgets, parallel workers, resume, failures, ranks, profiles, ETA.

Small on purpose (a linear model on two blobs, 20 steps): what is tested is the plan, the
storage and the summaries, not the optimizers.
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from optimkit.cli import main
from optimkit.compare import Task, parse_optimizer_choice, result_from_storage, run_compare
from optimkit.compare import study as st
from optimkit.compare import summary
from optimkit.compare.progress import Eta

THIS = Path(__file__).resolve()
ROOT = THIS.parent.parent
OPTS = ("sgd", "adam", "prodigy")


def make_blobs(sleep_s: float = 0.0) -> Task:
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 2, (256,), generator=g)
    x = torch.randn(256, 5, generator=g) + 0.7 * (y[:, None].float() * 2 - 1)

    def loss(out, t):
        if sleep_s:
            time.sleep(sleep_s)
        return nn.functional.cross_entropy(out, t)

    return Task(name="blobs", make_model=lambda: nn.Linear(5, 2), loss_fn=loss, train_data=(x[:192], y[:192]),
                val_data=(x[192:], y[192:]), batch_size=32, steps=20, eval_every=5, target=0.8)


def make_slow_blobs() -> Task:
    # ~0.5 s a trial, ~10 s for the interrupted run's 20: the Ctrl-C lands mid-run with a
    # wide margin even when the parent's journal polls are slow
    return make_blobs(sleep_s=0.025)


class _Exploding(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(5, 2)

    def forward(self, x):
        raise RuntimeError("boom in the user's model")  # LINE_OF_USER_ERROR


def make_broken_task() -> Task:
    t = make_blobs()
    t.make_model = _Exploding
    return t


def _strip(o):
    """The result without what legitimately differs between runs: timings, trial numbers, argv."""
    drop = ("trial", "trial_numbers", "command", "command_line", "created", "wall_time_s", "duration_s", "worker",
            "jobs", "storage", "area_time", "time")
    if isinstance(o, dict):
        return {k: _strip(v) for k, v in o.items() if k not in drop and "ms" not in k and "time" not in k}
    if isinstance(o, list):
        return [_strip(v) for v in o]
    return o


def _run(jobs: int, storage: str | None = None, budget: int | None = 5) -> dict:
    return run_compare([make_blobs()], [parse_optimizer_choice(s) for s in OPTS], steps=20, seeds=2, budget=budget,
                       jobs=jobs, storage=storage)


def test_budget_jobs1_equals_jobs2_and_every_trial_once(tmp_path):
    r1 = _run(1)
    r2 = _run(2, storage=str(tmp_path / "s.journal"))
    assert _strip(r1) == _strip(r2)
    assert r1["mode"] == "budget" and "budget: 5" in r1["title"]
    # 3 optimizers x (default + 5 budget points) x 2 seeds, each exactly once
    keys = [(t["optimizer"], t["point"], t["seed"]) for t in r2["trials"]]
    assert len(keys) == len(set(keys)) == 3 * 6 * 2
    assert all(t["state"] == "COMPLETE" for t in r2["trials"])
    # the reserved budget (5 // 4 = 1 point) ran as round 2
    assert sorted({(t["point"], t["round"]) for t in r2["trials"]}) == [(0, 1), (1, 1), (2, 1), (3, 1), (4, 1), (5, 2)]
    rows = r2["tasks"]["blobs"]["results"]
    assert sorted((r["optimizer"], r["kind"]) for r in rows) == sorted((o, k) for o in OPTS for k in ("default", "best"))
    for r in rows:
        if r["kind"] == "best":
            assert r["sensitivity"]["n"] == 5 and 0 < r["sensitivity"]["good_fraction"] <= 1
            assert set(r["tuned"]) == ({"d_coef"} if r["optimizer"] == "prodigy" else {"lr"})
            # the best row is the budget point with the lowest mean val loss
            grid = r2["tasks"]["blobs"]["sweeps"][r["optimizer"]]["grid"]
            assert r["val_loss"] == pytest.approx(min(g["val_loss"] for g in grid if g["val_loss"] is not None))
        else:
            assert r["tuned"] == {} and r["point"] == 0
        assert r["hyperparameters"]["lr"] == r["lr"] and "weight_decay" in r["hyperparameters"]
        assert r["train_loss_std"] is not None and r["seeds"] == 2
    # default mode says so
    r0 = _run(1, budget=None)
    assert r0["mode"] == "default" and r0["flags"]["default_only"] and len(r0["trials"]) == 3 * 2


def _count_complete(journal: Path) -> int:
    if not journal.exists():
        return 0
    try:
        study = st.load(st.STUDY_NAME, st.open_storage(str(journal)))
    except (KeyError, ValueError):
        return 0
    return sum(1 for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE")


def _cli(argv: list[str]) -> None:
    # Python's Ctrl-C handler, as in a terminal: a test runner started in the background by a
    # non-interactive shell (`make test &`) has SIGINT ignored, and a forked child inherits
    # that (the interrupted run then ran to the end and exited 0)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    sys.exit(main(argv))


def test_interrupted_run_resumes_without_rerunning(tmp_path):
    out = tmp_path / "r"
    argv = ["compare", "--task", f"{THIS}:make_slow_blobs", "--optimizers", "sgd", "adam", "--steps", "20",
            "--seeds", "2", "--budget", "4", "--jobs", "1", "--out", str(out), "--no-progress"]
    import multiprocessing as mp

    # a forked copy of this process runs the command (a fresh interpreter spends ~10 s on imports)
    p = mp.get_context("fork").Process(target=_cli, args=(argv,))
    p.start()
    journal = out / st.JOURNAL_FILE
    deadline = time.monotonic() + 120
    while _count_complete(journal) < 4 and time.monotonic() < deadline and p.is_alive():
        time.sleep(0.05)
    assert p.is_alive(), "the run ended before it could be interrupted: make the task slower"
    os.kill(p.pid, signal.SIGINT)  # Ctrl-C
    p.join(timeout=60)
    assert p.exitcode == 130
    study = st.load(st.STUDY_NAME, st.open_storage(str(journal)))
    before = {t.user_attrs["key"]: t.number for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"}
    planned = 2 * (1 + 4) * 2
    assert 4 <= len(before) < planned
    # the same command again (in this process: a second interpreter start costs ~10 s here)
    assert main(argv) == 0
    study = st.load(st.STUDY_NAME, st.open_storage(str(journal)))
    done = [t for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"]
    assert len(done) == planned and len({t.user_attrs["key"] for t in done}) == planned
    after = {t.user_attrs["key"]: t.number for t in done}
    assert all(after[k] == n for k, n in before.items())  # the finished trials were kept, not rerun
    # at most the one trial running at Ctrl-C was lost (and rerun)
    assert sum(1 for t in study.get_trials(deepcopy=False) if t.state.name != "COMPLETE") <= 1
    resumed = result_from_storage(str(journal))  # the report is rebuilt from the storage alone
    # the same task without the sleep (it changes timings only, which _strip drops)
    fresh = run_compare([make_blobs()], [parse_optimizer_choice(s) for s in ("sgd", "adam")], steps=20, seeds=2,
                        budget=4, jobs=1)
    a, b = _strip(resumed), _strip(fresh)
    a.pop("config"), b.pop("config")
    a["trials"] = [t for t in a["trials"] if t["state"] != "LOST"]
    assert a == b
    written = json.loads((out / "results.json").read_text())
    assert _strip(written["tasks"]) == _strip(resumed["tasks"])


def test_report_only_and_changed_command(tmp_path, capsys):
    out = tmp_path / "r"
    base = ["compare", "--task", f"{THIS}:make_blobs", "--optimizers", "sgd", "--steps", "10", "--seeds", "1",
            "--jobs", "1", "--out", str(out), "--no-progress"]
    assert main(base) == 0
    first = json.loads((out / "results.json").read_text())
    assert first["command"][:2] == ["optimkit", "compare"] and "--jobs" in first["command"]
    capsys.readouterr()
    assert main(["compare", "--report-only", "--out", str(out), "--no-progress"]) == 0
    assert _strip(json.loads((out / "results.json").read_text())) == _strip(first)
    changed = list(base)
    changed[changed.index("--seeds") + 1] = "2"
    assert main(changed) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "different comparison" in err and "seeds" in err


def test_failing_user_task_exits_nonzero_with_user_frame(tmp_path, capsys):
    rc = main(["compare", "--task", f"{THIS}:make_broken_task", "--optimizers", "sgd", "adam", "--steps", "5",
               "--seeds", "1", "--jobs", "1", "--out", str(tmp_path / "r"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 1
    line = next(i for i, l in enumerate(THIS.read_text().splitlines(), 1) if "LINE_OF_USER_ERROR" in l)
    assert "every trial failed" in err and f"{THIS}:{line} in forward" in err and "boom" in err
    result = json.loads((tmp_path / "r" / "results.json").read_text())
    assert result["flags"]["all_failed"] and all(r["rank"] is None for r in result["tasks"]["blobs"]["results"])
    assert result["overall"] == [] or all(r["rank"] is None for r in result["overall"])


@pytest.mark.parametrize("kind", ["file", "proc"])
def test_bad_out_is_one_line_before_anything_runs(tmp_path, capsys, kind):
    out = tmp_path / "afile"
    out.write_text("x")
    target = str(out) if kind == "file" else "/proc/optimkit-x"
    t0 = time.perf_counter()
    # the task module does not exist: an error about it would mean the task was loaded first
    rc = main(["compare", "--task", "no_such_module_xyz:make", "--out", target, "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "--out" in err and "Traceback" not in err, err
    assert time.perf_counter() - t0 < 5


def test_prodigy_small_lr_warns(tmp_path, capsys, recwarn):
    rc = main(["compare", "--task", f"{THIS}:make_blobs", "--optimizers", "prodigy:lr=1e-4", "--steps", "3",
               "--seeds", "1", "--jobs", "1", "--no-report", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 0
    warn = [l for l in err.splitlines() if "warning" in l]
    assert len(warn) == 1 and "multiplies" in warn[0] and "d_coef" in warn[0]
    assert not [w for w in recwarn if "Prodigy" in str(w.message)]  # the optimizer's own advice is not repeated


def test_round2_extends_past_the_edge():
    unit = st.Unit("t", "sgd", "sgd", 0.1, (("lr", 0.01, 1.0),))
    pts = st.round1_points(unit, 8)
    assert len(pts) == 1 + 6 and st.reserved(8) == 2
    lrs = [p.params["lr"] for p in pts[1:]]
    assert len(set(lrs)) == 6 and all(0.01 <= v <= 1.0 for v in lrs)
    # the lowest lr tried is best: round 2 searches below it, within half the log-width (x10)
    scores = {0: ({}, 1.0), **{p.index: (p.params, p.params["lr"]) for p in pts[1:]}}
    r2 = st.round2_points(unit, 8, scores)
    assert [p.index for p in r2] == [7, 8] and all(p.round == 2 for p in r2)
    assert all(min(lrs) / 10 - 1e-12 <= p.params["lr"] <= min(lrs) for p in r2)
    # a best in the middle: round 2 continues in the original range
    mid = sorted(lrs)[3]
    scores = {0: ({}, 1.0), **{p.index: (p.params, abs(math.log(p.params["lr"] / mid))) for p in pts[1:]}}
    assert all(0.01 <= p.params["lr"] <= 1.0 for p in st.round2_points(unit, 8, scores))
    # the best finite value is the highest finite one, but a higher lr ran and diverged (score None):
    # the optimum is bracketed, so no extension
    top = sorted(pts[1:], key=lambda p: p.params["lr"])
    scores = {0: ({}, 1.0), **{p.index: (p.params, -p.params["lr"]) for p in top[:-1]}, top[-1].index: (top[-1].params, None)}
    assert all(0.01 <= p.params["lr"] <= 1.0 for p in st.round2_points(unit, 8, scores))
    assert st.edge_of([1, 2, 3], 1) == "low" and st.edge_of([1, 2, 3], 3) == "high" and st.edge_of([1, 2, 3], 2) is None


def test_ranks_ties_and_divergence_and_profiles():
    rows = [{"metric": 0.9, "val_loss": 0.3, "seeds": 1}, {"metric": 0.9, "val_loss": 0.30001, "seeds": 1},
            {"metric": 0.95, "val_loss": 0.5, "seeds": 1}, {"metric": 0.99, "val_loss": 0.1, "seeds": 1,
                                                             "diverged_seeds": 1}]
    tmeta = {"metric": "accuracy", "higher_is_better": True}
    summary._rank(rows, lambda r: summary._sort_key(tmeta, r))
    assert [r["rank"] for r in rows] == [1, 2, 2, None]  # equal at 4 digits share; diverged is unranked
    tasks = {
        name: {"ranked_kind": "default", "results": [
            {"optimizer": o, "kind": "default", "rank": 1, "steps_to_target": s, "time_to_target_s": s / 10 if s else None}
            for o, s in steps.items()]}
        for name, steps in {"a": {"x": 10, "y": 20}, "b": {"x": 40, "y": 20}, "c": {"x": None, "y": 30}}.items()}
    prof = summary._profiles(tasks, ["x", "y"])
    assert prof["tasks"] == ["a", "b", "c"]
    assert prof["steps"]["y"][0] == pytest.approx(2 / 3) and prof["steps"]["y"][-1] == 1.0
    assert prof["steps"]["x"][0] == pytest.approx(1 / 3) and prof["steps"]["x"][-1] == pytest.approx(2 / 3)
    assert prof["area"]["y"] > prof["area"]["x"]


def test_eta_uses_each_tasks_step_cost():
    """Two tasks whose steps cost 1 s and 10 s: after one trial of each, the ETA is exact."""
    eta = Eta(workers=1)
    for task in ("cheap", "dear"):
        eta.plan(task, 3 * 100)
    now = 0.0
    for task, cost in (("cheap", 1.0), ("dear", 10.0)):
        eta.start(f"{task}0", task, now=now)
        now += 100 * cost
        eta.end(f"{task}0", 100, now=now)
    truth = 2 * 100 * 1.0 + 2 * 100 * 10.0
    assert eta.seconds_left(now=now) == pytest.approx(truth)
    # a running trial of a task not finished yet is costed from its own steps so far
    eta2 = Eta(workers=2)
    eta2.plan("cheap", 100)
    eta2.plan("dear", 200)
    eta2.start("c", "cheap", now=0.0)
    eta2.end("c", 100, now=100.0)
    eta2.start("d", "dear", now=100.0)
    eta2.step("d", 50)
    assert eta2.seconds_left(now=600.0) == pytest.approx(150 * 10.0 / 2)


def test_eta_in_a_real_run_is_within_2x():
    """Record the ETA shown after the first trial of each task; compare with the time that was left."""
    from optimkit.compare.progress import Progress

    class Rec(Progress):
        def __init__(self):
            self.seen = []

        def update(self, description, step, steps, loss, done_steps, eta_s):
            self.seen.append((time.perf_counter(), done_steps, eta_s))

    fast, slow = make_blobs(), make_blobs(sleep_s=0.003)
    slow.name = "slow"
    rec = Rec()
    run_compare([fast, slow], [parse_optimizer_choice(s) for s in ("sgd", "adam", "adagrad")], steps=20, seeds=2,
                jobs=1, progress=rec)
    end = time.perf_counter()
    # after both tasks' first trials (40 steps done), with work still left
    t, _, eta = next(x for x in rec.seen if x[1] >= 40 and x[2] is not None)
    assert 0.5 <= eta / (end - t) <= 2.0, (eta, end - t)


def make_task_that_raises() -> Task:
    return {}["no such key"]  # LINE_OF_TASK_ERROR


def test_task_function_that_raises_names_the_line(capsys):
    rc = main(["compare", "--task", f"{THIS}:make_task_that_raises", "--no-report", "--no-progress"])
    err = capsys.readouterr().err.strip()
    line = next(i for i, l in enumerate(THIS.read_text().splitlines(), 1) if "LINE_OF_TASK_ERROR" in l)
    assert rc == 2 and len(err.splitlines()) == 1 and f"{THIS}:{line} in make_task_that_raises" in err, err


def make_killing_task() -> Task:
    """A task whose model kills its own process (as an OOM killer would) when built in a worker."""
    t = make_blobs()

    def model():
        if os.environ.get("OPTIMKIT_TEST_PARENT") != str(os.getpid()):
            os._exit(9)
        return nn.Linear(5, 2)

    t.make_model = model
    return t


def test_a_dead_worker_is_one_line_exit_1(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("OPTIMKIT_TEST_PARENT", str(os.getpid()))
    rc = main(["compare", "--task", f"{THIS}:make_killing_task", "--optimizers", "sgd", "--steps", "3",
               "--seeds", "1", "--jobs", "2", "--out", str(tmp_path / "r"), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and len(err.splitlines()) == 1 and "exit code 9" in err and "run the same command" in err, err


def test_one_coordinator_per_folder(tmp_path, capsys):
    held = st.lock_folder(tmp_path / "r")
    try:
        rc = main(["compare", "--task", f"{THIS}:make_blobs", "--optimizers", "sgd", "--steps", "3", "--seeds", "1",
                   "--out", str(tmp_path / "r"), "--no-progress"])
    finally:
        held.close()
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "another optimkit compare is running" in err


def test_missing_tensorboard_refused_before_the_run(tmp_path, capsys, monkeypatch):
    from optimkit.compare import export

    monkeypatch.setattr(export, "tensorboard_available", lambda: False)
    out = tmp_path / "r"
    rc = main(["compare", "--task", f"{THIS}:make_blobs", "--optimizers", "sgd", "--steps", "3", "--seeds", "1",
               "--jobs", "1", "--out", str(out), "--tensorboard", str(tmp_path / "tb"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "optimkit[tensorboard]" in err
    assert not out.exists() or not any(out.iterdir())  # nothing ran, nothing stored
