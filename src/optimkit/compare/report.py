"""Render a compare result (the dict from :func:`~optimkit.compare.runner.run_compare`).

Everything here reads that one dict (schema 2: docs/compare-results.md; an older schema-1 dict
renders too): the terminal tables (this module), the PNG plots (:mod:`.plots`), the HTML page
(:mod:`.html_page`), the CSV and TensorBoard exports (:mod:`.export`), the verdict
(:mod:`.verdict`) and the JSON file. Numbers are formatted by :func:`fmt` only.

Tables are built as columns with a priority, so that a narrow terminal drops the least useful
columns (and abbreviates headers) instead of wrapping a number across lines.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .plots import DPI, LOSS_FIGSIZE, PRODIGY_FIGSIZE

__all__ = [
    "fmt",
    "fmt_pm",
    "task_table",
    "overall_table",
    "sweep_table",
    "table_title",
    "fit_columns",
    "print_report",
    "write_report",
    "write_json",
    "LOSS_FIGSIZE",
    "PRODIGY_FIGSIZE",
    "DPI",
]


def fmt(x: Any, digits: int = 4) -> str:
    """The one number format of tables and HTML: ``digits`` significant digits, ``—`` for none."""
    if x is None:
        return "—"
    if isinstance(x, bool):
        return str(x)
    if isinstance(x, int):
        return str(x)
    if isinstance(x, float):
        if not math.isfinite(x):
            return "nan" if math.isnan(x) else ("inf" if x > 0 else "-inf")
        return f"{x:.{digits}g}"
    return str(x)


def _pm_col(head: str, rows: list[dict[str, Any]], key: str, prio: int, short: str | None = None,
            ok: Any = None) -> Col:
    """A ``mean±sd`` column whose narrow form drops the spread."""
    ok = ok or (lambda r: True)
    return Col(head, [fmt_pm(r.get(key), r.get(f"{key}_std")) if ok(r) else "—" for r in rows], prio, short=short,
               short_cells=[fmt(r.get(key)) if ok(r) else "—" for r in rows])


def fmt_pm(x: Any, sd: Any, digits: int = 4) -> str:
    """``mean±sd`` (no spaces: one unbreakable cell); the mean alone without a spread."""
    if x is None or sd is None or not isinstance(sd, (int, float)) or not math.isfinite(sd) or sd == 0:
        return fmt(x, digits)
    return f"{fmt(x, digits)}±{sd:.2g}"


@dataclass
class Col:
    """One table column: the header, its cells, and how it behaves when space is short."""

    head: str
    cells: list[str]
    prio: int = 5  # 0: always shown; a higher number is dropped first in a narrow terminal
    text: bool = False  # free text (may wrap at a space); numbers never wrap
    short: str | None = None  # header for a narrow terminal
    left: bool = False
    short_cells: list[str] | None = None  # cells for a narrow terminal (the mean without its spread)


# ----------------------------------------------------------------------------- columns
def _mode(result: dict[str, Any]) -> str:
    if result.get("mode") in ("default", "budget"):
        return result["mode"]
    return "budget" if result.get("config", {}).get("budget") else "default"


def _metric_head(entry: dict[str, Any]) -> str | None:
    return f"val {entry['metric']}" if entry.get("metric") else None


def _abbrev(metric: str) -> str:
    return {"accuracy": "acc", "perplexity": "ppl"}.get(metric, metric[:6])


def _target_head(entry: dict[str, Any]) -> tuple[str, str]:
    t = entry.get("target")
    if t is None:
        return "steps to target", "to tgt"
    op = "≥" if entry.get("metric") and entry.get("higher_is_better") else "≤"
    what = entry.get("metric") or "val loss"
    return f"steps to {what} {op} {fmt(t)}", f"to {op}{fmt(t)}"


def _note(r: dict[str, Any]) -> str:
    """Short remarks on a row (the verdict explains them in full)."""
    parts = []
    if r.get("error"):
        where = f" at {r['where']}" if r.get("where") else ""
        parts.append(f"failed: {r['error']}{where}" if r.get("failed_seeds") else f"{r['error']}{where}")
    if r.get("diverged_seeds"):
        parts.append(f"diverged {r['diverged_seeds']}/{(r.get('seeds') or 0) + (r.get('failed_seeds') or 0) or '?'}")
    if r.get("edge"):
        parts.append(f"{r.get('edge_param') or 'lr'} at {r['edge']} edge")
    if "overfit" in (r.get("flags") or []):
        parts.append("overfits")
    return "; ".join(parts)


def _rows_of(entry: dict[str, Any], kind: str | None) -> list[dict[str, Any]]:
    rows = entry.get("results", [])
    if kind is None or not any("kind" in r for r in rows):
        return list(rows)
    return [r for r in rows if r.get("kind") == kind]


def _task_cols(entry: dict[str, Any], mode: str = "default") -> list[Col]:
    """Every column of one task's table (the terminal drops some when narrow)."""
    metric = entry.get("metric")
    mh = _metric_head(entry)
    th, ts = _target_head(entry)
    if mode == "budget" and any(r.get("kind") == "best" for r in entry.get("results", [])):
        return _budget_cols(entry)
    rows = _rows_of(entry, "default")
    def ok(r: dict[str, Any]) -> bool:
        return not r.get("error") or r.get("val_loss") is not None

    def cells(key: str, digits: int = 4) -> list[str]:
        return [fmt(r.get(key), digits) if ok(r) else "—" for r in rows]

    cols = [
        Col("#", [fmt(r.get("rank")) for r in rows], 0),
        Col("optimizer", [str(r.get("optimizer")) for r in rows], 0, text=True, left=True),
        Col("lr", [fmt(r.get("lr"), 3) for r in rows], 4),
        _pm_col("train loss", rows, "train_loss", 6, "train", ok),
        _pm_col("val loss", rows, "val_loss", 1 if not metric else 3, "val", ok),
    ]
    if mh:
        cols.append(_pm_col(mh, rows, "metric", 1, _abbrev(metric), ok))
    cols += [
        Col(th, cells("steps_to_target"), 2, short=ts),
        Col("ms/step", cells("ms_per_step", 3), 7, short="ms"),
        Col("opt ms/step", cells("opt_ms_per_step", 3), 9, short="opt ms"),
        Col("state B/param", cells("state_bytes_per_param", 3), 8, short="B/par"),
    ]
    if any(r.get("time_to_target_s") is not None for r in rows):
        cols.append(Col("s to target", cells("time_to_target_s", 3), 5, short="s tgt"))
    notes = [_note(r) for r in rows]
    if any(notes):  # only when a row has something to say
        cols.append(Col("note", notes, 2, text=True, left=True))
    return cols


def _tuned_text(r: dict[str, Any]) -> str:
    tuned = r.get("tuned")
    if not isinstance(tuned, dict) or not tuned:
        return fmt(r.get("lr"), 3) if r.get("lr") is not None else "—"
    return ", ".join(f"{k}={fmt(v, 3)}" for k, v in tuned.items())  # wraps between values only


def _budget_cols(entry: dict[str, Any]) -> list[Col]:
    """Budget mode: one line per optimizer: default result, best of the budget with its tuned
    values, and the sensitivity (how much of the search range was as good as the best)."""
    metric = entry.get("metric")
    key = "metric" if metric else "val_loss"
    what = _abbrev(metric) if metric else "val"
    best = _rows_of(entry, "best")
    default = {r.get("optimizer"): r for r in _rows_of(entry, "default")}
    th, ts = _target_head(entry)

    def sens(r: dict[str, Any]) -> tuple[str, str, str]:
        s = r.get("sensitivity") or {}
        frac, n = s.get("good_fraction"), s.get("n")
        good = f"{round(frac * n)}/{n}" if frac is not None and n else "—"
        factors = [f for f in (s.get("good_factor") or {}).values() if f]
        width = f"x{fmt(factors[0], 3)}" if factors else "—"
        spread = s.get("metric" if metric else "val_loss")
        rng = f"{fmt(spread[0], 3)}..{fmt(spread[2], 3)}" if spread and len(spread) == 3 else "—"
        return good, width, rng

    sx = [sens(r) for r in best]
    cols = [
        Col("#", [fmt(r.get("rank")) for r in best], 0),
        Col("optimizer", [str(r.get("optimizer")) for r in best], 0, text=True, left=True),
        _pm_col(f"default {_metric_head(entry) or 'val loss'}", [default.get(r.get("optimizer"), {}) for r in best],
                key, 2, f"dflt {what}"),
        _pm_col(f"tuned {_metric_head(entry) or 'val loss'}", best, key, 0, f"tuned {what}"),
        Col("tuned value", [_tuned_text(r) for r in best], 1, text=True, left=True, short="tuned"),
        Col("points within 10% of best", [g for g, _, _ in sx], 4, short="good"),
        Col("good range", [w for _, w, _ in sx], 5, short="range"),
        Col(f"{what} over points", [s for _, _, s in sx], 7, short=f"{what} span"),
        Col(th, [fmt(r.get("steps_to_target")) for r in best], 3, short=ts),
    ]
    if metric:
        cols.append(Col("tuned val loss", [fmt(r.get("val_loss")) for r in best], 8, short="val"))
    cols += [
        Col("ms/step", [fmt(r.get("ms_per_step"), 3) for r in best], 9, short="ms"),
        Col("state B/param", [fmt(r.get("state_bytes_per_param"), 3) for r in best], 10, short="B/par"),
    ]
    notes = [_note(r) for r in best]
    if any(notes):
        cols.append(Col("note", notes, 2, text=True, left=True))
    return cols


def _overall_cols(result: dict[str, Any]) -> list[Col]:
    rows = result.get("overall") or []
    tasks = list(result.get("tasks", {}))
    cols = [Col("#", [fmt(r.get("rank")) for r in rows], 0),
            Col("optimizer", [str(r.get("optimizer")) for r in rows], 0, text=True, left=True)]
    if any(r.get("profile_area") is not None for r in rows):
        cols.append(Col("profile score (steps)", [fmt(r.get("profile_area"), 3) for r in rows], 1, short="profile"))
    if any(r.get("profile_area_time") is not None for r in rows):
        cols.append(Col("profile score (time)", [fmt(r.get("profile_area_time"), 3) for r in rows], 6,
                        short="time prof"))
    cols += [Col("mean rank", [fmt(r.get("mean_rank"), 3) for r in rows], 1, short="mean"),
             Col("wins", [fmt(r.get("wins")) for r in rows], 2)]
    if any("reached" in r for r in rows):
        cols.append(Col("reached target", [fmt(r.get("reached")) for r in rows], 3, short="reached"))
    for i, t in enumerate(tasks):
        cols.append(Col(f"{t} rank", [fmt((r.get("ranks") or {}).get(t)) for r in rows], 7 + i, short=t[:6]))
    return cols


def _sweep_cols(entry: dict[str, Any]) -> list[Col]:
    sweeps = entry.get("sweeps") or {}
    labels, dflt, best, at_best, window, width = [], [], [], [], [], []
    for label, s in sweeps.items():
        grid = s.get("grid") or []
        b = next((g for g in grid if g.get("lr") == s.get("best_lr")), None)
        param = s.get("param", "lr")
        labels.append(label if param == "lr" else f"{label} ({param})")
        dflt.append(fmt(s.get("default_lr"), 3))
        best.append(fmt(s.get("best_lr"), 3) + (f" ({s['edge']} edge)" if s.get("edge") else ""))
        at_best.append(fmt(b.get("val_loss")) if b else "—")
        w = s.get("window")
        window.append(f"{fmt(w[0], 3)}..{fmt(w[1], 3)}" if w else "—")
        width.append(f"x{fmt(s['window_factor'], 3)}" if s.get("window_factor") else "—")
    return [Col("optimizer", labels, 0, text=True, left=True), Col("default lr", dflt, 3, short="default"),
            Col("best lr", best, 0, text=True, short="best"), Col("val loss at best", at_best, 1, short="val"),
            Col("good lr range", window, 2, short="good range"), Col("range width", width, 4, short="width")]


def _head_rows(cols: list[Col]) -> tuple[list[str], list[list[str]]]:
    n = max((len(c.cells) for c in cols), default=0)
    return [c.head for c in cols], [[c.cells[i] for c in cols] for i in range(n)]


def task_table(entry: dict[str, Any], mode: str = "default") -> tuple[list[str], list[list[str]]]:
    """Header and rows (strings) of one task's ranked table, every column."""
    return _head_rows(_task_cols(entry, mode))


def overall_table(result: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the overall ranking, every column."""
    return _head_rows(_overall_cols(result))


def sweep_table(entry: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of one task's lr sweep (``--lr-sweep``), every column."""
    return _head_rows(_sweep_cols(entry))


def table_title(result: dict[str, Any], name: str) -> str:
    """``task: description (steps, seeds) — what kind of comparison``."""
    entry = result["tasks"][name]
    seeds = result.get("config", {}).get("seeds")
    cfg = result.get("config", {})
    if _mode(result) == "default":
        what = "out of the box (default hyperparameters only)"
    elif cfg.get("budget"):
        what = f"tuned: best of {cfg['budget']} trial(s) per optimizer, default alongside"
    else:
        what = "tuned: best of the lr grid per optimizer, default alongside"
    desc = (entry.get("description") or "").strip()
    return f"{name}: {desc + ' ' if desc else ''}({entry.get('steps')} steps, {seeds} seed(s)) — {what}"


# ----------------------------------------------------------------------------- fitting


def _cells(c: Col, style: str) -> list[str]:
    return c.short_cells if style == "short" and c.short_cells is not None else c.cells


def _col_width(c: Col, style: str) -> int:
    """Characters a column needs in a layout ``style``: ``full`` (headers on one line),
    ``wrap`` (headers wrap at spaces) or ``short`` (short headers and cells; text wraps at
    spaces, so no word, e.g. ``lr=0.05``, is ever split)."""
    cells = _cells(c, style)
    cell_w = max((len(x) for x in cells), default=1)
    if style == "full":
        return max(len(c.head), cell_w)
    head = (c.short or c.head) if style == "short" else c.head
    head_w = max((len(w) for w in head.split()), default=1)
    if c.text and style == "short":
        cell_w = max((len(w) for x in cells for w in x.split()), default=1)
    return max(head_w, cell_w)


def _table_width(cols: list[Col], style: str) -> int:
    # a rounded box: one border per column plus one, and one space of padding on either side
    return sum(_col_width(c, style) + 3 for c in cols) + 1


def fit_columns(cols: list[Col], width: int) -> tuple[list[Col], str]:
    """The columns to show in ``width`` characters, and the layout style (see ``_col_width``).

    Every column with one-line headers if that fits; else with headers wrapped at spaces; else
    short headers, dropping the lowest-priority columns (the highest ``prio`` first, the later
    one among equals) until the table fits. Priority-0 columns always stay."""
    for style in ("full", "wrap"):
        if _table_width(cols, style) <= width:
            return cols, style
    keep = list(cols)
    while _table_width(keep, "short") > width:
        droppable = [c for c in keep if c.prio > 0]
        if not droppable:
            break
        worst = max(droppable, key=lambda c: (c.prio, keep.index(c)))
        keep.remove(worst)
    return keep, "short"


def _rich_table(title: str, cols: list[Col], width: int) -> Any:
    from rich import box
    from rich.table import Table

    shown, style = fit_columns(cols, width)
    widths = [_col_width(c, style) for c in shown]
    if style != "full":
        # the room left goes to the text columns, rightmost (the note) first, so that they
        # wrap onto fewer lines
        slack = width - _table_width(shown, style)
        for i in reversed(range(len(shown))):
            if shown[i].text and slack > 0:
                natural = max((len(x) for x in _cells(shown[i], style)), default=1)
                extra = min(slack, max(0, natural - widths[i]))
                widths[i] += extra
                slack -= extra
    hidden = [c.head for c in cols if c not in shown]
    caption = (f"not shown at {width} columns: {', '.join(hidden)} (a wider terminal shows them; "
               "every value is in results.json and index.html)") if hidden else None
    t = Table(title=title, box=box.ROUNDED, title_justify="left", caption=caption,
              caption_justify="left")
    for c, w in zip(shown, widths):
        # a wrapped table gets the exact widths fit_columns counted on (rich would otherwise
        # shrink whichever column it likes, e.g. fold a label while a header keeps its width)
        t.add_column((c.short or c.head) if style == "short" else c.head, justify="left" if c.left else "right",
                     overflow="fold", width=None if style == "full" else w, no_wrap=not c.text and style == "full")
    n = max((len(c.cells) for c in shown), default=0)
    for i in range(n):
        t.add_row(*[_cells(c, style)[i] for c in shown])
    return t


# ----------------------------------------------------------------------------- terminal
def print_report(result: dict[str, Any], console: Any = None) -> None:
    """Print every task's ranked table, the lr sweeps, the overall ranking and the verdict (rich).

    The tables fit ``console.width``: a narrow terminal shows fewer columns (named under the
    table) and short headers, never a number split across lines."""
    from rich.console import Console

    from .verdict import verdict

    if console is None:
        import os
        import sys

        # a terminal (or an explicit COLUMNS) sets the width; a pipe or file gets wide tables
        console = Console(file=sys.stdout,
                          width=None if sys.stdout.isatty() or os.environ.get("COLUMNS") else 200)
    width = console.width
    mode = _mode(result)
    if result.get("title"):
        console.print(result["title"], markup=False, highlight=False)
    for name, entry in result.get("tasks", {}).items():
        console.print(_rich_table(table_title(result, name), _task_cols(entry, mode), width))
        # the grid of --lr-sweep reads best as its own table; a --budget's random points are
        # summarised by the budget table's sensitivity columns (and plotted in lr_sweep.png)
        grid = result.get("config", {}).get("lr_sweep") or result.get("config", {}).get("sampler") == "grid"
        if entry.get("sweeps") and (grid or not any(r.get("kind") == "best" for r in entry.get("results", []))):
            console.print(_rich_table(f"{name}: learning-rate sweep (good range: val loss within 10% of the best)",
                                      _sweep_cols(entry), width))
    if result.get("overall"):
        title = ("overall ranking (performance profile over tasks, then mean rank)"
                 if any(r.get("profile_area") is not None for r in result["overall"])
                 else "overall ranking (mean rank over tasks)")
        console.print(_rich_table(title, _overall_cols(result), width))
    for name, hint in result.get("unavailable_tasks", {}).items():
        console.print(f"skipped task {name}: {hint}", markup=False, highlight=False)
    for w in result.get("warnings") or []:
        console.print(f"warning: {w}", markup=False, highlight=False)
    v = verdict(result)
    if v["text"]:
        console.print("verdict:", style="bold")
        for para in v["text"].split("\n\n"):
            console.print(para.replace("**", ""), markup=False, highlight=False)


# ----------------------------------------------------------------------------- files
def write_json(result: dict[str, Any], path: str | Path) -> None:
    """``result`` as indented JSON (NaN/inf are not allowed: the runner stores them as null)."""
    Path(path).write_text(json.dumps(result, indent=1, allow_nan=False) + "\n", encoding="utf-8")


def write_report(result: dict[str, Any], out: str | Path, *, tensorboard: str | None = None,
                 x_axis: str = "step") -> dict[str, str]:
    """Write the report folder and return ``{what: file name}`` of the files in ``out``.

    ``out`` gets ``results.json``, ``trials.csv``, the PNG plots (curves per task, Prodigy's d,
    the lr sensitivity, the performance profile when the result has one) and ``index.html``
    (opens with the verdict). ``tensorboard``: also write every curve as TensorBoard events
    into that folder (needs the ``tensorboard`` package: :class:`~.export.TensorBoardUnavailable`,
    a ValueError, otherwise, raised before anything is written; the CLI can call
    :func:`~.export.require_tensorboard` before the run). ``x_axis``: ``"step"`` or ``"wall"`` (seconds of training) for the
    curve plots.
    """
    if x_axis not in ("step", "wall"):
        raise ValueError(f"invalid x_axis={x_axis!r}; expected 'step' or 'wall'")
    from . import export, plots
    from .html_page import render_html

    if tensorboard is not None:
        export.require_tensorboard()  # before anything is written
    import matplotlib

    matplotlib.use("Agg", force=True)  # headless; never opens a window

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = result.get("config", {})
    labels = list(cfg.get("optimizers") or {lab: None for e in result.get("tasks", {}).values()
                                              for lab in (e.get("curves") or {})})
    palette = plots.colors(labels)
    seeds = int(cfg.get("seeds") or 1)
    files: dict[str, str] = {}
    for name, entry in result.get("tasks", {}).items():
        p = out / f"loss_{name}.png"
        if plots.plot_task(entry, labels, palette, p, seeds, x_axis=x_axis):
            files[f"loss_{name}"] = p.name
    if plots.plot_prodigy(result, out / "prodigy_d.png"):
        files["prodigy_d"] = "prodigy_d.png"
    if plots.plot_sweeps(result, palette, out / "lr_sweep.png"):
        files["lr_sweep"] = "lr_sweep.png"
    prof = result.get("profiles") or {}
    if prof.get("tau") and prof.get("steps") and prof.get("tasks"):
        if plots.plot_profile(prof, palette, out / "profile.png"):
            files["profile"] = "profile.png"
    export.write_trials_csv(result, out / "trials.csv")
    files["trials_csv"] = "trials.csv"
    if tensorboard is not None:
        export.write_tensorboard(result, tensorboard)
    files.update(json="results.json", html="index.html")
    result = {**result, "files": dict(files)}
    write_json(result, out / "results.json")
    (out / "index.html").write_text(render_html(result, files, x_axis=x_axis), encoding="utf-8")
    return files
