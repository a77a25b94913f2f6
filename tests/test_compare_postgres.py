"""optimkit compare across processes sharing a real PostgreSQL server (Optuna's RDB storage).

A throwaway server is started on loopback (initdb into a temporary folder, pg_ctl on a free
port, its unix socket in that folder; PostgreSQL refuses to run as root, so under uid 0 it runs
as the ``postgres`` system user, or ``nobody``). Two ``optimkit compare --worker`` processes
and one coordinator (``--jobs 0``: it plans, enqueues round 2 and waits) share one comparison;
every trial must run exactly once and the result must equal a single-process run.

Needs Debian's ``postgresql`` package (``make test`` installs it when missing) and the
``psycopg2-binary`` driver (extra ``cluster``). Outside CI the test skips, saying why, when
either is missing; in CI (``CI=true``) it fails instead.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from optimkit.cli import main
from optimkit.compare import parse_optimizer_choice, result_from_storage, run_compare

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from test_compare_study import _strip, make_blobs  # noqa: E402

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def _missing(reason: str) -> None:
    if IN_CI:
        pytest.fail(f"{reason} (CI=true: this test must run; `make test` installs PostgreSQL)")
    pytest.skip(reason)


def _pg_bin() -> Path | None:
    found = shutil.which("initdb")
    if found:
        return Path(found).resolve().parent
    dirs = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(p.split("/")[-2]) if p.split("/")[-2].isdigit() else 0)
    return Path(dirs[-1]) if dirs and (Path(dirs[-1]) / "initdb").exists() else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def pg_url():
    bindir = _pg_bin()
    if bindir is None:
        _missing("PostgreSQL server binaries (initdb, pg_ctl) not found: apt-get install -y postgresql")
    try:
        import psycopg2  # noqa: F401
    except ImportError:
        _missing("the PostgreSQL driver is missing: pip install 'optimkit[cluster]'")
    root = tempfile.mkdtemp(prefix="optimkit-pg-")
    prefix: list[str] = []
    if os.geteuid() == 0:  # postgres refuses to run as root
        user = next((u for u in ("postgres", "nobody") if _has_user(u)), None)
        if user is None:
            _missing("running as root and no 'postgres' or 'nobody' user to run the server as")
        os.chown(root, pwd.getpwnam(user).pw_uid, pwd.getpwnam(user).pw_gid)
        prefix = ["runuser", "-u", user, "--"]
    os.chmod(root, 0o700)
    data, port = f"{root}/data", _free_port()
    subprocess.run([*prefix, str(bindir / "initdb"), "-D", data, "-U", "optimkit", "--auth=trust", "-E", "UTF8",
                    "--no-sync"], check=True, capture_output=True, timeout=120)
    opts = f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off"
    r = subprocess.run([*prefix, str(bindir / "pg_ctl"), "-D", data, "-l", f"{root}/log", "-w", "-t", "60",
                        "-o", opts, "start"], capture_output=True, text=True, timeout=120)
    if r.returncode:
        log = Path(f"{root}/log").read_text() if Path(f"{root}/log").exists() else ""
        pytest.fail(f"pg_ctl start failed: {r.stderr.strip()} {log[-500:]}")
    try:
        yield f"postgresql+psycopg2://optimkit@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*prefix, str(bindir / "pg_ctl"), "-D", data, "-m", "immediate", "stop"], capture_output=True,
                       timeout=60)
        shutil.rmtree(root, ignore_errors=True)


def _has_user(name: str) -> bool:
    try:
        pwd.getpwnam(name)
        return True
    except KeyError:
        return False


def _cli(argv: list[str]) -> None:
    sys.exit(main(argv))


def test_two_workers_share_one_comparison(pg_url, tmp_path):
    import multiprocessing as mp

    # forked from this process: a fresh interpreter would spend ~10 s importing torch per worker
    ctx = mp.get_context("fork")
    workers = [ctx.Process(target=_cli, args=(["compare", "--worker", "--storage", pg_url],)) for _ in range(2)]
    for w in workers:
        w.start()
    try:
        # the coordinator: plans (incl. round 2 once round 1 is in), runs nothing itself, renders the report
        rc = main(["compare", "--task", f"{HERE / 'test_compare_study.py'}:make_blobs", "--optimizers", "sgd", "adam",
                   "--steps", "20", "--seeds", "2", "--budget", "4", "--jobs", "0", "--storage", pg_url,
                   "--out", str(tmp_path / "r"), "--no-progress"])
        assert rc == 0
        for w in workers:
            w.join(timeout=120)
    finally:
        for w in workers:
            if w.is_alive():
                w.kill()
    assert [w.exitcode for w in workers] == [0, 0]
    result = result_from_storage(pg_url)
    trials = result["trials"]
    keys = [(t["optimizer"], t["point"], t["seed"]) for t in trials]
    planned = 2 * (1 + 4) * 2
    assert len(trials) == len(set(keys)) == planned  # every trial ran exactly once
    assert all(t["state"] == "COMPLETE" for t in trials)
    assert len({t["worker"] for t in trials}) == 2  # both workers took trials
    single = run_compare([make_blobs()], [parse_optimizer_choice(s) for s in ("sgd", "adam")], steps=20, seeds=2,
                         budget=4, jobs=1)
    a, b = _strip(result), _strip(single)
    a.pop("config"), b.pop("config")
    assert a == b
