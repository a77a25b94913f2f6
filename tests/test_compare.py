"""optimkit compare end to end, on a tiny user task defined here (the documented protocol)."""

from __future__ import annotations

import json
import math
import re
import struct
from pathlib import Path

import pytest
import torch
from torch import nn

from optimkit.cli import main
from optimkit.compare import Task, TaskUnavailable, build_task, parse_optimizer_choice, run_compare
from optimkit.compare import report as report_mod
from optimkit.compare import tasks as tasks_mod

THIS = Path(__file__).resolve()


def make_tiny_task() -> Task:
    """Two Gaussian blobs in 5-D, a linear classifier: converges in a few dozen steps."""
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 2, (256,), generator=g)
    x = torch.randn(256, 5, generator=g) + 2.0 * (y[:, None].float() * 2 - 1)
    return Task(
        name="tiny",
        make_model=lambda: nn.Linear(5, 2),
        loss_fn=nn.functional.cross_entropy,
        train_data=(x[:192], y[:192]),
        val_data=(x[192:], y[192:]),
        batch_size=32,
        steps=40,
        eval_every=5,
        target=0.9,
        description="two blobs, linear classifier",
        family="convex",
    )


def make_not_a_task():
    return 42


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def _table_rows(text: str, title_start: str) -> list[list[str]]:
    """The data rows of the rich table whose title starts with ``title_start``."""
    lines = text.splitlines()
    start = next(i for i, l in enumerate(lines) if l.startswith(title_start))
    rows, seen_rule = [], 0
    for line in lines[start + 1:]:
        if line.startswith("╰"):
            break
        if line.startswith("├"):
            seen_rule += 1
            continue
        if seen_rule and line.startswith("│"):
            rows.append([c.strip() for c in line.strip("│").split("│")])
    return rows


def _close(cell: str, value: float | None, digits: int = 4) -> bool:
    """``cell`` is ``value`` printed with ``digits`` significant digits (a ``mean±sd`` cell:
    its mean)."""
    if value is None:
        return cell == "—"
    cell = cell.split("±")[0]
    return math.isclose(float(cell), value, rel_tol=0.5 * 10 ** (1 - digits), abs_tol=1e-12)


@pytest.fixture(scope="module")
def tiny_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    argv = ["compare", "--task", f"{THIS}:make_tiny_task", "--optimizers", "sgd", "adagrad:lr=0.05", "prodigy",
            "--steps", "30", "--seeds", "2", "--out", str(out), "--no-progress"]
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(argv)
    assert rc == 0
    return out, buf.getvalue(), json.loads((out / "results.json").read_text())


def test_table_numbers_equal_json(tiny_report):
    _, text, result = tiny_report
    entry = result["tasks"]["tiny"]
    rows = _table_rows(text, "tiny:")
    assert len(rows) == 3
    by_label = {r["optimizer"]: r for r in entry["results"]}
    for cells in rows:
        rank, label, lr, train, val, acc, target, ms, opt_ms, state = cells[:10]
        r = by_label[label]
        assert int(rank) == r["rank"]
        assert _close(lr, r["lr"], 3) and _close(train, r["train_loss"]) and _close(val, r["val_loss"])
        assert _close(acc, r["metric"]) and _close(ms, r["ms_per_step"], 3) and _close(opt_ms, r["opt_ms_per_step"], 3)
        assert _close(state, r["state_bytes_per_param"], 3)
        assert (target == "—") if r["steps_to_target"] is None else int(target) == r["steps_to_target"]
    # ranks follow accuracy, then validation loss
    ordered = sorted(entry["results"], key=lambda r: (-r["metric"], r["val_loss"]))
    assert [r["optimizer"] for r in ordered] == [r["optimizer"] for r in entry["results"]]
    overall = _table_rows(text, "overall ranking")
    assert [c[1] for c in overall] == [r["optimizer"] for r in result["overall"]]


def test_json_contents(tiny_report):
    _, _, result = tiny_report
    entry = result["tasks"]["tiny"]
    assert result["config"]["seeds"] == 2 and entry["steps"] == 30
    by_label = {r["optimizer"]: r for r in entry["results"]}
    # the registry's defaults: sgd 0.1, prodigy 1; the spec's lr overrides
    assert by_label["sgd"]["lr"] == 0.1 and by_label["prodigy"]["lr"] == 1.0 and by_label["adagrad:lr=0.05"]["lr"] == 0.05
    # state memory: SGD without momentum keeps nothing; Adagrad one fp32 buffer (+ step counters);
    # Prodigy four buffers (p0, s, m, v)
    assert by_label["sgd"]["state_bytes_per_param"] == 0
    assert 4 <= by_label["adagrad:lr=0.05"]["state_bytes_per_param"] < 4 + 16 / 12
    assert 16 <= by_label["prodigy"]["state_bytes_per_param"] < 16 + 16 / 12
    # steps to target = the first evaluation where the seed-mean accuracy reaches 0.9
    for label, r in by_label.items():
        c = entry["curves"][label]
        first = next((s for s, v in zip(c["eval_steps"], c["metric"]["mean"]) if v is not None and v >= 0.9), None)
        assert r["steps_to_target"] == first
        assert c["eval_steps"][0] == 0 and c["eval_steps"][-1] == 30
        lo, mean, hi = c["val_loss"]["min"], c["val_loss"]["mean"], c["val_loss"]["max"]
        assert all(a <= m + 1e-12 and m <= b + 1e-12 for a, m, b in zip(lo, mean, hi))
    # Prodigy's d: starts at d0 = 1e-6 and never decreases
    d = entry["curves"]["prodigy"]["d"]
    assert d[0] >= 1e-6 and all(b >= a for a, b in zip(d, d[1:])) and d[-1] > 1e-6


def test_plots_and_html(tiny_report):
    out, _, result = tiny_report
    w, h = (int(v * report_mod.DPI) for v in report_mod.LOSS_FIGSIZE)
    assert png_size(out / "loss_tiny.png") == (w, h)
    pw, ph = (int(v * report_mod.DPI) for v in report_mod.PRODIGY_FIGSIZE)
    assert png_size(out / "prodigy_d.png") == (pw, ph)
    html = (out / "index.html").read_text()
    pngs = sorted(p.name for p in out.glob("*.png"))
    # the tiny task has a target that runs reach: the performance profile is drawn too
    assert pngs == ["loss_tiny.png", "prodigy_d.png", "profile.png"]
    for name in pngs:
        assert f"src='{name}'" in html
    assert "results.json" in html


def test_lr_sweep_picks_lowest_val_loss(tmp_path, capsys):
    out = tmp_path / "r"
    rc = main(["compare", "--task", f"{THIS}:make_tiny_task", "--optimizers", "sgd", "adadelta", "--steps", "8",
               "--seeds", "1", "--lr-sweep", "--out", str(out), "--no-progress"])
    assert rc == 0
    result = json.loads((out / "results.json").read_text())
    sweeps = result["tasks"]["tiny"]["sweeps"]
    assert set(sweeps) == {"sgd"}  # adadelta does not need lr tuning: run once at lr=1
    grid = sweeps["sgd"]["grid"]
    assert [g["lr"] for g in grid] == pytest.approx([0.1 * f for f in (0.1, 0.3, 1, 3, 10)])
    best = min((g for g in grid if g["val_loss"] is not None and not g["diverged_seeds"]), key=lambda g: g["val_loss"])
    assert sweeps["sgd"]["best_lr"] == best["lr"]
    row = next(r for r in result["tasks"]["tiny"]["results"] if r["optimizer"] == "sgd")
    assert row["lr"] == best["lr"] and row["val_loss"] == pytest.approx(best["val_loss"])
    lo, hi = sweeps["sgd"]["window"]
    assert lo <= best["lr"] <= hi
    assert png_size(out / "lr_sweep.png")[0] > 0
    assert "lr_sweep.png" in (out / "index.html").read_text()
    assert "learning-rate sweep" in capsys.readouterr().out


def test_divergence_ranks_last(tmp_path):
    task = make_regression_task()
    result = run_compare([task], [parse_optimizer_choice("sgd:lr=100"), parse_optimizer_choice("sgd")],
                         steps=10, seeds=1)
    rows = result["tasks"]["reg"]["results"]
    assert rows[-1]["optimizer"] == "sgd:lr=100" and rows[-1]["diverged_seeds"] == 1
    assert rows[0]["optimizer"] == "sgd" and rows[0]["rank"] == 1
    json.dumps(result, allow_nan=False)  # NaN/inf are stored as null


def test_json_to_stdout(tmp_path, capsys):
    rc = main(["compare", "--task", f"{THIS}:make_tiny_task", "--optimizers", "adagrad", "--steps", "3",
               "--seeds", "1", "--no-report", "--json", "--no-progress"])
    assert rc == 0
    result = json.loads(capsys.readouterr().out)
    assert result["tasks"]["tiny"]["results"][0]["optimizer"] == "adagrad"


def test_user_task_by_module_name(monkeypatch, tmp_path):
    monkeypatch.syspath_prepend(str(THIS.parent))
    task = build_task(f"{THIS.stem}:make_tiny_task")
    assert task.name == "tiny"


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["--tasks", "nosuch"], "unknown task 'nosuch'"),
        (["--optimizers", "adamx"], "unknown optimizer 'adamx'"),
        (["--optimizers", "adamw:lr="], "adamw:lr="),
        (["--optimizers", "adamw:betas=(0.9"], "unbalanced"),
        (["--optimizers", "adamw:nosuch=1"], "nosuch"),
        (["--optimizers", "adamw:lr=-1"], "lr"),
        (["--task", "no_such_module_xyz:make"], "cannot import"),
        (["--task", f"{THIS}:make_not_a_task"], "expected optimkit.compare.Task"),
        (["--task", f"{THIS}:missing"], "no callable 'missing'"),
        (["--steps", "0"], "--steps"),
    ],
)
def test_usage_errors_are_one_line(argv, fragment, capsys):
    rc = main(["compare", *argv, "--no-report", "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert fragment in err


def test_missing_optional_data_is_skipped_with_a_hint(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(tasks_mod, "_find_fashion", lambda: None)
    rc = main(["compare", "--tasks", "fashion", "--task", f"{THIS}:make_tiny_task", "--optimizers", "sgd",
               "--steps", "2", "--seeds", "1", "--no-report", "--no-progress"])
    cap = capsys.readouterr()
    assert rc == 0
    hint = [l for l in cap.err.splitlines() if "fashion" in l]
    assert len(hint) == 1 and "apt install dataset-fashion-mnist" in hint[0]
    assert "skipped task fashion" in cap.out
    # only unavailable tasks: an error, still one line
    rc = main(["compare", "--tasks", "fashion", "--no-report", "--no-progress"])
    assert rc == 2
    with pytest.raises(TaskUnavailable):
        tasks_mod.make_fashion()


def test_builtin_suite_tasks_are_real_and_train(monkeypatch):
    """Each default task builds from installed data and takes a few steps (tiny budget)."""
    built = [build_task(n, quick=True) for n in ("logreg", "cnn", "charlm", "docbow")]
    families = {t.family for t in built}
    assert families == {"convex", "image", "transformer", "sparse"}
    lm = built[2]
    assert lm.info["chars"] > 40_000 and lm.metric == "perplexity"
    bow = built[3]
    # sparse: most words are rare (median document frequency is small against ~2000 documents)
    assert bow.info["vocab"] > 1000 and bow.info["median_document_frequency"] < 20
    result = run_compare(built, [parse_optimizer_choice("adagrad")], steps=3, seeds=1)
    for t in built:
        row = result["tasks"][t.name]["results"][0]
        assert row["val_loss"] is not None and math.isfinite(row["val_loss"])
        assert result["tasks"][t.name]["n_params"] > 0
    # character LM: an untrained model's loss is near log(vocab)
    first = result["tasks"]["charlm"]["curves"]["adagrad"]["val_loss"]["mean"][0]
    assert abs(first - math.log(lm.info["vocab"])) < 1.0


def test_task_protocol_validation():
    with pytest.raises(ValueError, match="exactly one of train_data or train_batches"):
        Task(name="x", make_model=lambda: nn.Linear(1, 1), loss_fn=nn.functional.mse_loss)
    with pytest.raises(ValueError, match="invalid name"):
        Task(name="a b", make_model=lambda: nn.Linear(1, 1), loss_fn=nn.functional.mse_loss,
             train_data=(torch.zeros(1, 1), torch.zeros(1, 1)))


def make_regression_task() -> Task:
    """A task given as a batch iterator, with a callable metric (R^2)."""
    w = torch.tensor([[1.0], [-2.0], [0.5]])

    def batches(gen):
        while True:
            x = torch.randn(16, 3, generator=gen)
            yield x, x @ w

    xv = torch.randn(64, 3, generator=torch.Generator().manual_seed(5))
    return Task(name="reg", make_model=lambda: nn.Linear(3, 1), loss_fn=nn.functional.mse_loss,
                train_batches=batches, val_data=(xv, xv @ w),
                metric=lambda out, y: float(1 - ((out - y) ** 2).mean() / y.var()), metric_name="R2",
                higher_is_better=True, steps=20)


def test_batch_iterator_task_and_callable_metric():
    result = run_compare([make_regression_task()], [parse_optimizer_choice("adam:lr=0.05")], seeds=1)
    entry = result["tasks"]["reg"]
    assert entry["metric"] == "R2"
    curve = entry["curves"]["adam:lr=0.05"]["metric"]["mean"]
    assert curve[-1] > curve[0]
    head, rows = report_mod.task_table(entry)
    assert "val R2" in head and rows[0][1] == "adam:lr=0.05"


def test_quick_default_steps():
    t = make_tiny_task()
    assert t.steps_for(False) == 40 and t.steps_for(True) == 10
    assert re.fullmatch(r"\d", str(len(tasks_mod.DEFAULT_SUITE)))
