"""Exports of a compare result for other tools: every trial as CSV, every curve as TensorBoard
events. Both read the result dict only (schema 2, docs/compare-results.md) and tolerate an older
dict: without ``trials`` the CSV holds one line per result row and lr-sweep point."""

from __future__ import annotations

import csv
import json
import math
import re
from pathlib import Path
from typing import Any

__all__ = [
    "TRIAL_COLUMNS",
    "TensorBoardUnavailable",
    "trial_rows",
    "write_trials_csv",
    "write_tensorboard",
    "tensorboard_available",
    "require_tensorboard",
]

#: the CSV header: one line per trial (task, optimizer, hyperparameter point, seed)
TRIAL_COLUMNS = [
    "task", "optimizer", "kind", "point", "round", "trial", "seed", "state", "hyperparameters",
    "val_loss", "metric", "train_loss", "diverged", "steps_to_target", "duration_s", "error", "where", "worker",
]


def _cell(v: Any) -> Any:
    """CSV cell: dicts/lists as compact JSON (one cell, parseable), None/NaN as empty."""
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return ""
    if isinstance(v, (dict, list, tuple)):
        return json.dumps(v, sort_keys=False, separators=(",", ":"))
    return v


def trial_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The trials of ``result`` as dicts with the keys of :data:`TRIAL_COLUMNS`."""
    if isinstance(result.get("trials"), list):
        return [{k: t.get(k) for k in TRIAL_COLUMNS} for t in result["trials"]]
    # an older (schema 1) result keeps no per-trial records: one line per row and sweep point
    out: list[dict[str, Any]] = []
    for name, entry in result.get("tasks", {}).items():
        sweeps = entry.get("sweeps") or {}
        for r in entry.get("results", []):
            lab = r.get("optimizer")
            points = (sweeps.get(lab) or {}).get("grid") or [None]
            for i, g in enumerate(points):
                src = r if g is None else g
                hp = {"lr": src.get("lr"), **(r.get("args") or {})}
                out.append({
                    "task": name, "optimizer": lab, "kind": "sweep" if g is not None else "default", "point": i,
                    "seed": "mean", "state": "FAIL" if r.get("error") else "COMPLETE", "hyperparameters": hp,
                    "val_loss": src.get("val_loss"), "metric": src.get("metric"),
                    "train_loss": r.get("train_loss") if g is None else None,
                    "diverged": bool(src.get("diverged_seeds")),
                    "steps_to_target": r.get("steps_to_target") if g is None else None, "error": r.get("error"),
                })
    return [{k: t.get(k) for k in TRIAL_COLUMNS} for t in out]


def write_trials_csv(result: dict[str, Any], path: str | Path) -> int:
    """Write every trial to ``path`` (UTF-8 CSV with a header); return the number of trials."""
    rows = trial_rows(result)
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(TRIAL_COLUMNS)
        for r in rows:
            w.writerow([_cell(r[k]) for k in TRIAL_COLUMNS])
    return len(rows)


def tensorboard_available() -> bool:
    """``tensorboard`` is installed (torch's SummaryWriter needs it)."""
    import importlib.util

    return importlib.util.find_spec("tensorboard") is not None


class TensorBoardUnavailable(ValueError):
    """``--tensorboard`` was asked for but the ``tensorboard`` package is not installed.

    A ``ValueError``: like a bad option value, the CLI reports it as one line (exit 2)."""


def require_tensorboard() -> None:
    """Raise :class:`TensorBoardUnavailable` (one line: how to install it) unless tensorboard
    is importable; call it before a run that will write events."""
    if not tensorboard_available():
        raise TensorBoardUnavailable("--tensorboard needs the tensorboard package: "
                                     "pip install 'optimkit[tensorboard]'")


_UNSAFE = re.compile(r"[^A-Za-z0-9_.=,+@-]+")


def _run_dir(label: str) -> str:
    """A folder name for a label: ``adamw:lr=3e-4`` -> ``adamw_lr=3e-4`` (no path separators)."""
    return _UNSAFE.sub("_", label).strip("._") or "run"


def write_tensorboard(result: dict[str, Any], logdir: str | Path) -> dict[str, int]:
    """Write every curve of ``result`` as TensorBoard scalar events under ``logdir``.

    One run per (task, optimizer[, kind]) in ``logdir/<task>/<optimizer>`` so that TensorBoard
    overlays the optimizers of a task; tags ``train_loss``, ``val_loss``, ``val_<metric>``
    (seed means) and, for Prodigy, ``d`` and ``effective_lr``; the x is the step. In budget mode
    the default rows' curves go to ``<optimizer>@default``. Returns ``{run dir: events
    written}``.

    Raises:
        TensorBoardUnavailable: ``tensorboard`` is not installed (one line: how to install it).
    """
    require_tensorboard()
    from torch.utils.tensorboard import SummaryWriter

    root = Path(logdir)
    # event wall times = the run's start + the measured training seconds (schema 2 curves), so
    # TensorBoard's "relative" x axis shows training time; without them, the time of writing
    t0 = _started(result)
    written: dict[str, int] = {}
    for name, entry in result.get("tasks", {}).items():
        by_kind = entry.get("curves_by_kind")
        ranked = entry.get("ranked_kind", "default")
        sets: list[tuple[str, dict[str, Any]]] = []
        if isinstance(by_kind, dict) and by_kind:
            for kind, curves in by_kind.items():
                sets += [(lab if kind == ranked else f"{lab}@{kind}", c) for lab, c in (curves or {}).items()]
        else:
            sets = list((entry.get("curves") or {}).items())
        metric = entry.get("metric")
        for run, c in sets:
            d = root / _run_dir(name) / _run_dir(run)
            n = 0
            with SummaryWriter(log_dir=str(d)) as w:
                series = [("train_loss", "train_steps", c.get("train_loss")),
                          ("val_loss", "eval_steps", c.get("val_loss"))]
                if metric:
                    series.append((f"val_{_run_dir(metric)}", "eval_steps", c.get("metric")))
                for tag, xkey, band in series:
                    ys = band.get("mean") if isinstance(band, dict) else band
                    n += _scalars(w, tag, c.get(xkey), ys, c.get(xkey.replace("_steps", "_time_s")), t0)
                for tag in ("d", "effective_lr"):
                    n += _scalars(w, tag, c.get("d_steps"), c.get(tag), c.get("d_time_s"), t0)
            written[str(d.relative_to(root))] = n
    return written


def _started(result: dict[str, Any]) -> float:
    import time
    from datetime import datetime

    try:
        return datetime.fromisoformat(str(result.get("created"))).timestamp()
    except ValueError:
        return time.time()


def _scalars(w: Any, tag: str, xs: list[Any] | None, ys: list[Any] | None, ts: list[Any] | None,
             t0: float) -> int:
    """Add one scalar per finite point (a gap, e.g. after divergence, is left out)."""
    if not xs or not ys:
        return 0
    timed = isinstance(ts, list) and len(ts) == len(xs)
    n = 0
    for i, (x, y) in enumerate(zip(xs, ys)):
        if x is None or y is None or not math.isfinite(y):
            continue
        wall = t0 + ts[i] if timed and ts[i] is not None else None
        w.add_scalar(tag, float(y), int(x), walltime=wall)
        n += 1
    return n
