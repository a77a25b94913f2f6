"""The step-time benchmark tool: a --quick run completes and its table agrees with its JSON.

No timed assertions: timings on a shared machine are noise. What is checked is the
bookkeeping: one entry per (optimizer, implementation), positive times, the floor fraction
printed for every row equal to bytes/param x params / bandwidth / time recomputed from the
JSON, and the "n/a" path for an optimizer that is not implemented.
"""

from __future__ import annotations

import json

import pytest
import torch

import optimkit
from optimkit import bench

QUICK = ["--quick", "--threads", "1", "--repeats", "2", "--warmup", "1", "--window", "0.001"]


def _table_rows(text: str) -> dict[str, list[list[str]]]:
    """Body rows of each printed per-set table, keyed by set name (from the table title)."""
    rows: dict[str, list[list[str]]] = {}
    current = None
    for line in text.splitlines():
        head = line.split(":", 1)[0].strip()
        if head in bench.SETS and "fp32 parameters" in line:
            current = head
            rows[current] = []
        elif line.startswith("targets"):
            current = None
        elif current and line.startswith("│"):
            rows[current].append([c.strip() for c in line.strip("│").split("│")])
    return rows


def _expected_candidates() -> set[tuple[str, str]]:
    out = set()
    for algo in bench.ALGORITHMS:
        for c in bench.candidates_for(algo):
            out.add((algo, c.label))
    return out


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench") / "quick.json"
    import contextlib
    import io

    buf = io.StringIO()
    threads = torch.get_num_threads()
    with contextlib.redirect_stdout(buf):
        rc = bench.main([*QUICK, "--json", str(path)])
    assert torch.get_num_threads() == threads, "main() must restore the thread count"
    return rc, buf.getvalue(), json.loads(path.read_text())


def test_quick_run_has_every_entry_with_positive_times(quick_run):
    rc, _, report = quick_run
    assert rc == 0
    sets = report["sets"]
    assert set(sets) == {"transformer", "small"}
    for meta in sets.values():
        assert 0 < meta["tensors"] <= 64  # --quick: tiny sets
    assert report["bandwidth"]["GBps"] > 0
    want = _expected_candidates()
    for set_name in sets:
        got = {(r["optimizer"], r["label"]) for r in report["results"] if r["set"] == set_name}
        assert got == want
        for r in report["results"]:
            if r["set"] != set_name:
                continue
            if r["status"] != "ok":
                # Only an optimizer that is still a placeholder may be missing.
                assert r["status"] == "n/a" and "NotImplementedError" in r["reason"], r
                continue
            assert r["ms_per_step"] > 0 and r["cold_ms"] > 0
            assert all(w > 0 for w in r["window_ms"])
            assert r["state_bytes_per_param"] >= 0
    # SGD is implemented: every one of its rows is measured, with torch's fused kernel the
    # only kind of anchor that is not a loop; momentum keeps one fp32 buffer per parameter.
    sgd = [r for r in report["results"] if r["optimizer"] == "sgd_momentum"]
    assert all(r["status"] == "ok" for r in sgd)
    for r in sgd:
        params = report["sets"][r["set"]]["params"]
        assert r["state_bytes_per_param"] == pytest.approx(4.0, abs=64 / params)


def test_printed_floor_fraction_matches_json(quick_run):
    _, text, report = quick_run
    rows = _table_rows(text)
    for set_name, meta in report["sets"].items():
        json_rows = [r for r in report["results"] if r["set"] == set_name]
        printed = rows[set_name]
        assert len(printed) == len(json_rows)
        n_checked = 0
        for cells, r in zip(printed, json_rows):
            assert cells[1] == r["label"]
            if r["status"] != "ok":
                assert cells[2] == r["status"]
                continue
            bpp = bench.BYTES_PER_PARAM[r["optimizer"]]
            bw = r["bandwidth_GBps"] * 1e9
            assert bw > 0
            want = bpp * meta["params"] / bw / (r["ms_per_step"] / 1e3)
            pct = float(cells[4].rstrip("%"))
            decimals = 1 if 100 * want < 10 else 0
            assert pct == pytest.approx(100 * want, abs=0.5 * 10**-decimals + 1e-9), (set_name, r["label"])
            n_checked += 1
        assert n_checked > 0


def test_not_implemented_optimizer_prints_na(monkeypatch, capsys):
    class Placeholder(optimkit.SGD):
        def __init__(self, params, **kwargs):
            raise NotImplementedError("RAdam is not implemented yet")

    monkeypatch.setattr(optimkit, "RAdam", Placeholder)
    assert bench.main([*QUICK, "--sets", "small", "--optimizers", "radam"]) == 0
    rows = _table_rows(capsys.readouterr().out)["small"]
    by_label = {cells[1]: cells for cells in rows}
    assert by_label["optimkit reference"][2] == "n/a"
    assert by_label["optimkit foreach"][2] == "n/a"
    assert by_label["torch foreach"][2] not in ("n/a", "error")


def test_render_reprints_a_saved_run(quick_run, tmp_path, capsys):
    _, text, report = quick_run
    path = tmp_path / "saved.json"
    path.write_text(json.dumps(report))
    assert bench.main(["--render", str(path)]) == 0
    assert _table_rows(capsys.readouterr().out) == _table_rows(text)


def test_bad_arguments_are_rejected():
    with pytest.raises(SystemExit):
        bench.main(["--optimizers", "adam,nosuch"])
    with pytest.raises(SystemExit):
        bench.main(["--repeats", "0"])



def test_run_leaves_denormals_representable(quick_run):
    """The benchmark flushes denormals while timing; it must not leak that into the process."""
    tiny = torch.tensor(torch.finfo(torch.float32).tiny, dtype=torch.float32)
    assert float(tiny / 4) > 0.0
