"""The optional compare tasks of optimkit.compare.tasks_extra: found, refused with a hint, built."""

from __future__ import annotations

import pytest
import torch

from optimkit.compare import TaskUnavailable, build_task
from optimkit.compare import tasks_extra


def _fake_fortunes(root, n_files=3, per_file=30_000):
    root.mkdir()
    g = torch.Generator().manual_seed(0)
    letters = "abcdefghijklmnopqrstuvwxyz .,\n"
    for i in range(n_files):
        idx = torch.randint(0, len(letters), (per_file,), generator=g).tolist()
        body = "".join(letters[j] for j in idx)
        (root / f"topic{i}").write_text(body[:per_file // 2] + "\n%\n" + body[per_file // 2:] + "b\x08b")
        (root / f"topic{i}.dat").write_bytes(b"\0")  # the index next to each fortune file
    (root / "README").write_text("not a fortune file: no .dat next to it")


def test_fortunes_missing_raises_with_the_install_hint(tmp_path, monkeypatch):
    monkeypatch.setenv("OPTIMKIT_FORTUNES", str(tmp_path))
    monkeypatch.setattr(tasks_extra, "_FORTUNE_DIRS", ())
    for name in ("fortunes", "fortunes_ft"):
        with pytest.raises(TaskUnavailable, match="apt install fortunes"):
            build_task(name)


def test_fortunes_reads_fortune_files_only(tmp_path, monkeypatch):
    root = tmp_path / "f"
    _fake_fortunes(root)
    monkeypatch.setenv("OPTIMKIT_FORTUNES", str(root))
    text, source = tasks_extra.fortunes_text()
    assert source == str(root) and "not a fortune file" not in text
    assert "\n%\n" not in text and "\x08" not in text  # separators and overstrikes removed
    task = build_task("fortunes")
    assert task.family == "transformer" and task.info["data"] == str(root)
    x, y = next(task.train_batches(torch.Generator().manual_seed(0)))
    assert x.shape == y.shape == (16, 64) and torch.equal(x[:, 1:], y[:, :-1])
    assert task.info["n_val_chars"] == (torch.arange(task.info["chars"]) // 4096 % 10 == 9).sum()
    out = task.make_model()(x)
    assert out.shape == (16, 64, task.info["vocab"])
