"""The race: plan every (task, optimizer, point, seed) as a trial of one Optuna study, run the
trials in worker processes, and summarise the stored trials into one result dict.

The result of :func:`run_compare` is a plain JSON-able ``dict`` (schema: docs/compare-results.md);
the tables, plots, HTML page and JSON file are all rendered from it (:mod:`optimkit.compare.report`),
and it is built from the storage alone (:func:`optimkit.compare.summary.result_from_storage`).
How trials are planned, stored and shared between processes: :mod:`optimkit.compare.study`.
What one trial measures: :mod:`optimkit.compare.trial`. How rows, ranks and profiles are computed:
:mod:`optimkit.compare.summary`.
"""

from __future__ import annotations

import inspect
import shlex
import tempfile
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import study as st
from .progress import Eta, Progress, RichProgress
from .summary import build_result, point_scores, unit_points
from .tasks import Task

__all__ = [
    "OptimizerChoice",
    "parse_optimizer_choice",
    "default_choices",
    "run_compare",
    "choice_warnings",
    "LR_SWEEP_FACTORS",
    "Progress",
    "RichProgress",
]

LR_SWEEP_FACTORS = st.LR_SWEEP_FACTORS


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
        with warnings.catch_warnings():  # only errors matter here; advice is given once, by choice_warnings
            warnings.simplefilter("ignore")
            create_optimizer(name, [nn.Parameter(torch.zeros(2))], lr=lr, optimizer_args=dict(args))
    except NotImplementedError:
        pass  # not implemented yet: reported per run as "skipped", not a usage error
    except (ValueError, TypeError) as e:
        raise ValueError(f"optimizer spec {text!r}: {e}") from None


def default_choices() -> list[OptimizerChoice]:
    """Every optimizer in the registry at its recommended default learning rate."""
    from ..factory import list_optimizers

    return [parse_optimizer_choice(n) for n in list_optimizers()]


def _base_spec(choice: OptimizerChoice) -> Any:
    from ..factory.registry import REGISTRY

    return REGISTRY.get(choice.name.removeprefix("lookahead_"))


def choice_warnings(choices: Sequence[OptimizerChoice]) -> list[str]:
    """One-line warnings about specs that are legal but almost certainly not meant."""
    out = []
    for c in choices:
        spec = _base_spec(c)
        if spec is not None and spec.name == "prodigy" and c.lr_given and c.lr is not None and c.lr < 0.1:
            out.append(f"{c.label}: Prodigy's lr multiplies its estimated step size d (keep lr=1, scale with "
                       f"d_coef); lr={c.lr:g} makes every step {1 / c.lr:.3g}x smaller than Prodigy's estimate")
    return out


def full_hyperparameters(choice: OptimizerChoice) -> dict[str, Any]:
    """``{"all": every constructor argument (defaults, preset, spec), "given": the spec's own}``."""
    from ..factory import resolve_optimizer

    spec = _base_spec(choice)
    if spec is not None:
        hp = {h.name: h.default for h in spec.hyperparams}
    else:
        cls, _, _ = resolve_optimizer(choice.name)
        hp = {n: p.default for n, p in inspect.signature(cls).parameters.items()
              if n != "params" and p.default is not inspect.Parameter.empty}
    hp.update(choice.args)
    if choice.lr is not None:
        hp["lr"] = choice.lr
    if choice.name.startswith("lookahead_"):
        hp["lookahead"] = {"k": 5, "alpha": 0.5}
    return st.meta_json({"all": hp, "given": dict(choice.args)})


def _space(choice: OptimizerChoice) -> tuple[tuple[str, float, float], ...]:
    """The search space of ``choice``: the registry's, centred on the user's value if given."""
    from ..factory.registry import LR_SEARCH_FACTOR, SearchDim

    spec = _base_spec(choice)
    dims = list(spec.search_space) if spec is not None else (
        [SearchDim("lr", 1 / LR_SEARCH_FACTOR, LR_SEARCH_FACTOR)] if choice.lr is not None else [])
    out = []
    for d in dims:
        given = choice.lr if d.name == "lr" and (choice.lr_given or spec is None) else choice.args.get(d.name)
        if isinstance(given, (int, float)) and not isinstance(given, bool) and given > 0:
            d = d.around(float(given))
        out.append((d.name, d.low, d.high))
    return tuple(out)


def _units(tasks: Sequence[Task], choices: Sequence[OptimizerChoice], lr_sweep: bool,
           factors: Sequence[float]) -> list[st.Unit]:
    out = []
    for t in tasks:
        for c in choices:
            grid = tuple(factors) if lr_sweep and c.needs_lr_tuning and c.lr is not None else None
            out.append(st.Unit(t.name, c.label, c.name, c.lr, _space(c), grid))
    return out


def _n_points(u: st.Unit, budget: int | None) -> int:
    if u.grid is not None:
        return len([f for f in u.grid if f != 1.0]) + 1
    return 1 + (budget if budget and u.space else 0)


# --------------------------------------------------------------------------- the race
_RUNTIME_KEYS = ("jobs", "threads", "storage")


def run_compare(
    tasks: Sequence[Task],
    choices: Sequence[OptimizerChoice],
    *,
    steps: int | None = None,
    seeds: int = 2,
    lr_sweep: bool = False,
    budget: int | None = None,
    quick: bool = False,
    device: str | torch.device = "cpu",
    threads: int | None = 1,
    jobs: int = 1,
    storage: str | None = None,
    study_name: str = st.STUDY_NAME,
    progress: Progress | None = None,
    unavailable: dict[str, str] | None = None,
    sweep_factors: Sequence[float] = LR_SWEEP_FACTORS,
    task_specs: dict[str, str] | None = None,
    command: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Race ``choices`` on ``tasks``; return every number as a JSON-able dict.

    Args:
        tasks: the problems (see :class:`~optimkit.compare.tasks.Task`).
        choices: the contestants; labels must be unique.
        steps: override every task's step budget.
        seeds: runs per (task, optimizer, point); curves show a min-max band over seeds.
        lr_sweep: for optimizers with ``needs_lr_tuning``, also try ``lr x sweep_factors``.
        budget: trials of each optimizer's search space (plus its default); ``None``: defaults only.
        quick: use each task's ``quick_steps``.
        device: where models and data live.
        threads: ``torch.set_num_threads`` for trials run in this process (restored after).
        jobs: worker processes (each one torch thread); 1 runs in this process; 0 runs nothing
            here and waits for ``optimkit compare --worker`` processes sharing ``storage``.
        storage: a journal file path or a database URL; ``None``: a temporary journal. Finished
            trials found there are not rerun (the comparison must be the same one).
        study_name: the Optuna study holding this comparison.
        progress: a :class:`Progress` (the CLI passes :class:`RichProgress`).
        unavailable: ``{task name: hint}`` of tasks skipped for missing data (reported).
        task_specs: ``{task name: spec}`` that rebuilds each task in another process
            (``logreg``, ``file.py:function``); default: the name.
        command: the argv that reproduces this run (stored in the result).

    Raises:
        ValueError: bad arguments, or ``storage`` holds a different comparison.
    """
    labels = [c.label for c in choices]
    if len(set(labels)) != len(labels):
        raise ValueError(f"duplicate optimizer in {labels}")
    if seeds < 1:
        raise ValueError(f"invalid seeds={seeds}; expected >= 1")
    if steps is not None and steps < 1:
        raise ValueError(f"invalid steps={steps}; expected >= 1")
    if budget is not None and budget < 1:
        raise ValueError(f"invalid budget={budget}; expected >= 1")
    if jobs < 0:
        raise ValueError(f"invalid jobs={jobs}; expected >= 0")
    dev = torch.device(device)
    progress = progress or Progress()
    tmp = None
    if storage is None:
        tmp = tempfile.TemporaryDirectory(prefix="optimkit-compare-")
        storage = str(Path(tmp.name) / st.JOURNAL_FILE)
    units = _units(tasks, choices, lr_sweep, sweep_factors)
    mode = "budget" if (budget or lr_sweep) else "default"
    config = {
        "tasks": [t.name for t in tasks], "task_specs": [(task_specs or {}).get(t.name, t.name) for t in tasks],
        "optimizers": labels, "steps": steps, "seeds": seeds, "budget": budget,
        "sampler": "grid" if lr_sweep else ("qmc" if budget else None), "lr_sweep": lr_sweep,
        "sweep_factors": list(sweep_factors) if lr_sweep else None, "quick": quick, "device": str(dev),
        "threads": threads, "jobs": jobs, "storage": st.redact(storage), "study": study_name, "rank_by": "steps",
        "extension": {"reserved": st.reserved(budget) if budget else 0, "reach": "half the range's log-width"},
    }
    if command is None:
        command = ["optimkit", "compare", "--tasks", *config["task_specs"], "--optimizers", *labels,
                   "--seeds", str(seeds)] + (["--steps", str(steps)] if steps else []) + (
                   ["--budget", str(budget)] if budget else []) + (["--lr-sweep"] if lr_sweep else []) + (
                   ["--quick"] if quick else [])
    title = (f"Tuned comparison (budget: {budget} trials per optimizer, {seeds} seed(s))" if budget else
             f"Tuned comparison (lr sweep x{', x'.join(f'{f:g}' for f in sweep_factors)}, {seeds} seed(s))"
             if lr_sweep else "Out-of-the-box comparison (default hyperparameters only)")
    meta = st.meta_json({
        "schema": 2, "mode": mode, "title": title, "config": config, "command": list(command),
        "command_line": shlex.join(command), "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "versions": {"optimkit": _version(), "torch": torch.__version__, "optuna": st._optuna().__version__},
        "tasks": {t.name: _task_meta(t, steps, quick, (task_specs or {}).get(t.name, t.name)) for t in tasks},
        "units": st.units_json(units),
        "hyperparameters": {c.label: full_hyperparameters(c) for c in choices},
        "warnings": choice_warnings(choices), "unavailable_tasks": dict(unavailable or {}),
        "planned": sum(_n_points(u, budget) * seeds for u in units),
    })
    started = time.perf_counter()
    old_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        study = _open_study(storage, study_name, meta)
        meta = study.user_attrs["meta"]
        _coordinate(study, storage, study_name, meta, units, budget, seeds, jobs, dev,
                    {t.name: t for t in tasks}, progress)
        study.set_user_attr("wall_time_s", time.perf_counter() - started)
        return build_result(meta, study.get_trials(deepcopy=False), wall_time_s=time.perf_counter() - started)
    finally:
        if threads:
            torch.set_num_threads(old_threads)
        if tmp is not None:
            tmp.cleanup()


def _task_meta(t: Task, steps: int | None, quick: bool, spec: str) -> dict[str, Any]:
    n = steps or t.steps_for(quick)
    return {"name": t.name, "spec": spec, "description": t.description, "family": t.family, "metric": t.metric_name,
            "higher_is_better": t.higher_is_better, "target": t.target, "steps": n,
            "eval_every": max(1, min(t.eval_every or n // 20 or 1, n)), "info": t.info}


def _open_study(storage: str, study_name: str, meta: dict[str, Any]) -> Any:
    """Create the study, or load it and check it holds the same comparison."""
    optuna = st._optuna()
    study = optuna.create_study(study_name=study_name, storage=st.open_storage(storage), load_if_exists=True,
                                direction="minimize", sampler=optuna.samplers.RandomSampler(seed=0))
    old = study.user_attrs.get("meta")
    if old is None:
        study.set_user_attr("meta", meta)
        return study
    same = lambda m: ({k: v for k, v in m["config"].items() if k not in _RUNTIME_KEYS}, m["units"])  # noqa: E731
    if same(old) != same(meta):
        a, b = same(old)[0], same(meta)[0]
        diff = next((f"{k}: stored {a.get(k)!r}, now {b.get(k)!r}" for k in b if a.get(k) != b.get(k)), "optimizers")
        raise ValueError(f"the storage {st.redact(storage)} holds a different comparison ({diff}); "
                         "use another --out (or --storage/--study), or --report-only to render it")
    return study


def _coordinate(study: Any, url: str, study_name: str, meta: dict[str, Any], units: list[st.Unit],
                budget: int | None, seeds: int, jobs: int, dev: torch.device, tasks: dict[str, Task],
                progress: Progress) -> None:
    """Enqueue the plan, run it (here or in workers), plan round 2 when round 1 is in; until done."""
    optuna = st._optuna()
    if not st.is_server_url(url):
        # a journal is used by one coordinator at a time (the CLI holds the folder's lock): a
        # trial still RUNNING belongs to a run that was interrupted, so it is lost and rerun
        for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
            study.tell(t.number, state=optuna.trial.TrialState.FAIL, skip_if_finished=True)
    study.set_user_attr("finished", False)
    tmeta = meta["tasks"]
    r1 = {u: st.round1_points(u, budget) for u in units}
    r2: dict[st.Unit, list[st.Point]] = {}
    needs_r2 = {u for u in units if budget and u.space and u.grid is None and st.reserved(budget)}

    def desired() -> list[tuple[st.Unit, st.Point, int]]:
        out = [(u, p, s) for u in units for p in r1[u] + r2.get(u, []) for s in range(seeds)]
        # round-robin over tasks (then optimizers): every task's step cost is measured early
        # for the ETA, and long and short tasks interleave across the workers
        topt = {lab: i for i, lab in enumerate(meta["config"]["optimizers"])}
        ttask = {n: i for i, n in enumerate(meta["config"]["tasks"])}
        out.sort(key=lambda x: (x[1].round, x[1].index, x[2], topt[x[0].optimizer], ttask[x[0].task]))
        return out

    eta = Eta(max(1, jobs))
    by_key = st.index_trials(study.get_trials(deepcopy=False))
    for u in units:
        left = _n_points(u, budget) * seeds - sum(
            1 for k, ts in by_key.items() if k.startswith(f"{u.task}|{u.optimizer}|") and st.settled(ts))
        eta.plan(u.task, max(0, left) * tmeta[u.task]["steps"])
    total = sum(eta.planned.values())
    state = {"desc": "", "step": 0, "steps": 0, "loss": None}
    descs: dict[str, tuple[str, int]] = {}

    def on_event(ev: tuple) -> None:
        kind, key = ev[0], ev[1]
        if kind == "start":
            eta.start(key, ev[2])
            descs[key] = (ev[4], ev[3])
            state.update(desc=ev[4], step=0, steps=ev[3], loss=None)
        elif kind == "step":
            eta.step(key, ev[2])
            d = descs.get(key, ("", 0))
            state.update(desc=d[0], step=ev[2], steps=d[1], loss=ev[3])
        elif kind == "end":
            eta.end(key, ev[3])
            if ev[4] == "FAIL":
                where = f" (at {ev[6]})" if ev[6] else ""
                progress.note(f"{descs.get(key, (key,))[0]}: failed: {ev[5]}{where}")
        progress.update(state["desc"], state["step"], state["steps"], state["loss"], sum(eta.done.values()),
                        eta.seconds_left())

    cache = st.TaskCache(meta, dev, tasks)
    procs, queue, done = [], None, None
    progress.start(total)
    try:
        while True:
            if st.is_server_url(url):
                optuna.storages.fail_stale_trials(study)
            by_key = st.index_trials(study.get_trials(deepcopy=False))
            for u in needs_r2 - set(r2):
                pts = unit_points(u, by_key, seeds)
                if all(i in pts and all(t is not None for t in pts[i]["trials"]) for i in range(len(r1[u]))):
                    scores = point_scores({i: pts[i] for i in range(len(r1[u]))})
                    r2[u] = st.round2_points(u, budget, scores)
            want = desired()
            for u, p, s in want:
                k = st.key_of(u.task, u.optimizer, p.index, s)
                ts = by_key.get(k, [])
                if st.settled(ts) is None and not any(st.trial_state(t) in ("RUNNING", "WAITING") for t in ts):
                    study.enqueue_trial({k2: v for k2, v in p.params.items()}, user_attrs={
                        "key": k, "task": u.task, "optimizer": u.optimizer, "point": p.index, "seed": s,
                        "round": p.round, "params": p.params, "bounds": {q: list(b) for q, b in p.bounds.items()}})
            by_key = st.index_trials(study.get_trials(deepcopy=False))
            if all(st.settled(by_key.get(st.key_of(u.task, u.optimizer, p.index, s), [])) is not None
                   for u, p, s in want) and needs_r2 <= set(r2):
                break
            if jobs == 1:
                st.work(study, cache, lambda: True, on_event)
            elif jobs >= 2:
                if not procs:
                    procs, queue, done = st.start_workers(jobs, url, study_name, meta, str(dev), tasks)
                _drain(queue, on_event, 0.3)
                dead = [p.exitcode for p in procs if not p.is_alive()]
                if dead:  # killed or crashed: its trial would stay RUNNING and this loop would wait forever
                    raise RuntimeError(f"a worker process exited (exit code {dead[0]}) before the comparison finished; "
                                       "run the same command again to continue")
            else:
                time.sleep(1.0)
                n_set = sum(1 for ts in by_key.values() if st.settled(ts) is not None)
                progress.update(f"waiting for workers: {n_set}/{meta['planned']} trials", 0, 0, None,
                                0, None)
        study.set_user_attr("finished", True)
    finally:
        if done is not None:
            done.set()
            for p in procs:
                p.join(timeout=10)
                if p.is_alive():
                    p.terminate()
        progress.stop()


def _drain(queue: Any, handler: Any, timeout: float) -> None:
    import queue as q

    end = time.perf_counter() + timeout
    while True:
        left = end - time.perf_counter()
        try:
            ev = queue.get(timeout=max(0.01, left))
        except q.Empty:
            return
        handler(ev)
        if time.perf_counter() > end:
            return


def _version() -> str:
    from .. import __version__

    return __version__

