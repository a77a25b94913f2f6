"""The step-time benchmark tool: a --quick run completes and its table agrees with its JSON.

No timed assertions: timings on a shared machine are noise. What is checked is the
bookkeeping: one entry per (optimizer, implementation), positive times with their spread, the
floor fraction printed for every row equal to bytes/param x params / ceiling / time
recomputed from the JSON, the ceiling the best of its probes, the "n/a" path for an optimizer
that is not implemented; and the mechanics a trustworthy run needs: every window starts from
the pristine gradients, a candidate that changes them is named, a failing candidate prints
its whole message and makes the run exit non-zero, and the contention scenario's background
process is started and always stopped. On a narrow console (80, 100, 120 columns) the tables
are printed compact and split: no line is wider than the console, nothing is cut, and every
value of the wide layout is still printed, equal to the JSON's numbers.
"""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import pytest
import torch
from rich.console import Console

import optimkit
from optimkit import bench, bench_cli, bench_contention, bench_report

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


@pytest.fixture(scope="module", autouse=True)
def _no_columns():
    """bench.main honours $COLUMNS when stdout is not a terminal; these tests parse the wide
    layout it prints without one (140 columns) unless they set a width."""
    import os

    old = os.environ.pop("COLUMNS", None)
    yield
    if old is not None:
        os.environ["COLUMNS"] = old


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
    assert set(sets) == set(bench.DEFAULT_SETS)
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
            assert r["ms_min"] <= r["ms_per_step"] <= r["ms_max"]
            assert r["ms_min"] <= r["ms_mean"] <= r["ms_max"]
            assert r["ms_min"] == min(r["window_ms"]) and r["ms_max"] == max(r["window_ms"])
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
            assert cells[3] == bench_report.format_spread(r)
            pct = float(cells[5].rstrip("%"))
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


# ----------------------------------------------------------------- ceiling and gradients
def test_ceiling_is_the_best_probe(quick_run):
    _, _, report = quick_run
    bw = report["bandwidth"]
    assert set(bw["probes_GBps"]) == set(bench.PROBES)
    assert bw["GBps"] == max(bw["probes_GBps"].values())
    for r in report["results"]:
        probes = r["probes_GBps"]
        assert set(probes) == set(bench.PROBES) and all(v > 0 for v in probes.values())
        assert r["bandwidth_GBps"] == max(probes.values())  # the floor's ceiling
        assert all(r["bandwidth_GBps"] >= v for v in probes.values())


def test_torch_nesterov_foreach_is_noted_for_changing_grads(quick_run):
    """torch 2.13's foreach SGD with nesterov adds the momentum into p.grad in place."""
    _, text, report = quick_run
    row = next(r for r in report["results"]
               if r["optimizer"] == "sgd_nesterov" and r["label"] == "torch foreach")
    assert row["note"] == "changes p.grad"
    assert "changes p.grad" in text
    # optimkit's paths leave the gradients alone (tests/test_grads_untouched.py checks values)
    assert all(r["note"] == "" for r in report["results"] if r["library"] == "optimkit")


def test_param_set_restores_and_detects_gradients():
    pset = bench.ParamSet.build("t", [(3, 2), (5,)])
    assert pset.grads_changed() == ""
    pset.params[1].grad.mul_(2)
    assert pset.grads_changed() == "changes p.grad"
    pset.restore_grads()
    assert pset.grads_changed() == ""
    pset.params[0].grad = torch.zeros(3, 2)
    assert pset.grads_changed() == "replaces p.grad"
    pset.restore_grads()
    assert pset.params[0].grad is pset.grad_views[0] and pset.grads_changed() == ""


class _Mutator(torch.optim.Optimizer):
    """Doubles every gradient in place, and replaces one (``replace=True``)."""

    def __init__(self, params, replace=False):
        super().__init__(params, {})
        self.replace = replace

    def step(self, closure=None):
        for g in self.param_groups:
            for p in g["params"]:
                p.grad.mul_(2.0)
            if self.replace:
                g["params"][0].grad = g["params"][0].grad.clone()


class _Spy(torch.optim.Optimizer):
    """Records, at every step, whether each gradient still holds the pristine values."""

    seen: list[bool] = []

    def __init__(self, params, pristine):
        super().__init__(params, {})
        self.pristine = pristine

    def step(self, closure=None):
        ps = self.param_groups[0]["params"]
        got = torch.cat([p.grad.reshape(-1) for p in ps])
        _Spy.seen.append(bool(torch.equal(got, self.pristine)))


def _fake_candidates(monkeypatch, extra):
    """Replace the candidates of every algorithm by ``extra(pset_grads)`` builders."""
    real_build = bench.ParamSet.build
    holder = {}

    def build(*a, **k):
        holder["pset"] = real_build(*a, **k)
        return holder["pset"]

    monkeypatch.setattr(bench.ParamSet, "build", build)
    monkeypatch.setattr(bench, "candidates_for", lambda algo, *a, **k: extra(algo, holder))


def test_every_window_starts_from_pristine_grads_and_mutators_are_noted(monkeypatch, tmp_path, capsys):
    _Spy.seen = []

    def cands(algo, holder):
        return [
            bench.Candidate(algo, "test", "mutator", lambda ps: _Mutator(ps)),
            bench.Candidate(algo, "test", "replacer", lambda ps: _Mutator(ps, replace=True)),
            bench.Candidate(algo, "test", "spy", lambda ps: _Spy(ps, holder["pset"].grad_init.clone()),
                            anchor=True),
        ]

    _fake_candidates(monkeypatch, cands)
    path = tmp_path / "r.json"
    assert bench.main([*QUICK, "--sets", "small", "--optimizers", "sgd", "--repeats", "3",
                       "--json", str(path)]) == 0
    assert _Spy.seen and all(_Spy.seen)  # cold step, warm-up, every step of every window
    rows = {r["label"]: r for r in json.loads(path.read_text())["results"]}
    assert rows["test mutator"]["note"] == "changes p.grad"
    assert rows["test replacer"]["note"] == "replaces p.grad"
    assert rows["test spy"]["note"] == ""
    printed = {c[1]: c for c in _table_rows(capsys.readouterr().out)["small"]}
    assert printed["test mutator"][-1] == "changes p.grad"
    assert printed["test replacer"][-1] == "replaces p.grad"


def test_an_error_row_prints_its_whole_message_and_fails_the_run(monkeypatch, capsys, tmp_path):
    long = ("the kernel refused this group: " + " ".join(f"detail{i}=[{i}]" for i in range(60))
            + "\nsecond line of the message")

    class Broken(torch.optim.Optimizer):
        def __init__(self, params):
            super().__init__(params, {})

        def step(self, closure=None):
            raise RuntimeError(long)

    def cands(algo, holder):
        return [bench.Candidate(algo, "test", "broken", lambda ps: Broken(ps)),
                bench.Candidate(algo, "test", "spy", lambda ps: _Spy(ps, holder["pset"].grad_init.clone()),
                                anchor=True)]

    _fake_candidates(monkeypatch, cands)
    path = tmp_path / "r.json"
    assert bench.main([*QUICK, "--sets", "small", "--optimizers", "sgd", "--json", str(path)]) == 1
    out = capsys.readouterr().out
    squashed = "".join(out.split())
    assert "".join(f"RuntimeError: {long}".split()) in squashed  # nothing cut, [..] not eaten
    row = next(r for r in json.loads(path.read_text())["results"] if r["label"] == "test broken")
    assert row["status"] == "error" and row["reason"] == f"RuntimeError: {long}"
    assert bench.main(["--render", str(path)]) == 1  # a saved run with an error row too


# ------------------------------------------------------------------------- contention
def _contention_cfg(**kw):
    args = bench_cli.build_parser().parse_args(
        ["--contention", *QUICK[:1], "--optimizers", "sgd_momentum", "--sets", "mlp",
         "--repeats", "1", "--warmup", "0", "--window", "0.001"])
    return bench_cli.config_from_args(args)


def test_contention_starts_and_stops_one_background_process():
    cfg = _contention_cfg()
    bg = bench_contention.Background(60.0)
    report = bench_contention.run_contention(cfg, background=bg)
    pid = report["contention"]["pid"]
    assert pid == bg.pid and pid is not None
    assert report["contention"]["alive_at_stop"] is True  # it ran through the loaded phase
    assert not bench_contention.pid_alive(pid)
    rows = report["results"]
    assert {(r["phase"], r["label"]) for r in rows} == {
        (ph, lab) for ph in ("idle", "loaded") for lab in ("optimkit default", "torch default")}
    for r in rows:
        assert r["status"] == "ok" and r["ms_min"] <= r["ms_mean"] <= r["ms_max"]
        if r["library"] == "optimkit":
            assert r["ratio_to_anchor"] == pytest.approx(r["ms_mean"] / next(
                x["ms_mean"] for x in rows if x["phase"] == r["phase"] and x["library"] == "torch"))
    assert {t["phase"] for t in report["targets"]} == {"idle", "loaded"}


def test_contention_process_is_stopped_on_interrupt(monkeypatch):
    cfg = _contention_cfg()
    bg = bench_contention.Background(60.0)
    real = bench_contention._measure_algo

    def interrupted(*a, **k):
        if bg.proc is not None:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(bench_contention, "_measure_algo", interrupted)
    with pytest.raises(KeyboardInterrupt):
        bench_contention.run_contention(cfg, background=bg)
    assert bg.pid is not None and not bench_contention.pid_alive(bg.pid)


def test_prodigy_targets_against_adamw_use_the_same_run():
    """Issue 14 item 3: Prodigy's default and compiled rows over (52/28) x torch's fused AdamW
    of the same run, and the compiled first step against the cold or warm budget."""
    from optimkit.bench_report import evaluate_targets

    def row(algo, library, impl, label, ms, cold=100.0):
        return dict(set="transformer", optimizer=algo, library=library, impl=impl, label=label,
                    status="ok", ms_per_step=ms, cold_ms=cold, ratio_to_anchor=1.0,
                    floor_fraction=0.5)

    results = [row("adamw", "torch", "fused", "torch fused", 10.0),
               row("prodigy", "optimkit", "default", "optimkit default", 10.0 * 52 / 28 * 2.0),
               row("prodigy", "optimkit", "flat+compiled", "optimkit flat+compiled",
                   10.0 * 52 / 28 * 1.1, cold=4000.0),
               row("prodigy", "prodigyopt", "default", "prodigyopt", 100.0)]
    for cold, limit in ((True, 5.0), (False, 1.0)):
        report = dict(results=results, sets={"transformer": {}},
                      bytes_per_param={"adamw": 28, "prodigy": 52},
                      meta={"config": {"cold_compile": cold}})
        got = {t["target"]: t for t in evaluate_targets(report) if t["optimizer"] == "prodigy"}
        assert got["default <= 1.6x (52/28) AdamW"]["value"] == pytest.approx(2.0)
        assert got["default <= 1.6x (52/28) AdamW"]["met"] is False
        assert got["compiled <= 1.15x (52/28) AdamW"]["value"] == pytest.approx(1.1)
        assert got["compiled <= 1.15x (52/28) AdamW"]["met"] is True
        which = "cold" if cold else "warm"
        t = got[f"compile {which} <= {limit:g} s"]
        assert t["value"] == pytest.approx(4.0) and t["met"] is (4.0 <= limit)


# ------------------------------------------------------------------ narrow consoles
# On a console narrower than the wide table, every table is printed compact (notes as
# numbered footnotes, the anchor as "anchor") and split into parts that repeat the key
# columns. The checks: no line longer than the width, no ellipsis, and every value of the
# wide layout still printed, equal to the JSON's numbers.
DOCS = Path(__file__).resolve().parent.parent / "docs"


def _render(report: dict, width: int) -> str:
    buf = io.StringIO()
    saved = json.loads(json.dumps(report))  # print_saved fills in derived fields
    bench_report.print_saved(saved, Console(file=buf, width=width, color_system=None, legacy_windows=False))
    return buf.getvalue()


def _parsed_tables(text: str) -> list[tuple[str, list[str], list[list[str]]]]:
    """(title's last line, headers, body rows) of every printed table, one row per body line."""
    tables = []
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if not line.startswith("┏"):
            continue
        title = lines[i - 1].strip() if i else ""
        headers = [c.strip() for c in lines[i + 1].strip("┃").split("┃")]
        rows = []
        for body in lines[i + 3:]:
            if body.startswith("└"):
                break
            if body.startswith("│"):
                rows.append([c.strip() for c in body.strip("│").split("│")])
        tables.append((title, headers, rows))
    return tables


def _set_parts(text: str, title_re: str) -> dict[str, list[dict[str, str]]]:
    """The parts of each set's table joined back into one row per result: header -> cell."""
    out: dict[str, list[dict[str, str]]] = {}
    for title, headers, rows in _parsed_tables(text):
        m = re.match(title_re, title)
        if not m:
            continue
        name, part = m.group(1), m.group(2)
        if part in (None, "1"):
            out[name] = [dict(zip(headers, r)) for r in rows]
        else:
            assert len(rows) == len(out[name])
            for joined, r in zip(out[name], rows):
                for h, c in zip(headers, r):
                    assert joined.get(h, c) == c, (h, joined.get(h), c)  # key columns repeated
                    joined[h] = c
    return out


_SET_TITLE = r"^(\w+): [\d,]+ fp32 parameters in \d+ tensors(?: \(part (\d) of \d\))?$"


def _footnotes(text: str) -> dict[str, dict[str, str]]:
    """Per set, the numbered footnotes printed under its tables: number -> text."""
    out: dict[str, dict[str, str]] = {}
    current = None
    for line in text.splitlines():
        m = re.match(_SET_TITLE, line.strip())
        if m:
            current = m.group(1)
        m = re.match(r"^\((\d+)\) (.+)$", line)
        if m and current:
            out.setdefault(current, {})[m.group(1)] = m.group(2)
    return out


def _check_lines(text: str, width: int) -> None:
    for line in text.splitlines():
        assert len(line) <= width, (width, line)
        assert "…" not in line and "..." not in line, line


def _check_narrow_report(report: dict, text: str) -> None:
    """Every value of every row of the step-time tables, recomputed from the JSON."""
    assert "(part 2 of" in text  # split: the wide table does not fit
    parts = _set_parts(text, _SET_TITLE)
    assert set(parts) == set(report["sets"])
    all_notes = _footnotes(text)
    for set_name, meta in report["sets"].items():
        notes = all_notes.get(set_name, {})
        rows = [r for r in report["results"] if r["set"] == set_name]
        printed = parts[set_name]
        assert len(printed) == len(rows)
        names = [c["optimizer"] for c in printed]
        for algo in dict.fromkeys(r["optimizer"] for r in rows):
            first = next(i for i, r in enumerate(rows) if r["optimizer"] == algo)
            assert names[first] == bench.TITLES[algo]
            assert names[first + 1] == f"{bench.BYTES_PER_PARAM[algo]} B/param"
            group = [r for r in rows if r["optimizer"] == algo]
            if len(group) > 3:  # the floor and the ceiling it was computed from
                assert names[first + 2] == f"floor {bench_report._fmt_ms(group[0]['floor_ms'])} ms"
                assert names[first + 3] == f"at {group[0]['bandwidth_GBps']:.1f} GB/s"
        for cells, r in zip(printed, rows):
            label, mark = re.fullmatch(r"(.+?)(?: \((\d+)\))?", cells["implementation"]).groups()
            assert label == r["label"]
            note = "see below" if r["status"] != "ok" else r.get("note", "")
            assert (notes[mark] if mark else "") == note
            if r["status"] != "ok":
                assert cells["ms/step"] == r["status"]
                continue
            assert cells["ms/step"] == bench_report._fmt_ms(r["ms_per_step"])
            assert cells["spread"] == bench_report.format_spread(r)
            assert cells["vs anchor"] == ("anchor" if r["is_anchor"] else f"{r['ratio_to_anchor']:.2f}x")
            bw = r["bandwidth_GBps"] * 1e9
            want = bench.BYTES_PER_PARAM[r["optimizer"]] * meta["params"] / bw / (r["ms_per_step"] / 1e3)
            pct = float(cells["floor"].rstrip("%"))
            decimals = 1 if 100 * want < 10 else 0
            assert pct == pytest.approx(100 * want, abs=0.5 * 10**-decimals + 1e-9), (set_name, r["label"])
            assert cells["cold ms"] == bench_report._fmt_ms(r["cold_ms"])
            assert cells["state B/param"] == f"{r['state_bytes_per_param']:.1f}"


def _targets_cells(text: str) -> dict[tuple[str, str], dict[str, set[str]]]:
    """Each targets row: header -> its targets (a cell's lines, or the wide cell split at "; ")."""
    out: dict[tuple[str, str], dict[str, set[str]]] = {}
    for title, headers, rows in _parsed_tables(text):
        if headers[:2] != ["set", "optimizer"]:
            continue
        key = None
        for r in rows:
            cells = dict(zip(headers, r))
            if cells["set"]:
                key = (cells["set"], cells["optimizer"])
                out.setdefault(key, {})
            for h, c in cells.items():
                if h not in ("set", "optimizer") and c:
                    out[key].setdefault(h, set()).update(c.split("; "))
    return out


def _derived(report: dict) -> list:
    saved = json.loads(json.dumps(report))
    bench_report.fill_derived(saved["results"], saved["sets"])
    return saved["results"]


@pytest.mark.parametrize("width", [80, 100])
def test_narrow_report_fits_and_keeps_every_value(quick_run, width):
    _, _, report = quick_run
    wide = _render(report, 140)
    assert "(part" not in wide and "note" in wide
    text = _render(report, width)
    _check_lines(text, width)
    _check_narrow_report(report | {"results": _derived(report)}, text)
    assert _targets_cells(text) == _targets_cells(wide)


def test_narrow_notes_and_failures_are_footnotes(quick_run):
    _, _, report = quick_run
    report = json.loads(json.dumps(report))
    rows = [r for r in report["results"] if r["set"] == "small"]
    rows[0]["note"] = "changes p.grad"
    rows[5]["note"] = "changes p.grad"
    rows[6]["note"] = "replaces p.grad"
    rows[1].update(status="error", reason="RuntimeError: " + " ".join(f"word{i}" for i in range(40)))
    text = _render(report, 80)
    _check_lines(text, 80)
    _check_narrow_report(report | {"results": _derived(report)}, text)
    assert _footnotes(text)["small"] == {"1": "changes p.grad", "2": "see below", "3": "replaces p.grad"}
    assert "".join(rows[1]["reason"].split()) in "".join(text.split())  # the whole message


@pytest.mark.parametrize("name", ["bench-2026-11-30b.json", "bench-2026-11-30.json"])
@pytest.mark.parametrize("width", [80, 120, 200])
def test_saved_runs_at_common_widths(name, width):
    path = DOCS / name
    if not path.exists():
        pytest.skip(f"{path} not present")
    report = json.loads(path.read_text())
    text = _render(report, width)
    _check_lines(text, width)
    wide = _render(report, 140)
    assert _targets_cells(text) == _targets_cells(wide)
    if width >= 140:
        # today's layout: the tables as printed at 140 columns (the header line wraps later)
        assert text[text.index("\ntransformer:"):] == wide[wide.index("\ntransformer:"):]
        assert "(anchor)" in text and "(part" not in text
    else:
        assert "changes p.grad" in text
        if "(part 2 of" in text:
            _check_narrow_report(report | {"results": _derived(report)}, text)


def _contention_rows(text: str) -> dict[str, list[dict[str, str]]]:
    return _set_parts(text, r"^(\w+): [\d,]+ fp32 parameters in \d+ tensors(?: \(part (\d) of \d\))?")


@pytest.mark.parametrize("width", [80, 120])
def test_narrow_contention_keeps_every_value(width):
    path = DOCS / "bench-2026-11-30b-contention.json"
    if not path.exists():
        pytest.skip(f"{path} not present")
    report = json.loads(path.read_text())
    rows = [r for r in report["results"] if r["library"] != "optimkit"]
    rows[0]["note"] = "changes p.grad"  # a note, to see it as a footnote
    text = _render(report, width)
    _check_lines(text, width)
    assert "(1) torch default: changes p.grad" in text or "(1) prodigyopt: changes p.grad" in text
    printed = _contention_rows(text)
    saved = json.loads(json.dumps(report))
    bench_report.fill_derived(saved["results"], saved["sets"], "ms_mean")

    def triple(r):
        f = bench_report._fmt_ms
        return f"{f(r['ms_mean'])} / {f(r['ms_per_step'])} / {f(r['ms_max'])}"

    n = 0
    for set_name in report["sets"]:
        it = iter(printed[set_name])
        for algo in dict.fromkeys(r["optimizer"] for r in saved["results"] if r["set"] == set_name):
            for phase in ("idle", "loaded"):
                grp = [r for r in saved["results"]
                       if r["set"] == set_name and r["optimizer"] == algo and r["phase"] == phase]
                ours = next(r for r in grp if r["library"] == "optimkit")
                theirs = next(r for r in grp if r["library"] != "optimkit")
                cells = next(it)
                assert re.sub(r" \(\d+\)$", "", cells["phase"]) == phase
                assert cells["optimkit default"] == triple(ours)
                assert cells["anchor ms"] == triple(theirs)
                assert cells["anchor"] == theirs["label"]
                assert cells["ratio"] == f"{ours['ratio_to_anchor']:.2f}x"
                limit = bench_report.CONTENTION_LIMITS[phase]
                assert cells["target"] == f"<= {limit:.1f}x {'ok' if ours['ratio_to_anchor'] <= limit else 'NO'}"
                n += 1
    assert n == len(saved["results"]) // 2


def test_width_option_and_columns(monkeypatch, tmp_path, capsys, quick_run):
    _, _, report = quick_run
    path = tmp_path / "saved.json"
    path.write_text(json.dumps(report))
    monkeypatch.delenv("COLUMNS", raising=False)
    assert bench_cli.console_width(None) == 140  # not a terminal: today's wide tables
    monkeypatch.setenv("COLUMNS", "80")
    assert bench_cli.console_width(None) == 80
    assert bench_cli.console_width(100) == 100
    assert bench.main(["--render", str(path)]) == 0
    out = capsys.readouterr().out
    _check_lines(out, 80)
    assert "(part 2 of" in out
    assert bench.main(["--render", str(path), "--width", "200"]) == 0
    assert "(part" not in capsys.readouterr().out
    with pytest.raises(SystemExit):
        bench.main(["--render", str(path), "--width", "5"])
