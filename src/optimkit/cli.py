"""The ``optimkit`` command: compare | recommend | explain | trajectories | bench | list.

A thin front end: it parses arguments, calls the library and turns every usage error
(unknown task or optimizer, malformed spec, missing module) into one line on stderr and
exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

__all__ = ["main", "build_parser"]

_PROG = "optimkit"


class UsageError(Exception):
    """A problem with what the user asked for; printed as one line."""


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (with a pointer to --help), exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _split_list(values: Sequence[str] | None) -> list[str] | None:
    """``--tasks a b,c`` -> ``[a, b, c]``; an item with ``:`` (a spec) is never split."""
    if values is None:
        return None
    out: list[str] = []
    for v in values:
        if ":" in v:
            out.append(v)
        else:
            out += [p for p in (s.strip() for s in v.split(",")) if p]
    return out


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=_PROG, description="optimkit: PyTorch optimizers, and tools to choose between them.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    c = sub.add_parser("compare", help="race optimizers on built-in (or your) tasks; write a report",
                       description="Race optimizers on real tasks; print ranked tables, write a report folder "
                                   "(PNG plots, index.html, results.json).")
    c.add_argument("--tasks", nargs="+", metavar="TASK",
                   help="built-in task names (default: logreg cnn charlm docbow; optional: mnist1d fashion "
                        "fortunes fortunes_ft; see optimkit list) "
                        "and/or module:function user tasks")
    c.add_argument("--task", action="append", default=[], metavar="MODULE:FUNCTION",
                   help="a user task: MODULE:FUNCTION returning optimkit.compare.Task (repeatable)")
    c.add_argument("--optimizers", nargs="+", metavar="SPEC",
                   help="registry names, or name:key=value,... (e.g. adamw:lr=3e-4,weight_decay=0.1); "
                        "default: every registered optimizer at its recommended lr")
    c.add_argument("--steps", type=int, help="steps per run (default: each task's own)")
    c.add_argument("--seeds", type=int, help="seeds per run (default 2; 1 with --quick)")
    c.add_argument("--budget", type=int, metavar="N",
                   help="tune: N trials of each optimizer's search space (lr, or Prodigy's d_coef) plus its "
                        "default; without it: the quick out-of-the-box comparison")
    c.add_argument("--lr-sweep", action="store_true",
                   help="tune on a fixed grid instead: default lr x {0.1,0.3,1,3,10} for optimizers that need lr tuning")
    c.add_argument("--jobs", type=int, metavar="N",
                   help="worker processes (default: the number of cores; 1 = in this process; 0 = only plan and "
                        "wait for --worker processes)")
    c.add_argument("--storage", metavar="URL",
                   help="where trials are stored: a database URL (postgresql://user@host/db) shared by workers on "
                        "several machines, or a journal file (default: OUT/study.journal)")
    c.add_argument("--study", default="optimkit-compare", metavar="NAME", help="study name in the storage")
    c.add_argument("--worker", action="store_true",
                   help="join a running comparison in --storage as a worker (runs trials until it is finished)")
    c.add_argument("--report-only", action="store_true", help="render the report from the storage; run nothing")
    c.add_argument("--out", default="optimkit-report", help="report folder (default ./optimkit-report)")
    c.add_argument("--tensorboard", metavar="DIR", help="also write every curve as TensorBoard events to DIR")
    c.add_argument("--x-axis", choices=["step", "wall"], default="step", help="x axis of the curve plots")
    c.add_argument("--no-report", action="store_true", help="print the tables only, write no files")
    c.add_argument("--json", nargs="?", const="-", metavar="PATH",
                   help="also write the results JSON to PATH ('-' or no value: to stdout, instead of the tables)")
    c.add_argument("--device", default="cpu", help="torch device (default cpu)")
    c.add_argument("--threads", type=int, default=1,
                   help="torch threads during the race (default 1: fastest for these small models; 0 = torch's)")
    c.add_argument("--quick", action="store_true", help="short runs, 1 seed: under a minute")
    c.add_argument("--no-progress", action="store_true", help="no progress display")

    r = sub.add_parser("recommend", help="which optimizer to start with, and why",
                       description="Ranked optimizer recommendations with starting hyperparameters and reasons.")
    r.add_argument("--model", choices=["cnn", "transformer", "rnn", "gan", "linear", "mlp"],
                   help="the kind of model")
    r.add_argument("--sparse", action="store_true", help="sparse features / large embedding tables")
    r.add_argument("--data-size", choices=["small", "medium", "large"], help="amount of training data")
    r.add_argument("--memory-tight", action="store_true", help="optimizer state memory is the constraint")
    r.add_argument("--no-tuning", action="store_true",
                   help="no budget to tune the learning rate: Prodigy's measured zero-tuning preset for --model, "
                        "--sparse or --fine-tune (docs/choosing.md)")
    r.add_argument("--fine-tune", action="store_true", help="fine-tuning a pretrained model")
    r.add_argument("--top", type=int, default=3, help="how many recommendations (default 3)")
    r.add_argument("--json", action="store_true", help="print JSON instead of text")

    e = sub.add_parser("explain", help="update rule, hyperparameters, tuning advice and pitfalls of an optimizer",
                       description="Explain one optimizer from the registry.")
    e.add_argument("name", help="registry name or alias (see `optimkit list`)")
    e.add_argument("--markdown", action="store_true", help="print the markdown docs page instead")

    t = sub.add_parser("trajectories", help="paths of optimizers on 2-D test functions (PNG)",
                       description="Draw optimizer paths on Rosenbrock, Beale, a saddle and an ill-conditioned "
                                   "quadratic.")
    t.add_argument("--optimizers", nargs="+", metavar="SPEC", help="names or name:key=value specs")
    t.add_argument("--functions", nargs="+", metavar="NAME",
                   help="rosenbrock beale saddle quadratic (default: all)")
    t.add_argument("--steps", type=int, default=None, help="steps per path (default: per function)")
    t.add_argument("--out", default="optimkit-trajectories.png", help="PNG file to write")
    t.add_argument("--no-tune", action="store_true",
                   help="use the default lrs instead of picking each lr-tuned optimizer's lr per function")

    sub.add_parser("list", help="list the registered optimizers and the built-in tasks")

    b = sub.add_parser("bench", help="step-time / memory benchmarks (optimkit.bench)", add_help=False)
    b.add_argument("args", nargs=argparse.REMAINDER)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``optimkit`` command; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:  # everything after `bench` belongs to the benchmark's own parser
        return _bench(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    args.argv = argv
    try:
        return {
            "compare": _compare,
            "recommend": _recommend,
            "explain": _explain,
            "trajectories": _trajectories,
            "list": _list,
        }[args.command](args)
    except (UsageError, ValueError, KeyError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        msg = " ".join(str(msg).split())  # one line, always
        print(f"{_PROG} {args.command}: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        hint = " (finished trials are stored: run the same command again to continue)" if (
            args.command == "compare" and not args.no_report) else ""
        print(f"{_PROG} {args.command}: interrupted{hint}", file=sys.stderr)
        return 130


# ----------------------------------------------------------------------------- compare
def _check_out(out: str) -> Path:
    """The report folder must be creatable and writable before anything runs (one line, exit 2)."""
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise UsageError(f"--out {out}: exists and is not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".optimkit-write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise UsageError(f"--out {out}: not writable ({e.strerror or type(e).__name__})") from None
    return path


def _cores() -> int:
    import os

    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def _compare(args: argparse.Namespace) -> int:
    from .compare import (
        DEFAULT_SUITE,
        TaskUnavailable,
        build_task,
        default_choices,
        parse_optimizer_choice,
        print_report,
        result_from_storage,
        run_compare,
        write_json,
    )
    from .compare.runner import Progress, RichProgress, choice_warnings
    from .compare.study import JOURNAL_FILE, lock_folder

    if args.steps is not None and args.steps < 1:
        raise UsageError(f"invalid --steps {args.steps}; expected >= 1")
    if args.seeds is not None and args.seeds < 1:
        raise UsageError(f"invalid --seeds {args.seeds}; expected >= 1")
    if args.budget is not None and args.budget < 1:
        raise UsageError(f"invalid --budget {args.budget}; expected >= 1")
    if args.jobs is not None and args.jobs < 0:
        raise UsageError(f"invalid --jobs {args.jobs}; expected >= 0")
    if args.threads is not None and args.threads < 0:
        raise UsageError(f"invalid --threads {args.threads}; expected >= 0 (0 = torch's default)")
    if args.budget and args.lr_sweep:
        raise UsageError("--budget and --lr-sweep are two ways to tune; give one")
    if args.tensorboard and not args.worker:
        from .compare.export import require_tensorboard

        require_tensorboard()  # before the run: a missing package fails in a second, not after it
    to_stdout = args.json == "-"
    writes = not args.no_report
    if (writes or args.report_only or args.worker) and not args.storage:
        out = _check_out(args.out)  # before anything runs: a bad --out fails in a second, not after the run
        storage = str(out / JOURNAL_FILE)
    else:
        if writes and not args.worker:  # a worker with --storage writes no report
            _check_out(args.out)
        storage = args.storage
    if args.worker:
        return _worker(storage, args.study)
    if args.report_only:
        if storage and "://" not in storage and not Path(storage).exists():
            raise UsageError(f"--report-only: no comparison stored in {storage}")
        result = result_from_storage(storage, args.study)
        return _finish(args, result, to_stdout, print_report, write_json)

    names = _split_list(args.tasks) or []
    names += args.task
    if not names:
        names = list(DEFAULT_SUITE)
    if len(set(names)) != len(names):
        raise UsageError(f"a task is named twice in {names}")
    specs = _split_list(args.optimizers)
    # check every name before the (slow) data loading starts
    choices = [parse_optimizer_choice(s) for s in specs] if specs else default_choices()
    if len({c.label for c in choices}) != len(choices):
        raise UsageError("an optimizer is named twice")
    device = _device(args.device)
    for w in choice_warnings(choices):
        print(f"{_PROG} compare: warning: {w}", file=sys.stderr)

    tasks, unavailable, task_specs = [], {}, {}
    for n in names:
        try:
            t = build_task(n, quick=args.quick)
        except TaskUnavailable as e:
            unavailable[n] = str(e)
            print(f"skipping task {n}: {e}", file=sys.stderr)
            continue
        tasks.append(t)
        task_specs[t.name] = n
    if not tasks:
        raise UsageError("no task can run (all skipped for missing data)")
    seen: set[str] = set()
    for t in tasks:
        if t.name in seen:
            raise UsageError(f"two tasks are named {t.name!r}")
        seen.add(t.name)

    lock = lock_folder(Path(args.out)) if storage and "://" not in storage else None
    progress = Progress() if args.no_progress else RichProgress()
    try:
        result = run_compare(
            tasks,
            choices,
            steps=args.steps,
            seeds=args.seeds or (1 if args.quick else 2),
            lr_sweep=args.lr_sweep,
            budget=args.budget,
            quick=args.quick,
            device=device,
            threads=args.threads or None,
            jobs=_cores() if args.jobs is None else args.jobs,
            storage=storage,
            study_name=args.study,
            progress=progress,
            unavailable=unavailable,
            task_specs=task_specs,
            command=[_PROG, "compare", *args.argv[1:]],
        )
    except RuntimeError as e:  # a worker process died: what is stored is kept
        print(f"{_PROG} compare: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 1
    finally:
        if lock is not None:
            lock.close()
    return _finish(args, result, to_stdout, print_report, write_json)


def _finish(args: argparse.Namespace, result: dict[str, Any], to_stdout: bool, print_report: Any,
            write_json: Any) -> int:
    """Print and write the report; exit 1 when a trial failed (0 otherwise)."""
    from .compare import write_report

    if not to_stdout:
        print_report(result)
    if not args.no_report:
        write_report(result, args.out, tensorboard=args.tensorboard, x_axis=args.x_axis)
        where = Path(args.out) / "index.html"
        print(f"report: {where}  (plots, results.json)", file=sys.stderr if to_stdout else sys.stdout)
    if args.json:
        if to_stdout:
            import json

            sys.stdout.write(json.dumps(result, indent=1, allow_nan=False) + "\n")
        else:
            write_json(result, args.json)
    failures = result.get("failures") or []
    if result.get("flags", {}).get("all_failed"):
        f = failures[0] if failures else {}
        at = f" at {f['where']}" if f.get("where") else ""
        print(f"{_PROG} compare: error: every trial failed; first: {f.get('task')} · {f.get('optimizer')}: "
              f"{f.get('error')}{at}", file=sys.stderr)
        return 1
    if failures:
        f = failures[0]
        at = f" at {f['where']}" if f.get("where") else ""
        print(f"{_PROG} compare: error: {len(failures)} trial(s) failed; first: {f['task']} · {f['optimizer']} "
              f"seed {f['seed']}: {f['error']}{at}", file=sys.stderr)
        return 1
    return 0


def _worker(storage: str | None, study_name: str, wait_s: float = 600.0) -> int:
    """``--worker``: run the waiting trials of a comparison until its coordinator finishes it."""
    import time

    import torch

    from .compare.study import TaskCache, _optuna, load, open_storage, work

    if not storage:
        raise UsageError("--worker needs --storage URL (or the --out folder of a running comparison)")
    optuna = _optuna()
    torch.set_num_threads(1)
    st = open_storage(storage)
    deadline = time.monotonic() + wait_s
    while True:  # the coordinator may not have created the study yet
        try:
            study = load(study_name, st)
            meta = study.user_attrs.get("meta")
            if meta is not None:
                break
        except KeyError:
            pass
        if time.monotonic() > deadline:
            raise UsageError(f"no comparison {study_name!r} appeared in {storage} within {wait_s:.0f} s")
        time.sleep(1.0)
    cache = TaskCache(meta, torch.device(meta["config"]["device"]))
    n = work(study, cache, lambda: bool(study.user_attrs.get("finished")), poll_s=0.5)
    print(f"{_PROG} compare --worker: ran {n} trial(s) of {study_name!r}", file=sys.stderr)
    return 0


def _device(name: str) -> Any:
    import torch

    try:
        dev = torch.device(name)
    except RuntimeError as e:
        raise UsageError(f"invalid --device {name!r}: {e}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: CUDA is not available")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"--device {name}: MPS is not available")
    return dev


# ----------------------------------------------------------------------------- others
def _recommend(args: argparse.Namespace) -> int:
    from .guide.recommend import Traits, recommend, render_recommendations

    if args.top < 1:
        raise UsageError(f"invalid --top {args.top}; expected >= 1")
    traits = Traits(
        model=args.model,
        sparse=args.sparse,
        data_size=args.data_size,
        memory_tight=args.memory_tight,
        no_tuning=args.no_tuning,
        fine_tune=args.fine_tune,
    )
    recs = recommend(traits, top=args.top)
    if args.json:
        import json

        print(json.dumps([r.as_dict() for r in recs], indent=1))
    else:
        sys.stdout.write(render_recommendations(traits, recs))
    return 0


def _explain(args: argparse.Namespace) -> int:
    from .factory import get_spec
    from .guide.explain import _wrap, render_markdown, render_text, terminal_width

    name = args.name.strip()
    head = ""
    if name.lower().startswith("lookahead_"):  # the wrapper: say so, then explain the base
        base = name[len("lookahead_"):]
        head = (f"{name}: optimkit.Lookahead around {base} (k=5, alpha=0.5 unless given): every "
                f"k steps the weights move alpha of the way from their slow copy to where {base} "
                "took them (Zhang et al. 2019; docs/lookahead.md). The base optimizer:")
        head = (head if args.markdown else _wrap(head, "", terminal_width(), "  ")) + "\n\n"
        name = base
    elif "." in name:  # create_optimizer takes a class path; explain covers the registry
        raise UsageError(f"{name!r} is a class path: create_optimizer and compare accept it, but "
                         "explain covers optimkit's registry only (optimkit list); see that "
                         "class's own documentation")
    spec = get_spec(name)
    sys.stdout.write(head + (render_markdown(spec) if args.markdown else render_text(spec)))
    return 0


def _trajectories(args: argparse.Namespace) -> int:
    from .trajectories import FUNCTIONS, draw_trajectories

    funcs = _split_list(args.functions) or list(FUNCTIONS)
    unknown = [f for f in funcs if f not in FUNCTIONS]
    if unknown:
        raise UsageError(f"unknown function {unknown[0]!r}; choose from {', '.join(FUNCTIONS)}")
    if args.steps is not None and args.steps < 1:
        raise UsageError(f"invalid --steps {args.steps}; expected >= 1")
    path = draw_trajectories(args.out, optimizers=_split_list(args.optimizers), functions=funcs, steps=args.steps,
                              tune=not args.no_tune)
    print(f"wrote {path}")
    return 0


def _list(args: argparse.Namespace) -> int:
    from .compare import BUILTIN_TASKS, DEFAULT_SUITE
    from .factory import REGISTRY

    from .guide.explain import _wrap, terminal_width

    width = terminal_width()
    col = max(map(len, [*REGISTRY, *BUILTIN_TASKS]))

    def row(name: str, text: str) -> None:  # wrapped to the terminal, aligned under the text
        print(_wrap(f"{name:<{col}}  {text}", "  ", width, " " * (col + 4)))

    print("optimizers (optimkit explain NAME):")
    for name, spec in REGISTRY.items():
        alias = f" (aliases: {', '.join(spec.aliases)})" if spec.aliases else ""
        row(name, f"{spec.description}{alias}")
    print("tasks (optimkit compare --tasks ...; [optional]: needs data not installed by "
          "default, see docs/compare.md):" if width >= 100 else
          "tasks (optimkit compare --tasks ...;\n  [optional]: needs data not installed by "
          "default, see docs/compare.md):")
    for name, builder in BUILTIN_TASKS.items():
        doc = (builder.__doc__ or "").strip().splitlines()[0]
        row(name, f"{doc}{'' if name in DEFAULT_SUITE else '  [optional]'}")
    return 0


def _bench(argv: list[str]) -> int:
    try:
        from . import bench
    except ImportError as e:
        print(f"{_PROG} bench: error: the benchmark module is not available ({e})", file=sys.stderr)
        return 2
    return int(bench.main(argv) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
