"""A comparison as an Optuna study: the plan of trials, the storage, and the processes that run them.

Shape (docs/compare.md, "How a comparison runs"): every (task, optimizer, point, seed) is one
Optuna trial of one study. The coordinator (the ``optimkit compare`` process) *enqueues* every
trial with fixed hyperparameters (``Study.enqueue_trial``), in a fixed order; workers (local
processes from ``--jobs``, or ``optimkit compare --worker`` on other machines) take waiting
trials with ``Study.ask()`` and report with ``Study.tell()``. Because hyperparameters are fixed
when a trial is enqueued, never when it is taken, the numbers do not depend on how many
workers ran or in which order trials finished.

Points: point 0 is the optimizer's default setting. ``--budget N`` adds N points of the
registry's search space drawn by Optuna's ``QMCSampler`` (scrambled Sobol, seeded: the same
relative positions for every optimizer, so no optimizer gets luckier draws): the first
``N - E`` points in round 1, and ``E = N // 4`` reserved points in round 2, planned once
round 1 is complete. If round 1's best point is the lowest (highest) value tried of a
dimension, round 2 searches past that edge (up to half the range's log-width further);
otherwise it continues the Sobol sequence in the original range. Every optimizer gets exactly
N trials either way. ``--lr-sweep`` is the same with a fixed grid ``lr x {0.1, 0.3, 1, 3, 10}``
(point 0 = x1) and no second round.

Storages: the default is Optuna's ``JournalStorage`` over a ``JournalFileBackend`` in the
report folder (``study.journal``): an append-only log written under a file lock, which Optuna
recommends for several processes on one machine (SQLite serialises writers with a database lock
that concurrent workers hit as "database is locked"), and which a crash can at most leave with a
half-written last line that replay ignores. ``--storage postgresql://...`` uses Optuna's
``RDBStorage`` with a heartbeat, so trials of a worker that died are failed and re-enqueued.
"""

from __future__ import annotations

import functools
import json
import math
import os
import socket
import threading
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

STUDY_NAME = "optimkit-compare"
JOURNAL_FILE = "study.journal"
HEARTBEAT_S = 10
GRACE_S = 60
#: ``lr x`` these factors in ``--lr-sweep``
LR_SWEEP_FACTORS: tuple[float, ...] = (0.1, 0.3, 1.0, 3.0, 10.0)


def _optuna() -> Any:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed")
    return optuna


# ----------------------------------------------------------------------------- storage
def is_server_url(url: str) -> bool:
    """A database URL (PostgreSQL, MySQL, SQLite) rather than a journal file path."""
    return "://" in url


def open_storage(url: str) -> Any:
    """Optuna storage for ``url``: a database URL (RDBStorage with heartbeat) or a journal file."""
    optuna = _optuna()
    if is_server_url(url):
        import sqlalchemy.exc

        for attempt in range(6):
            try:
                return optuna.storages.RDBStorage(url, heartbeat_interval=HEARTBEAT_S, grace_period=GRACE_S)
            except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError):
                # processes that open a fresh database at once race to create Optuna's tables;
                # the loser sees a duplicate key: the tables exist now, so try again
                if attempt == 5:
                    raise
                time.sleep(0.2 * (attempt + 1))
    from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock

    path = url.removeprefix("journal:")
    # the open-lock (O_EXCL lock file) works on every local file system; the default symlink
    # lock does not on some mounted ones
    return optuna.storages.JournalStorage(JournalFileBackend(path, lock_obj=JournalFileOpenLock(path)))


def redact(url: str) -> str:
    """The URL without its password (stored in results.json and printed)."""
    if "://" in url and "@" in url:
        head, rest = url.split("://", 1)
        cred, host = rest.rsplit("@", 1)
        return f"{head}://{cred.split(':', 1)[0]}:***@{host}" if ":" in cred else url
    return url


# ----------------------------------------------------------------------------- plan
@dataclass(frozen=True)
class Unit:
    """One (task, optimizer) of the plan; JSON round-trips through the study's meta."""

    task: str
    optimizer: str  # the label = the spec as written: re-parsed by workers
    name: str
    lr: float | None
    space: tuple[tuple[str, float, float], ...]  # (param, low, high), log-uniform
    grid: tuple[float, ...] | None = None  # --lr-sweep: lr factors, point 0 = factor 1

    @staticmethod
    def from_json(d: dict[str, Any]) -> Unit:
        return Unit(d["task"], d["optimizer"], d["name"], d["lr"], tuple(tuple(s) for s in d["space"]),
                    tuple(d["grid"]) if d.get("grid") else None)


def key_of(task: str, optimizer: str, point: int, seed: int) -> str:
    return f"{task}|{optimizer}|{point}|{seed}"


@dataclass(frozen=True)
class Point:
    index: int
    round: int
    params: dict[str, float]  # tuned values ({} = default)
    bounds: dict[str, tuple[float, float]]


@functools.lru_cache(maxsize=32)
def unit_cube_points(n: int, dims: int, seed: int = 0) -> tuple[tuple[float, ...], ...]:
    """``n`` points of Optuna's scrambled-Sobol ``QMCSampler`` in [0, 1]^dims (deterministic)."""
    optuna = _optuna()
    study = optuna.create_study(sampler=optuna.samplers.QMCSampler(qmc_type="sobol", scramble=True, seed=seed))
    dist = {f"u{i}": optuna.distributions.FloatDistribution(0.0, 1.0) for i in range(dims)}
    out = []
    for _ in range(n):
        t = study.ask(dist)
        out.append(tuple(t.params[f"u{i}"] for i in range(dims)))
        study.tell(t, 0.0)
    return tuple(out)


def _scale(u: float, lo: float, hi: float) -> float:
    return math.exp(math.log(lo) + u * (math.log(hi) - math.log(lo)))


def reserved(budget: int) -> int:
    """Trials of a budget held back for round 2 (0 below 4: too few to spare)."""
    return budget // 4 if budget >= 4 else 0


def round1_points(unit: Unit, budget: int | None) -> list[Point]:
    """Point 0 (default) and the points that need no result to be planned."""
    pts = [Point(0, 1, {}, {})]
    if unit.grid is not None and unit.lr is not None:
        lo, hi = unit.lr * min(unit.grid), unit.lr * max(unit.grid)
        others = [f for f in unit.grid if f != 1.0]
        pts += [Point(i + 1, 1, {"lr": unit.lr * f}, {"lr": (lo, hi)}) for i, f in enumerate(others)]
        return pts
    if not budget or not unit.space:
        return pts
    n1 = budget - reserved(budget)
    cube = unit_cube_points(budget, len(unit.space))
    for i in range(n1):
        pts.append(Point(i + 1, 1, {p: _scale(u, lo, hi) for (p, lo, hi), u in zip(unit.space, cube[i])},
                         {p: (lo, hi) for p, lo, hi in unit.space}))
    return pts


def edge_of(values: list[float], best: float) -> str | None:
    """``"low"``/``"high"`` when ``best`` is the lowest/highest of >= 3 distinct values tried."""
    distinct = sorted(set(values))
    if len(distinct) < 3:
        return None
    if best <= distinct[0]:
        return "low"
    if best >= distinct[-1]:
        return "high"
    return None


def round2_points(unit: Unit, budget: int, scores: dict[int, tuple[dict[str, float], float | None]]) -> list[Point]:
    """The reserved points, from round 1's results ``{point: (params, mean val loss or None)}``."""
    e = reserved(budget)
    if not e or not unit.space or unit.grid is not None:
        return []
    tuned = {i: s for i, s in scores.items() if i > 0}
    finite = {i: s for i, s in tuned.items() if s[1] is not None}
    cube = unit_cube_points(budget, len(unit.space))[budget - e:]
    bounds = {p: (lo, hi) for p, lo, hi in unit.space}
    if finite:
        best = min(finite, key=lambda i: (finite[i][1], i))
        for p, lo, hi in unit.space:
            # every value tried counts, diverged ones too: a higher lr that diverged brackets the optimum
            tried = [s[0][p] for s in tuned.values()]
            side = edge_of(tried, finite[best][0][p])
            if side:
                reach = math.sqrt(hi / lo)  # half the range's log-width past the edge
                bounds[p] = (min(tried) / reach, min(tried)) if side == "low" else (max(tried), max(tried) * reach)
                break  # one dimension is extended; the others keep their range
    start = budget - e + 1
    return [Point(start + k, 2, {p: _scale(u, *bounds[p]) for (p, _, _), u in zip(unit.space, cube[k])},
                  dict(bounds)) for k in range(e)]


# ----------------------------------------------------------------------------- trials
def trial_state(t: Any) -> str:
    """COMPLETE / FAIL (a real failure: the run raised) / LOST (interrupted, stale) / RUNNING / WAITING."""
    s = t.state.name
    if s == "FAIL" and "error" not in t.user_attrs:
        return "LOST"
    return s


def index_trials(trials: Iterable[Any]) -> dict[str, list[Any]]:
    """key -> trials with that key (placeholders without a key dropped), by trial number."""
    out: dict[str, list[Any]] = {}
    for t in sorted(trials, key=lambda t: t.number):
        k = t.user_attrs.get("key")
        if k:
            out.setdefault(k, []).append(t)
    return out


def settled(ts: list[Any]) -> Any | None:
    """The trial that stands for a key: the first COMPLETE one, else the first real failure."""
    for want in ("COMPLETE", "FAIL"):
        for t in ts:
            if trial_state(t) == want:
                return t
    return None


# ----------------------------------------------------------------------------- workers
Events = Callable[[tuple], None]


class _Heartbeat:
    """Records the heartbeat of a running trial (RDB storages) from a thread."""

    def __init__(self, storage: Any, trial_id: int) -> None:
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if getattr(storage, "get_heartbeat_interval", lambda: None)():
            storage.record_heartbeat(trial_id)

            def beat() -> None:
                while not self._stop.wait(HEARTBEAT_S):
                    try:
                        storage.record_heartbeat(trial_id)
                    except Exception:  # noqa: BLE001 - a missed beat only risks a rerun
                        pass

            self._thread = threading.Thread(target=beat, daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()


class TaskCache:
    """Tasks (and their data on the device) built once per process, from the meta's specs."""

    def __init__(self, meta: dict[str, Any], device: Any, prebuilt: dict[str, Any] | None = None) -> None:
        self.meta, self.device, self._tasks = meta, device, dict(prebuilt or {})
        self._data: dict[str, Any] = {}
        self._choices: dict[str, Any] = {}

    def task(self, name: str) -> tuple[Any, Any]:
        from .tasks import build_task
        from .trial import _to

        if name not in self._tasks:
            spec = self.meta["tasks"][name]["spec"]
            self._tasks[name] = build_task(spec, quick=self.meta["config"]["quick"])
        if name not in self._data:
            t = self._tasks[name]
            self._data[name] = (_to(t.train_data, self.device), _to(t.val_data, self.device))
        return self._tasks[name], self._data[name]

    def choice(self, label: str) -> Any:
        from .runner import parse_optimizer_choice

        if label not in self._choices:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self._choices[label] = parse_optimizer_choice(label)
        return self._choices[label]


def run_one_trial(study: Any, trial: Any, cache: TaskCache, events: Events | None, worker: str) -> None:
    """Run an enqueued trial and tell the study its outcome (the record goes to user attrs)."""
    from .trial import run_trial, user_frame

    a = trial.user_attrs
    for p, (lo, hi) in a.get("bounds", {}).items():
        trial.suggest_float(p, lo, hi, log=True)  # registers the enqueued value as the trial's param
    task, data = cache.task(a["task"])
    choice = cache.choice(a["optimizer"])
    tmeta = cache.meta["tasks"][a["task"]]
    params = dict(a.get("params", {}))
    lr = params.pop("lr", choice.lr)
    args = {**choice.args, **params}
    trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
    key = a["key"]
    if events:
        events(("start", key, a["task"], tmeta["steps"], _describe(a, lr)))
    beat = _Heartbeat(study._storage, trial._trial_id)
    t0 = time.perf_counter()
    try:
        rec = run_trial(task, choice.name, lr, args, a["seed"], tmeta["steps"], tmeta["eval_every"], cache.device,
                        data, (lambda s, l: events(("step", key, s, l))) if events else None)
    except NotImplementedError as e:
        trial.set_user_attr("error", f"not implemented: {e}")
        trial.set_user_attr("skipped", True)
        state, value = "FAIL", None
    except Exception as e:  # noqa: BLE001 - recorded with where it happened; the race goes on
        trial.set_user_attr("error", f"{type(e).__name__}: {e}".splitlines()[0])
        trial.set_user_attr("where", user_frame(e))
        state, value = "FAIL", None
    else:
        trial.set_user_attr("run", rec)
        last = [v for v in rec["val_loss"] if math.isfinite(v)]
        value = last[-1] if last and not rec["diverged"] else float("inf")
        state = "COMPLETE"
    finally:
        beat.stop()
    trial.set_user_attr("duration_s", time.perf_counter() - t0)
    err = trial.user_attrs.get("error") if state == "FAIL" else None
    where = trial.user_attrs.get("where") if state == "FAIL" else None
    optuna = _optuna()
    if state == "COMPLETE":
        study.tell(trial, value)
    else:
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
    if events:
        events(("end", key, a["task"], tmeta["steps"], state, err, where))


def _describe(a: dict[str, Any], lr: float | None) -> str:
    tuned = ", ".join(f"{k}={v:.3g}" for k, v in a.get("params", {}).items())
    what = tuned or (f"lr={lr:.3g}" if lr is not None else "default")
    return f"{a['task']} · {a['optimizer']} {what} s{a['seed']}"


def work(study: Any, cache: TaskCache, stop: Callable[[], bool], events: Events | None = None,
         poll_s: float = 0.2) -> int:
    """Take waiting trials until none is left and ``stop()`` says so; return how many ran."""
    optuna = _optuna()
    waiting = (optuna.trial.TrialState.WAITING,)
    worker = f"{socket.gethostname()}:{os.getpid()}"
    n = 0
    while True:
        if not study.get_trials(deepcopy=False, states=waiting):
            if stop():
                return n
            time.sleep(poll_s)
            continue
        trial = study.ask()
        if "key" not in trial.user_attrs:  # another worker took the last waiting trial first
            trial.set_user_attr("placeholder", True)
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            continue
        try:
            run_one_trial(study, trial, cache, events, worker)
        except KeyboardInterrupt:
            # left RUNNING would block a resume until it is found stale: mark it lost now
            try:
                study.tell(trial, state=optuna.trial.TrialState.FAIL, skip_if_finished=True)
            finally:
                raise
        n += 1


def _worker_process(url: str, study_name: str, meta: dict[str, Any], device: str, queue: Any, done: Any) -> None:
    """Entry point of a local worker process (``--jobs``)."""
    import torch

    torch.set_num_threads(1)  # one thread per worker: the workers are the parallelism
    try:
        optuna = _optuna()
        study = load(study_name, open_storage(url))
        cache = TaskCache(meta, torch.device(device), _INHERITED_TASKS)
        work(study, cache, done.is_set, queue.put)
    except KeyboardInterrupt:
        pass


#: tasks built by the coordinator, inherited by forked workers (spawned workers rebuild them)
_INHERITED_TASKS: dict[str, Any] = {}


def start_workers(n: int, url: str, study_name: str, meta: dict[str, Any], device: str,
                  tasks: dict[str, Any]) -> tuple[list[Any], Any, Any]:
    """Start ``n`` worker processes; returns (processes, event queue, done event)."""
    import multiprocessing as mp

    # fork where it exists: the workers inherit the imported modules and the built tasks
    # (importing torch and building the docstring task costs ~10 s per process otherwise);
    # each worker sets one torch thread before any op, so no OpenMP pool crosses the fork
    # (an accelerator's runtime does not survive a fork: spawn for anything but the CPU)
    fork = "fork" in mp.get_all_start_methods() and device == "cpu"
    ctx = mp.get_context("fork" if fork else "spawn")
    _INHERITED_TASKS.clear()
    _INHERITED_TASKS.update(tasks)
    queue, done = ctx.Queue(), ctx.Event()
    procs = [ctx.Process(target=_worker_process, args=(url, study_name, meta, device, queue, done), daemon=True)
             for _ in range(n)]
    for p in procs:
        p.start()
    return procs, queue, done


def load(study_name: str, storage: Any) -> Any:
    """Load a comparison's study with a sampler that never runs: every trial is enqueued fixed."""
    optuna = _optuna()
    return optuna.load_study(study_name=study_name, storage=storage, sampler=optuna.samplers.RandomSampler(seed=0))


def meta_json(meta: dict[str, Any]) -> dict[str, Any]:
    """The meta as it reads back from storage (tuples become lists)."""
    return json.loads(json.dumps(meta))


def units_json(units: list[Unit]) -> list[dict[str, Any]]:
    return [asdict(u) for u in units]


def lock_folder(folder: Path) -> Any:
    """An exclusive lock on ``folder/.lock`` held while this process coordinates the study."""
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks; one coordinator per folder is then up to you
        return None
    folder.mkdir(parents=True, exist_ok=True)
    f = open(folder / ".lock", "w")  # noqa: SIM115 - held open for the process's lifetime
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.close()
        raise ValueError(f"another optimkit compare is running on {folder}") from None
    return f
