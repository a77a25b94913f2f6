"""Zero-tuning Prodigy presets, measured against the best AdamW of a learning-rate grid.

    python benchmarks/presets.py                                  # every available task
    python benchmarks/presets.py --tasks logreg cnn --seeds 2 --json docs/presets-DATE.json
    python benchmarks/presets.py --presets split --merge docs/presets-DATE.json   # add a row
    python benchmarks/presets.py --tasks docbow --presets --add-lrs 1 --merge docs/presets-DATE.json
    python benchmarks/presets.py --choose docs/presets-DATE.json   # the table for guide/presets.py
    python benchmarks/presets.py --combine a.json b.json --json docs/presets-DATE.json

For every built-in and optional compare task (``optimkit.compare.tasks``; a task whose data is
missing is skipped with its hint), each candidate Prodigy preset (``optimkit.guide.presets.
CANDIDATES``, lr=1) and AdamW at every lr of a log grid are trained with the seeding of
``optimkit compare`` (same initial weights and batches for every contestant of a seed; one
torch thread). The number that decides is the gap

    gap = (L_preset - L_best) / (L_init - L_best)

on the final training loss (mean minibatch loss over the last 10% of steps, mean over
seeds): the fraction of the tuned AdamW's progress the preset leaves undone. ``L_best`` is
the best AdamW of the grid (by final training loss), ``L_init`` the initial model's mean loss
over the first 8 training batches of each seed (the runner's seeds and batch streams).
A negative gap: the preset beat the tuned AdamW. The target of issue 13 is gap <= 0.01.

Prints a table and writes JSON (every task's grid, the gaps, the best lr, and whether that lr
sits at an edge of the grid: then a wider grid might lower L_best, and the gap is optimistic).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import inspect
import json
import math
import sys
import time
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from optimkit import Prodigy, create_optimizer, param_groups
from optimkit.factory import resolve_optimizer
from optimkit.compare.tasks import BUILTIN_TASKS, DEFAULT_SUITE, OPTIONAL_TASKS, Task, TaskUnavailable, build_task
from optimkit.guide.presets import CANDIDATES as PRESETS

#: AdamW's lr grid: 7 points, half-decade spacing (the best lr of every task lies inside it)
ADAMW_LRS: tuple[float, ...] = (3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1)
_DIVERGE_FACTOR = 1e4
_T0 = time.perf_counter()


def _log(text: str) -> None:
    print(f"[{time.perf_counter() - _T0:7.0f}s] {text}", file=sys.stderr, flush=True)


def available_presets() -> dict[str, dict[str, Any]]:
    """The candidates this Prodigy accepts (``split_groups`` only once it exists)."""
    sig = inspect.signature(Prodigy)
    return {k: v for k, v in PRESETS.items() if all(a in sig.parameters for a in v)}


def _spec(args: dict[str, Any]) -> str:
    def text(v: Any) -> str:
        return "(" + ",".join(map(str, v)) + ")" if isinstance(v, tuple) else str(v)

    return "prodigy" + (":" + ",".join(f"{k}={text(v)}" for k, v in args.items()) if args else "")


def _index(x: Any, idx: Tensor) -> Any:
    if isinstance(x, Tensor):
        return x[idx]
    return type(x)(_index(v, idx) for v in x)


def _batches(task: Task, gen: torch.Generator) -> Iterator[tuple[Any, Tensor]]:
    """The task's batch stream: its own iterator, or shuffled epochs of ``train_data`` (the last
    partial batch dropped), as ``optimkit compare`` draws them."""
    if task.train_batches is not None:
        yield from task.train_batches(gen)
        return
    x, y = task.train_data
    n, bs = len(y), task.batch_size
    if bs is None or bs >= n:
        while True:
            yield x, y
    while True:
        perm = torch.randperm(n, generator=gen)
        for i in range(0, n - bs + 1, bs):
            idx = perm[i: i + bs]
            yield _index(x, idx), y[idx]


def train_losses(task: Task, name: str, lr: float, args: dict[str, Any], seed: int, steps: int,
                 lr_scales: dict[str, float] | None = None) -> list[float]:
    """Per-step minibatch losses of one run (stops at a non-finite or exploding loss).

    Seeding as ``optimkit compare``: ``torch.manual_seed(seed)`` before the model is built, the
    batches from ``Generator().manual_seed(10_000 + seed)``: every contestant of a seed starts
    from the same weights and sees the same batches. ``lr_scales`` (``{name pattern: factor}``)
    gives groups of parameters ``lr x factor`` (``optimkit.param_groups``), for AdamW and Prodigy
    alike, with the weight decay create_optimizer would give.
    """
    torch.manual_seed(seed)
    model = task.make_model()
    model.train()
    if lr_scales:
        cls = resolve_optimizer(name)[0]
        wd = args.get("weight_decay", inspect.signature(cls).parameters["weight_decay"].default)
        groups = param_groups(model, weight_decay=wd, lr_scales=lr_scales, base_lr=lr)
        opt = create_optimizer(name, groups, lr=lr, optimizer_args=dict(args))
    else:
        opt = create_optimizer(name, model, lr=lr, optimizer_args=dict(args))
    batches = _batches(task, torch.Generator().manual_seed(10_000 + seed))
    losses: list[float] = []
    for _ in range(steps):
        x, y = next(batches)
        opt.zero_grad(set_to_none=True)
        loss = task.loss_fn(model(x), y)
        loss.backward()
        opt.step()
        lv = float(loss.detach())
        losses.append(lv)
        if not math.isfinite(lv) or abs(lv) > _DIVERGE_FACTOR * max(1.0, abs(losses[0])):
            break
    return losses


@torch.no_grad()
def initial_loss(task: Task, seeds: int, n_batches: int = 8) -> float:
    """Mean loss of the initial model (seeded as the runs are) over its first batches."""
    out = []
    for seed in range(seeds):
        torch.manual_seed(seed)
        model = task.make_model()
        model.train()
        it = _batches(task, torch.Generator().manual_seed(10_000 + seed))
        out.extend(float(task.loss_fn(model(x), y)) for x, y in (next(it) for _ in range(n_batches)))
    return sum(out) / len(out)


def _final(task: Task, name: str, lr: float, args: dict[str, Any], seeds: int, steps: int,
           lr_scales: dict[str, float] | None = None) -> dict[str, Any]:
    """Final training loss (mean of the last 10% of steps, mean over seeds) of one contestant."""
    tail = max(1, steps // 10)
    finals, diverged = [], 0
    for seed in range(seeds):
        _log(f"{task.name} · {name} lr={lr:g} {args or ''} seed {seed}")
        losses = train_losses(task, name, lr, args, seed, steps, lr_scales)
        if len(losses) < steps or not math.isfinite(losses[-1]):
            diverged += 1
        else:
            finals.append(sum(losses[-tail:]) / tail)
    return {"train_loss": sum(finals) / len(finals) if finals and not diverged else None, "diverged_seeds": diverged}


def measure_task(task: Task, presets: dict[str, dict[str, Any]], lrs: tuple[float, ...], seeds: int,
                 steps: int | None, adamw: bool = True, lr_scales: dict[str, float] | None = None) -> dict[str, Any]:
    """Run the candidates and the AdamW grid on one task; return its raw numbers."""
    steps = steps or task.steps
    t0 = time.perf_counter()
    entry: dict[str, Any] = {
        "family": task.family, "steps": steps, "seeds": seeds, "info": task.info,
        "L_init": initial_loss(task, seeds), "presets": {}, "adamw": {},
    }
    for name, args in presets.items():
        entry["presets"][name] = {"args": {k: list(v) if isinstance(v, tuple) else v for k, v in args.items()},
                                  **_final(task, "prodigy", 1.0, args, seeds, steps, lr_scales)}
    if adamw:
        for lr in lrs:
            entry["adamw"][f"{lr:g}"] = _final(task, "adamw", lr, {}, seeds, steps, lr_scales)
    entry["wall_time_s"] = time.perf_counter() - t0
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


#: table key of optimkit.guide.presets.NO_TUNING -> the task families it is chosen on
KINDS: dict[str, tuple[str, ...]] = {
    "linear": ("convex",), "cnn": ("image",), "transformer": ("transformer",), "mlp": ("mlp",),
    "sparse": ("sparse",), "fine_tune": ("fine-tune",), "any": (),
}


def choose(results: dict[str, Any]) -> dict[str, tuple[str, dict[str, float]]]:
    """Per kind of model: the candidate with the smallest worst gap over that kind's tasks
    (``any``: over every task), ties to the earlier candidate; with the gaps it had."""
    out = {}
    names = [n for n in PRESETS if all(n in e["presets"] for e in results["tasks"].values())]
    for kind, families in KINDS.items():
        tasks = {t: e for t, e in results["tasks"].items() if not families or e["family"] in families}
        if not tasks:
            continue

        def worst(n: str) -> float:
            gaps = [e["presets"][n].get("gap") for e in tasks.values()]
            return math.inf if any(g is None for g in gaps) else max(gaps)

        best = min(names, key=worst)
        out[kind] = (best, {t: round(e["presets"][best]["gap"], 4) for t, e in tasks.items()})
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", nargs="+", default=None, help="default: every built-in and optional task")
    ap.add_argument("--presets", nargs="*", default=None, help=f"subset of {', '.join(PRESETS)} (none: only --add-lrs)")
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=None, help="override every task's step budget")
    ap.add_argument("--lrs", type=float, nargs="+", default=list(ADAMW_LRS))
    ap.add_argument("--target", type=float, default=0.01)
    ap.add_argument("--json", default=f"docs/presets-{_dt.date.today().isoformat()}.json")
    ap.add_argument("--merge", default=None, help="add these rows to an existing JSON (AdamW grid kept)")
    ap.add_argument("--add-lrs", type=float, nargs="+", default=(),
                    help="with --merge: AdamW lrs to add to the grid (when the best lr sat at an edge)")
    ap.add_argument("--choose", default=None, metavar="JSON",
                    help="print the table of optimkit.guide.presets.NO_TUNING chosen from a results file")
    ap.add_argument("--lr-scales", nargs="+", default=None, metavar="PATTERN=FACTOR",
                    help="groups with different lrs (e.g. 'blocks.*=0.5'): results go to 'group_lrs' in the "
                         "JSON, not into the preset table")
    ap.add_argument("--combine", nargs="+", default=None, metavar="JSON",
                    help="merge the tasks of several results files (runs split across processes) into --json")
    a = ap.parse_args(argv)
    if a.combine:
        results: dict[str, Any] = {}
        for path in a.combine:
            with open(path) as f:
                part = json.load(f)
            if not results:
                results = {**part, "tasks": {}, "unavailable": {}, "command": [], "merged": []}
            results["tasks"].update(part["tasks"])
            results["unavailable"].update(part["unavailable"])
            results["command"].append(part["command"])
            results["merged"] += part.get("merged", [])
        results["unavailable"] = {k: v for k, v in results["unavailable"].items() if k not in results["tasks"]}
        with open(a.json, "w") as f:
            json.dump(results, f, indent=1)
        print(table(results, a.target))
        return 0
    if a.choose:
        with open(a.choose) as f:
            results = json.load(f)
        print(table(results, results.get("target", a.target)))
        for kind, (preset, gaps) in choose(results).items():
            print(f"    {kind!r}: NoTuningPreset({preset!r}, {tuple(gaps)!r}, {gaps!r}),")
        return 0
    torch.set_num_threads(1)  # small models: one thread is fastest and deterministic

    presets = available_presets()
    if a.presets is not None:
        unknown = set(a.presets) - set(PRESETS)
        if unknown:
            ap.error(f"unknown preset(s) {sorted(unknown)}; expected {', '.join(PRESETS)}")
        missing = set(a.presets) - set(presets)
        if missing:
            ap.error(f"this Prodigy does not take the arguments of {sorted(missing)}")
        presets = {k: presets[k] for k in a.presets}
    scales = None
    if a.lr_scales:
        scales = {}
        for item in a.lr_scales:
            pat, sep, val = item.rpartition("=")
            if not sep or not pat:
                ap.error(f"--lr-scales {item!r}: expected PATTERN=FACTOR")
            scales[pat] = float(val)
    names = a.tasks or list(DEFAULT_SUITE) + [t for t in OPTIONAL_TASKS if t in BUILTIN_TASKS]
    out_path = a.merge or a.json
    if a.merge:
        with open(a.merge) as f:
            results = json.load(f)
        results.setdefault("merged", []).append(
            "python benchmarks/presets.py " + " ".join(argv if argv is not None else sys.argv[1:]))
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
        if scales:  # a side experiment: its own section, its own AdamW grid (same scales)
            key = name + " " + " ".join(f"{k}={v:g}" for k, v in scales.items())
            entry = measure_task(task, presets, tuple(a.lrs), a.seeds, a.steps or results["tasks"].get(name, {}).get("steps"),
                                 lr_scales=scales)
            entry["lr_scales"] = scales
            score(entry)
            results.setdefault("group_lrs", {})[key] = entry
            with open(out_path, "w") as f:
                json.dump(results, f, indent=1)
            continue
        if a.merge:
            old = results["tasks"].get(name)
            if old is None:
                print(f"skipped {name}: not in {a.merge}", file=sys.stderr)
                continue
            new = measure_task(task, presets, tuple(a.add_lrs), old["seeds"], old["steps"], adamw=bool(a.add_lrs))
            old["presets"].update(new["presets"])
            old["adamw"].update(new["adamw"])
            score(old)
        else:
            results["tasks"][name] = measure_task(task, presets, tuple(a.lrs), a.seeds, a.steps)
            score(results["tasks"][name])
        with open(out_path, "w") as f:  # after every task: a long run leaves partial results
            json.dump(results, f, indent=1)
        print(table(results, a.target), flush=True)
    with open(out_path, "w") as f:  # also when the last tasks were skipped (their hints are kept)
        json.dump(results, f, indent=1)
    print(f"\nwrote {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
