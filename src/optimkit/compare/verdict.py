"""The verdict of a compare run: what to use for each task and why, with the caveats that apply.

Pure functions of the result dict (no plotting, no I/O), so they are cheap to test on crafted
inputs. The caveats are the ways a comparison misleads (DeepOBS; Schmidt et al. 2021):

* ranking at default hyperparameters only measures how good each default is;
* a best learning rate on the edge of the range tried means the range was too narrow;
* a training loss far below the validation loss means the winner overfits;
* every run diverged or failed: nothing is recommended;
* a difference within the seed spread (or the printed precision) is a tie, not a win.
"""

from __future__ import annotations

import math
from typing import Any

__all__ = ["verdict", "task_verdict", "hyperparameters", "edge_side", "tied", "OVERFIT_RATIO"]

#: validation loss >= this x training loss (and at least ``OVERFIT_GAP`` above it): overfitting
OVERFIT_RATIO = 2.0
OVERFIT_GAP = 0.05
#: without a seed spread, values closer than this (relative) are a tie: the tables print 4 digits
TIE_REL = 5e-4


def _g(x: float | None) -> str:
    return "—" if x is None else f"{x:.4g}"


def hyperparameters(row: dict[str, Any], full: bool = False) -> str:
    """``lr=0.1, momentum=0.9``: what a row ran with, lr first.

    By default the values that matter to a reader: lr, the arguments given in the spec and the
    tuned values; ``full=True``: every constructor argument (``row["hyperparameters"]``)."""
    hp = row.get("hyperparameters")
    if full and isinstance(hp, dict):
        items = dict(hp)
    else:
        items = {}
        if row.get("lr") is not None:
            items["lr"] = row["lr"]
        items.update(row.get("args") or {})
        items.update(row.get("tuned") or {})
    if "lr" in items:
        items = {"lr": items.pop("lr"), **items}
    return ", ".join(f"{k}={_g(v) if isinstance(v, float) else v}" for k, v in items.items()) or "defaults"


def _mode(result: dict[str, Any]) -> str:
    """``budget`` (tuned with equal budgets), ``sweep`` (--lr-sweep) or ``default``."""
    cfg = result.get("config", {})
    if cfg.get("budget"):
        return "budget"
    if cfg.get("lr_sweep"):
        return "sweep"
    return "default"


def _ok(row: dict[str, Any]) -> bool:
    """Ranked and finite: a diverged or failed row is never a winner."""
    return (not row.get("error") and not row.get("diverged_seeds") and row.get("rank") is not None
            and row.get("val_loss") is not None)


def _score(entry: dict[str, Any], row: dict[str, Any]) -> float | None:
    return row.get("metric") if entry.get("metric") else row.get("val_loss")


def _spread(entry: dict[str, Any], row: dict[str, Any], key: str | None = None) -> float | None:
    key = key or ("metric" if entry.get("metric") else "val_loss")
    for k in (f"{key}_std", f"{key}_sd"):
        if isinstance(row.get(k), (int, float)):
            return float(row[k])
    return None


def _close(entry: dict[str, Any], a: dict[str, Any], b: dict[str, Any], key: str) -> bool:
    """``a[key]`` and ``b[key]`` differ by no more than the larger seed spread (standard
    deviation over seeds), or than the printed precision without one."""
    sa, sb = a.get(key), b.get(key)
    if sa is None or sb is None:
        return False
    spread = max((s for s in (_spread(entry, a, key), _spread(entry, b, key)) if s is not None), default=None)
    if spread is not None and spread > 0:
        return abs(sa - sb) <= spread
    return abs(sa - sb) <= TIE_REL * max(abs(sa), abs(sb), 1e-12)


def tied(entry: dict[str, Any], a: dict[str, Any], b: dict[str, Any]) -> bool:
    """``a`` and ``b`` are indistinguishable: the same rank, or, on the ranking's own terms
    (the metric, then the validation loss), no difference beyond the seed spread (or the
    printed precision without one)."""
    if a.get("rank") is not None and a.get("rank") == b.get("rank"):
        return True
    if entry.get("metric") and not _close(entry, a, b, "metric"):
        return False
    return _close(entry, a, b, "val_loss")


def edge_side(entry: dict[str, Any], row: dict[str, Any]) -> str | None:
    """``"upper"``/``"lower"`` when the row's best lr lies on that edge of the range tried.

    Read from the row when the runner marked it (``at_edge``/``edge``), else from the lr sweep
    grid of the task."""
    if "edge" in row:  # schema 2: the runner decided, after its extension round
        return row["edge"] or None
    for k in ("at_edge", "best_at_edge"):
        v = row.get(k)
        if isinstance(v, str) and v:
            return v
        if isinstance(v, dict):  # {"lr": "upper"}
            sides = [s for s in v.values() if s]
            if sides:
                return str(sides[0])
        if v is True:
            return "edge"
    s = (entry.get("sweeps") or {}).get(row.get("optimizer"))
    if not s or s.get("best_lr") is None:
        return None
    lrs = [g["lr"] for g in s.get("grid", []) if g.get("lr") is not None]
    if len(lrs) < 2:
        return None
    if s["best_lr"] >= max(lrs):
        return "upper"
    if s["best_lr"] <= min(lrs):
        return "lower"
    return None


def _overfits(row: dict[str, Any]) -> bool:
    if isinstance(row.get("flags"), list):  # schema 2: the runner's rule
        return "overfit" in row["flags"]
    tr, va = row.get("train_loss"), row.get("val_loss")
    if tr is None or va is None or not (math.isfinite(tr) and math.isfinite(va)):
        return False
    return va >= OVERFIT_RATIO * max(tr, 0.0) and va - tr >= OVERFIT_GAP


_DEFAULT_ONLY = ("ranked at each optimizer's default hyperparameters only: this measures how well each default "
                 "suits this task, not how good the optimizer is once tuned (use --budget N)")


def task_verdict(result: dict[str, Any], name: str, brief: bool = False) -> dict[str, Any]:
    """The verdict of one task: ``{"winner", "tied", "text", "caveats"}``.

    ``winner`` is None when no run finished; ``tied`` lists the labels indistinguishable from
    the winner (the winner first). ``brief``: the default-only caveat in three words (the
    overall verdict above it explains it once)."""
    entry = result["tasks"][name]
    kind = entry.get("ranked_kind")
    every = [r for r in entry.get("results", []) if kind is None or r.get("kind", kind) == kind]
    rows = [r for r in every if _ok(r)]
    rows.sort(key=lambda r: r["rank"])
    metric = entry.get("metric")
    what = f"validation {metric}" if metric else "validation loss"
    caveats: list[str] = []
    if not rows:
        n = len(every)
        errors = [r for r in every if r.get("error")]
        if every and len(errors) == n:  # errors in the task's code, not divergence: no lr helps
            e = errors[0]
            where = f" at {e['where']}" if e.get("where") else ""
            return {"winner": None, "tied": [], "caveats": [],
                    "text": f"{name}: no recommendation: every run ({n} optimizer(s)) raised an error, "
                            f"which no learning rate changes (first: {e['optimizer']}: {e['error']}"
                            f"{where}). Fix it and run again."}
        return {"winner": None, "tied": [], "caveats": [],
                "text": f"{name}: no recommendation: every run ({n} optimizer(s)) diverged or failed, so nothing "
                        "is ranked. Lower the learning rates (or give a --budget so each optimizer's lr is "
                        "searched) and run again."}
    best = rows[0]
    group = [best] + [r for r in rows[1:] if tied(entry, best, r)]
    labels = [r["optimizer"] for r in group]
    score = _score(entry, best)
    extra = f" (validation loss {_g(best.get('val_loss'))})" if metric else ""
    if len(group) > 1:
        why = "the seed spread" if _spread(entry, best) else "the printed precision"
        vals = ", ".join(f"{r['optimizer']} {_g(_score(entry, r))}" for r in group)
        head = (f"{name}: use **{best['optimizer']}** ({hyperparameters(best)}) or "
                f"{' or '.join(labels[1:])}: they tie on {what} ({vals}; the differences are within {why}).")
    else:
        head = f"{name}: use **{best['optimizer']}** ({hyperparameters(best)}): best {what}, {_g(score)}{extra}"
        if len(rows) > 1:
            nxt = rows[1]
            if metric and _g(best.get("metric")) == _g(nxt.get("metric")):
                head += (f", ahead of {nxt['optimizer']} on validation loss ({_g(nxt.get('val_loss'))}) at the same "
                         f"{metric}")
            elif metric and _close(entry, best, nxt, "metric"):
                head += (f", ahead of {nxt['optimizer']} ({_g(_score(entry, nxt))}, within the seed spread; the "
                         f"validation loss decides: {_g(best.get('val_loss'))} vs {_g(nxt.get('val_loss'))})")
            else:
                head += f", ahead of {nxt['optimizer']} ({_g(_score(entry, nxt))})"
        head += "."
    dflt = next((r for r in entry.get("results", []) if r.get("kind") == "default"
                 and r.get("optimizer") == best["optimizer"]), None)
    if kind == "best" and dflt is not None and _score(entry, dflt) is not None:
        head += f" At its default setting it scored {_g(_score(entry, dflt))}."
    stt = best.get("steps_to_target")
    if entry.get("target") is not None and stt is not None:
        reached = [r for r in rows[1:] if r.get("steps_to_target") is not None]
        faster = [r for r in reached if r["steps_to_target"] < stt]
        head += (f" It met the target ({_g(entry['target'])}) from the start" if stt == 0 else
                 f" It reached the target ({_g(entry['target'])}) in {stt} steps")
        head += (f"; {faster[0]['optimizer']} got there sooner ({faster[0]['steps_to_target']} steps)."
                 if faster else ".")
    failed = [r["optimizer"] for r in every if not _ok(r)]
    if failed:
        head += f" Not ranked (diverged or failed): {', '.join(failed)}."

    mode = _mode(result)
    if mode == "default":
        caveats.append("default hyperparameters only" if brief else _DEFAULT_ONLY)
    edges = [(r["optimizer"], side) for r in rows[: max(3, len(group))] if (side := edge_side(entry, r))]
    if edges:
        caveats.append("best lr on the edge of the range tried for "
                       + ", ".join(f"{lab} ({side})" for lab, side in edges)
                       + ": the range was too narrow, a value beyond it may do better")
    if _overfits(best):
        caveats.append(f"{best['optimizer']}'s training loss ({_g(best.get('train_loss'))}) is far below its "
                       f"validation loss ({_g(best.get('val_loss'))}): it overfits; with regularisation or early "
                       "stopping the ranking may change")
    seeds = best.get("seeds") or result.get("config", {}).get("seeds")
    if seeds == 1:
        caveats.append("1 seed: differences smaller than run-to-run noise cannot be told apart")
    if len(rows) == 1 and len(every) > 1:
        caveats.append("only one optimizer finished")
    text = head
    if caveats:
        text += " Caveats: " + "; ".join(caveats) + "."
    return {"winner": best["optimizer"], "tied": labels if len(group) > 1 else [], "text": text,
            "caveats": caveats}


def verdict(result: dict[str, Any]) -> dict[str, Any]:
    """Every task's verdict and, with several tasks, the overall one.

    Returns ``{"text": str, "tasks": {name: task_verdict}, "overall": str | None}``; ``text``
    is the whole verdict as paragraphs separated by blank lines (``**x**`` marks the pick)."""
    several = len(result.get("tasks", {})) > 1
    tasks = {name: task_verdict(result, name, brief=several) for name in result.get("tasks", {})}
    overall = None
    rows = [r for r in result.get("overall") or [] if r.get("rank") is not None]
    if len(tasks) > 1:
        if not rows:
            overall = "Overall: no recommendation: no optimizer finished a task."
        else:
            top = rows[0]
            same = [r for r in rows[1:] if r.get("rank") == top.get("rank")]
            n = len(tasks)
            how = f"mean rank {_g(top.get('mean_rank'))}, best on {top.get('wins', 0)} of {n} tasks"
            lead = ""
            if top.get("profile_area") is not None:
                lead = " reach the targets in the fewest steps" if same else " reaches the targets in the fewest steps"
                # the profile counts only the tasks where some optimizer reached the target
                counted = (result.get("profiles") or {}).get("tasks") or []
                over = (f"over the {len(counted)} of {n} tasks where some optimizer reached the target, "
                        "1 = fastest on each" if counted and len(counted) < n else "1 = fastest on every task")
                how = f"performance-profile score {_g(top['profile_area'])} {over}; " + how
            if same:
                overall = (f"Overall: **{top['optimizer']}** and {', '.join(r['optimizer'] for r in same)} tie:"
                           f" they{lead or ' rank equal'} ({how}).")
            else:
                overall = f"Overall, across {n} tasks: **{top['optimizer']}**{lead} ({how})."
            by_rank = min(rows, key=lambda r: (r.get("mean_rank") is None, r.get("mean_rank") or 0.0))
            if top.get("profile_area") is not None and by_rank is not top and \
                    by_rank.get("mean_rank") != top.get("mean_rank"):
                overall += (f" By final {'metric' if any(e.get('metric') for e in result['tasks'].values()) else 'loss'}"
                            f" instead, {by_rank['optimizer']} has the best mean rank ({_g(by_rank.get('mean_rank'))}):"
                            " faster to the target is not the same as better at the end.")
            if _mode(result) == "default":
                overall += " Caveats: " + _DEFAULT_ONLY.replace("this task", "these tasks") + "."
    paras = ([overall] if overall else []) + [v["text"] for v in tasks.values()]
    return {"text": "\n\n".join(paras), "tasks": tasks, "overall": overall}
