"""The PNG plots of a compare report (matplotlib, Agg backend; called by ``write_report``).

Every function reads the result dict of :func:`~optimkit.compare.runner.run_compare` and
tolerates keys that older result dicts lack: a plot whose data is missing is skipped, never an
exception. Curves are told apart by colour *and* by line style and marker, so that lines that
overlap (two optimizers reaching the same loss) stay distinguishable, also in greyscale.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

__all__ = [
    "DPI",
    "LOSS_FIGSIZE",
    "PRODIGY_FIGSIZE",
    "SWEEP_PANEL",
    "PROFILE_FIGSIZE",
    "colors",
    "plot_task",
    "plot_prodigy",
    "plot_sweeps",
    "plot_profile",
    "profile_fraction",
]

DPI = 100
LOSS_FIGSIZE = (14.0, 4.2)  # inches: 1400 x 420 px at DPI
PRODIGY_FIGSIZE = (12.0, 4.0)
SWEEP_PANEL = (4.2, 3.6)
PROFILE_FIGSIZE = (8.0, 4.6)

# 4 line styles x 10 markers: with tab10's 10 colours, two labels share a colour only past 10
# and never share the (colour, style, marker) triple below 40.
_LINESTYLES = ["-", "--", "-.", ":"]
_MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*", "<", ">"]
_MARKS_PER_LINE = 8


def colors(labels: list[str]) -> dict[str, Any]:
    """One colour per label (tab10, tab20 beyond ten)."""
    import matplotlib

    cmap = matplotlib.colormaps["tab10" if len(labels) <= 10 else "tab20"]
    return {lab: cmap(i % cmap.N) for i, lab in enumerate(labels)}


def _line_kw(i: int, n_labels: int, n_points: int) -> dict[str, Any]:
    """Line style and marker of the ``i``-th label; markers are staggered between labels so
    that two identical curves still show both markers side by side."""
    every = max(1, n_points // _MARKS_PER_LINE)
    offset = (i * every // max(1, n_labels)) % every if every > 1 else 0
    return {
        "linestyle": _LINESTYLES[i % len(_LINESTYLES)],
        "marker": _MARKERS[i % len(_MARKERS)],
        "markevery": (offset, every),
        "markersize": 4.5,
        "markeredgewidth": 0.8,
        "markerfacecolor": "white",  # hollow markers: an overlapped line still shows its own
    }


def _series(xs: list[Any], ys: list[Any]) -> tuple[list[float], list[float]]:
    """Matplotlib wants NaN, not None, for gaps."""
    return ([math.nan if x is None else float(x) for x in xs],
            [math.nan if y is None else float(y) for y in ys])


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


def _fmt(x: float) -> str:
    return f"{x:.4g}"


def _row_of(entry: dict[str, Any], label: str) -> dict[str, Any]:
    return next((r for r in entry.get("results", []) if r.get("optimizer") == label), {})


def _wall_x(curve: dict[str, Any], steps_key: str, row: dict[str, Any]) -> tuple[list[Any] | None, bool]:
    """Wall-clock seconds for the points of ``curve[steps_key]``.

    Measured times win (``<steps_key minus "_steps">_wall_s`` or ``wall_s`` lists aligned with the
    steps, as a newer runner records them); otherwise step x the row's median step time, an
    estimate (returned with ``True``) that ignores evaluation pauses.
    """
    prefix = steps_key[: -len("_steps")] if steps_key.endswith("_steps") else steps_key
    for key in (f"{prefix}_wall_s", f"{prefix}_time_s"):
        if isinstance(curve.get(key), list) and len(curve[key]) == len(curve[steps_key]):
            return curve[key], False
    ms = row.get("ms_per_step")
    if ms is None:
        return None, True
    return [None if s is None else s * ms / 1e3 for s in curve[steps_key]], True


def _target_line(ax: Any, target: float, what: str) -> None:
    """The target as a dotted line, labelled with its value just outside the axes on the right
    (inside, a label would hide the very curves that approach the target)."""
    ax.axhline(target, color="0.3", lw=1.0, ls=(0, (2, 2)), zorder=1)
    ax.annotate(f"target\n{what}\n{_fmt(target)}", xy=(1.0, target), xycoords=("axes fraction", "data"),
                xytext=(4, 0), textcoords="offset points", ha="left", va="center", fontsize=7.5, color="0.2",
                annotation_clip=False)


def plot_task(entry: dict[str, Any], labels: list[str], palette: dict[str, Any], path: Path, seeds: int,
              x_axis: str = "step") -> bool:
    """Training loss, validation loss and the validation metric of one task, one line per
    optimizer (seed mean) with a min-max band over seeds. Returns False when there is nothing
    to draw (no curves)."""
    import matplotlib.pyplot as plt

    curves = entry.get("curves") or {}
    labels = [lab for lab in labels if curves.get(lab)]
    if not labels:
        return False
    metric = entry.get("metric")
    panels = [("train_steps", "train_loss", "training loss (minibatch, binned)"),
              ("eval_steps", "val_loss", "validation loss")]
    if metric:
        panels.append(("eval_steps", "metric", f"validation {metric}"))
    fig, axes = plt.subplots(1, len(panels), figsize=LOSS_FIGSIZE, dpi=DPI, layout="constrained")
    band = "min-max over seeds" if seeds > 1 else "1 seed"
    est_note = ""
    if x_axis == "wall" and any(_wall_x(curves[lab], "eval_steps", {})[1] for lab in labels):
        est_note = "; time = step x median ms/step (estimated: no measured times)"
    fig.suptitle(f"{entry.get('name', '')}: {entry.get('description', '')}  (line: mean, band: {band}{est_note})",
                 fontsize=10)
    for ax, (xkey, ykey, title) in zip(axes, panels):
        all_vals: list[Any] = []
        for i, lab in enumerate(labels):
            c = curves[lab]
            if xkey not in c or not isinstance(c.get(ykey), dict):
                continue
            xs_raw: list[Any] | None = c[xkey]
            if x_axis == "wall":
                xs_raw, _ = _wall_x(c, xkey, _row_of(entry, lab))
                if xs_raw is None:
                    continue
            xs, mean = _series(xs_raw, c[ykey].get("mean", []))
            all_vals += [v for v in c[ykey].get("mean", []) if v is not None]
            ax.plot(xs, mean, color=palette.get(lab), lw=1.4, label=lab, **_line_kw(i, len(labels), len(xs)))
            if seeds > 1 and c[ykey].get("min") and c[ykey].get("max"):
                _, lo = _series(xs_raw, c[ykey]["min"])
                _, hi = _series(xs_raw, c[ykey]["max"])
                ax.fill_between(xs, lo, hi, color=palette.get(lab), alpha=0.15, lw=0)
        log = ykey != "metric" or metric == "perplexity"
        if log and _positive(all_vals):
            _log_axis(ax)
        if ykey != "metric" and _positive(all_vals):
            # diverging runs can reach huge losses; keep the informative range visible
            finite = sorted(v for v in all_vals if math.isfinite(v))
            top = finite[int(0.98 * (len(finite) - 1))]
            ax.set_ylim(max(finite[0] * 0.8, 1e-6), top * 1.5)
        if ykey == "metric" and metric == "accuracy":
            ax.set_ylim(0, 1.02)
        # the target applies to the metric, or to the validation loss of a task without one
        target = entry.get("target")
        if target is not None and ((ykey == "metric") or (ykey == "val_loss" and not metric)):
            _target_line(ax, target, metric or "val loss")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("training wall time (s; evaluation excluded)" if x_axis == "wall" else "step")
        ax.set_ylabel({"train_loss": "loss", "val_loss": "loss"}.get(ykey, metric or ""))
        ax.grid(True, which="both", alpha=0.25)
    handles, names = axes[0].get_legend_handles_labels()
    fig.legend(handles, names, loc="outside right upper", fontsize=8, title="optimizer", title_fontsize=8)
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return True


def _same_curve(a: list[Any], b: list[Any]) -> bool:
    return len(a) == len(b) and all(
        (x is None and y is None) or (x is not None and y is not None and math.isclose(x, y, rel_tol=1e-9, abs_tol=0))
        for x, y in zip(a, b))


def plot_prodigy(result: dict[str, Any], path: Path) -> int:
    """Prodigy's d and effective lr per step. When every line has lr = 1 the two are the same
    curve, so one panel (d = effective lr) is drawn instead of two identical ones. Returns the
    number of panels drawn (0: no Prodigy-style curve, nothing written)."""
    import matplotlib.pyplot as plt

    lines = [(t, lab, c) for t, e in result.get("tasks", {}).items()
             for lab, c in (e.get("curves") or {}).items() if c.get("d") and c.get("d_steps")]
    if not lines:
        return 0
    one_panel = all(_same_curve(c["d"], c.get("effective_lr") or c["d"]) for _, _, c in lines)
    fig, axes = plt.subplots(1, 1 if one_panel else 2, figsize=PRODIGY_FIGSIZE, dpi=DPI, layout="constrained",
                             squeeze=False)
    axes = list(axes[0])
    if one_panel:
        fig.suptitle("Prodigy: estimated step size d per step (seed mean); lr = 1, so d is also the effective lr "
                     "(the step an Adam would take)", fontsize=10)
        keys = [("d", "d = effective lr")]
    else:
        fig.suptitle("Prodigy: estimated step size d and effective lr (= lr x d, the step an Adam would take) per "
                     "step (seed mean)", fontsize=10)
        keys = [("d", "d (group['d'])"), ("effective_lr", "effective lr")]
    import matplotlib

    cmap = matplotlib.colormaps["tab10"]
    for i, (task, lab, c) in enumerate(lines):
        for ax, (key, _) in zip(axes, keys):
            xs, ys = _series(c["d_steps"], c.get(key) or c["d"])
            ax.plot(xs, ys, color=cmap(i % 10), lw=1.4, label=f"{task} · {lab}", **_line_kw(i, len(lines), len(xs)))
    for ax, (_, title) in zip(axes, keys):
        ax.set_yscale("log")  # spans many decades: scientific labels read best
        ax.set_xlabel("step")
        ax.set_ylabel(title)
        ax.set_title(title, fontsize=10)
        ax.grid(True, which="both", alpha=0.25)
    handles, names = axes[0].get_legend_handles_labels()
    fig.legend(handles, names, loc="outside right upper", fontsize=8, title="task · optimizer", title_fontsize=8)
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return len(axes)


def plot_sweeps(result: dict[str, Any], palette: dict[str, Any], path: Path) -> bool:
    """Final validation loss against lr, one panel per task (``--lr-sweep``)."""
    import matplotlib.pyplot as plt

    tasks = [(t, e) for t, e in result.get("tasks", {}).items() if e.get("sweeps")]
    if not tasks:
        return False
    fig, axes = plt.subplots(1, len(tasks), figsize=(max(7.5, SWEEP_PANEL[0] * len(tasks) + 1.8), SWEEP_PANEL[1]),
                             dpi=DPI, layout="constrained", squeeze=False)
    other = sorted({s.get("param") for _, e in tasks for s in e["sweeps"].values() if s.get("param", "lr") != "lr"})
    xlabel = "learning rate" + (f" ({', '.join(other)} for Prodigy-style)" if other else "")
    fig.suptitle("sensitivity: final validation loss of every point tried (x: diverged, star: best)", fontsize=10)
    for ax, (t, e) in zip(axes[0], tasks):
        for i, (lab, s) in enumerate(e["sweeps"].items()):
            grid = sorted((g for g in s.get("grid") or [] if g.get("lr") is not None), key=lambda g: g["lr"])
            lrs = [g["lr"] for g in grid]
            vl = [math.nan if g.get("val_loss") is None or g.get("diverged_seeds") else g["val_loss"] for g in grid]
            ax.plot(lrs, vl, color=palette.get(lab), lw=1.2, label=lab, linestyle=_LINESTYLES[i % 4],
                    marker=_MARKERS[i % 10], ms=4, mfc="white")
            bad = [x for x, g in zip(lrs, grid) if g.get("val_loss") is None or g.get("diverged_seeds")]
            finite = [v for v in vl if math.isfinite(v)]
            if bad and finite:
                ax.plot(bad, [max(finite)] * len(bad), "x", color=palette.get(lab), ms=6)
            best = next((g for g in grid if g["lr"] == s.get("best_lr")), None)
            if best is not None and best.get("val_loss") is not None:
                ax.plot([best["lr"]], [best["val_loss"]], "*", color=palette.get(lab), ms=11)
        ax.set_xscale("log")
        if _positive([g.get("val_loss") for s in e["sweeps"].values() for g in s.get("grid") or []]):
            _log_axis(ax)
        ax.set_title(t, fontsize=10)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("final validation loss")
        ax.grid(True, which="both", alpha=0.25)
    handles, names = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, names, loc="outside right upper", fontsize=8, title="optimizer", title_fontsize=8)
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return True


def profile_fraction(ratios: list[float | None], tau: float) -> float:
    """Fraction of tasks whose ratio (time / best time; None or inf = never reached) is <= tau."""
    if not ratios:
        return 0.0
    return sum(1 for r in ratios if r is not None and math.isfinite(r) and r <= tau) / len(ratios)


def plot_profile(profiles: dict[str, Any], palette: dict[str, Any], path: Path) -> bool:
    """Performance profiles (Dolan & Moré; AlgoPerf): for each optimizer, rho(tau) = the
    fraction of tasks it reaches the target within tau x the best optimizer's steps (left) and
    wall time (right), drawn as step functions over a log tau axis.

    ``profiles``: the result's ``profiles`` entry (``tau``, ``tasks``, ``steps``/``time``:
    ``{label: [rho per tau]}``, ``area``/``area_time``: the score per label)."""
    import matplotlib.pyplot as plt

    tau = profiles.get("tau") or []
    panels = [(k, t, a) for k, t, a in (("steps", "steps to target", "area"), ("time", "time to target", "area_time"))
              if isinstance(profiles.get(k), dict) and profiles[k]]
    if len(tau) < 2 or not panels:
        return False
    n_tasks = len(profiles.get("tasks") or [])
    fig, axes = plt.subplots(1, len(panels), figsize=PROFILE_FIGSIZE if len(panels) == 1 else (12.0, 4.6), dpi=DPI,
                             layout="constrained", squeeze=False)
    fig.suptitle(f"performance profiles over {n_tasks} task(s): fraction of tasks that reach the target within "
                 "tau x the best optimizer's steps / time\n(higher and further left is better; score = area under "
                 "the curve, 1 = fastest on every task)", fontsize=9)
    labels = list(dict.fromkeys(lab for key, _, _ in panels for lab in profiles[key]))

    def name(lab: str) -> str:
        scores = [f"{k} {profiles[a][lab]:.2f}" for k, _, a in panels
                  if isinstance((profiles.get(a) or {}).get(lab), (int, float))]
        return f"{lab} ({', '.join(scores)})" if scores else lab

    for ax, (key, what, _area_key) in zip(axes[0], panels):
        for i, lab in enumerate(labels):
            rho = profiles[key].get(lab)
            if not rho or len(rho) != len(tau):
                continue
            ax.step(tau, [math.nan if r is None else r for r in rho], where="post", color=palette.get(lab), lw=1.6,
                    label=name(lab), **_line_kw(i, len(labels), len(tau)))
        ax.set_xscale("log")
        ax.set_xlim(tau[0], tau[-1])
        ax.set_ylim(-0.03, 1.03)
        _log_axis(ax, "x")
        ax.set_xlabel(f"tau (x the best {what})")
        ax.set_ylabel("fraction of tasks")
        ax.set_title(what, fontsize=10)
        ax.grid(True, which="both", alpha=0.25)
    handles, names = axes[0][0].get_legend_handles_labels()
    # below the panels: at the upper right the legend would cover the two-line title
    fig.legend(handles, names, loc="outside lower center", ncols=min(4, max(1, len(names))), fontsize=8,
               title="optimizer (score)", title_fontsize=8)
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return True
