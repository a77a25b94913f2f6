"""Render a compare result (the dict from :func:`~optimkit.compare.runner.run_compare`).

Everything here reads that one dict: the terminal tables, the PNG plots (matplotlib, Agg), the
HTML page that embeds them and the JSON file. Numbers are formatted by :func:`fmt` only.
"""

from __future__ import annotations

import html
import json
import math
from pathlib import Path
from typing import Any

__all__ = [
    "fmt",
    "task_table",
    "overall_table",
    "sweep_table",
    "print_report",
    "write_report",
    "write_json",
    "LOSS_FIGSIZE",
    "DPI",
]

DPI = 100
LOSS_FIGSIZE = (14.0, 4.2)  # inches: 1400 x 420 px at DPI
PRODIGY_FIGSIZE = (12.0, 4.0)
SWEEP_PANEL = (4.2, 3.6)


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


def _metric_title(entry: dict[str, Any]) -> str | None:
    return f"val {entry['metric']}" if entry.get("metric") else None


def _target_title(entry: dict[str, Any]) -> str:
    t = entry.get("target")
    if t is None:
        return "steps to target"
    op = "≥" if entry.get("metric") and entry.get("higher_is_better") else "≤"
    what = entry.get("metric") or "val loss"
    return f"steps to {what} {op} {fmt(t)}"


def task_table(entry: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Header and rows (strings) of one task's ranked table."""
    head = ["#", "optimizer", "lr", "train loss", "val loss"]
    mt = _metric_title(entry)
    if mt:
        head.append(mt)
    head += [_target_title(entry), "ms/step", "opt ms/step", "state B/param", "note"]
    rows = []
    for r in entry["results"]:
        note = ""
        if r.get("error"):
            note = r["error"]
        elif r.get("diverged_seeds"):
            note = f"diverged ({r['diverged_seeds']}/{r['seeds']} seeds)"
        if r.get("error"):
            cells = [fmt(r.get("rank")), r["optimizer"], fmt(r.get("lr"), 3)] + ["—"] * (len(head) - 4) + [note]
        else:
            cells = [fmt(r["rank"]), r["optimizer"], fmt(r["lr"], 3), fmt(r["train_loss"]), fmt(r["val_loss"])]
            if mt:
                cells.append(fmt(r["metric"]))
            cells += [fmt(r["steps_to_target"]), fmt(r["ms_per_step"], 3), fmt(r["opt_ms_per_step"], 3),
                      fmt(r["state_bytes_per_param"], 3), note]
        rows.append(cells)
    return head, rows


def overall_table(result: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    tasks = list(result["tasks"])
    head = ["#", "optimizer", "mean rank", "wins"] + [f"{t} rank" for t in tasks]
    rows = []
    for r in result["overall"]:
        rows.append([fmt(r["rank"]), r["optimizer"], fmt(r["mean_rank"], 3), fmt(r["wins"])]
                    + [fmt(r["ranks"].get(t)) for t in tasks])
    return head, rows


def sweep_table(entry: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    head = ["optimizer", "default lr", "best lr", "val loss at best", "good lr range", "range width"]
    rows = []
    for label, s in entry.get("sweeps", {}).items():
        best = next((g for g in s["grid"] if g["lr"] == s["best_lr"]), None)
        window = f"{fmt(s['window'][0], 3)} .. {fmt(s['window'][1], 3)}" if s.get("window") else "—"
        width = f"x{fmt(s['window_factor'], 3)}" if s.get("window_factor") else "—"
        rows.append([label, fmt(s["default_lr"], 3), fmt(s["best_lr"], 3),
                     fmt(best["val_loss"]) if best else "—", window, width])
    return head, rows


# ----------------------------------------------------------------------------- terminal
def print_report(result: dict[str, Any], console: Any = None) -> None:
    """Print every task's ranked table, the lr sweeps and the overall ranking (rich)."""
    from rich import box
    from rich.console import Console
    from rich.table import Table

    if console is None:
        import sys

        console = Console(file=sys.stdout, width=None if sys.stdout.isatty() else 200)

    def show(title: str, head: list[str], rows: list[list[str]]) -> None:
        t = Table(title=title, box=box.ROUNDED, title_justify="left")
        for i, h in enumerate(head):
            t.add_column(h, justify="left" if h in ("optimizer", "note") else "right", overflow="fold")
        for r in rows:
            t.add_row(*r)
        console.print(t)

    for name, entry in result["tasks"].items():
        title = f"{name}: {entry['description']}  ({entry['steps']} steps, {result['config']['seeds']} seed(s))"
        show(title, *task_table(entry))
        if entry.get("sweeps"):
            show(f"{name}: learning-rate sweep (good range: val loss within 10% of the best)", *sweep_table(entry))
    if result["overall"]:
        show("overall ranking (mean rank over tasks)", *overall_table(result))
    for name, hint in result.get("unavailable_tasks", {}).items():
        console.print(f"skipped task {name}: {hint}", markup=False, highlight=False)


# ----------------------------------------------------------------------------- files
def write_json(result: dict[str, Any], path: str | Path) -> None:
    Path(path).write_text(json.dumps(result, indent=1, allow_nan=False) + "\n", encoding="utf-8")


def _colors(labels: list[str]) -> dict[str, Any]:
    import matplotlib

    cmap = matplotlib.colormaps["tab10" if len(labels) <= 10 else "tab20"]
    return {lab: cmap(i % cmap.N) for i, lab in enumerate(labels)}


def _style(i: int) -> str:
    return ["-", "--", "-.", ":"][(i // 10) % 4]


def _series(xs: list[Any], ys: list[Any]) -> tuple[list[float], list[float]]:
    """Matplotlib wants NaN, not None, for gaps."""
    return [float(x) for x in xs], [math.nan if y is None else float(y) for y in ys]


def _log_axis(ax: Any, axis: str = "y") -> None:
    """Log scale with plain tick labels (0.6, 2, 30); minor labels only on short ranges."""
    from matplotlib.ticker import FuncFormatter

    which = ax.yaxis if axis == "y" else ax.xaxis
    (ax.set_yscale if axis == "y" else ax.set_xscale)("log")
    lim = ax.get_ylim if axis == "y" else ax.get_xlim

    def major(v: float, _pos: Any) -> str:
        return f"{v:g}"

    def minor(v: float, _pos: Any) -> str:
        lo, hi = lim()
        digit = f"{v:.0e}"[0]  # first significant digit
        if lo > 0 and (hi / lo < 12 and digit in "23456" or hi / lo < 40 and digit in "25"):
            return f"{v:g}"
        return ""

    which.set_major_formatter(FuncFormatter(major))
    which.set_minor_formatter(FuncFormatter(minor))


def _positive(values: list[Any]) -> bool:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    return bool(vals) and min(vals) > 0


def _plot_task(entry: dict[str, Any], labels: list[str], colors: dict[str, Any], path: Path, seeds: int) -> None:
    import matplotlib.pyplot as plt

    metric = entry.get("metric")
    panels = [("train_steps", "train_loss", "training loss (minibatch, binned)"),
              ("eval_steps", "val_loss", "validation loss")]
    if metric:
        panels.append(("eval_steps", "metric", f"validation {metric}"))
    fig, axes = plt.subplots(1, len(panels), figsize=LOSS_FIGSIZE, dpi=DPI, layout="constrained")
    band = "min-max over seeds" if seeds > 1 else "1 seed"
    fig.suptitle(f"{entry['name']}: {entry['description']}  (line: mean, band: {band})", fontsize=10)
    curves = entry["curves"]
    for ax, (xkey, ykey, title) in zip(axes, panels):
        all_vals: list[Any] = []
        for i, lab in enumerate(labels):
            c = curves.get(lab)
            if not c:
                continue
            xs, mean = _series(c[xkey], c[ykey]["mean"])
            _, lo = _series(c[xkey], c[ykey]["min"])
            _, hi = _series(c[xkey], c[ykey]["max"])
            all_vals += [v for v in c[ykey]["mean"] if v is not None]
            ax.plot(xs, mean, _style(i), color=colors[lab], lw=1.4, label=lab)
            if seeds > 1:
                ax.fill_between(xs, lo, hi, color=colors[lab], alpha=0.15, lw=0)
        log = ykey != "metric" or metric == "perplexity"
        if log and _positive(all_vals):
            _log_axis(ax)
        if ykey != "metric" and _positive(all_vals):
            # diverging runs can reach huge losses; keep the informative range visible
            finite = sorted(v for v in all_vals if math.isfinite(v))
            top = finite[int(0.98 * (len(finite) - 1))]
            ax.set_ylim(max(finite[0] * 0.8, 1e-6), top * 1.5)
        if ykey == "metric" and metric == "accuracy":
            ax.set_ylim(0, 1.0)
        if ykey == "metric" and entry.get("target") is not None:
            ax.axhline(entry["target"], color="0.5", lw=0.8, ls=":", label="_target")
            ax.annotate("target", (1.0, entry["target"]), xycoords=("axes fraction", "data"),
                        ha="right", va="bottom", fontsize=7, color="0.4")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.set_ylabel({"train_loss": "loss", "val_loss": "loss"}.get(ykey, metric or ""))
        ax.grid(True, which="both", alpha=0.25)
    handles, names = axes[0].get_legend_handles_labels()
    fig.legend(handles, names, loc="outside right upper", fontsize=8, title="optimizer", title_fontsize=8)
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def _plot_prodigy(result: dict[str, Any], path: Path) -> bool:
    import matplotlib.pyplot as plt

    lines = [(t, lab, c) for t, e in result["tasks"].items() for lab, c in e["curves"].items() if c.get("d")]
    if not lines:
        return False
    fig, (ax_d, ax_e) = plt.subplots(1, 2, figsize=PRODIGY_FIGSIZE, dpi=DPI, layout="constrained")
    fig.suptitle("Prodigy: estimated step size d and effective lr (= lr x d, the step an Adam would take) per step "
                 "(seed mean)", fontsize=10)
    import matplotlib

    cmap = matplotlib.colormaps["tab10"]
    for i, (task, lab, c) in enumerate(lines):
        xs, d = _series(c["d_steps"], c["d"])
        _, e = _series(c["d_steps"], c["effective_lr"])
        name = f"{task} · {lab}"
        ax_d.plot(xs, d, color=cmap(i % 10), lw=1.4, label=name)
        ax_e.plot(xs, e, color=cmap(i % 10), lw=1.4, label=name)
    for ax, title in ((ax_d, "d (group['d'])"), (ax_e, "effective lr")):
        ax.set_yscale("log")  # spans many decades: scientific labels read best
        ax.set_xlabel("step")
        ax.set_ylabel(title)
        ax.set_title(title, fontsize=10)
        ax.grid(True, which="both", alpha=0.25)
    handles, names = ax_d.get_legend_handles_labels()
    fig.legend(handles, names, loc="outside right upper", fontsize=8, title="task · optimizer", title_fontsize=8)
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return True


def _plot_sweeps(result: dict[str, Any], colors: dict[str, Any], path: Path) -> bool:
    import matplotlib.pyplot as plt

    tasks = [(t, e) for t, e in result["tasks"].items() if e.get("sweeps")]
    if not tasks:
        return False
    fig, axes = plt.subplots(1, len(tasks), figsize=(max(7.5, SWEEP_PANEL[0] * len(tasks) + 1.8), SWEEP_PANEL[1]),
                             dpi=DPI, layout="constrained", squeeze=False)
    fig.suptitle("lr sweep: final validation loss vs lr (x: diverged, star: best)", fontsize=10)
    for ax, (t, e) in zip(axes[0], tasks):
        for lab, s in e["sweeps"].items():
            lrs = [g["lr"] for g in s["grid"]]
            vl = [math.nan if g["val_loss"] is None or g["diverged_seeds"] else g["val_loss"] for g in s["grid"]]
            ax.plot(lrs, vl, "o-", ms=3, color=colors.get(lab), lw=1.2, label=lab)
            bad = [x for x, g in zip(lrs, s["grid"]) if g["val_loss"] is None or g["diverged_seeds"]]
            finite = [v for v in vl if math.isfinite(v)]
            if bad and finite:
                ax.plot(bad, [max(finite)] * len(bad), "x", color=colors.get(lab), ms=6)
            if s.get("best_lr") is not None:
                best = next(g for g in s["grid"] if g["lr"] == s["best_lr"])
                ax.plot([s["best_lr"]], [best["val_loss"]], "*", color=colors.get(lab), ms=11)
        ax.set_xscale("log")
        if _positive([g["val_loss"] for s in e["sweeps"].values() for g in s["grid"]]):
            _log_axis(ax)
        ax.set_title(t, fontsize=10)
        ax.set_xlabel("learning rate")
        ax.set_ylabel("final validation loss")
        ax.grid(True, which="both", alpha=0.25)
    handles, names = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, names, loc="outside right upper", fontsize=8, title="optimizer", title_fontsize=8)
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return True


def _html_table(head: list[str], rows: list[list[str]]) -> str:
    th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>\n" for r in rows)
    return f"<table><thead><tr>{th}</tr></thead><tbody>\n{body}</tbody></table>"


_CSS = """body{font-family:system-ui,sans-serif;margin:2em;max-width:1500px;color:#222}
table{border-collapse:collapse;margin:0.5em 0 1em}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}
td:nth-child(2),th:nth-child(2){text-align:left}th{background:#f3f3f3}img{max-width:100%;border:1px solid #eee}
.small{color:#666;font-size:90%}"""


def write_report(result: dict[str, Any], out: str | Path) -> dict[str, str]:
    """Write ``results.json``, the PNG plots and ``index.html`` into ``out``; return the files."""
    import matplotlib

    matplotlib.use("Agg", force=True)  # headless; never opens a window

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    labels = list(result["config"]["optimizers"])
    colors = _colors(labels)
    seeds = result["config"]["seeds"]
    files: dict[str, str] = {}
    for name, entry in result["tasks"].items():
        p = out / f"loss_{name}.png"
        _plot_task(entry, labels, colors, p, seeds)
        files[f"loss_{name}"] = p.name
    if _plot_prodigy(result, out / "prodigy_d.png"):
        files["prodigy_d"] = "prodigy_d.png"
    if _plot_sweeps(result, colors, out / "lr_sweep.png"):
        files["lr_sweep"] = "lr_sweep.png"
    result = {**result, "files": {**files, "json": "results.json", "html": "index.html"}}
    write_json(result, out / "results.json")
    (out / "index.html").write_text(_html(result, files), encoding="utf-8")
    return {**files, "json": "results.json", "html": "index.html"}


def _html(result: dict[str, Any], files: dict[str, str]) -> str:
    cfg = result["config"]
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>optimkit compare</title>",
        f"<style>{_CSS}</style></head><body>",
        "<h1>optimkit compare</h1>",
        f"<p class='small'>optimkit {html.escape(result['optimkit_version'])}, torch "
        f"{html.escape(result['torch_version'])}, {html.escape(result['created'])}; device {html.escape(cfg['device'])}; "
        f"{cfg['seeds']} seed(s); lr sweep: {'yes' if cfg['lr_sweep'] else 'no'}; quick: {'yes' if cfg['quick'] else 'no'}; "
        f"wall time {result['wall_time_s']:.1f} s. All numbers: <a href='results.json'>results.json</a>.</p>",
    ]
    if result["overall"]:
        parts += ["<h2>Overall ranking</h2><p class='small'>Mean rank over tasks (lower is better); "
                  "a task ranks by its validation metric, ties by validation loss; diverged runs rank last.</p>",
                  _html_table(*overall_table(result))]
    for name, entry in result["tasks"].items():
        parts.append(f"<h2 id='{html.escape(name)}'>{html.escape(name)}</h2>")
        info = ", ".join(f"{k}: {v}" for k, v in entry.get("info", {}).items())
        parts.append(f"<p>{html.escape(entry['description'])} ({entry['steps']} steps, "
                     f"{fmt(entry['n_params'])} parameters). <span class='small'>{html.escape(info)}</span></p>")
        parts.append(_html_table(*task_table(entry)))
        if f"loss_{name}" in files:
            parts.append(f"<img src='{html.escape(files[f'loss_{name}'])}' alt='loss curves {html.escape(name)}'>")
        if entry.get("sweeps"):
            parts.append("<h3>Learning-rate sweep</h3>" + _html_table(*sweep_table(entry)))
    if "lr_sweep" in files:
        parts.append(f"<h2>Learning-rate sensitivity</h2><img src='{files['lr_sweep']}' alt='lr sweep'>")
    if "prodigy_d" in files:
        parts.append("<h2>Prodigy's step-size estimate</h2><p class='small'>d grows from d0 until it matches the "
                     "distance the weights have to travel; the effective lr is lr x d.</p>"
                     f"<img src='{files['prodigy_d']}' alt='Prodigy d'>")
    notes = [f"optimizer {k}: {v}" for k, v in result.get("skipped_optimizers", {}).items()]
    notes += [f"task {k}: {v}" for k, v in result.get("unavailable_tasks", {}).items()]
    if notes:
        parts.append("<h2>Skipped</h2><ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in notes) + "</ul>")
    parts.append("</body></html>\n")
    return "\n".join(parts)
