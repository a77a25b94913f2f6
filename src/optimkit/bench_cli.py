"""The ``optimkit bench`` command line: arguments, configuration, exit status.

The measurement is :mod:`optimkit.bench` (and :mod:`optimkit.bench_contention` for
``--contention``); the tables are printed by :mod:`optimkit.bench_report`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

import torch

from .bench import ALGORITHMS, DEFAULT_SETS, SETS, Config, run_benchmark

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
    p.add_argument("--sets", default=None,
                   type=lambda v: _parse_list(v, SETS, "set"),
                   help="parameter sets: transformer (~25M params, 148 tensors), small (~2M params, "
                   "2000 tensors), mlp (a 64-128-128-10 MLP, 6 tensors); default: transformer,small "
                   "(mlp,small with --contention)")
    p.add_argument("--optimizers", default="all",
                   type=lambda v: _parse_list(v, ALGORITHMS, "optimizer"),
                   help=f"comma-separated subset of {', '.join(ALGORITHMS)}; default: all")
    p.add_argument("--repeats", type=int, default=None,
                   help="timed windows per candidate; default 7 (10 with --contention), 3 with --quick")
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
    p.add_argument("--contention", action="store_true",
                   help="the contention scenario: every optimizer's default step against torch.optim's "
                   "default (prodigyopt for Prodigy), first alone, then with one background process "
                   "running 2-thread torch matmuls; reports mean, median and max over windows")
    p.add_argument("--contention-seconds", type=float, default=1800.0,
                   help="time limit of the background process (it is stopped as soon as the "
                   "measurement ends; default 1800)")
    p.add_argument("--json", metavar="PATH", help="also write the full results as JSON")
    p.add_argument("--render", metavar="PATH",
                   help="measure nothing: print the tables of a JSON written by --json")
    p.add_argument("--width", type=int, default=None, metavar="COLUMNS",
                   help="width of the printed tables; default: $COLUMNS, else the terminal's, else 140 "
                   "(a file or pipe). A table wider than this is printed compact: notes as numbered "
                   "footnotes, the columns split over several tables that repeat the key columns")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads(N) before measuring")
    p.add_argument("--seed", type=int, default=0, help="seed of the fixed parameters and gradients")
    return p


def config_from_args(args: argparse.Namespace) -> Config:
    """Turn parsed arguments into a :class:`Config` (quick-mode and scenario defaults applied)."""
    q, cont = args.quick, args.contention
    repeats = args.repeats if args.repeats is not None else (3 if q else 10 if cont else 7)
    sets = args.sets if args.sets is not None else list(("mlp", "small") if cont else DEFAULT_SETS)
    cfg = Config(
        sets=sets if isinstance(sets, list) else _parse_list(sets, SETS, "set"),
        optimizers=args.optimizers if isinstance(args.optimizers, list)
        else _parse_list(args.optimizers, ALGORITHMS, "optimizer"),
        repeats=repeats,
        warmup=args.warmup if args.warmup is not None else (1 if q else 3),
        ref_repeats=args.ref_repeats if args.ref_repeats is not None else min(3, repeats),
        window_s=args.window if args.window is not None else (0.005 if q else 0.1),
        # Contention: windows of ~0.1 s whatever the step time, so a tiny step's spikes land
        # inside windows (the mean over windows then includes them)
        max_window_steps=5000 if cont else 50,
        bandwidth_floats=(2**20 if q else 64 * 2**20),
        quick=q,
        compiled=(args.compiled if args.compiled is not None else not q) and not cont,
        cold_compile=not args.warm_compile_cache,
        seed=args.seed,
        contention=cont,
        contention_s=args.contention_seconds,
    )
    if cfg.repeats < 1 or cfg.warmup < 0 or cfg.ref_repeats < 1 or cfg.window_s <= 0:
        raise ValueError("bench: --repeats and --ref-repeats must be >= 1, --warmup >= 0, --window > 0")
    if cfg.contention_s <= 0:
        raise ValueError("bench: --contention-seconds must be > 0")
    return cfg


def console_width(width: int | None) -> int | None:
    """The tables' width: ``--width``, else $COLUMNS, else the terminal's (``None``: rich reads
    both), else 140: a file or pipe gets the wide tables instead of rich's 80-column default
    unless $COLUMNS asks for a width."""
    if width is not None:
        return width
    if sys.stdout.isatty():
        return None
    columns = os.environ.get("COLUMNS", "")
    return int(columns) if columns.isdigit() and int(columns) > 0 else 140


def has_errors(report: dict[str, Any]) -> bool:
    """Whether some row of ``report`` failed (status "error"; "n/a" is a placeholder optimizer)."""
    return any(r.get("status") == "error" for r in report.get("results", ()))


def main(argv: list[str] | None = None) -> int:
    """``optimkit bench``: run the benchmark, print the tables, optionally write JSON.

    Returns 1 when some candidate failed (its whole message is printed under the table), else 0.
    """
    from rich.console import Console

    from . import bench_report

    parser = build_parser()
    args = parser.parse_args(argv)
    if args.width is not None and args.width < 20:
        parser.error("--width must be >= 20")
    out = Console(width=console_width(args.width))
    if args.render:
        with open(args.render) as f:
            saved = json.load(f)
        bench_report.print_saved(saved, out)
        return 1 if has_errors(saved) else 0
    try:
        cfg = config_from_args(args)
    except ValueError as e:
        parser.error(str(e))
    old_threads = torch.get_num_threads()
    if args.threads is not None:
        if args.threads < 1:
            parser.error("--threads must be >= 1")
        torch.set_num_threads(args.threads)
    err = Console(stderr=True)
    log = lambda s: err.print(s, highlight=False)  # noqa: E731
    try:
        if cfg.contention:
            from .bench_contention import run_contention

            report = run_contention(cfg, log=log)
        else:
            report = run_benchmark(cfg, log=log)
    finally:
        torch.set_num_threads(old_threads)  # main() may be called in-process (tests, the CLI)
    report["meta"]["command"] = " ".join(["optimkit bench", *(argv if argv is not None else sys.argv[1:])])
    bench_report.print_any(report, out)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1, default=str)
        err.print(f"wrote {args.json}", highlight=False)
    return 1 if has_errors(report) else 0


