r"""Step-time benchmark: optimkit's implementations against torch.optim and prodigyopt.

An optimizer step reads and writes every parameter, gradient and state buffer once, so it
is bound by memory bandwidth. This module measures, in one run:

* the machine's memory bandwidth: a large tensor copy, counting bytes read + written;
* for each optimizer and each implementation (optimkit's per-tensor reference, foreach and
  fused paths; torch.optim's for-loop, foreach and fused paths; ``prodigyopt``), the median
  milliseconds of one ``opt.step()`` on fixed parameter sets;

and reports each as ms/step, the ratio to the anchor (torch's fastest implementation of the
same algorithm, ``prodigyopt`` for Prodigy) and the fraction of the bandwidth floor::

    floor_ms = bytes_per_param * n_params / bandwidth        (DESIGN.md section 4)
    fraction = floor_ms / measured_ms

Method (heavyball-style): gradients are set once (fixed random values); every measured call
is a single ``opt.step()``; steps are timed in windows and the median over windows is kept;
within one algorithm all candidates (and one bandwidth window) take turns, in an order that
alternates direction every repetition, so drift in the machine's load hits all of them
alike. The bandwidth used for an algorithm's floor is the median of the copy windows taken
in turn with that algorithm's candidates, so a change in the machine's load between
algorithms moves the floor with it. The first step (state allocation, compilation) is
reported separately as "cold".

Entry point: :func:`main` (``optimkit bench``, ``benchmarks/step_time.py``).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime as _dt
import gc
import io
import json
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
    impl: str  # "reference" | "foreach" | "fused" | "flat" | "flat+compiled" | "for-loop"
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


def candidates_for(algo: str, compiled: bool = False) -> list[Candidate]:
    """Every implementation of ``algo`` the benchmark compares, optimkit's first."""
    ok_name, torch_name, hp = _ALGO_SPECS[algo]
    ok_cls = getattr(optimkit, ok_name)
    out: list[Candidate] = []

    def ok(flags: dict[str, Any]) -> Callable[[list[Tensor]], torch.optim.Optimizer]:
        return lambda ps: ok_cls(ps, **hp, **flags)

    out.append(Candidate(algo, "optimkit", "reference", ok(dict(foreach=False)), slow=True))
    out.append(Candidate(algo, "optimkit", "foreach", ok(dict(foreach=True))))
    if _has_fused(ok_cls):
        out.append(Candidate(algo, "optimkit", "fused", ok(dict(fused=True))))
    # flat=True over this set's parameters and gradients (already views of one buffer each,
    # as a flat-parameter trainer keeps them, so nothing is copied): the default path per chunk
    out.append(Candidate(algo, "optimkit", "flat", ok(dict(flat=True))))
    if compiled and getattr(ok_cls, "_has_compiled", False):
        # opt-in (compile=True): torch.compile'd single-pass kernels; the first step compiles
        out.append(Candidate(algo, "optimkit", "flat+compiled", ok(dict(flat=True, compile=True))))
    if torch_name is not None:
        t_cls = getattr(torch.optim, torch_name)

        def th(flags: dict[str, Any]) -> Callable[[list[Tensor]], torch.optim.Optimizer]:
            return lambda ps: t_cls(ps, **hp, **flags)

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

        out.append(Candidate(algo, "prodigyopt", "for-loop", prodigyopt_build, anchor=True))
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


def param_set_shapes(name: str, quick: bool = False) -> list[tuple[int, ...]]:
    """The shapes of a named parameter set (``transformer`` or ``small``)."""
    if name == "transformer":
        # full: 25.3M float32 parameters in 148 tensors
        return transformer_shapes(16, 1, 64, 8) if quick else transformer_shapes(384, 12, 10000, 512)
    if name == "small":
        # full: 2.0M float32 parameters in 2000 tensors
        return small_shapes(8, scale=4) if quick else small_shapes(1000)
    raise ValueError(f"bench: unknown parameter set {name!r}; expected 'transformer' or 'small'")


SETS: tuple[str, ...] = ("transformer", "small")


@dataclass
class ParamSet:
    """Parameters that are views of one flat buffer, fixed gradients, and the initial values."""

    name: str
    params: list[Tensor]
    flat: Tensor
    init: Tensor
    grad_flat: Tensor

    @property
    def numel(self) -> int:
        return self.flat.numel()

    @classmethod
    def build(cls, name: str, shapes: Sequence[tuple[int, ...]], seed: int = 0) -> ParamSet:
        gen = torch.Generator().manual_seed(seed)
        n = sum(_numel(s) for s in shapes)
        init = torch.randn(n, generator=gen).mul_(0.02)
        grad_flat = torch.randn(n, generator=gen).mul_(1e-2)
        flat = init.clone()
        params: list[Tensor] = []
        off = 0
        # Views of one buffer: the realistic layout for large tensors (each its own
        # allocation either way) and what a flat-buffer implementation needs; torch.optim's
        # paths see ordinary contiguous parameters.
        for s in shapes:
            k = _numel(s)
            p = torch.nn.Parameter(flat[off : off + k].view(s))
            p.grad = grad_flat[off : off + k].view(s)
            params.append(p)
            off += k
        return cls(name, params, flat, init, grad_flat)

    def reset(self) -> None:
        """Restore the initial parameter values (each algorithm starts from the same point)."""
        self.flat.copy_(self.init)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


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


@dataclass
class _Run:
    cand: Candidate
    opt: Any = None
    status: str = "ok"
    reason: str = ""
    cold_ms: float = float("nan")
    steps_per_window: int = 1
    window_ms: list[float] = field(default_factory=list)
    snapshot: Any = None


class _Bandwidth:
    """A large ``copy_`` timed in windows: bytes read + written per second."""

    def __init__(self, floats: int) -> None:
        self.src = torch.empty(floats).uniform_()
        self.dst = torch.empty_like(self.src)
        self.dst.copy_(self.src)  # fault the pages in before timing
        self.bytes = 2 * self.src.numel() * self.src.element_size()
        self.windows_gbps: list[float] = []

    def window(self, copies: int = 3) -> None:
        t0 = time.perf_counter()
        for _ in range(copies):
            self.dst.copy_(self.src)
        dt = time.perf_counter() - t0
        self.windows_gbps.append(self.bytes * copies / dt / 1e9)

    @property
    def gbps(self) -> float:
        return statistics.median(self.windows_gbps)


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
    run.reason = f"{type(e).__name__}: {e}".splitlines()[0][:200]
    run.opt = None


def _measure_algo(
    algo: str, pset: ParamSet, cfg: Config, bw: _Bandwidth, log: Callable[[str], None]
) -> tuple[list[_Run], float]:
    """Measure every candidate of ``algo``; also returns the bandwidth measured alongside (GB/s)."""
    pset.reset()
    runs = [_Run(c) for c in candidates_for(algo, cfg.compiled)]
    restore_cap = _RESTORE_EACH_WINDOW.get(algo)
    # Cold first step, then warm-up and the window size, one candidate at a time.
    for run in runs:
        try:
            run.opt = run.cand.build(pset.params)
            t = _time_steps(run.opt, 1)
            run.cold_ms = 1e3 * t
            nwarm = min(cfg.warmup, 1) if run.cand.slow else cfg.warmup
            max_steps = cfg.max_window_steps
            if restore_cap is not None:
                nwarm, max_steps = min(nwarm, 3), min(max_steps, restore_cap)
            if nwarm > 0:
                t = _time_steps(run.opt, nwarm) / nwarm
            run.steps_per_window = max(1, min(max_steps, int(cfg.window_s / max(t, 1e-6))))
            if restore_cap is not None:
                run.snapshot = _snapshot(run.opt)
        except Exception as e:  # noqa: BLE001 - a candidate that cannot run is reported, not fatal
            _fail(run, e)
            log(f"  {run.cand.label}: {run.status} ({run.reason})")
    live = [r for r in runs if r.status == "ok"]
    first_bw = len(bw.windows_gbps)
    for rep in range(cfg.repeats):
        # Alternate direction each repetition so slow drift affects every candidate alike;
        # the bandwidth window takes its turn in the same rotation.
        order: list[_Run | None] = [None, *live]
        if rep % 2:
            order.reverse()
        for run in order:
            if run is None:
                bw.window()
                continue
            if run.status != "ok" or (run.cand.slow and rep >= cfg.ref_repeats):
                continue
            try:
                if run.snapshot is not None:  # untimed: start the window from the warm state
                    pset.reset()
                    _restore(run.opt, run.snapshot)
                dt = _time_steps(run.opt, run.steps_per_window)
                run.window_ms.append(1e3 * dt / run.steps_per_window)
            except Exception as e:  # noqa: BLE001
                _fail(run, e)
    return runs, statistics.median(bw.windows_gbps[first_bw:])


def run_benchmark(cfg: Config, log: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    """Measure everything ``cfg`` asks for and return the JSON-able report."""
    load_before = _loadavg()
    started = time.time()
    # Denormals would make timings data-dependent. torch has no getter for this flag (the
    # setter returns whether it is supported), and its default is off: restore off.
    torch.set_flush_denormal(True)
    old_cache = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if cfg.compiled and cfg.cold_compile:
        # A fresh inductor cache: the first-step time is what a first-ever run costs.
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="optimkit-bench-inductor-")
    try:
        bw = _Bandwidth(cfg.bandwidth_floats)
        for _ in range(3):
            bw.window()
        results: list[dict[str, Any]] = []
        sets_meta: dict[str, Any] = {}
        for set_name in cfg.sets:
            shapes = param_set_shapes(set_name, cfg.quick)
            pset = ParamSet.build(set_name, shapes, seed=cfg.seed)
            sets_meta[set_name] = {"params": pset.numel, "tensors": len(shapes)}
            log(f"set {set_name}: {pset.numel:,} parameters in {len(shapes)} tensors")
            for algo in cfg.optimizers:
                log(f"  {TITLES[algo]} ...")
                runs, block_gbps = _measure_algo(algo, pset, cfg, bw, log)
                for run in runs:
                    row = _result_row(set_name, algo, run, pset.numel)
                    row["bandwidth_GBps"] = block_gbps
                    results.append(row)
                    run.opt = run.snapshot = None  # free this algorithm's state before the next one
                del runs
                gc.collect()
            del pset
            gc.collect()
        for _ in range(3):
            bw.window()
    finally:
        torch.set_flush_denormal(False)
        if cfg.compiled and cfg.cold_compile:
            if old_cache is None:
                os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)
            else:
                os.environ["TORCHINDUCTOR_CACHE_DIR"] = old_cache
    gbps = bw.gbps
    _fill_derived(results, sets_meta)
    report = {
        "meta": {
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
        },
        "bandwidth": {
            "bytes_per_copy": bw.bytes,
            "windows_GBps": [round(x, 3) for x in bw.windows_gbps],
            "GBps": gbps,
        },
        "bytes_per_param": {a: BYTES_PER_PARAM[a] for a in cfg.optimizers},
        "sets": sets_meta,
        "results": results,
    }
    report["targets"] = evaluate_targets(report)
    return report


def _result_row(set_name: str, algo: str, run: _Run, n_params: int) -> dict[str, Any]:
    c = run.cand
    row: dict[str, Any] = {
        "set": set_name,
        "optimizer": algo,
        "library": c.library,
        "impl": c.impl,
        "label": c.label,
        "anchor_candidate": c.anchor,
        "status": run.status if (run.status != "ok" or run.window_ms) else "error",
        "reason": run.reason if (run.status != "ok" or run.window_ms) else "no window measured",
    }
    if row["status"] == "ok":
        row.update(
            ms_per_step=statistics.median(run.window_ms),
            window_ms=run.window_ms,
            steps_per_window=run.steps_per_window,
            cold_ms=run.cold_ms,
            state_bytes_per_param=_state_bytes(run.opt) / n_params,
        )
    return row


def _fill_derived(results: list[dict[str, Any]], sets_meta: dict[str, Any]) -> None:
    """Anchor ratio and floor fraction of every row (floor from the row's ``bandwidth_GBps``)."""
    for set_name, meta in sets_meta.items():
        for algo in {r["optimizer"] for r in results if r["set"] == set_name}:
            rows = [r for r in results if r["set"] == set_name and r["optimizer"] == algo]
            gbps = rows[0]["bandwidth_GBps"]
            floor_ms = 1e3 * BYTES_PER_PARAM[algo] * meta["params"] / (gbps * 1e9)
            anchors = [r for r in rows if r["anchor_candidate"] and r["status"] == "ok"]
            anchor = min(anchors, key=lambda r: r["ms_per_step"]) if anchors else None
            for r in rows:
                r["floor_ms"] = floor_ms
                r["anchor"] = anchor["label"] if anchor else None
                r["is_anchor"] = anchor is r
                if r["status"] != "ok":
                    continue
                r["floor_fraction"] = floor_ms / r["ms_per_step"]
                r["ratio_to_anchor"] = r["ms_per_step"] / anchor["ms_per_step"] if anchor else None


# ------------------------------------------------------------------------------ targets
_FUSED_TARGET = ("adam", "adamw", "sgd", "sgd_momentum", "sgd_nesterov", "adagrad")
_HALF_TARGET = ("rmsprop", "radam", "adadelta")


def _best_optimkit(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    ok = [r for r in rows if r["library"] == "optimkit" and r["status"] == "ok"]
    return min(ok, key=lambda r: r["ms_per_step"]) if ok else None


def evaluate_targets(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's speed targets, checked against the best optimkit path (opt-in ones included:
    flat=True, compile=True). The first-step budget applies to the paths that may be defaults,
    so the compiled rows (opt-in because they cannot meet it warm) are not counted there."""
    out: list[dict[str, Any]] = []
    results = report["results"]

    def add(target: str, set_name: str, algo: str, value: float | None, limit: float, le: bool) -> None:
        met = None if value is None else (value <= limit if le else value >= limit)
        out.append(dict(target=target, set=set_name, optimizer=algo, value=value, limit=limit, met=met))

    for set_name in report["sets"]:
        for algo in report["bytes_per_param"]:
            rows = [r for r in results if r["set"] == set_name and r["optimizer"] == algo]
            best = _best_optimkit(rows)
            by_label = {r["label"]: r for r in rows if r["status"] == "ok"}
            if algo in _FUSED_TARGET:
                ref = by_label.get("torch fused")
                v = best["ms_per_step"] / ref["ms_per_step"] if best and ref else None
                add("<= 1.0x torch fused", set_name, algo, v, 1.0, True)
            elif algo in _HALF_TARGET:
                v = best["ratio_to_anchor"] if best else None
                add("<= 0.5x torch fastest", set_name, algo, v, 0.5, True)
            elif algo == "prodigy":
                v = best["ratio_to_anchor"] if best else None
                add("<= 0.30x prodigyopt", set_name, algo, v, 0.30, True)
                add(">= 60% of floor", set_name, algo, best["floor_fraction"] if best else None, 0.60, False)
            if set_name == "small":
                add(">= 50% of floor (many small tensors)", set_name, algo,
                    best["floor_fraction"] if best else None, 0.50, False)
            cold = [r["cold_ms"] for r in rows if r["library"] == "optimkit" and r["status"] == "ok"
                    and r["impl"] != "flat+compiled"]
            add("first step <= 10 s cold", set_name, algo, max(cold) / 1e3 if cold else None, 10.0, True)
    return out


# ------------------------------------------------------------------------------ printing
def _fmt_ms(ms: float) -> str:
    return f"{ms:.3g}" if ms < 1000 else f"{ms:,.0f}"


def format_fraction(fraction: float) -> str:
    """How the table prints a floor fraction (tests recompute it from the JSON numbers)."""
    pct = 100 * fraction
    return f"{pct:.1f}%" if pct < 10 else f"{pct:.0f}%"


def print_report(report: dict[str, Any], console: Any) -> None:
    """Print one rich table per parameter set, then the targets."""
    from rich.table import Table

    bw = report["bandwidth"]
    meta = report["meta"]
    console.print(
        f"optimkit bench: torch {meta['torch']}, {meta['threads']} threads, {meta['cpu']}; "
        f"bandwidth (copy, read+write) median {bw['GBps']:.1f} GB/s "
        f"(windows {min(bw['windows_GBps']):.1f}-{max(bw['windows_GBps']):.1f}; each floor uses the "
        f"median measured alongside that optimizer); "
        f"load avg before {meta['loadavg_before'][0]:.2f}, after {meta['loadavg_after'][0]:.2f}"
    )
    notes: list[str] = []
    for set_name, smeta in report["sets"].items():
        table = Table(
            title=f"{set_name}: {smeta['params']:,} fp32 parameters in {smeta['tensors']} tensors",
            title_justify="left",
        )
        for col, just in (("optimizer", "left"), ("implementation", "left"), ("ms/step", "right"),
                          ("vs anchor", "right"), ("floor", "right"), ("cold ms", "right"),
                          ("state B/param", "right")):
            table.add_column(col, justify=just, no_wrap=True)  # type: ignore[arg-type]
        algos = list(dict.fromkeys(r["optimizer"] for r in report["results"] if r["set"] == set_name))
        for ai, algo in enumerate(algos):
            rows = [r for r in report["results"] if r["set"] == set_name and r["optimizer"] == algo]
            for i, r in enumerate(rows):
                name = ""
                if i == 0:
                    name = TITLES[algo]
                elif i == 1:
                    name = f"{BYTES_PER_PARAM[algo]} B/param"
                elif i == 2:
                    name = f"floor {_fmt_ms(r['floor_ms'])} ms"
                elif i == 3:
                    name = f"at {r['bandwidth_GBps']:.1f} GB/s"
                if r["status"] != "ok":
                    cells = [r["status"]] + ["", "", "", ""]
                    notes.append(f"{set_name} / {TITLES[algo]} / {r['label']}: {r['reason']}")
                else:
                    ratio = r.get("ratio_to_anchor")
                    rtxt = "" if ratio is None else f"{ratio:.2f}x" + (" (anchor)" if r["is_anchor"] else "")
                    cells = [
                        _fmt_ms(r["ms_per_step"]),
                        rtxt,
                        format_fraction(r["floor_fraction"]),
                        _fmt_ms(r["cold_ms"]),
                        f"{r['state_bytes_per_param']:.1f}",
                    ]
                table.add_row(name, r["label"], *cells, end_section=(i == len(rows) - 1 and ai < len(algos) - 1))
        console.print(table)
    if report.get("targets"):
        console.print(targets_table(report["targets"]))
    for n in notes:
        console.print(f"note: {n}", highlight=False)


def targets_table(targets: list[dict[str, Any]]) -> Any:
    """The issue's targets, one row per (set, optimizer)."""
    from rich.table import Table

    t = Table(title="targets (best optimkit path, opt-in flat/compile included; first step: "
              "paths that can be defaults)", title_justify="left")
    for col in ("set", "optimizer", "speed", "floor", "first step", "all met"):
        t.add_column(col, no_wrap=True)
    keys = list(dict.fromkeys((tg["set"], tg["optimizer"]) for tg in targets))
    for set_name, algo in keys:
        cells = {"speed": "", "floor": "", "first step": ""}
        mets = []
        for tg in targets:
            if (tg["set"], tg["optimizer"]) != (set_name, algo):
                continue
            v, met = tg["value"], tg["met"]
            mets.append(met)
            mark = {True: "ok", False: "NO", None: "n/a"}[met]
            if "floor" in tg["target"]:
                col, txt = "floor", f"{'n/a' if v is None else format_fraction(v)} (>= {tg['limit']:.0%}) {mark}"
            elif "cold" in tg["target"]:
                col, txt = "first step", f"{'n/a' if v is None else f'{v:.2f} s'} {mark}"
            else:
                col, txt = "speed", f"{'n/a' if v is None else f'{v:.2f}x'} ({tg['target']}) {mark}"
            cells[col] = f"{cells[col]}; {txt}" if cells[col] else txt
        allmet = "n/a" if any(m is None for m in mets) else ("yes" if all(mets) else "NO")
        t.add_row(set_name, TITLES[algo], cells["speed"], cells["floor"], cells["first step"], allmet)
    return t


# ----------------------------------------------------------------------------------- CLI
def _parse_list(value: str, choices: Sequence[str], what: str) -> list[str]:
    items = [x.strip().lower().replace("-", "_") for x in value.split(",") if x.strip()]
    if items == ["all"]:
        return list(choices)
    bad = [x for x in items if x not in choices]
    if bad or not items:
        raise argparse.ArgumentTypeError(
            f"invalid {what} {','.join(bad) or value!r}; expected a comma-separated subset of "
            f"{', '.join(choices)} (or 'all')"
        )
    return list(dict.fromkeys(items))


def build_parser() -> argparse.ArgumentParser:
    """The ``optimkit bench`` argument parser."""
    p = argparse.ArgumentParser(
        prog="optimkit bench",
        description="Time one optimizer step of optimkit, torch.optim and prodigyopt against the "
        "memory-bandwidth floor (see docs/performance.md).",
    )
    p.add_argument("--sets", default="transformer,small",
                   type=lambda v: _parse_list(v, SETS, "set"),
                   help="parameter sets: transformer (~25M params, 148 tensors), small (~2M params, "
                   "2000 tensors); default: both")
    p.add_argument("--optimizers", default="all",
                   type=lambda v: _parse_list(v, ALGORITHMS, "optimizer"),
                   help=f"comma-separated subset of {', '.join(ALGORITHMS)}; default: all")
    p.add_argument("--repeats", type=int, default=None,
                   help="timed windows per candidate (median taken); default 7, 3 with --quick")
    p.add_argument("--warmup", type=int, default=None,
                   help="untimed steps after the cold first step; default 3, 1 with --quick")
    p.add_argument("--ref-repeats", type=int, default=None,
                   help="windows for the slow per-tensor loops (optimkit reference, torch for-loop); "
                   "default min(3, repeats)")
    p.add_argument("--window", type=float, default=None,
                   help="target seconds per timed window; default 0.1 (0.005 with --quick)")
    p.add_argument("--quick", action="store_true",
                   help="tiny parameter sets and few repetitions: a smoke run, not a measurement")
    p.add_argument("--compiled", action=argparse.BooleanOptionalAction, default=None,
                   help="also time the compile=True paths (flat=True, compile=True) where an "
                   "optimizer has one (default: on, off with --quick)")
    p.add_argument("--warm-compile-cache", action="store_true",
                   help="let the compiled paths use the existing inductor cache (default: a fresh "
                   "one, so their cold time is a first-ever compile)")
    p.add_argument("--json", metavar="PATH", help="also write the full results as JSON")
    p.add_argument("--render", metavar="PATH",
                   help="measure nothing: print the tables of a JSON written by --json")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads(N) before measuring")
    p.add_argument("--seed", type=int, default=0, help="seed of the fixed parameters and gradients")
    return p


def config_from_args(args: argparse.Namespace) -> Config:
    """Turn parsed arguments into a :class:`Config` (quick-mode defaults applied)."""
    q = args.quick
    repeats = args.repeats if args.repeats is not None else (3 if q else 7)
    cfg = Config(
        sets=args.sets if isinstance(args.sets, list) else _parse_list(args.sets, SETS, "set"),
        optimizers=args.optimizers if isinstance(args.optimizers, list)
        else _parse_list(args.optimizers, ALGORITHMS, "optimizer"),
        repeats=repeats,
        warmup=args.warmup if args.warmup is not None else (1 if q else 3),
        ref_repeats=args.ref_repeats if args.ref_repeats is not None else min(3, repeats),
        window_s=args.window if args.window is not None else (0.005 if q else 0.1),
        bandwidth_floats=(2**20 if q else 64 * 2**20),
        quick=q,
        compiled=args.compiled if args.compiled is not None else not q,
        cold_compile=not args.warm_compile_cache,
        seed=args.seed,
    )
    if cfg.repeats < 1 or cfg.warmup < 0 or cfg.ref_repeats < 1 or cfg.window_s <= 0:
        raise ValueError("bench: --repeats and --ref-repeats must be >= 1, --warmup >= 0, --window > 0")
    return cfg


def main(argv: list[str] | None = None) -> int:
    """``optimkit bench``: run the benchmark, print the tables, optionally write JSON."""
    from rich.console import Console

    parser = build_parser()
    args = parser.parse_args(argv)
    if args.render:
        with open(args.render) as f:
            saved = json.load(f)
        _fill_derived(saved["results"], saved["sets"])
        saved["targets"] = evaluate_targets(saved)
        print_report(saved, Console(width=None if sys.stdout.isatty() else 140))
        return 0
    try:
        cfg = config_from_args(args)
    except ValueError as e:
        parser.error(str(e))
    old_threads = torch.get_num_threads()
    if args.threads is not None:
        if args.threads < 1:
            parser.error("--threads must be >= 1")
        torch.set_num_threads(args.threads)
    # A file or pipe gets a fixed wide table instead of rich's 80-column default.
    out = Console(width=None if sys.stdout.isatty() else 140)
    err = Console(stderr=True)
    try:
        report = run_benchmark(cfg, log=lambda s: err.print(s, highlight=False))
    finally:
        torch.set_num_threads(old_threads)  # main() may be called in-process (tests, the CLI)
    report["meta"]["command"] = " ".join(["optimkit bench", *(argv if argv is not None else sys.argv[1:])])
    print_report(report, out)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1, default=str)
        err.print(f"wrote {args.json}", highlight=False)
    return 0


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
