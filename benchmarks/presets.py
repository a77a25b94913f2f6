"""Zero-tuning Prodigy presets, measured against the best AdamW of a learning-rate grid.

    python benchmarks/presets.py                                  # every available task
    python benchmarks/presets.py --tasks logreg cnn --seeds 2 --json docs/presets-DATE.json
    python benchmarks/presets.py --presets split --merge docs/presets-DATE.json   # add a row

For every built-in and optional compare task (``optimkit.compare.tasks``; a task whose data is
missing is skipped with its hint), each candidate Prodigy preset and AdamW at every lr of a
log grid are trained with ``optimkit.compare.run_compare`` (same initial weights and batches
for every contestant of a seed). The number that decides is the gap

    gap = (L_preset - L_best) / (L_init - L_best)

on the final training loss (mean minibatch loss over the last 10% of steps, mean over
seeds): the fraction of the tuned AdamW's progress the preset leaves undone. ``L_best`` is
the best AdamW of the grid (by final training loss), ``L_init`` the initial model's mean loss
over the first 8 training batches of each seed (the runner's seeds and batch streams).
A negative gap: the preset beat the tuned AdamW. The target of issue 13 is gap <= 0.01.

Prints a table and writes JSON (every task's grid, the gaps, the best lr, and whether that lr
sits at an edge of the grid, which would make L_best optimistic for the preset).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import inspect
import json
import math
import sys
import time
from typing import Any

import torch

from optimkit import Prodigy
from optimkit.compare.runner import Progress, _minibatches, parse_optimizer_choice, run_compare
from optimkit.compare.tasks import BUILTIN_TASKS, DEFAULT_SUITE, OPTIONAL_TASKS, Task, TaskUnavailable, build_task

#: candidate presets: name -> Prodigy arguments (lr=1 always)
PRESETS: dict[str, dict[str, Any]] = {
    "default": {},
    "bc_sw": {"use_bias_correction": True, "safeguard_warmup": True},
    "betas_0.99": {"betas": (0.9, 0.99)},
    "wd_0.01": {"weight_decay": 0.01},  # decouple=True (the default): AdamW-style
    "split": {"split_groups": True},
}
#: AdamW's lr grid: 8 points, half-decade spacing
ADAMW_LRS: tuple[float, ...] = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1)


class _Log(Progress):
    def __init__(self) -> None:
        self.t0 = time.perf_counter()

    def run(self, description: str, steps: int) -> None:
        print(f"[{time.perf_counter() - self.t0:7.0f}s] {description}", file=sys.stderr, flush=True)

    def note(self, message: str) -> None:
        print(f"    {message}", file=sys.stderr, flush=True)


def available_presets() -> dict[str, dict[str, Any]]:
    """The candidates this Prodigy accepts (``split_groups`` only once it exists)."""
    sig = inspect.signature(Prodigy)
    return {k: v for k, v in PRESETS.items() if all(a in sig.parameters for a in v)}


def _spec(args: dict[str, Any]) -> str:
    def text(v: Any) -> str:
        return "(" + ",".join(map(str, v)) + ")" if isinstance(v, tuple) else str(v)

    return "prodigy" + (":" + ",".join(f"{k}={text(v)}" for k, v in args.items()) if args else "")


@torch.no_grad()
def initial_loss(task: Task, seeds: int, n_batches: int = 8) -> float:
    """Mean loss of the initial model (seeded as the runner seeds it) over its first batches."""
    out = []
    for seed in range(seeds):
        torch.manual_seed(seed)
        model = task.make_model()
        model.train()
        gen = torch.Generator().manual_seed(10_000 + seed)
        it = task.train_batches(gen) if task.train_batches is not None else _minibatches(task.train_data, task.batch_size, gen)
        out.extend(float(task.loss_fn(model(x), y)) for x, y in (next(it) for _ in range(n_batches)))
    return sum(out) / len(out)


def measure_task(task: Task, presets: dict[str, dict[str, Any]], lrs: tuple[float, ...], seeds: int,
                 steps: int | None, adamw: bool = True) -> dict[str, Any]:
    """Run the candidates and the AdamW grid on one task; return its raw numbers."""
    choices = [parse_optimizer_choice(_spec(a)) for a in presets.values()]
    if adamw:
        choices += [parse_optimizer_choice(f"adamw:lr={lr:g}") for lr in lrs]
    res = run_compare([task], choices, steps=steps, seeds=seeds, threads=1, progress=_Log())
    rows = {r["optimizer"]: r for r in res["tasks"][task.name]["results"]}
    entry: dict[str, Any] = {
        "family": task.family, "steps": res["tasks"][task.name]["steps"], "seeds": seeds,
        "n_params": res["tasks"][task.name]["n_params"], "info": task.info,
        "L_init": initial_loss(task, seeds), "presets": {}, "adamw": {},
        "wall_time_s": res["wall_time_s"],
    }
    for name, args in presets.items():
        r = rows[_spec(args)]
        entry["presets"][name] = {"args": {k: list(v) if isinstance(v, tuple) else v for k, v in args.items()},
                                  "train_loss": r.get("train_loss"), "val_loss": r.get("val_loss"),
                                  "metric": r.get("metric"), "diverged_seeds": r.get("diverged_seeds"),
                                  "error": r.get("error")}
    if adamw:
        for lr in lrs:
            r = rows[f"adamw:lr={lr:g}"]
            entry["adamw"][f"{lr:g}"] = {"train_loss": r.get("train_loss"), "val_loss": r.get("val_loss"),
                                         "metric": r.get("metric"), "diverged_seeds": r.get("diverged_seeds")}
    return entry


def score(entry: dict[str, Any]) -> None:
    """Add L_best, the best lr, and every preset's gap to a task entry (in place)."""
    grid = {float(k): v["train_loss"] for k, v in entry["adamw"].items()
            if v["train_loss"] is not None and not v["diverged_seeds"]}
    if not grid:
        entry["L_best"] = entry["best_lr"] = None
        return
    best_lr = min(grid, key=grid.get)
    lrs = sorted(float(k) for k in entry["adamw"])
    entry["L_best"], entry["best_lr"] = grid[best_lr], best_lr
    entry["best_lr_at_edge"] = best_lr in (lrs[0], lrs[-1])
    span = entry["L_init"] - entry["L_best"]
    for p in entry["presets"].values():
        loss = p["train_loss"]
        p["gap"] = None if loss is None or p["diverged_seeds"] or span <= 0 else (loss - entry["L_best"]) / span


def table(results: dict[str, Any], target: float) -> str:
    """Rows: tasks; columns: the presets' gaps (``*`` marks a miss of the target)."""
    names = sorted({n for e in results["tasks"].values() for n in e["presets"]}, key=list(PRESETS).index)
    head = f"{'task':<10} {'family':<12} {'L_init':>7} {'L_best':>7} {'AdamW lr':>9} " + " ".join(f"{n:>11}" for n in names)
    lines = [head, "-" * len(head)]
    for tname, e in results["tasks"].items():
        cells = []
        for n in names:
            g = e["presets"].get(n, {}).get("gap")
            cells.append(f"{'-':>11}" if g is None else f"{g:>10.4f}{'*' if g > target else ' '}")
        edge = "!" if e.get("best_lr_at_edge") else " "
        lines.append(f"{tname:<10} {e['family']:<12} {e['L_init']:>7.4f} {e['L_best'] or math.nan:>7.4f} "
                     f"{e['best_lr'] or math.nan:>8.0e}{edge} " + " ".join(cells))
    worst = []
    for n in names:
        gaps = [e["presets"][n]["gap"] for e in results["tasks"].values() if n in e["presets"]]
        worst.append(f"{max((g for g in gaps if g is not None), default=math.nan):>10.4f} ")
    lines.append(f"{'worst':<10} {'':<12} {'':>7} {'':>7} {'':>9} " + " ".join(worst))
    lines.append(f"gap = (L_preset - L_best) / (L_init - L_best), final training loss; * > {target}; "
                 "! AdamW's best lr at the grid's edge")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", nargs="+", default=None, help="default: every built-in and optional task")
    ap.add_argument("--presets", nargs="+", default=None, help=f"subset of {', '.join(PRESETS)}")
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=None, help="override every task's step budget")
    ap.add_argument("--lrs", type=float, nargs="+", default=list(ADAMW_LRS))
    ap.add_argument("--target", type=float, default=0.01)
    ap.add_argument("--json", default=f"docs/presets-{_dt.date.today().isoformat()}.json")
    ap.add_argument("--merge", default=None, help="add these rows to an existing JSON (AdamW grid kept)")
    a = ap.parse_args(argv)

    presets = available_presets()
    if a.presets:
        unknown = set(a.presets) - set(PRESETS)
        if unknown:
            ap.error(f"unknown preset(s) {sorted(unknown)}; expected {', '.join(PRESETS)}")
        missing = set(a.presets) - set(presets)
        if missing:
            ap.error(f"this Prodigy does not take the arguments of {sorted(missing)}")
        presets = {k: presets[k] for k in a.presets}
    names = a.tasks or list(DEFAULT_SUITE) + [t for t in OPTIONAL_TASKS if t in BUILTIN_TASKS]
    out_path = a.merge or a.json
    if a.merge:
        with open(a.merge) as f:
            results = json.load(f)
    else:
        results = {"created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                   "command": "python benchmarks/presets.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                   "torch_version": torch.__version__, "adamw_lrs": list(a.lrs), "target": a.target,
                   "tasks": {}, "unavailable": {}}
    for name in names:
        try:
            task = build_task(name)
        except TaskUnavailable as e:
            results["unavailable"][name] = str(e)
            print(f"skipped {name}: {e}", file=sys.stderr)
            continue
        if a.merge:
            old = results["tasks"].get(name)
            if old is None:
                print(f"skipped {name}: not in {a.merge}", file=sys.stderr)
                continue
            new = measure_task(task, presets, (), old["seeds"], old["steps"], adamw=False)
            old["presets"].update(new["presets"])
            score(old)
        else:
            results["tasks"][name] = measure_task(task, presets, tuple(a.lrs), a.seeds, a.steps)
            score(results["tasks"][name])
        with open(out_path, "w") as f:  # after every task: a long run leaves partial results
            json.dump(results, f, indent=1)
        print(table(results, a.target), flush=True)
    print(f"\nwrote {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
