"""The race: run every (task, optimizer, learning rate, seed), then summarise into one dict.

The result of :func:`run_compare` is a plain JSON-able ``dict``; the tables, plots, HTML page
and JSON file are all rendered from it (:mod:`optimkit.compare.report`), so every number a
user sees in the terminal is the number stored in ``results.json``.

Measurement choices (documented in docs/compare.md):

* every optimizer of a task starts from the same weights (seeded) and sees the same batches;
* ``train_loss`` is the mean minibatch loss over the last 10% of steps; ``val_loss`` and the
  metric are evaluated on the held-out data at the end (and every ``eval_every`` steps for
  the curves); numbers are means over seeds;
* ``steps_to_target``: the first evaluation step at which the seed-mean metric reaches the
  task's target (``None``: never);
* ``ms_per_step``: wall time of a whole training step (batch, forward, backward, step);
  ``opt_ms_per_step``: of ``optimizer.step()`` alone; both medians over the run;
* ``state_bytes_per_param``: bytes of every tensor in the optimizer state after the run,
  divided by the number of trained parameters (fp32 Adam: 8 plus a few bytes of step counters);
* a run whose loss becomes non-finite is stopped and counted as diverged; it ranks last;
* ranking: by the final validation metric (validation loss when the task has none), ties
  broken by validation loss; the overall ranking is the mean rank over tasks.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .tasks import Batch, Task

__all__ = [
    "OptimizerChoice",
    "parse_optimizer_choice",
    "default_choices",
    "run_compare",
    "LR_SWEEP_FACTORS",
]

#: multipliers of an optimizer's default lr tried by ``--lr-sweep``
LR_SWEEP_FACTORS: tuple[float, ...] = (0.1, 0.3, 1.0, 3.0, 10.0)
#: a sweep point is "as good as the best" when its validation loss is within this fraction
SWEEP_TOLERANCE = 0.10
_DIVERGE_FACTOR = 1e4


@dataclass(frozen=True)
class OptimizerChoice:
    """One contestant: a registry name (or class path) with arguments and a learning rate."""

    label: str  # as the user wrote it; unique within a run
    name: str  # canonical registry name, or the class path
    args: dict[str, Any] = field(default_factory=dict)  # constructor arguments, lr excluded
    lr: float | None = None  # None: the optimizer's own default (class without registry entry)
    needs_lr_tuning: bool = True
    lr_given: bool = False  # the user fixed lr in the spec string


def parse_optimizer_choice(text: str) -> OptimizerChoice:
    """Parse ``"name"`` or ``"name:key=value,key=value"`` (values parsed by the factory).

    Classic optimizers get the registry's recommended ``default_lr``; Prodigy gets ``lr=1``.

    Raises:
        ValueError: unknown optimizer, malformed arguments or an argument the optimizer does
            not take (one line, from the factory).
    """
    from ..factory import parse_optimizer_args, resolve_optimizer

    text = text.strip()
    name, sep, arg_text = text.partition(":")
    name = name.strip()
    if not name:
        raise ValueError(f"invalid optimizer spec {text!r}; expected name or name:key=value,...")
    if sep and not arg_text.strip():
        raise ValueError(f"invalid optimizer spec {text!r}: nothing after ':'")
    cls, spec, lookahead = resolve_optimizer(name)
    try:
        args = parse_optimizer_args(arg_text) if sep else {}
    except ValueError as e:
        raise ValueError(f"optimizer spec {text!r}: {e}") from None
    lr = args.pop("lr", None)
    if lr is not None and (isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0):
        raise ValueError(f"invalid lr={lr!r} in optimizer spec {text!r}; expected a number > 0")
    lr_given = lr is not None
    if spec is not None:
        canonical = ("lookahead_" if lookahead else "") + spec.name
        if lr is None:
            lr = spec.default_lr if spec.default_lr is not None else (1.0 if spec.name == "prodigy" else None)
        needs = spec.needs_lr_tuning
    else:
        canonical, needs = name, True
    _check_args(text, canonical, args, lr)
    return OptimizerChoice(
        label=text if sep else name.lower() if spec is not None else name,
        name=canonical,
        args=args,
        lr=float(lr) if lr is not None else None,
        needs_lr_tuning=needs,
        lr_given=lr_given,
    )


def _check_args(text: str, name: str, args: dict[str, Any], lr: float | None) -> None:
    """Build the optimizer once on a dummy parameter so a bad argument fails before any run."""
    from ..factory import create_optimizer

    try:
        create_optimizer(name, [nn.Parameter(torch.zeros(2))], lr=lr, optimizer_args=dict(args))
    except NotImplementedError:
        pass  # not implemented yet: reported per run as "skipped", not a usage error
    except (ValueError, TypeError) as e:
        raise ValueError(f"optimizer spec {text!r}: {e}") from None


def default_choices() -> list[OptimizerChoice]:
    """Every optimizer in the registry at its recommended default learning rate."""
    from ..factory import list_optimizers

    return [parse_optimizer_choice(n) for n in list_optimizers()]


# --------------------------------------------------------------------------- progress
class Progress:
    """What the runner reports while it runs (the CLI plugs in a rich display)."""

    def start(self, total_steps: int) -> None: ...
    def run(self, description: str, steps: int) -> None: ...
    def advance(self, step: int, loss: float, n: int) -> None: ...
    def note(self, message: str) -> None: ...
    def stop(self) -> None: ...


class RichProgress(Progress):
    """A rich progress bar on stderr: task, optimizer, step, current loss, ETA."""

    def __init__(self) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, TextColumn, TimeRemainingColumn
        from rich.progress import Progress as _P

        self.console = Console(stderr=True)
        self._p = _P(
            TextColumn("{task.description}"),
            TextColumn("step {task.fields[step]:>4}/{task.fields[steps]:<4}"),
            TextColumn("loss {task.fields[loss]:>7}"),
            BarColumn(bar_width=12),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=self.console,
            transient=True,
        )
        self._id: Any = None

    def start(self, total_steps: int) -> None:
        self._p.start()
        self._id = self._p.add_task("", total=total_steps, step=0, steps=0, loss="-")

    def run(self, description: str, steps: int) -> None:
        self._p.update(self._id, description=description, step=0, steps=steps, loss="-")

    def advance(self, step: int, loss: float, n: int) -> None:
        self._p.update(self._id, advance=n, step=step, loss=f"{loss:.4g}")

    def note(self, message: str) -> None:
        self.console.print(message, markup=False, highlight=False)

    def stop(self) -> None:
        self._p.stop()


# --------------------------------------------------------------------------- one run
@dataclass
class _Run:
    lr: float | None
    seed: int
    train_loss: list[float] = field(default_factory=list)
    eval_steps: list[int] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    metric: list[float] = field(default_factory=list)
    step_ms: list[float] = field(default_factory=list)
    opt_ms: list[float] = field(default_factory=list)
    d_steps: list[int] = field(default_factory=list)
    d: list[float] = field(default_factory=list)
    effective_lr: list[float] = field(default_factory=list)
    state_bytes: int = 0
    n_params: int = 0
    diverged: bool = False
    error: str | None = None


def _to(x: Any, device: torch.device) -> Any:
    if isinstance(x, Tensor):
        return x.to(device)
    if isinstance(x, (list, tuple)):
        return type(x)(_to(v, device) for v in x)
    return x


def _minibatches(data: Batch, batch_size: int | None, gen: torch.Generator) -> Iterator[Batch]:
    x, y = data
    n = len(y)
    if batch_size is None or batch_size >= n:
        while True:
            yield x, y
    while True:  # shuffled epochs; the last partial batch of an epoch is dropped
        perm = torch.randperm(n, generator=gen).to(y.device)
        for i in range(0, n - batch_size + 1, batch_size):
            idx = perm[i : i + batch_size]
            yield _index(x, idx), y[idx]


def _index(x: Any, idx: Tensor) -> Any:
    if isinstance(x, Tensor):
        return x[idx]
    if isinstance(x, (list, tuple)):
        return type(x)(_index(v, idx) for v in x)
    raise TypeError(f"train_data inputs must be Tensors (or tuples of them), got {type(x).__name__}")


@torch.no_grad()
def _evaluate(task: Task, model: nn.Module, val: Batch | None, chunk: int = 512) -> tuple[float, float]:
    if val is None:
        return math.nan, math.nan
    model.eval()
    x, y = val
    n = len(y)
    total, outs = 0.0, []
    for i in range(0, n, chunk):
        xi = _index(x, torch.arange(i, min(n, i + chunk), device=y.device)) if n > chunk else x
        yi = y[i : i + chunk] if n > chunk else y
        out = model(xi)
        total += float(task.loss_fn(out, yi)) * len(yi)
        if task.metric is not None and task.metric != "perplexity":
            outs.append((out, yi))
    model.train()
    loss = total / n
    if task.metric is None:
        metric = math.nan
    elif task.metric == "perplexity":
        metric = math.exp(min(loss, 50.0))
    elif task.metric == "accuracy":
        correct = sum(int((o.argmax(-1) == t).sum()) for o, t in outs)
        metric = correct / n
    else:
        metric = float(task.metric(torch.cat([o for o, _ in outs]), torch.cat([t for _, t in outs])))
    return loss, metric


def _state_bytes(opt: torch.optim.Optimizer) -> int:
    seen: set[int] = set()
    total = 0

    def walk(obj: Any) -> None:
        nonlocal total
        if isinstance(obj, Tensor):
            key = obj.untyped_storage().data_ptr() if obj.numel() else id(obj)
            if key not in seen:
                seen.add(key)
                total += obj.numel() * obj.element_size()
        elif isinstance(obj, dict):
            for v in obj.values():
                walk(v)
        elif isinstance(obj, (list, tuple)):
            for v in obj:
                walk(v)

    walk(dict(opt.state))
    inner = getattr(opt, "optimizer", None) or getattr(opt, "base_optimizer", None)
    if isinstance(inner, torch.optim.Optimizer) and inner is not opt:
        walk(dict(inner.state))
    return total


def _run_one(
    task: Task,
    choice: OptimizerChoice,
    lr: float | None,
    seed: int,
    steps: int,
    eval_every: int,
    device: torch.device,
    train: Batch | None,
    val: Batch | None,
    progress: Progress,
) -> _Run:
    from ..factory import create_optimizer

    run = _Run(lr=lr, seed=seed)
    torch.manual_seed(seed)
    model = task.make_model().to(device)
    model.train()
    run.n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    opt = create_optimizer(choice.name, model, lr=lr, optimizer_args=dict(choice.args))
    gen = torch.Generator().manual_seed(10_000 + seed)
    batches = task.train_batches(gen) if task.train_batches is not None else _minibatches(train, task.batch_size, gen)

    def record_eval(step: int) -> None:
        vl, m = _evaluate(task, model, val)
        run.eval_steps.append(step)
        run.val_loss.append(vl)
        run.metric.append(m)

    record_eval(0)
    first_loss: float | None = None
    pending = 0
    for step in range(1, steps + 1):
        t0 = time.perf_counter()
        x, y = next(batches)
        x, y = _to(x, device), _to(y, device)
        opt.zero_grad(set_to_none=True)
        loss = task.loss_fn(model(x), y)
        loss.backward()
        t1 = time.perf_counter()
        opt.step()
        t2 = time.perf_counter()
        lv = float(loss.detach())  # one host sync per step, needed for the curve anyway
        run.step_ms.append((t2 - t0) * 1e3)
        run.opt_ms.append((t2 - t1) * 1e3)
        run.train_loss.append(lv)
        group = opt.param_groups[0]
        if "d" in group:  # Prodigy-style optimizers mirror their scalar d into every group
            d = float(group["d"])
            run.d_steps.append(step)
            run.d.append(d)
            eff = group.get("effective_lr")
            run.effective_lr.append(float(eff) if eff is not None else d * float(group["lr"]))
        if first_loss is None:
            first_loss = lv
        pending += 1
        if not math.isfinite(lv) or abs(lv) > _DIVERGE_FACTOR * max(1.0, abs(first_loss)):
            run.diverged = True
            progress.advance(step, lv, pending + steps - step)
            break
        if step % eval_every == 0 or step == steps:
            record_eval(step)
        if step % 5 == 0 or step == steps:
            progress.advance(step, lv, pending)
            pending = 0
    run.state_bytes = _state_bytes(opt)
    return run


# --------------------------------------------------------------------------- summary
def _mean(xs: Sequence[float]) -> float:
    xs = [x for x in xs if x is not None]
    return float(statistics.fmean(xs)) if xs else math.nan


def _finite_or_none(x: float) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


def _band(curves: list[list[float]], length: int) -> dict[str, list[float | None]]:
    """Mean, min and max over seeds; a seed that stopped early (diverged) leaves a gap."""
    out: dict[str, list[float | None]] = {"mean": [], "min": [], "max": []}
    for i in range(length):
        vals = [c[i] for c in curves if i < len(c) and math.isfinite(c[i])]
        ok = len(vals) == len(curves) and vals
        out["mean"].append(float(statistics.fmean(vals)) if ok else None)
        out["min"].append(min(vals) if ok else None)
        out["max"].append(max(vals) if ok else None)
    return out


def _binned(losses: list[float], steps: int, bins: int = 100) -> tuple[list[int], list[float]]:
    """Average the per-step minibatch losses in ``bins`` windows (noisy curves are unreadable)."""
    width = max(1, steps // bins)
    xs, ys = [], []
    for start in range(0, steps, width):
        w = losses[start : start + width]
        if len(w) < width and start + width <= steps:  # the run stopped inside this window
            w = []
        xs.append(min(steps, start + width))
        ys.append(float(statistics.fmean(w)) if w and all(math.isfinite(v) for v in w) else math.nan)
    return xs, ys


def _summarise_runs(task: Task, runs: list[_Run], steps: int) -> dict[str, Any]:
    """Numbers of one (optimizer, lr) over its seeds."""
    tail = max(1, steps // 10)
    diverged = sum(r.diverged for r in runs)
    finals = [r for r in runs if not r.diverged]
    train_loss = _mean([_mean(r.train_loss[-tail:]) for r in finals]) if finals else math.nan
    val_loss = _mean([r.val_loss[-1] for r in finals]) if finals else math.nan
    metric = _mean([r.metric[-1] for r in finals]) if finals else math.nan
    eval_steps = max((r.eval_steps for r in runs), key=len)
    mcurve = _band([r.metric if task.metric is not None else r.val_loss for r in runs], len(eval_steps))["mean"]
    steps_to_target = None
    if task.target is not None and diverged == 0:
        better = (lambda v: v >= task.target) if (task.metric is not None and task.higher_is_better) else (
            lambda v: v <= task.target
        )
        for s, v in zip(eval_steps, mcurve):
            if v is not None and better(v):
                steps_to_target = s
                break
    step_ms = [m for r in runs for m in r.step_ms[1:]] or [m for r in runs for m in r.step_ms]
    opt_ms = [m for r in runs for m in r.opt_ms[1:]] or [m for r in runs for m in r.opt_ms]
    n_params = runs[0].n_params
    return {
        "train_loss": _finite_or_none(train_loss),
        "val_loss": _finite_or_none(val_loss),
        "metric": _finite_or_none(metric),
        "steps_to_target": steps_to_target,
        "ms_per_step": statistics.median(step_ms) if step_ms else None,
        "opt_ms_per_step": statistics.median(opt_ms) if opt_ms else None,
        "state_bytes_per_param": (max(r.state_bytes for r in runs) / n_params) if n_params else None,
        "diverged_seeds": diverged,
        "seeds": len(runs),
    }


def _curves(runs: list[_Run], steps: int) -> dict[str, Any]:
    binned = [_binned(r.train_loss + [math.nan] * (steps - len(r.train_loss)), steps) for r in runs]
    eval_steps = max((r.eval_steps for r in runs), key=len)
    out: dict[str, Any] = {
        "train_steps": binned[0][0],
        "train_loss": _band([b[1] for b in binned], len(binned[0][0])),
        "eval_steps": eval_steps,
        "val_loss": _band([r.val_loss for r in runs], len(eval_steps)),
        "metric": _band([r.metric for r in runs], len(eval_steps)),
    }
    if any(r.d for r in runs):
        d_steps = max((r.d_steps for r in runs), key=len)
        out["d_steps"] = d_steps
        out["d"] = _band([r.d for r in runs], len(d_steps))["mean"]
        out["effective_lr"] = _band([r.effective_lr for r in runs], len(d_steps))["mean"]
    return out


def _sort_key(task: Task, row: dict[str, Any]) -> tuple[float, float]:
    if row.get("error") or row["diverged_seeds"] or row["val_loss"] is None:
        return (math.inf, math.inf)
    vl = row["val_loss"]
    if task.metric is None or row["metric"] is None:
        return (vl, vl)
    return (-row["metric"] if task.higher_is_better else row["metric"], vl)


def _json_clean(obj: Any) -> Any:
    """NaN/inf are not JSON: store them as null."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _json_clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_clean(v) for v in obj]
    return obj


# --------------------------------------------------------------------------- the race
def run_compare(
    tasks: Sequence[Task],
    choices: Sequence[OptimizerChoice],
    *,
    steps: int | None = None,
    seeds: int = 2,
    lr_sweep: bool = False,
    quick: bool = False,
    device: str | torch.device = "cpu",
    threads: int | None = 1,
    progress: Progress | None = None,
    unavailable: dict[str, str] | None = None,
    sweep_factors: Sequence[float] = LR_SWEEP_FACTORS,
) -> dict[str, Any]:
    """Race ``choices`` on ``tasks``; return every number as a JSON-able dict.

    Args:
        tasks: the problems (see :class:`~optimkit.compare.tasks.Task`).
        choices: the contestants; labels must be unique.
        steps: override every task's step budget.
        seeds: runs per (task, optimizer, lr); curves show a min-max band over seeds.
        lr_sweep: for optimizers with ``needs_lr_tuning``, also try ``lr x sweep_factors``
            and report the best lr (by final validation loss) and how wide the good range is.
        quick: use each task's ``quick_steps``.
        device: where models and data live.
        threads: ``torch.set_num_threads`` for the race (restored after). 1 is fastest for
            these small models on a shared CPU; ``None`` leaves torch's setting alone.
        progress: a :class:`Progress` (the CLI passes :class:`RichProgress`).
        unavailable: ``{task name: hint}`` of tasks skipped for missing data (reported).
    """
    labels = [c.label for c in choices]
    if len(set(labels)) != len(labels):
        raise ValueError(f"duplicate optimizer in {labels}")
    if seeds < 1:
        raise ValueError(f"invalid seeds={seeds}; expected >= 1")
    if steps is not None and steps < 1:
        raise ValueError(f"invalid steps={steps}; expected >= 1")
    dev = torch.device(device)
    progress = progress or Progress()
    old_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)

    plan: list[tuple[Task, int, OptimizerChoice, list[float | None]]] = []
    for task in tasks:
        n = steps or task.steps_for(quick)
        for c in choices:
            lrs: list[float | None] = [c.lr]
            if lr_sweep and c.needs_lr_tuning and c.lr is not None:
                lrs = [c.lr * f for f in sweep_factors]
            plan.append((task, n, c, lrs))
    total = sum(n * len(lrs) * seeds for _, n, _, lrs in plan)

    skipped: dict[str, str] = {}
    out_tasks: dict[str, Any] = {}
    started = time.perf_counter()
    progress.start(total)
    try:
        for task in tasks:
            n = steps or task.steps_for(quick)
            eval_every = max(1, min(task.eval_every or n // 20 or 1, n))
            train = _to(task.train_data, dev) if task.train_data is not None else None
            val = _to(task.val_data, dev) if task.val_data is not None else None
            rows, curves, sweeps = [], {}, {}
            n_params = None
            for t, tn, c, lrs in plan:
                if t is not task:
                    continue
                per_lr: list[tuple[float | None, list[_Run], dict[str, Any]]] = []
                error = skipped.get(c.label)
                for lr in lrs:
                    runs: list[_Run] = []
                    for seed in range(seeds):
                        if error:
                            progress.advance(0, math.nan, tn)
                            continue
                        lr_txt = f" lr={lr:.3g}" if lr is not None else ""
                        progress.run(f"{task.name} · {c.label}{lr_txt} s{seed}", tn)
                        try:
                            runs.append(_run_one(task, c, lr, seed, tn, eval_every, dev, train, val, progress))
                        except NotImplementedError as e:
                            error = f"not implemented: {e}"
                            skipped[c.label] = error
                            progress.note(f"skipped {c.label}: {error}")
                            progress.advance(0, math.nan, tn)
                        except Exception as e:  # noqa: BLE001 - one failing run must not end the race
                            error = f"{type(e).__name__}: {e}".splitlines()[0]
                            progress.note(f"{task.name} · {c.label}: failed: {error}")
                            progress.advance(0, math.nan, tn)
                    if runs:
                        n_params = runs[0].n_params
                        per_lr.append((lr, runs, _summarise_runs(task, runs, tn)))
                if not per_lr:
                    rows.append({"optimizer": c.label, "name": c.name, "args": c.args, "lr": c.lr,
                                 "error": error, "diverged_seeds": 0, "val_loss": None, "metric": None})
                    continue
                best_lr, best_runs, best = per_lr[0]
                if len(per_lr) > 1:
                    finite = [p for p in per_lr if p[2]["val_loss"] is not None and not p[2]["diverged_seeds"]]
                    if finite:
                        best_lr, best_runs, best = min(finite, key=lambda p: p[2]["val_loss"])
                        lo = [p[0] for p in finite if p[2]["val_loss"] <= best["val_loss"] + SWEEP_TOLERANCE * abs(best["val_loss"])]
                        window = [min(lo), max(lo)]
                    else:
                        window = None
                    sweeps[c.label] = {
                        "grid": [{"lr": lr, "val_loss": s["val_loss"], "metric": s["metric"],
                                  "diverged_seeds": s["diverged_seeds"]} for lr, _, s in per_lr],
                        "best_lr": best_lr if finite else None,
                        "window": window,
                        "window_factor": (window[1] / window[0]) if window else None,
                        "default_lr": c.lr,
                    }
                rows.append({"optimizer": c.label, "name": c.name, "args": c.args, "lr": best_lr,
                             "error": error if error and not best_runs else None, **best})
                curves[c.label] = _curves(best_runs, tn)
            rows.sort(key=lambda r: _sort_key(task, r))
            rank = 0
            for r in rows:
                rank += 1
                r["rank"] = rank if not r.get("error") else None
            out_tasks[task.name] = {
                "name": task.name,
                "description": task.description,
                "family": task.family,
                "metric": task.metric_name,
                "higher_is_better": task.higher_is_better,
                "target": task.target,
                "steps": n,
                "eval_every": eval_every,
                "n_params": n_params,
                "info": task.info,
                "results": rows,
                "sweeps": sweeps,
                "curves": curves,
            }
    finally:
        progress.stop()
        if threads:
            torch.set_num_threads(old_threads)

    result = {
        "optimkit_version": _version(),
        "torch_version": torch.__version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "config": {
            "tasks": [t.name for t in tasks],
            "optimizers": [c.label for c in choices],
            "steps": steps,
            "seeds": seeds,
            "lr_sweep": lr_sweep,
            "sweep_factors": list(sweep_factors) if lr_sweep else None,
            "quick": quick,
            "device": str(dev),
            "threads": threads,
        },
        "wall_time_s": time.perf_counter() - started,
        "tasks": out_tasks,
        "overall": _overall(out_tasks, [c.label for c in choices]),
        "skipped_optimizers": skipped,
        "unavailable_tasks": dict(unavailable or {}),
    }
    return _json_clean(result)


def _overall(tasks: dict[str, Any], labels: list[str]) -> list[dict[str, Any]]:
    rows = []
    for label in labels:
        ranks = {t: r["rank"] for t, e in tasks.items() for r in e["results"] if r["optimizer"] == label and r["rank"]}
        if not ranks:
            continue
        rows.append({
            "optimizer": label,
            "mean_rank": statistics.fmean(ranks.values()),
            "wins": sum(1 for v in ranks.values() if v == 1),
            "n_tasks": len(ranks),
            "ranks": ranks,
        })
    rows.sort(key=lambda r: (-r["n_tasks"], r["mean_rank"], -r["wins"]))
    for i, r in enumerate(rows, 1):
        r["rank"] = i
    return rows


def _version() -> str:
    from .. import __version__

    return __version__

