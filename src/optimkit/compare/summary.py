"""From stored trials to the result dict (schema: docs/compare-results.md).

Everything here reads the study's meta and its trials, nothing else, so a report can be rebuilt
from the storage at any time (``optimkit compare --report-only``). Definitions:

* a row summarises one point (hyperparameter setting) of one optimizer over its seeds: means
  and sample standard deviations over the seeds that did not diverge;
* ``train_loss``: mean minibatch loss over the last 10 % of steps; ``val_loss``/``metric``:
  after the last step;
* ``steps_to_target``: the first evaluation step at which the seed-mean metric reaches the
  target (``None`` if never or if a seed diverged); ``time_to_target_s``: the mean over seeds
  of the training time (step time only) up to that step;
* the best point of a budget is the one with the lowest mean final validation loss among the
  points where no seed diverged or failed (selected and reported on the same runs: optimistic
  by design, as in any tuning protocol without a separate test split);
* rank: by the metric (direction of the task), then val loss; rows equal in both at 4
  significant digits share a rank; a row with a diverged or failed seed is never ranked;
* performance profile (AlgoPerf): per task the ratio of an optimizer's steps (seconds) to
  target to the best optimizer's; rho(tau) = fraction of tasks with ratio <= tau; the area
  under rho over log(tau) in [1, 4], normalised to [0, 1], ranks the optimizers overall.
"""

from __future__ import annotations

import math
import statistics
from typing import Any

from .study import STUDY_NAME, Unit, edge_of, index_trials, key_of, settled, trial_state

__all__ = ["build_result", "result_from_storage", "TAU_MAX", "SWEEP_TOLERANCE"]

#: a point is "as good as the best" when its val loss is within this fraction of the best
SWEEP_TOLERANCE = 0.10
TAU_MAX = 4.0
_TAUS = [TAU_MAX ** (i / 40) for i in range(41)]


def _finite(x: Any) -> float | None:
    return float(x) if isinstance(x, (int, float)) and math.isfinite(x) else None


def _mean(xs: list[float]) -> float | None:
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    return statistics.fmean(xs) if xs else None


def _std(xs: list[float]) -> float | None:
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    return statistics.stdev(xs) if len(xs) > 1 else None


def _sig(x: float | None) -> float | None:
    return None if x is None else float(f"{x:.4g}")


def _band(curves: list[list[float]], length: int) -> dict[str, list[float | None]]:
    """Mean, min and max over seeds; a step where a seed is missing or non-finite is a gap."""
    out: dict[str, list[float | None]] = {"mean": [], "min": [], "max": []}
    for i in range(length):
        vals = [c[i] for c in curves if i < len(c) and c[i] is not None and math.isfinite(c[i])]
        ok = bool(vals) and len(vals) == len(curves)
        out["mean"].append(statistics.fmean(vals) if ok else None)
        out["min"].append(min(vals) if ok else None)
        out["max"].append(max(vals) if ok else None)
    return out


def _cum_s(rec: dict[str, Any]) -> list[float]:
    """Cumulative training seconds after each step (index = step - 1)."""
    out, acc = [], 0.0
    for ms in rec["step_ms"]:
        acc += ms / 1e3
        out.append(acc)
    return out


def _time_at(recs: list[dict[str, Any]], steps: list[int]) -> list[float | None]:
    cums = [_cum_s(r) for r in recs]
    out = []
    for s in steps:
        vals = [0.0 if s == 0 else c[s - 1] for c in cums if s == 0 or s <= len(c)]
        out.append(statistics.fmean(vals) if vals else None)
    return out


def _binned(losses: list[float], steps: int, bins: int = 100) -> tuple[list[int], list[float]]:
    """Per-step minibatch losses averaged in <= ``bins`` windows (noisy curves are unreadable)."""
    width = max(1, steps // bins)
    xs, ys = [], []
    for start in range(0, steps, width):
        w = losses[start : start + width]
        if len(w) < width and start + width <= steps:  # the run stopped inside this window
            w = []
        xs.append(min(steps, start + width))
        ys.append(statistics.fmean(w) if w and all(math.isfinite(v) for v in w) else math.nan)
    return xs, ys


def _curves(recs: list[dict[str, Any]], steps: int) -> dict[str, Any]:
    binned = [_binned(r["train_loss"] + [math.nan] * (steps - len(r["train_loss"])), steps) for r in recs]
    eval_steps = max((r["eval_steps"] for r in recs), key=len)
    out: dict[str, Any] = {
        "train_steps": binned[0][0],
        "train_time_s": _time_at(recs, binned[0][0]),
        "train_loss": _band([b[1] for b in binned], len(binned[0][0])),
        "eval_steps": eval_steps,
        "eval_time_s": _time_at(recs, eval_steps),
        "val_loss": _band([r["val_loss"] for r in recs], len(eval_steps)),
        "metric": _band([r["metric"] for r in recs], len(eval_steps)),
    }
    if any(r["d"] for r in recs):
        d_steps = max((r["d_steps"] for r in recs), key=len)
        out["d_steps"] = d_steps
        out["d_time_s"] = _time_at(recs, d_steps)
        out["d"] = _band([r["d"] for r in recs], len(d_steps))["mean"]
        out["effective_lr"] = _band([r["effective_lr"] for r in recs], len(d_steps))["mean"]
    return out


def _reached(tmeta: dict[str, Any]) -> Any:
    target = tmeta["target"]
    if tmeta["metric"] is not None and tmeta["higher_is_better"]:
        return lambda v: v >= target
    return lambda v: v <= target


def _steps_to_target(tmeta: dict[str, Any], steps: list[int], curve: list[float | None]) -> int | None:
    if tmeta["target"] is None:
        return None
    ok = _reached(tmeta)
    return next((s for s, v in zip(steps, curve) if v is not None and ok(v)), None)


def _row(tmeta: dict[str, Any], unit: Unit, point: int, params: dict[str, float], kind: str,
         trials: list[Any], full_hp: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """One row (and its curves) from the settled trials of one point."""
    steps = tmeta["steps"]
    done = [t for t in trials if t is not None and trial_state(t) == "COMPLETE"]
    failed = [t for t in trials if t is not None and trial_state(t) == "FAIL"]
    recs = [t.user_attrs["run"] for t in done]
    lr = params.get("lr", unit.lr)
    row: dict[str, Any] = {
        "optimizer": unit.optimizer, "name": unit.name, "kind": kind, "point": point,
        "args": dict(full_hp.get("given", {})),
        "lr": lr, "tuned": dict(params), "seeds": len(done), "failed_seeds": len(failed),
        "diverged_seeds": sum(r["diverged"] for r in recs),
        "error": failed[0].user_attrs.get("error") if failed else None,
        "where": failed[0].user_attrs.get("where") if failed else None,
        "trial_numbers": [t.number for t in trials if t is not None],
        "sensitivity": None, "edge": None, "edge_param": None, "extended": None,
    }
    hp = dict(full_hp.get("all", {}))
    hp.update({"lr": lr} if lr is not None else {})
    hp.update({k: v for k, v in params.items() if k != "lr"})
    row["hyperparameters"] = hp
    finals = [r for r in recs if not r["diverged"]]
    tail = max(1, steps // 10)
    per = {
        "train_loss": [_mean(r["train_loss"][-tail:]) for r in finals],
        "val_loss": [r["val_loss"][-1] for r in finals],
        "metric": [r["metric"][-1] for r in finals],
    }
    for k, vals in per.items():
        row[k], row[f"{k}_std"] = _mean(vals), _std(vals)
    if not recs:
        row.update(steps_to_target=None, steps_to_target_seeds=[], time_to_target_s=None, ms_per_step=None,
                   opt_ms_per_step=None, state_bytes_per_param=None)
        return row, None
    curves = _curves(recs, steps)
    ranked_curve = curves["metric" if tmeta["metric"] is not None else "val_loss"]["mean"]
    stt = _steps_to_target(tmeta, curves["eval_steps"], ranked_curve) if not row["diverged_seeds"] else None
    row["steps_to_target"] = stt
    row["steps_to_target_seeds"] = [
        _steps_to_target(tmeta, r["eval_steps"], r["metric"] if tmeta["metric"] is not None else r["val_loss"])
        for r in recs]
    row["time_to_target_s"] = _time_at(recs, [stt])[0] if stt is not None else None
    step_ms = [m for r in recs for m in r["step_ms"][1:]] or [m for r in recs for m in r["step_ms"]]
    opt_ms = [m for r in recs for m in r["opt_ms"][1:]] or [m for r in recs for m in r["opt_ms"]]
    row["ms_per_step"] = statistics.median(step_ms) if step_ms else None
    row["opt_ms_per_step"] = statistics.median(opt_ms) if opt_ms else None
    n = recs[0]["n_params"]
    row["state_bytes_per_param"] = max(r["state_bytes"] for r in recs) / n if n else None
    return row, curves


def _flags(row: dict[str, Any]) -> list[str]:
    out = []
    tl, vl = row.get("train_loss"), row.get("val_loss")
    if tl is not None and vl is not None and vl > 1.5 * tl and vl > tl + 0.1:
        out.append("overfit")
    if row.get("diverged_seeds"):
        out.append("diverged")
    if row.get("failed_seeds"):
        out.append("failed")
    if row.get("edge"):
        out.append("edge")
    return out


def _sort_key(tmeta: dict[str, Any], row: dict[str, Any]) -> tuple[float, float]:
    if row.get("failed_seeds") or row.get("diverged_seeds") or row.get("val_loss") is None or not row.get("seeds"):
        return (math.inf, math.inf)
    vl = _sig(row["val_loss"])
    if tmeta["metric"] is None or row["metric"] is None:
        return (vl, vl)
    m = _sig(row["metric"])
    return (-m if tmeta["higher_is_better"] else m, vl)


def _rank(rows: list[dict[str, Any]], key: Any) -> None:
    """Competition ranking (1, 1, 3) in place; rows whose key is infinite get ``None``."""
    rows.sort(key=key)
    prev, rank = None, 0
    for i, r in enumerate(rows, 1):
        k = key(r)
        if math.isinf(k[0]):
            r["rank"] = None
            continue
        if k != prev:
            rank, prev = i, k
        r["rank"] = rank


def _point_score(ts: list[Any]) -> float | None:
    """Mean final val loss of a point over seeds; ``None`` if a seed failed, diverged or is missing."""
    vals = []
    for t in ts:
        if t is None or trial_state(t) != "COMPLETE" or t.user_attrs["run"]["diverged"]:
            return None
        v = [x for x in t.user_attrs["run"]["val_loss"] if math.isfinite(x)]
        if not v:
            return None
        vals.append(v[-1])
    return statistics.fmean(vals) if vals else None


def unit_points(unit: Unit, by_key: dict[str, list[Any]], seeds: int) -> dict[int, dict[str, Any]]:
    """``{point: {"params", "round", "bounds", "trials": [settled trial or None per seed]}}``."""
    out: dict[int, dict[str, Any]] = {}
    prefix = f"{unit.task}|{unit.optimizer}|"
    for k, ts in by_key.items():
        if not k.startswith(prefix):
            continue
        a = ts[0].user_attrs
        params = a.get("params") or ({"lr": unit.lr} if unit.grid is not None and unit.lr is not None else {})
        p = out.setdefault(a["point"], {"params": params, "round": a.get("round", 1),
                                        "bounds": a.get("bounds", {}), "trials": [None] * seeds})
        if a["seed"] < seeds:
            p["trials"][a["seed"]] = settled(ts)
    return out


def point_scores(points: dict[int, dict[str, Any]]) -> dict[int, tuple[dict[str, float], float | None]]:
    return {i: (p["params"], _point_score(p["trials"])) for i, p in points.items()}


def _sensitivity(points: dict[int, dict[str, Any]], tuned: list[int], best: int) -> dict[str, Any]:
    scores = {i: _point_score(points[i]["trials"]) for i in tuned}
    finite = {i: s for i, s in scores.items() if s is not None}
    bestv = scores[best]
    good = [i for i, s in finite.items() if s <= bestv + SWEEP_TOLERANCE * abs(bestv)]
    metrics = []
    for i in finite:
        ms = [t.user_attrs["run"]["metric"][-1] for t in points[i]["trials"]]
        m = _mean(ms)
        if m is not None:
            metrics.append(m)
    spread = lambda xs: [min(xs), statistics.median(xs), max(xs)] if xs else None  # noqa: E731
    params = list(points[best]["params"])
    rng = {p: [min(points[i]["params"][p] for i in good), max(points[i]["params"][p] for i in good)] for p in params}
    return {
        "n": len(tuned), "good_fraction": len(good) / len(tuned) if tuned else None,
        "val_loss": spread(list(finite.values())), "metric": spread(metrics),
        "good_range": rng, "good_factor": {p: (hi / lo if lo > 0 else None) for p, (lo, hi) in rng.items()},
    }


def _task_entry(tmeta: dict[str, Any], units: list[Unit], by_key: dict[str, list[Any]], meta: dict[str, Any],
                hparams: dict[str, dict[str, Any]]) -> dict[str, Any]:
    seeds = meta["config"]["seeds"]
    budget_mode = meta["mode"] == "budget"
    rows: list[dict[str, Any]] = []
    curves: dict[str, dict[str, Any]] = {"default": {}, "best": {}}
    sweeps: dict[str, Any] = {}
    n_params = None
    for u in units:
        pts = unit_points(u, by_key, seeds)
        if 0 not in pts:
            continue
        full = hparams.get(u.optimizer, {})
        row, c = _row(tmeta, u, 0, {}, "default", pts[0]["trials"], full)
        rows.append(row)
        if c:
            curves["default"][u.optimizer] = c
            n_params = n_params or next(t.user_attrs["run"]["n_params"] for t in pts[0]["trials"]
                                        if t is not None and "run" in t.user_attrs)
        if not budget_mode:
            continue
        tuned = sorted(i for i in pts if i > 0 or u.grid is not None)
        scored = {i: _point_score(pts[i]["trials"]) for i in tuned}
        finite = {i: s for i, s in scored.items() if s is not None}
        if not tuned or not finite:
            best_i = 0
        else:
            best_i = min(finite, key=lambda i: (finite[i], i))
        brow, bc = _row(tmeta, u, best_i, pts[best_i]["params"], "best", pts[best_i]["trials"], full)
        if tuned and finite:
            brow["sensitivity"] = _sensitivity(pts, tuned, best_i)
            for p in pts[best_i]["params"]:
                # every value that ran counts: a higher lr that diverged brackets the optimum
                ran = [i for i in tuned if any(t is not None and trial_state(t) == "COMPLETE" for t in pts[i]["trials"])]
                side = edge_of([pts[i]["params"][p] for i in ran], pts[best_i]["params"][p])
                ext = next((s for s in ("low", "high") if any(
                    pts[i]["round"] == 2 and _outside(pts[i]["params"][p], u, p, s) for i in tuned)), None)
                brow["extended"] = brow["extended"] or ext
                if side and brow["edge"] is None:
                    brow["edge"], brow["edge_param"] = side, p
        rows.append(brow)
        if bc:
            curves["best"][u.optimizer] = bc
        if tuned:
            param = next(iter(pts[tuned[0]]["params"]), "lr")
            grid = sorted(({"lr": pts[i]["params"].get(param, u.lr), "hyperparameters": pts[i]["params"] or
                            {param: u.lr}, "val_loss": scored[i], "round": pts[i]["round"],
                            "metric": _mean([t.user_attrs["run"]["metric"][-1] for t in pts[i]["trials"]
                                             if t is not None and "run" in t.user_attrs]),
                            "diverged_seeds": sum(1 for t in pts[i]["trials"] if t is not None and "run" in
                                                  t.user_attrs and t.user_attrs["run"]["diverged"])}
                           for i in tuned), key=lambda g: g["lr"] or 0.0)
            sens = brow["sensitivity"] or {}
            window = (sens.get("good_range") or {}).get(param)
            sweeps[u.optimizer] = {
                "param": param, "grid": grid,
                "best_lr": pts[best_i]["params"].get(param) if finite else None,
                "window": window, "window_factor": (window[1] / window[0]) if window else None,
                "default_lr": u.lr if param == "lr" else full.get("all", {}).get(param),
                "range": [min(g["lr"] for g in grid), max(g["lr"] for g in grid)],
                "edge": brow["edge"],
            }
    for r in rows:
        r["flags"] = _flags(r)
    ranked_kind = "best" if budget_mode else "default"
    key = lambda r: _sort_key(tmeta, r)  # noqa: E731
    for kind in ("default", "best"):
        _rank([r for r in rows if r["kind"] == kind], key)
    rows.sort(key=lambda r: (r["kind"] != ranked_kind, r["rank"] is None, r["rank"] or 0, key(r)))
    return {
        **{k: tmeta[k] for k in ("name", "description", "family", "metric", "higher_is_better", "target", "steps",
                                  "eval_every", "info")},
        "n_params": n_params, "results": rows, "ranked_kind": ranked_kind, "sweeps": sweeps,
        "curves": curves[ranked_kind], "curves_by_kind": curves if budget_mode else {"default": curves["default"]},
    }


def _outside(v: float, u: Unit, p: str, side: str) -> bool:
    dim = next((d for d in u.space if d[0] == p), None)
    if dim is None:
        return False
    return v < dim[1] if side == "low" else v > dim[2]


def _profiles(tasks: dict[str, Any], labels: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {"tau": _TAUS, "by": "steps", "tasks": [], "steps": {}, "time": {}, "area": {},
                           "area_time": {}}
    for field, curve_key, area_key in (("steps_to_target", "steps", "area"), ("time_to_target_s", "time", "area_time")):
        ratios: dict[str, list[float]] = {lab: [] for lab in labels}
        counted = []
        for name, e in tasks.items():
            # reached at step 0 (the initial model) counts as one step: a ratio needs a positive best
            floor = 1.0 if field == "steps_to_target" else 1e-6
            vals = {r["optimizer"]: max(float(r[field]), floor) for r in e["results"] if r["kind"] == e["ranked_kind"]
                    and r.get("rank") is not None and r.get(field) is not None}
            best = min(vals.values(), default=None)
            if best is None:
                continue
            counted.append(name)
            for lab in labels:
                v = vals.get(lab)
                ratios[lab].append(max(v, best) / best if v is not None else math.inf)
        if field == "steps_to_target":
            out["tasks"] = counted
        for lab in labels:
            rho = [sum(r <= tau for r in ratios[lab]) / len(counted) for tau in _TAUS] if counted else []
            out[curve_key][lab] = rho
            # trapezoid over the equally spaced log(tau) grid, normalised by its length
            out[area_key][lab] = (sum((a + b) / 2 for a, b in zip(rho, rho[1:])) / (len(rho) - 1)) if rho else None
    return out


def _overall(tasks: dict[str, Any], labels: list[str], profiles: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for lab in labels:
        ranks = {t: r["rank"] for t, e in tasks.items() for r in e["results"]
                 if r["optimizer"] == lab and r["kind"] == e["ranked_kind"] and r["rank"] is not None}
        rows.append({
            "optimizer": lab, "profile_area": profiles["area"].get(lab), "profile_area_time": profiles["area_time"].get(lab),
            "mean_rank": statistics.fmean(ranks.values()) if ranks else None,
            "wins": sum(1 for v in ranks.values() if v == 1), "n_tasks": len(ranks),
            "reached": sum(1 for e in tasks.values() for r in e["results"] if r["optimizer"] == lab
                           and r["kind"] == e["ranked_kind"] and r.get("steps_to_target") is not None),
            "ranks": ranks,
        })

    def key(r: dict[str, Any]) -> tuple[float, float, float]:
        if not r["n_tasks"]:
            return (math.inf, math.inf, math.inf)
        area = r["profile_area"]
        return (-r["n_tasks"], -(_sig(area) or 0.0), _sig(r["mean_rank"]))

    _rank(rows, lambda r: key(r) if r["n_tasks"] else (math.inf,))
    return rows


def _hparams(meta: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {label: hp for label, hp in meta.get("hyperparameters", {}).items()}


def build_result(meta: dict[str, Any], trials: list[Any], *, wall_time_s: float | None = None) -> dict[str, Any]:
    """The result dict of a comparison from its meta and its trials (any order)."""
    by_key = index_trials(trials)
    units = [Unit.from_json(u) for u in meta["units"]]
    hparams = _hparams(meta)
    tasks: dict[str, Any] = {}
    for name, tmeta in meta["tasks"].items():
        tasks[name] = _task_entry(tmeta, [u for u in units if u.task == name], by_key, meta, hparams)
    labels = list(meta["config"]["optimizers"])
    profiles = _profiles(tasks, labels)
    trial_rows = []
    for k, ts in by_key.items():
        for t in ts:
            a, run = t.user_attrs, t.user_attrs.get("run")
            last = lambda xs: next((x for x in reversed(xs) if math.isfinite(x)), None) if xs else None  # noqa: E731
            trial_rows.append({
                "task": a["task"], "optimizer": a["optimizer"], "kind": "default" if a["point"] == 0 else "budget",
                "point": a["point"], "round": a.get("round", 1), "trial": t.number, "seed": a["seed"],
                "hyperparameters": a.get("params", {}), "state": trial_state(t),
                "val_loss": last(run["val_loss"]) if run else None, "metric": last(run["metric"]) if run else None,
                "train_loss": _mean(run["train_loss"][-max(1, len(run["train_loss"]) // 10):]) if run else None,
                "diverged": run["diverged"] if run else None, "duration_s": a.get("duration_s"),
                "error": a.get("error"), "where": a.get("where"), "worker": a.get("worker"),
            })
    # plan order, not trial number: round 2 is enqueued when round 1 is in, so numbers depend
    # on completion order, and the list must not differ between --jobs 1 and --jobs 2
    t_i = {n: i for i, n in enumerate(meta["tasks"])}
    o_i = {n: i for i, n in enumerate(labels)}
    trial_rows.sort(key=lambda r: (t_i.get(r["task"], 0), o_i.get(r["optimizer"], 0), r["point"], r["seed"], r["trial"]))
    skipped = {r["optimizer"]: r["error"] for r in trial_rows if r["error"] and r["error"].startswith("not implemented")}
    failures = [{k: r[k] for k in ("task", "optimizer", "seed", "hyperparameters", "error", "where")}
                for r in trial_rows if r["state"] == "FAIL" and r["optimizer"] not in skipped]
    all_rows = [(t, r) for t, e in tasks.items() for r in e["results"]]
    planned = meta.get("planned", 0)
    n_done = sum(1 for ts in by_key.values() if settled(ts) is not None)
    flags = {
        "default_only": meta["mode"] == "default",
        "best_at_edge": [{"task": t, "optimizer": r["optimizer"], "param": r["edge_param"], "edge": r["edge"]}
                         for t, r in all_rows if r.get("edge")],
        "overfit": [{"task": t, "optimizer": r["optimizer"], "kind": r["kind"], "train_loss": r["train_loss"],
                     "val_loss": r["val_loss"]} for t, r in all_rows if "overfit" in r["flags"]],
        "diverged": [{"task": t, "optimizer": r["optimizer"], "kind": r["kind"]} for t, r in all_rows
                     if r["diverged_seeds"]],
        "failed": [{"task": f["task"], "optimizer": f["optimizer"], "error": f["error"], "where": f["where"]}
                   for f in failures],
        "all_failed": bool(trial_rows) and not any(r["state"] == "COMPLETE" for r in trial_rows),
        "incomplete": n_done < planned,
    }
    result = {
        "schema": 2, "mode": meta["mode"], "title": meta["title"], "command": meta["command"],
        "command_line": meta["command_line"], "optimkit_version": meta["versions"]["optimkit"],
        "torch_version": meta["versions"]["torch"], "optuna_version": meta["versions"]["optuna"],
        "created": meta["created"], "wall_time_s": wall_time_s, "config": meta["config"], "tasks": tasks,
        "overall": _overall(tasks, labels, profiles), "profiles": profiles, "trials": trial_rows, "flags": flags,
        "warnings": meta.get("warnings", []) + _trial_warnings(by_key), "failures": failures, "skipped_optimizers": skipped,
        "unavailable_tasks": meta.get("unavailable_tasks", {}), "complete": not flags["incomplete"],
    }
    return _json_clean(result)


def _trial_warnings(by_key: dict[str, list[Any]]) -> list[str]:
    """Warnings raised inside trials, once per (task, optimizer, message)."""
    out: list[str] = []
    for ts in by_key.values():
        for t in ts:
            a = t.user_attrs
            for w in (a.get("run") or {}).get("warnings", []):
                line = f"{a['task']} · {a['optimizer']}: {w}"
                if line not in out:
                    out.append(line)
    return out[:50]


def _json_clean(obj: Any) -> Any:
    """NaN/inf are not JSON: store them as null; tuples become lists."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _json_clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_clean(v) for v in obj]
    return obj


def result_from_storage(storage: str | Any, study_name: str = STUDY_NAME) -> dict[str, Any]:
    """Rebuild the result dict from a storage URL / journal path (or an Optuna storage object)."""
    from .study import _optuna, open_storage

    optuna = _optuna()
    st = open_storage(storage) if isinstance(storage, str) else storage
    try:
        study = optuna.load_study(study_name=study_name, storage=st)
    except KeyError:
        raise ValueError(f"no comparison {study_name!r} in {storage}") from None
    meta = study.user_attrs.get("meta")
    if meta is None:
        raise ValueError(f"study {study_name!r} in {storage} is not an optimkit comparison")
    return build_result(meta, study.get_trials(deepcopy=False), wall_time_s=study.user_attrs.get("wall_time_s"))


__all__ += ["unit_points", "point_scores", "key_of"]
