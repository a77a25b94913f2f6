"""The optimkit command: entry points, trajectories, bench delegation, one-line errors."""

from __future__ import annotations

import math
import struct
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from optimkit import trajectories as traj
from optimkit.cli import main


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def test_python_dash_m_runs_the_cli():
    r = subprocess.run([sys.executable, "-m", "optimkit", "explain", "sgd"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("sgd: ")


def test_console_script_is_declared():
    from importlib.metadata import entry_points

    eps = [e for e in entry_points(group="console_scripts") if e.name == "optimkit"]
    assert eps and eps[0].value == "optimkit.cli:main"


def test_no_command_prints_help(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    for cmd in ("compare", "recommend", "explain", "trajectories", "bench"):
        assert cmd in out


def test_unknown_command_is_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        main(["frobnicate"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "invalid choice" in err


def test_list(capsys, monkeypatch):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "prodigy" in out and "charlm" in out and "[optional]" in out
    monkeypatch.setenv("COLUMNS", "80")  # wrapped to the terminal, descriptions aligned
    assert main(["list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert max(map(len, lines)) <= 80, max(lines, key=len)
    starts = {line.index(line.split()[1]) for line in lines
              if line.startswith("  ") and line[2] not in " [" and len(line.split()) > 1}
    assert len(starts) == 1, starts  # every description starts in the same column


def test_trajectories_png(tmp_path, capsys):
    out = tmp_path / "t.png"
    rc = main(["trajectories", "--optimizers", "sgd:lr=0.01", "adam:lr=0.1", "--functions", "quadratic", "saddle",
               "--steps", "15", "--no-tune", "--out", str(out)])
    assert rc == 0 and str(out) in capsys.readouterr().out
    assert png_size(out) == (int(traj.FIGSIZE[0] * traj.DPI), int(traj.FIGSIZE[1] * traj.DPI))


def test_trajectory_paths_descend():
    """On the convex quadratic a small-lr SGD path decreases f at every step."""
    fn = traj.FUNCTIONS["quadratic"]
    path = traj.optimize_path(fn, "sgd", {}, 0.01, 30)
    assert len(path.xs) == 31 and not path.diverged
    assert all(b < a for a, b in zip(path.values, path.values[1:]))
    # the function values are the textbook ones at the minima
    for f in traj.FUNCTIONS.values():
        v = float(f.f(torch.tensor(f.minimum[0]), torch.tensor(f.minimum[1])))
        assert math.isclose(v, f.f_min, abs_tol=1e-9), f.name
    # a huge lr leaves the box and is reported as diverged, not drawn forever
    assert traj.optimize_path(fn, "sgd", {}, 10.0, 50).diverged


def test_trajectories_errors_are_one_line(tmp_path, capsys):
    assert main(["trajectories", "--functions", "himmelblau", "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "unknown function 'himmelblau'" in err
    assert main(["trajectories", "--optimizers", "nope", "--out", str(tmp_path / "x.png")]) == 2
    assert "unknown optimizer 'nope'" in capsys.readouterr().err


def test_bench_is_delegated(monkeypatch):
    seen = {}
    fake = types.ModuleType("optimkit.bench")
    fake.main = lambda argv: seen.setdefault("argv", argv) and 0
    monkeypatch.setitem(sys.modules, "optimkit.bench", fake)
    import optimkit

    monkeypatch.setattr(optimkit, "bench", fake, raising=False)
    assert main(["bench", "--quick", "--sizes", "1"]) == 0
    assert seen["argv"] == ["--quick", "--sizes", "1"]


def test_bench_missing_module_is_one_line(monkeypatch, capsys):
    import optimkit

    monkeypatch.setitem(sys.modules, "optimkit.bench", None)  # makes the import fail
    monkeypatch.delattr(optimkit, "bench", raising=False)
    assert main(["bench"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "bench" in err


def test_explain_lookahead_and_class_paths(capsys, monkeypatch):
    """``explain lookahead_adamw`` explains the wrapper, then AdamW; a dotted class path (which
    create_optimizer takes) gets a usage error saying explain covers the registry."""
    monkeypatch.setenv("COLUMNS", "80")
    assert main(["explain", "lookahead_adamw"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("lookahead_adamw: optimkit.Lookahead around adamw")
    assert "\nadamw: Adam with decoupled weight decay" in out
    assert max(map(len, out.splitlines())) <= 80
    assert main(["explain", "torch.optim.NAdam"]) == 2
    err = capsys.readouterr().err
    assert "is a class path" in err and "registry" in err


def test_compare_help_names_the_default_and_optional_tasks(capsys):
    """cli.py imports no torch (a fast --help), so the task names in --help are written out:
    they must stay the registry's."""
    from optimkit.compare import DEFAULT_SUITE
    from optimkit.compare.tasks import OPTIONAL_TASKS

    with pytest.raises(SystemExit):
        main(["compare", "--help"])
    flat = " ".join(capsys.readouterr().out.split())
    assert f"default: {' '.join(DEFAULT_SUITE)}; optional: {' '.join(OPTIONAL_TASKS)};" in flat
