"""The compare report: verdict, terminal tables that fit, HTML, CSV, TensorBoard, plots.

Crafted result dicts (schema 2, docs/compare-results.md) test the rendering rules, one tiny
real run (module fixture) checks that the report renders what the runner really returns.
"""

from __future__ import annotations

import copy
import csv
import io
import re
from typing import Any

import pytest
import torch
from torch import nn

from optimkit.compare import export, plots
from optimkit.compare import report as rep
from optimkit.compare.html_page import render_html, reproduce_command
from optimkit.compare.verdict import task_verdict, verdict

# --------------------------------------------------------------------------- crafted dicts


def _curves(n: int = 20, base: float = 1.0, d: bool = False, lr: float = 1.0) -> dict[str, Any]:
    steps = list(range(0, n + 1, 5))
    band = lambda ys: {"mean": ys, "min": [y * 0.9 for y in ys], "max": [y * 1.1 for y in ys]}  # noqa: E731
    c = {
        "train_steps": list(range(1, n + 1)), "train_time_s": [0.01 * s for s in range(1, n + 1)],
        "train_loss": band([base / s for s in range(1, n + 1)]),
        "eval_steps": steps, "eval_time_s": [0.01 * s for s in steps],
        "val_loss": band([base / (1 + s) for s in steps]), "metric": band([min(1.0, 0.5 + s / 40) for s in steps]),
    }
    if d:
        c["d_steps"] = list(range(1, n + 1))
        c["d"] = [1e-6 * 2 ** min(s, 10) for s in range(1, n + 1)]
        c["effective_lr"] = [lr * v for v in c["d"]]
    return c


def _row(label: str, rank: int | None, metric: float | None, val: float | None = 0.3, train: float | None = 0.28,
         kind: str = "default", **kw: Any) -> dict[str, Any]:
    r = {"optimizer": label, "name": label.split(":")[0], "kind": kind, "args": {}, "lr": 0.01, "tuned": {},
         "hyperparameters": {"lr": 0.01, "eps": 1e-8}, "train_loss": train, "val_loss": val, "metric": metric,
         "train_loss_std": None, "val_loss_std": None, "metric_std": None, "steps_to_target": 10,
         "time_to_target_s": 0.1, "ms_per_step": 1.234, "opt_ms_per_step": 0.5, "state_bytes_per_param": 8.0,
         "seeds": 2, "diverged_seeds": 0, "failed_seeds": 0, "error": None, "where": None, "rank": rank,
         "edge": None, "edge_param": None, "flags": [], "sensitivity": None}
    r.update(kw)
    return r


def _result(rows: list[dict[str, Any]], mode: str = "default", metric: str | None = "accuracy",
            n_tasks: int = 1) -> dict[str, Any]:
    labels = list(dict.fromkeys(r["optimizer"] for r in rows))
    tasks = {}
    for t in range(n_tasks):
        name = f"task{t}"
        tasks[name] = {
            "name": name, "description": "crafted", "metric": metric, "higher_is_better": True, "target": 0.9,
            "steps": 20, "eval_every": 5, "n_params": 12, "info": {}, "results": copy.deepcopy(rows),
            "ranked_kind": "best" if mode == "budget" else "default", "sweeps": {},
            "curves": {lab: _curves(d=lab.startswith("prodigy")) for lab in labels},
        }
    return {
        "schema": 2, "mode": mode, "command_line": "optimkit compare --tasks task0 --optimizers " + " ".join(labels),
        "optimkit_version": "0", "torch_version": torch.__version__, "created": "2026-11-30T06:00:00",
        "wall_time_s": 1.0, "tasks": tasks, "overall": [], "trials": [], "profiles": {},
        "config": {"tasks": list(tasks), "optimizers": labels, "seeds": 2, "budget": 4 if mode == "budget" else None,
                   "lr_sweep": False, "device": "cpu"},
    }


# --------------------------------------------------------------------------- the verdict
def test_verdict_names_winner_and_default_only_caveat():
    res = _result([_row("adamw", 1, 0.95), _row("sgd", 2, 0.90)])
    v = task_verdict(res, "task0")
    assert v["winner"] == "adamw" and v["tied"] == []
    assert "use **adamw**" in v["text"] and "ahead of sgd" in v["text"]
    assert any("default hyperparameters only" in c for c in v["caveats"])
    assert not any("overfit" in c for c in v["caveats"])


def test_verdict_budget_mode_edge_and_overfit():
    rows = [_row("sgd", 1, 0.95, kind="best", tuned={"lr": 0.3}, edge="high", edge_param="lr",
                 flags=["overfit", "edge"], train_loss=0.01, val_loss=0.5),
            _row("adamw", 2, 0.80, kind="best"), _row("sgd", 1, 0.70, kind="default"),
            _row("adamw", 2, 0.60, kind="default")]
    v = task_verdict(_result(rows, mode="budget"), "task0")
    assert v["winner"] == "sgd" and "lr=0.3" in v["text"]
    assert not any("default hyperparameters only" in c for c in v["caveats"])
    assert any("edge" in c and "sgd (high)" in c for c in v["caveats"])
    assert any("overfits" in c for c in v["caveats"])
    assert "default setting it scored 0.7" in v["text"]  # the tuned winner is compared to its default


def test_verdict_every_run_diverged_names_no_winner():
    rows = [_row("sgd", None, None, val=None, diverged_seeds=2), _row("adam", None, None, val=None, error="boom")]
    res = _result(rows)
    v = task_verdict(res, "task0")
    assert v["winner"] is None and "no recommendation" in v["text"] and "diverged or failed" in v["text"]
    # the overall verdict of several such tasks recommends nothing either
    res2 = _result(rows, n_tasks=2)
    assert "no recommendation" in verdict(res2)["overall"]


def test_verdict_every_run_raised_points_at_the_error_not_the_lr():
    """Every run raised (a bug in the task's code): the advice is to fix it, naming the first
    error and where, not to lower the learning rates."""
    rows = [_row("sgd", None, None, val=None, error="RuntimeError: boom", where="task.py:13 in forward"),
            _row("adam", None, None, val=None, error="RuntimeError: boom")]
    v = task_verdict(_result(rows), "task0")
    assert v["winner"] is None and "raised an error" in v["text"], v["text"]
    assert "sgd: RuntimeError: boom at task.py:13 in forward" in v["text"], v["text"]
    assert "Lower the learning rates" not in v["text"]


def test_verdict_ties_by_rank_and_by_seed_spread():
    v = task_verdict(_result([_row("a", 1, 0.9), _row("b", 1, 0.9), _row("c", 3, 0.5)]), "task0")
    assert v["tied"] == ["a", "b"] and "tie" in v["text"] and "**a**" in v["text"]
    spread = [_row("a", 1, 0.95, metric_std=0.02), _row("b", 2, 0.94, metric_std=0.02)]
    assert task_verdict(_result(spread), "task0")["tied"] == ["a", "b"]
    apart = [_row("a", 1, 0.95, metric_std=0.001), _row("b", 2, 0.90, metric_std=0.001)]
    assert task_verdict(_result(apart), "task0")["tied"] == []


def test_verdict_diverged_row_is_never_the_winner():
    # a diverged row that sorts first by its (partial) numbers must not win
    rows = [_row("wild", 1, 0.99, diverged_seeds=1), _row("calm", 2, 0.9)]
    v = task_verdict(_result(rows), "task0")
    assert v["winner"] == "calm" and "Not ranked (diverged or failed): wild" in v["text"]


# --------------------------------------------------------------------------- terminal tables
def _printed(result: dict[str, Any], width: int) -> str:
    from rich.console import Console

    buf = io.StringIO()
    rep.print_report(result, Console(file=buf, width=width, color_system=None, legacy_windows=False))
    return buf.getvalue()


@pytest.mark.parametrize("width", [200, 100, 80, 60, 44])
@pytest.mark.parametrize("mode", ["default", "budget"])
def test_tables_fit_and_never_split_a_number(width, mode):
    rows = [_row("adagrad:lr=0.05", 1, 0.95312, metric_std=0.0041, train_loss=0.000675, val_loss=0.5076,
                 kind="best" if mode == "budget" else "default", tuned={"d_coef": 0.1256}, edge="high",
                 sensitivity={"n": 8, "good_fraction": 0.625, "val_loss": [0.5, 0.6, 2.3], "metric": [0.2, 0.8, 0.95],
                              "good_range": {"lr": [0.01, 0.3]}, "good_factor": {"lr": 30.0}}),
            _row("prodigy", 2, 0.9042, kind="best" if mode == "budget" else "default", diverged_seeds=1)]
    if mode == "budget":
        rows += [dict(r, kind="default", metric=0.8) for r in rows]
    res = _result(rows, mode=mode, n_tasks=2)
    res["overall"] = [{"optimizer": "adagrad:lr=0.05", "rank": 1, "mean_rank": 1.0, "wins": 2, "n_tasks": 2,
                       "profile_area": 0.875, "profile_area_time": 0.5, "reached": 2,
                       "ranks": {"task0": 1, "task1": 1}}]
    text = _printed(res, width)
    lines = text.splitlines()
    assert all(len(line) <= width for line in lines), max(lines, key=len)
    # every number of every column that is shown appears whole on one line
    for name, entry in res["tasks"].items():
        cols, style = rep.fit_columns(rep._task_cols(entry, mode), width)
        assert [c.head for c in cols][:2] == ["#", "optimizer"]
        for c in cols:
            for cell in rep._cells(c, style):
                for word in cell.split():
                    if re.search(r"\d", word):
                        assert any(word in line for line in lines), (width, c.head, word)
    if width >= 200:
        assert "±0.0041" in text  # the seed spread, when there is room
    # a column left out for width is named under its table, never dropped silently
    for name, entry in res["tasks"].items():
        all_cols = rep._task_cols(entry, mode)
        cols, _ = rep.fit_columns(all_cols, width)
        hidden = [c.head for c in all_cols if c not in cols]
        if hidden:
            flat = " ".join(text.split())
            assert f"not shown at {width} columns: " in flat, flat[-400:]
            for h in hidden:
                assert " ".join(h.split()) in flat, h


def test_note_column_only_when_a_row_has_a_note():
    head, _ = rep.task_table(_result([_row("a", 1, 0.9), _row("b", 2, 0.8)])["tasks"]["task0"])
    assert "note" not in head
    head, rows = rep.task_table(_result([_row("a", 1, 0.9), _row("b", None, None, diverged_seeds=2)])["tasks"]["task0"])
    assert head[-1] == "note" and rows[1][-1] == "diverged 2/2"


def test_titles_say_what_kind_of_comparison():
    text = _printed(_result([_row("a", 1, 0.9)]), 200)
    assert "out of the box (default hyperparameters only)" in text
    rows = [_row("a", 1, 0.9, kind="best", tuned={"lr": 0.1}), _row("a", 1, 0.8, kind="default")]
    res = _result(rows, mode="budget")
    head, cells = rep.task_table(res["tasks"]["task0"], "budget")
    assert head[:5] == ["#", "optimizer", "default val accuracy", "tuned val accuracy", "tuned value"]
    assert cells[0][2:5] == ["0.8", "0.9", "lr=0.1"]
    assert "tuned: best of 4" in _printed(res, 200)


# --------------------------------------------------------------------------- files
class _Tiny:
    @staticmethod
    def task():
        from optimkit.compare import Task

        g = torch.Generator().manual_seed(0)
        y = torch.randint(0, 2, (192,), generator=g)
        x = torch.randn(192, 4, generator=g) + 1.5 * (y[:, None].float() * 2 - 1)
        return Task(name="tiny", make_model=lambda: nn.Linear(4, 2), loss_fn=nn.functional.cross_entropy,
                    train_data=(x[:128], y[:128]), val_data=(x[128:], y[128:]), batch_size=32, steps=12,
                    eval_every=3, target=0.95, description="two blobs")


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    """A real budget run: 2 optimizers (one Prodigy), budget 2, 1 seed, 12 steps."""
    from optimkit.compare import parse_optimizer_choice, run_compare

    d = tmp_path_factory.mktemp("real")
    result = run_compare([_Tiny.task()], [parse_optimizer_choice("sgd"), parse_optimizer_choice("prodigy")],
                         seeds=1, budget=2, jobs=1, storage=str(d / "study.journal"))
    return result, d


def test_report_files_from_a_real_run(real):
    pytest.importorskip("tensorboard")
    result, d = real
    out, tb = d / "report", d / "tb"
    files = rep.write_report(result, out, tensorboard=str(tb))
    html = (out / "index.html").read_text()
    assert "name='viewport' content='width=device-width, initial-scale=1'" in html
    assert html.index("id='verdict'") < html.index("Reproduce") < html.index("<h2 id='task-tiny'>")
    assert result["command_line"].replace("'", "&#x27;") in html
    for name in files.values():
        assert (out / name).is_file()
        if name.endswith(".png"):
            assert f"src='{name}'" in html
    assert "<div class='scroll'><table>" in html and "max-width:100%" in html
    # every trial is one CSV line
    with open(out / "trials.csv", newline="") as f:
        lines = list(csv.DictReader(f))
    assert len(lines) == len(result["trials"]) > 0
    assert {r["task"] for r in lines} == {"tiny"} and set(lines[0]) == set(export.TRIAL_COLUMNS)
    # TensorBoard: every finite point of every curve read back
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    curves = result["tasks"]["tiny"]["curves_by_kind"]
    for kind, by_label in curves.items():
        for label, c in by_label.items():
            run = label if kind == result["tasks"]["tiny"]["ranked_kind"] else f"{label}@{kind}"
            acc = EventAccumulator(str(tb / "tiny" / export._run_dir(run)))
            acc.Reload()
            vals = [v for v in c["val_loss"]["mean"] if v is not None]
            events = acc.Scalars("val_loss")
            assert [e.step for e in events] == [s for s, v in zip(c["eval_steps"], c["val_loss"]["mean"])
                                                if v is not None]
            assert [e.value for e in events] == pytest.approx(vals, rel=1e-6)
            assert len(acc.Scalars("val_accuracy")) == len(vals)
            if label == "prodigy":
                assert len(acc.Scalars("d")) == len(c["d"])


def test_tensorboard_missing_is_one_clear_error(monkeypatch, tmp_path):
    monkeypatch.setattr(export, "tensorboard_available", lambda: False)
    with pytest.raises(export.TensorBoardUnavailable, match=r"pip install 'optimkit\[tensorboard\]'") as e:
        rep.write_report(_result([_row("a", 1, 0.9)]), tmp_path / "r", tensorboard=str(tmp_path / "tb"))
    assert "\n" not in str(e.value) and not (tmp_path / "r").exists()  # checked before writing anything
    assert isinstance(e.value, ValueError)  # the CLI prints a ValueError as one line, exit 2


def test_wall_axis_and_bad_axis(tmp_path):
    res = _result([_row("a", 1, 0.9), _row("prodigy", 2, 0.8)])
    entry = res["tasks"]["task0"]
    assert plots.plot_task(entry, ["a", "prodigy"], plots.colors(["a", "prodigy"]), tmp_path / "w.png", 2,
                           x_axis="wall")
    assert "training seconds" in render_html(res, {"loss_task0": "w.png"}, x_axis="wall")
    with pytest.raises(ValueError, match="x_axis"):
        rep.write_report(res, tmp_path, x_axis="time")


def test_prodigy_panel_not_duplicated_when_lr_is_1(tmp_path):
    res = _result([_row("prodigy", 1, 0.9)])
    assert plots.plot_prodigy(res, tmp_path / "d1.png") == 1  # d == effective lr: one panel
    res["tasks"]["task0"]["curves"]["prodigy"] = _curves(d=True, lr=0.5)
    assert plots.plot_prodigy(res, tmp_path / "d2.png") == 2
    assert plots.plot_prodigy(_result([_row("a", 1, 0.9)]), tmp_path / "d0.png") == 0


def test_lines_differ_in_style_and_marker_not_only_colour():
    kws = [plots._line_kw(i, 10, 100) for i in range(10)]
    assert len({(k["linestyle"], k["marker"]) for k in kws}) == 10
    assert len({k["markevery"][0] for k in kws}) > 1  # staggered: identical curves show both markers


def test_profile_plot(tmp_path):
    profiles = {"tau": [1.0, 2.0, 4.0], "tasks": ["task0", "task1"], "steps": {"a": [1, 1, 1], "b": [0, .5, 1]},
                "time": {"a": [.5, 1, 1], "b": [.5, .5, 1]}, "area": {"a": 1.0, "b": 0.5},
                "area_time": {"a": 0.8, "b": 0.6}}
    assert plots.plot_profile(profiles, plots.colors(["a", "b"]), tmp_path / "profile.png")
    assert not plots.plot_profile({"tau": [1.0]}, {}, tmp_path / "none.png")
    assert plots.profile_fraction([1.0, 1.5, None, 3.0], 2.0) == 0.5
    res = _result([_row("a", 1, 0.9), _row("b", 2, 0.8)], n_tasks=2)
    assert "src='profile.png'" in render_html(res, {"profile": "profile.png"})


def test_old_schema_renders(tmp_path):
    # a schema-1 dict (no kinds, no trials, no command) still renders; the command is rebuilt
    old = _result([_row("a", 1, 0.9), _row("b", 2, 0.8)])
    for k in ("schema", "mode", "command_line", "trials", "profiles"):
        old.pop(k)
    for r in old["tasks"]["task0"]["results"]:
        for k in ("kind", "hyperparameters", "tuned", "flags", "edge"):
            r.pop(k)
    old["tasks"]["task0"]["curves"] = {}  # and without curves: no plot, no crash
    files = rep.write_report(old, tmp_path / "o")
    assert "loss_task0" not in files
    assert len((tmp_path / "o" / "trials.csv").read_text().splitlines()) == 1 + 2
    cmd, exact = reproduce_command(old)
    assert not exact and cmd.startswith("optimkit compare --tasks task0 --optimizers a b")
    assert "Rebuilt from the recorded configuration" in (tmp_path / "o" / "index.html").read_text()


def test_html_escapes_user_text():
    res = _result([_row("<script>x</script>", 1, 0.9)])
    html = render_html(res, {})
    assert "<script>x" not in html and "&lt;script&gt;" in html


def test_overall_verdict_says_over_which_tasks_the_profile_counts():
    """The performance profile counts only tasks where some optimizer reached the target: with
    2 of 4 such tasks, the overall verdict says so instead of "fastest on every task"."""
    res = _result([_row("prodigy", 1, 0.95), _row("sgd", 2, 0.90)], n_tasks=4)
    res["overall"] = [{"optimizer": "prodigy", "rank": 1, "profile_area": 1.0, "mean_rank": 1.0, "wins": 4},
                      {"optimizer": "sgd", "rank": 2, "profile_area": 0.5, "mean_rank": 2.0, "wins": 0}]
    res["profiles"] = {"tasks": ["task0", "task1"]}
    text = verdict(res)["overall"]
    assert "over the 2 of 4 tasks where some optimizer reached the target, 1 = fastest on each" in text, text
    assert "fastest on every task" not in text
    res["profiles"] = {"tasks": ["task0", "task1", "task2", "task3"]}
    assert "1 = fastest on every task" in verdict(res)["overall"]


def test_title_without_a_description_has_no_double_space():
    res = _result([_row("a", 1, 0.9)])
    res["tasks"]["task0"]["description"] = ""
    assert rep.table_title(res, "task0").startswith("task0: (20 steps, 2 seed(s)) — ")
