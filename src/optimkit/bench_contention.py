"""The contention scenario of the step-time benchmark (``optimkit bench --contention``).

Users train where other work shares the cores: a data loader, a second job, a shared CI
runner. This scenario times every optimizer's default step (no ``foreach``/``fused`` flag)
against torch.optim's default for the same algorithm (on CPU its for-loop; ``prodigyopt``
for Prodigy) on small models, twice:

* **idle**: nothing else started by the benchmark (the machine's own load is reported);
* **loaded**: with ONE background process running 2-thread torch matmuls (512 x 512, MKL)
  for at most ``--contention-seconds``; it is started once, waited for until it computes,
  and stopped (terminated, then killed) as soon as the measurement ends, also on Ctrl-C or
  an exception. It also stops itself at its time limit, so it cannot outlive a killed run.

Method as in :mod:`optimkit.bench` (interleaved candidates, gradients restored every window,
a candidate that changes them noted), with windows of ~0.1 s whatever the step time, so a
spike lands inside a window; the statistic is the **mean over windows**, spikes included,
reported with the median and the max. The target is optimkit / torch <= 1.0 idle and
<= 1.5 loaded (:data:`optimkit.bench_report.CONTENTION_LIMITS`).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from .bench import (
    BYTES_PER_PARAM, TITLES, Config, ParamSet, _loadavg, _measure_algo, candidates_for, host_meta,
    measuring, param_set_shapes, result_row,
)

#: the background process: 2-thread matmuls until its time limit (argv[1] seconds)
_BACKGROUND = """
import sys, time
import torch
torch.set_num_threads(int(sys.argv[2]))
a = torch.randn(512, 512)
end = time.monotonic() + float(sys.argv[1])
a @ a
print("ready", flush=True)
while time.monotonic() < end:
    a @ a
"""


class Background:
    """One background process running ``threads``-thread torch matmuls for at most
    ``seconds``; a context manager that starts it (returning once it computes) and always
    stops it."""

    what = "2-thread torch matmuls, 512 x 512"

    def __init__(self, seconds: float, threads: int = 2) -> None:
        self.seconds = seconds
        self.threads = threads
        self.proc: subprocess.Popen[str] | None = None
        self.started = self.stopped = float("nan")
        self.alive_at_stop: bool | None = None
        self.returncode: int | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _BACKGROUND, str(self.seconds), str(self.threads)],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        )
        line = self.proc.stdout.readline() if self.proc.stdout else ""
        if line.strip() != "ready":
            self.stop()
            raise RuntimeError(f"bench --contention: the background process did not start "
                               f"(exit status {self.returncode})")
        self.started = time.monotonic()

    def stop(self) -> None:
        if self.proc is None:
            return
        self.alive_at_stop = self.proc.poll() is None
        if self.alive_at_stop:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.stopped = time.monotonic()
        self.returncode = self.proc.returncode
        if self.proc.stdout:
            self.proc.stdout.close()

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def __enter__(self) -> Background:
        # SIGTERM (a timeout, a job scheduler) ends Python without running ``finally``
        # blocks: turn it into SystemExit while the process runs, so it is stopped too.
        self._old_term: Any = None
        if threading.current_thread() is threading.main_thread():
            self._old_term = signal.signal(signal.SIGTERM, _raise_exit)
        try:
            self.start()
        except BaseException:
            self._restore_term()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        try:
            self.stop()
        finally:
            self._restore_term()

    def _restore_term(self) -> None:
        if self._old_term is not None:
            signal.signal(signal.SIGTERM, self._old_term)
            self._old_term = None


def _raise_exit(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def run_contention(cfg: Config, log: Callable[[str], None] = lambda s: None,
                   background: Background | None = None) -> dict[str, Any]:
    """Measure every optimizer's default against torch.optim's default, idle then loaded,
    and return the JSON-able report (``scenario: "contention"``)."""
    from .bench_report import evaluate_targets, fill_derived

    load_before = _loadavg()
    started = time.time()
    bg = background if background is not None else Background(cfg.contention_s)
    results: list[dict[str, Any]] = []
    sets_meta: dict[str, Any] = {}
    loaded_load: list[float] = []
    with measuring(cfg):
        psets = {}
        for set_name in cfg.sets:
            shapes = param_set_shapes(set_name, cfg.quick)
            psets[set_name] = ParamSet.build(set_name, shapes, seed=cfg.seed)
            sets_meta[set_name] = {"params": psets[set_name].numel, "tensors": len(shapes)}
        for phase in ("idle", "loaded"):
            ctx: contextlib.AbstractContextManager[Any] = bg if phase == "loaded" else contextlib.nullcontext()
            with ctx:
                log(f"phase {phase}" + (f" (background pid {bg.pid})" if phase == "loaded" else ""))
                for set_name, pset in psets.items():
                    for algo in cfg.optimizers:
                        log(f"  {set_name} / {TITLES[algo]} ...")
                        cands = candidates_for(algo, defaults_only=True)
                        for run in _measure_algo(algo, pset, cfg, None, log, cands):
                            row = result_row(set_name, algo, run, pset.numel)
                            row["phase"] = phase
                            results.append(row)
                            run.opt = run.snapshot = None
                if phase == "loaded":
                    loaded_load = _loadavg()
    fill_derived(results, sets_meta, stat="ms_mean")
    report: dict[str, Any] = {
        "scenario": "contention",
        "meta": host_meta(cfg, load_before, started),
        "contention": {
            "what": bg.what,
            "pid": bg.pid,
            "threads": bg.threads,
            "limit_s": bg.seconds,
            # it stops itself at its limit: then it ran limit_s, not until the phase ended
            "ran_s": min(bg.stopped - bg.started, bg.seconds),
            "alive_at_stop": bg.alive_at_stop,
            "returncode": bg.returncode,
            "loadavg_loaded": loaded_load or [float("nan")] * 3,
        },
        "bytes_per_param": {a: BYTES_PER_PARAM[a] for a in cfg.optimizers},
        "sets": sets_meta,
        "results": results,
    }
    if bg.alive_at_stop is False:
        log("warning: the background process reached its time limit before the loaded phase "
            "ended; raise --contention-seconds")
    report["targets"] = evaluate_targets(report)
    return report


def pid_alive(pid: int) -> bool:
    """Whether a process with this id still runs (for tests; a zombie counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][:1] != "Z"
    except OSError:
        try:
            os.kill(pid, 0)
        except OSError:
            return False
        return True


