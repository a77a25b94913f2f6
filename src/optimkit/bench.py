r"""Step-time benchmark: optimkit's implementations against torch.optim and prodigyopt.

An optimizer step reads and writes every parameter, gradient and state buffer once, so it
is bound by memory bandwidth. This module measures, in one run:

* the machine's bandwidth ceiling: the best of several in-place probes over a large tensor,
  each timed in windows alongside the optimizers (:data:`PROBES`: a copy counting 8 B per
  element, a triad ``p.add_(g, alpha=...)`` and torch's fused SGD without momentum, each
  counting 12 B per element: read p and g, write p);
* for each optimizer and each implementation (optimkit's default, per-tensor reference,
  foreach, fused and flat paths; torch.optim's for-loop, foreach and fused paths;
  ``prodigyopt``), the milliseconds of one ``opt.step()`` on fixed parameter sets;

and reports each as ms/step (median over windows, with the min-max spread), the ratio to the
anchor (torch's fastest implementation of the same algorithm, ``prodigyopt`` for Prodigy)
and the fraction of the bandwidth floor::

    floor_ms = bytes_per_param * n_params / ceiling        (DESIGN.md section 4)
    fraction = floor_ms / measured_ms

Method (heavyball-style): every measured call is a single ``opt.step()``; steps are timed
in windows; within one algorithm all candidates (and one window of each probe) take turns,
in an order that alternates direction every repetition, so drift in the machine's load hits
all of them alike. Every candidate starts its cold step, its warm-up and every window from
the same gradients: they are restored from a pristine copy (values, and ``p.grad`` pointing
at the original tensor) outside the timer, and checked after each of its windows; a candidate
that changed them (in place, or by replacing ``p.grad``) is reported in its row's note. The
ceiling used for an algorithm's floor is the best probe median of the windows taken in turn
with that algorithm's candidates, so a change in the machine's load moves the floor with it.
The first step (state allocation, compilation) is reported separately as "cold".

``--contention`` (:mod:`optimkit.bench_contention`) times every optimizer's default step
against torch.optim's default on an idle machine and with one background process running
2-thread matmuls. Printing and the issue's targets are in :mod:`optimkit.bench_report`.

Entry point: :func:`main` (``optimkit bench``, ``benchmarks/step_time.py``; the command line is
:mod:`optimkit.bench_cli`).
"""

from __future__ import annotations

import contextlib
import copy
import datetime as _dt
import gc
import io
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

import optimkit
from . import _torch_compat as tc

# ------------------------------------------------------------------------------- algorithms
#: minimal bytes each algorithm must move per fp32 parameter per step (DESIGN.md section 4)
BYTES_PER_PARAM: dict[str, int] = {
    "sgd": 12,
    "sgd_momentum": 20,
    "sgd_nesterov": 20,
    "adagrad": 20,
    "rmsprop": 20,
    "adam": 28,
    "adamw": 28,
    "radam": 28,
    "adadelta": 28,
    "prodigy": 52,
}

#: display names
TITLES: dict[str, str] = {
    "sgd": "SGD",
    "sgd_momentum": "SGD momentum",
    "sgd_nesterov": "SGD nesterov",
    "adagrad": "Adagrad",
    "rmsprop": "RMSprop",
    "adam": "Adam",
    "adamw": "AdamW",
    "radam": "RAdam",
    "adadelta": "Adadelta",
    "prodigy": "Prodigy",
}

# (optimkit class name, torch.optim class name or None, hyperparameters shared by both)
_ALGO_SPECS: dict[str, tuple[str, str | None, dict[str, Any]]] = {
    "sgd": ("SGD", "SGD", dict(lr=1e-3)),
    "sgd_momentum": ("SGD", "SGD", dict(lr=1e-3, momentum=0.9)),
    "sgd_nesterov": ("SGD", "SGD", dict(lr=1e-3, momentum=0.9, nesterov=True)),
    "adagrad": ("Adagrad", "Adagrad", dict(lr=1e-2)),
    "rmsprop": ("RMSprop", "RMSprop", dict(lr=1e-2)),
    "adam": ("Adam", "Adam", dict(lr=1e-3)),
    "adamw": ("AdamW", "AdamW", dict(lr=1e-3, weight_decay=1e-2)),
    "radam": ("RAdam", "RAdam", dict(lr=1e-3)),
    "adadelta": ("Adadelta", "Adadelta", dict(lr=1.0)),
    "prodigy": ("Prodigy", None, dict(lr=1.0)),
}

ALGORITHMS: tuple[str, ...] = tuple(_ALGO_SPECS)


#: algorithms whose state diverges under a fixed gradient, with the most steps a window may
#: take before the state is restored. Prodigy's d grows geometrically when the gradient never
#: changes (measured: fp32 overflow after ~40-55 steps from d0=1e-6), so every window starts
#: from the state snapshotted after warm-up, with the parameters reset.
_RESTORE_EACH_WINDOW: dict[str, int] = {"prodigy": 16}


@dataclass
class Candidate:
    """One implementation of one algorithm: how to build it and how to label it."""

    algo: str
    library: str  # "optimkit" | "torch" | "prodigyopt"
    impl: str  # "default" | "reference" | "foreach" | "fused" | "flat" | "flat+compiled" | "for-loop"
    build: Callable[[list[Tensor]], torch.optim.Optimizer]
    slow: bool = False  # a per-tensor Python loop: fewer repetitions
    anchor: bool = False  # eligible as the anchor (torch.optim / prodigyopt)

    @property
    def label(self) -> str:
        return self.library if self.library == "prodigyopt" else f"{self.library} {self.impl}"


def _has_fused(cls: type) -> bool:
    return bool(getattr(cls, "_has_fused", False))


def _torch_has_fused(cls: type) -> bool:
    import inspect

    return "fused" in inspect.signature(cls.__init__).parameters


def candidates_for(algo: str, compiled: bool = False, defaults_only: bool = False) -> list[Candidate]:
    """Every implementation of ``algo`` the benchmark compares, optimkit's first.

    ``defaults_only``: just each library's default (no ``foreach``/``fused`` flag: what a
    user gets; torch.optim's default on CPU is its for-loop), as the contention scenario
    compares them."""
    ok_name, torch_name, hp = _ALGO_SPECS[algo]
    ok_cls = getattr(optimkit, ok_name)
    out: list[Candidate] = []

    def ok(flags: dict[str, Any]) -> Callable[[list[Tensor]], torch.optim.Optimizer]:
        return lambda ps: ok_cls(ps, **hp, **flags)

    out.append(Candidate(algo, "optimkit", "default", ok({})))
    if not defaults_only:
        out.append(Candidate(algo, "optimkit", "reference", ok(dict(foreach=False)), slow=True))
        out.append(Candidate(algo, "optimkit", "foreach", ok(dict(foreach=True))))
        if _has_fused(ok_cls):
            out.append(Candidate(algo, "optimkit", "fused", ok(dict(fused=True))))
        # flat=True over this set's parameters and gradients (already views of one buffer
        # each, as a flat-parameter trainer keeps them, so nothing is copied)
        out.append(Candidate(algo, "optimkit", "flat", ok(dict(flat=True))))
        if compiled and getattr(ok_cls, "_has_compiled", False):
            # opt-in (compile=True): torch.compile'd single-pass kernels; the first step compiles
            out.append(Candidate(algo, "optimkit", "flat+compiled", ok(dict(flat=True, compile=True))))
    if torch_name is not None:
        t_cls = getattr(torch.optim, torch_name)

        def th(flags: dict[str, Any]) -> Callable[[list[Tensor]], torch.optim.Optimizer]:
            return lambda ps: t_cls(ps, **hp, **flags)

        if defaults_only:
            out.append(Candidate(algo, "torch", "default", th({}), anchor=True))
            return out
        out.append(Candidate(algo, "torch", "for-loop", th(dict(foreach=False)), slow=True, anchor=True))
        out.append(Candidate(algo, "torch", "foreach", th(dict(foreach=True)), anchor=True))
        if _torch_has_fused(t_cls):
            out.append(Candidate(algo, "torch", "fused", th(dict(fused=True)), anchor=True))
    else:  # Prodigy: the reference implementation is the prodigyopt package

        def prodigyopt_build(ps: list[Tensor]) -> torch.optim.Optimizer:
            import prodigyopt

            # prodigyopt prints from its constructor; keep the benchmark's output a table.
            with contextlib.redirect_stdout(io.StringIO()):
                return prodigyopt.Prodigy(ps, **hp)

        out.append(Candidate(algo, "prodigyopt", "default" if defaults_only else "for-loop",
                             prodigyopt_build, anchor=True))
    return out


# ----------------------------------------------------------------------------- param sets
def transformer_shapes(d: int, layers: int, vocab: int, ctx: int) -> list[tuple[int, ...]]:
    """Parameter shapes of a GPT-like encoder: embeddings, per layer attention + MLP + 2 norms."""
    shapes: list[tuple[int, ...]] = [(vocab, d), (ctx, d)]
    for _ in range(layers):
        shapes += [
            (d,), (d,),  # norm 1
            (3 * d, d), (3 * d,),  # qkv projection
            (d, d), (d,),  # attention output
            (d,), (d,),  # norm 2
            (4 * d, d), (4 * d,),  # MLP up
            (d, 4 * d), (d,),  # MLP down
        ]
    shapes += [(d,), (d,)]  # final norm
    return shapes


def small_shapes(pairs: int, scale: int = 32) -> list[tuple[int, ...]]:
    """Many small tensors: ``pairs`` (matrix, vector) pairs of varied sizes."""
    shapes: list[tuple[int, ...]] = []
    for i in range(pairs):
        shapes.append((scale, scale + i % (scale + 1)))
        shapes.append((int(12.5 * scale) + i % (4 * scale + 1),))
    return shapes


def mlp_shapes(widths: Sequence[int] = (64, 128, 128, 10)) -> list[tuple[int, ...]]:
    """The parameters of an MLP of ``nn.Linear`` layers: (out, in) weight, (out,) bias each."""
    shapes: list[tuple[int, ...]] = []
    for n_in, n_out in zip(widths[:-1], widths[1:]):
        shapes += [(n_out, n_in), (n_out,)]
    return shapes


def param_set_shapes(name: str, quick: bool = False) -> list[tuple[int, ...]]:
    """The shapes of a named parameter set (``transformer``, ``small`` or ``mlp``)."""
    if name == "transformer":
        # full: 25.3M float32 parameters in 148 tensors
        return transformer_shapes(16, 1, 64, 8) if quick else transformer_shapes(384, 12, 10000, 512)
    if name == "small":
        # full: 2.0M float32 parameters in 2000 tensors
        return small_shapes(8, scale=4) if quick else small_shapes(1000)
    if name == "mlp":
        # 26,122 parameters in 6 tensors (64-128-128-10), tiny already: the same with --quick
        return mlp_shapes()
    raise ValueError(f"bench: unknown parameter set {name!r}; expected one of {', '.join(SETS)}")


SETS: tuple[str, ...] = ("transformer", "small", "mlp")
#: the sets a plain run measures (``--sets`` default)
DEFAULT_SETS: tuple[str, ...] = ("transformer", "small")


@dataclass
class ParamSet:
    """Parameters that are views of one flat buffer, fixed gradients, and pristine copies."""

    name: str
    params: list[Tensor]
    flat: Tensor
    init: Tensor
    grad_flat: Tensor
    grad_init: Tensor  # the gradients' values every window starts from (never stepped on)
    grad_views: list[Tensor]  # the tensors each p.grad must be (candidates may replace them)

    @property
    def numel(self) -> int:
        return self.flat.numel()

    @classmethod
    def build(cls, name: str, shapes: Sequence[tuple[int, ...]], seed: int = 0) -> ParamSet:
        gen = torch.Generator().manual_seed(seed)
        n = sum(_numel(s) for s in shapes)
        init = torch.randn(n, generator=gen).mul_(0.02)
        grad_init = torch.randn(n, generator=gen).mul_(1e-2)
        flat = init.clone()
        grad_flat = grad_init.clone()
        params: list[Tensor] = []
        views: list[Tensor] = []
        off = 0
        # Views of one buffer: the realistic layout for large tensors (each its own
        # allocation either way) and what a flat-buffer implementation needs; torch.optim's
        # paths see ordinary contiguous parameters.
        for s in shapes:
            k = _numel(s)
            p = torch.nn.Parameter(flat[off : off + k].view(s))
            p.grad = grad_flat[off : off + k].view(s)
            params.append(p)
            views.append(p.grad)
            off += k
        return cls(name, params, flat, init, grad_flat, grad_init, views)

    def reset(self) -> None:
        """Restore the initial parameter values (each algorithm starts from the same point)."""
        self.flat.copy_(self.init)

    def restore_grads(self) -> None:
        """Every ``p.grad`` back to the original tensor, holding the original values."""
        self.grad_flat.copy_(self.grad_init)
        for p, g in zip(self.params, self.grad_views):
            if p.grad is not g:
                p.grad = g

    def grads_changed(self) -> str:
        """What a step did to the gradients: "" (nothing), "replaces p.grad" (a ``p.grad`` is
        no longer the tensor it was given) or "changes p.grad" (values written in place)."""
        if any(p.grad is not g for p, g in zip(self.params, self.grad_views)):
            return "replaces p.grad"
        if not torch.equal(self.grad_flat, self.grad_init):
            return "changes p.grad"
        return ""


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


# ------------------------------------------------------------------------- the ceiling
#: in-place probes of the bandwidth ceiling: name -> bytes moved per element
PROBES: dict[str, int] = {"copy": 8, "triad": 12, "fused_sgd": 12}


class _Ceiling:
    """The machine's bandwidth ceiling: the best of several in-place probes over a large
    tensor, each timed in windows (bytes read + written per second; a destination that is
    only written counts once: its write-allocate read is not useful traffic).

    * ``copy``: ``dst.copy_(src)``, 8 B/element;
    * ``triad``: ``dst.add_(src, alpha=1e-3)``, 12 B/element (what an SGD step does);
    * ``fused_sgd``: torch's fused SGD kernel without momentum on ``dst`` with gradient
      ``src``, 12 B/element: the fastest single-pass kernel torch has.

    A single-pass optimizer kernel cannot beat the best of them by much, so floor fractions
    stay at or below ~100% (a copy alone under-estimates the ceiling: write-allocate)."""

    def __init__(self, floats: int) -> None:
        self.src = torch.empty(floats).uniform_()
        self.dst = torch.empty_like(self.src)
        self.dst.copy_(self.src)  # fault the pages in before timing
        self.windows: dict[str, list[float]] = {k: [] for k in PROBES}

    def _run(self, name: str) -> None:
        if name == "copy":
            self.dst.copy_(self.src)
        elif name == "triad":
            self.dst.add_(self.src, alpha=1e-3)
        else:
            tc.fused_sgd_([self.dst], [self.src], [], weight_decay=0.0, momentum=0.0, lr=1e-3,
                          dampening=0.0, nesterov=False, maximize=False, is_first_step=False,
                          grad_scale=None, found_inf=None)

    def window(self, calls: int = 3) -> None:
        """One timed window of each probe."""
        for name, bpe in PROBES.items():
            t0 = time.perf_counter()
            for _ in range(calls):
                self._run(name)
            dt = time.perf_counter() - t0
            self.windows[name].append(bpe * self.src.numel() * calls / dt / 1e9)
        # The triad and fused SGD change dst; keep its values bounded.
        self.dst.copy_(self.src)

    def medians(self, since: int = 0) -> dict[str, float]:
        """Median GB/s of each probe over its windows from index ``since`` on."""
        return {k: statistics.median(v[since:]) for k, v in self.windows.items() if v[since:]}

    @property
    def count(self) -> int:
        return len(self.windows["copy"])
# ------------------------------------------------------------------------------- measuring
@dataclass
class Config:
    sets: list[str]
    optimizers: list[str]
    repeats: int = 7
    warmup: int = 3
    ref_repeats: int = 3
    window_s: float = 0.1
    max_window_steps: int = 50
    bandwidth_floats: int = 64 * 2**20  # 256 MiB source, 256 MiB destination
    quick: bool = False
    compiled: bool = False
    cold_compile: bool = True
    seed: int = 0
    contention: bool = False
    contention_s: float = 1800.0  # the background process's own time limit


@dataclass
class _Run:
    cand: Candidate
    opt: Any = None
    status: str = "ok"
    reason: str = ""
    note: str = ""  # what the candidate did to the gradients, if anything
    cold_ms: float = float("nan")
    steps_per_window: int = 1
    window_ms: list[float] = field(default_factory=list)
    snapshot: Any = None


def _state_bytes(opt: Any) -> int:
    """Bytes of tensors in ``opt.state``, each underlying storage counted once."""
    seen: dict[int, int] = {}

    def visit(v: Any) -> None:
        if isinstance(v, Tensor):
            st = v.untyped_storage()
            seen[st.data_ptr() if st.data_ptr() else id(st)] = st.nbytes()
        elif isinstance(v, dict):
            for x in v.values():
                visit(x)
        elif isinstance(v, (list, tuple)):
            for x in v:
                visit(x)

    for s in opt.state.values():
        visit(s)
    return sum(seen.values())


def _snapshot(opt: Any) -> tuple[dict[int, dict[str, Any]], list[dict[str, Any]]]:
    """Copies of every state entry and every group hyperparameter (not the parameters)."""
    state = {
        id(p): {k: v.clone() if isinstance(v, Tensor) else copy.deepcopy(v) for k, v in s.items()}
        for p, s in opt.state.items()
    }
    groups = [{k: copy.deepcopy(v) for k, v in g.items() if k != "params"} for g in opt.param_groups]
    return state, groups


def _restore(opt: Any, snap: tuple[dict[int, dict[str, Any]], list[dict[str, Any]]]) -> None:
    """Put ``opt`` back to a :func:`_snapshot`, tensors in place (no new allocations)."""
    state, groups = snap
    for p, s in opt.state.items():
        for k, v in state.get(id(p), {}).items():
            live = s.get(k)
            if isinstance(v, Tensor) and isinstance(live, Tensor) and live.shape == v.shape:
                live.copy_(v)
            else:
                s[k] = v.clone() if isinstance(v, Tensor) else copy.deepcopy(v)
    for g, saved in zip(opt.param_groups, groups):
        g.update(copy.deepcopy(saved))


def _time_steps(opt: Any, k: int) -> float:
    t0 = time.perf_counter()
    for _ in range(k):
        opt.step()
    return time.perf_counter() - t0


def _fail(run: _Run, e: BaseException) -> None:
    run.status = "n/a" if isinstance(e, NotImplementedError) else "error"
    run.reason = f"{type(e).__name__}: {e}"  # whole: printed under the table
    run.opt = None


def _check_grads(run: _Run, pset: ParamSet) -> None:
    """Note (once) what ``run``'s steps did to the shared gradients."""
    what = pset.grads_changed()
    if what and not run.note:
        run.note = what


def _measure_algo(
    algo: str, pset: ParamSet, cfg: Config, ceiling: _Ceiling | None, log: Callable[[str], None],
    cands: list[Candidate] | None = None,
) -> list[_Run]:
    """Measure every candidate of ``algo`` (``cands``; default :func:`candidates_for`), with
    one window of each ceiling probe in every rotation when ``ceiling`` is given."""
    pset.reset()
    runs = [_Run(c) for c in (cands if cands is not None else candidates_for(algo, cfg.compiled))]
    restore_cap = _RESTORE_EACH_WINDOW.get(algo)
    # Cold first step, then warm-up and the window size, one candidate at a time; each from
    # the pristine gradients.
    for run in runs:
        try:
            pset.restore_grads()
            run.opt = run.cand.build(pset.params)
            t = _time_steps(run.opt, 1)
            run.cold_ms = 1e3 * t
            _check_grads(run, pset)
            pset.restore_grads()
            nwarm = min(cfg.warmup, 1) if run.cand.slow else cfg.warmup
            max_steps = cfg.max_window_steps
            if restore_cap is not None:
                nwarm, max_steps = min(nwarm, 3), min(max_steps, restore_cap)
            if nwarm > 0:
                t = _time_steps(run.opt, nwarm) / nwarm
                _check_grads(run, pset)
            run.steps_per_window = max(1, min(max_steps, int(cfg.window_s / max(t, 1e-6))))
            if restore_cap is not None:
                run.snapshot = _snapshot(run.opt)
        except Exception as e:  # noqa: BLE001 - a candidate that cannot run is reported, not fatal
            _fail(run, e)
            log(f"  {run.cand.label}: {run.status} ({run.reason.splitlines()[0][:160]})")
    live = [r for r in runs if r.status == "ok"]
    for rep in range(cfg.repeats):
        # Alternate direction each repetition so slow drift affects every candidate alike;
        # the probes take their turn in the same rotation.
        order: list[_Run | None] = [None, *live] if ceiling is not None else list(live)
        if rep % 2:
            order.reverse()
        for run in order:
            if run is None:
                assert ceiling is not None
                ceiling.window()
                continue
            if run.status != "ok" or (run.cand.slow and rep >= cfg.ref_repeats):
                continue
            try:
                # untimed: the same gradients (and for Prodigy the warm state) every window
                pset.restore_grads()
                if run.snapshot is not None:
                    pset.reset()
                    _restore(run.opt, run.snapshot)
                dt = _time_steps(run.opt, run.steps_per_window)
                run.window_ms.append(1e3 * dt / run.steps_per_window)
                _check_grads(run, pset)
            except Exception as e:  # noqa: BLE001
                _fail(run, e)
                log(f"  {run.cand.label}: {run.status} ({run.reason.splitlines()[0][:160]})")
    pset.restore_grads()
    return runs


@contextlib.contextmanager
def measuring(cfg: Config) -> Any:
    """The process settings of a measurement: denormals flushed (timings must not depend on
    the data) and, for compiled rows, a fresh inductor cache (their cold time is then a
    first-ever compile); both restored on exit."""
    torch.set_flush_denormal(True)
    old_cache = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    fresh = cfg.compiled and cfg.cold_compile
    if fresh:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="optimkit-bench-inductor-")
    try:
        yield
    finally:
        # torch has no getter for this flag (the setter returns whether it is supported),
        # and its default is off: restore off.
        torch.set_flush_denormal(False)
        if fresh:
            if old_cache is None:
                os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)
            else:
                os.environ["TORCHINDUCTOR_CACHE_DIR"] = old_cache


def run_benchmark(cfg: Config, log: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    """Measure everything ``cfg`` asks for and return the JSON-able report."""
    from .bench_report import evaluate_targets, fill_derived

    load_before = _loadavg()
    started = time.time()
    with measuring(cfg):
        ceiling = _Ceiling(cfg.bandwidth_floats)
        for _ in range(3):
            ceiling.window()
        results: list[dict[str, Any]] = []
        sets_meta: dict[str, Any] = {}
        for set_name in cfg.sets:
            shapes = param_set_shapes(set_name, cfg.quick)
            pset = ParamSet.build(set_name, shapes, seed=cfg.seed)
            sets_meta[set_name] = {"params": pset.numel, "tensors": len(shapes)}
            log(f"set {set_name}: {pset.numel:,} parameters in {len(shapes)} tensors")
            for algo in cfg.optimizers:
                log(f"  {TITLES[algo]} ...")
                first = ceiling.count
                runs = _measure_algo(algo, pset, cfg, ceiling, log)
                probes = ceiling.medians(first)
                for run in runs:
                    row = result_row(set_name, algo, run, pset.numel)
                    row["probes_GBps"] = probes
                    row["bandwidth_GBps"] = max(probes.values())  # the ceiling
                    results.append(row)
                    run.opt = run.snapshot = None  # free this algorithm's state before the next one
                del runs
                gc.collect()
            del pset
            gc.collect()
        for _ in range(3):
            ceiling.window()
    fill_derived(results, sets_meta)
    probes_all = ceiling.medians()
    report = {
        "meta": host_meta(cfg, load_before, started),
        "bandwidth": {
            "probes_bytes_per_element": dict(PROBES),
            "windows_GBps": {k: [round(x, 3) for x in v] for k, v in ceiling.windows.items()},
            "probes_GBps": probes_all,
            "GBps": max(probes_all.values()),
        },
        "bytes_per_param": {a: BYTES_PER_PARAM[a] for a in cfg.optimizers},
        "sets": sets_meta,
        "results": results,
    }
    report["targets"] = evaluate_targets(report)
    return report


def host_meta(cfg: Config, load_before: list[float], started: float) -> dict[str, Any]:
    """The run's context: versions, CPU, threads, load average before and after, config."""
    return {
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "duration_s": round(time.time() - started, 1),
        "torch": torch.__version__,
        "optimkit": optimkit.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "loadavg_before": load_before,
        "loadavg_after": _loadavg(),
        "config": {k: v for k, v in vars(cfg).items()},
    }


def result_row(set_name: str, algo: str, run: _Run, n_params: int) -> dict[str, Any]:
    """One candidate's JSON row: status, the window times and their spread, cold step, state."""
    c = run.cand
    measured = run.status == "ok" and bool(run.window_ms)
    row: dict[str, Any] = {
        "set": set_name,
        "optimizer": algo,
        "library": c.library,
        "impl": c.impl,
        "label": c.label,
        "anchor_candidate": c.anchor,
        "status": run.status if (run.status != "ok" or measured) else "error",
        "reason": run.reason if (run.status != "ok" or measured) else "no window measured",
        "note": run.note,
    }
    if row["status"] == "ok":
        w = run.window_ms
        row.update(
            ms_per_step=statistics.median(w),
            ms_mean=statistics.fmean(w),
            ms_min=min(w),
            ms_max=max(w),
            window_ms=w,
            steps_per_window=run.steps_per_window,
            cold_ms=run.cold_ms,
            state_bytes_per_param=_state_bytes(run.opt) / n_params,
        )
    return row


# ----------------------------------------------------------------------------------- CLI
def main(argv: list[str] | None = None) -> int:
    """``optimkit bench`` (:func:`optimkit.bench_cli.main`): 1 when some candidate failed."""
    from .bench_cli import main as cli_main

    return cli_main(argv)


# ------------------------------------------------------------------------------ host info
def _loadavg() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:  # pragma: no cover - not on every platform
        return [float("nan")] * 3


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:  # pragma: no cover
        pass
    return platform.processor() or "unknown CPU"
