"""Optional compare tasks on real offline data that is not always installed.

``fortunes``: a character-level transformer language model on the Debian ``fortunes``
package (``/usr/share/games/fortunes``: ~2.5 MB of quotations, jokes and prose in ~40 files;
``apt install fortunes``). It is the charlm task on a second, larger and different body of
English: short informal texts instead of a language reference. Nothing is downloaded; when the
files are missing the task raises :class:`~optimkit.compare.tasks.TaskUnavailable` saying how
to get them. ``OPTIMKIT_FORTUNES`` may name another folder of fortune files.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import torch

from .tasks import Batch, Task, TaskUnavailable, _CharTransformer, _lm_loss

__all__ = ["make_fortunes", "fortunes_text"]

_FORTUNE_DIRS = ("/usr/share/games/fortunes", "/usr/share/fortunes", "/usr/share/games/fortune")
_BACKSPACE = re.compile(r".\x08")  # "overstriking" (bold/underline as char + backspace)


def fortunes_text() -> tuple[str, str]:
    """The concatenated fortune files (``%`` separators removed) and the folder they came from.

    Raises:
        TaskUnavailable: no folder with fortune files (``apt install fortunes``).
    """
    dirs = [os.environ["OPTIMKIT_FORTUNES"]] if os.environ.get("OPTIMKIT_FORTUNES") else []
    for d in dirs + list(_FORTUNE_DIRS):
        root = Path(d)
        # a fortune file has a binary index next to it: "name" + "name.dat"
        files = sorted(p for p in root.glob("*") if p.is_file() and (root / (p.name + ".dat")).is_file())
        if files:
            parts = []
            for f in files:
                text = _BACKSPACE.sub("", f.read_text(encoding="utf-8", errors="replace"))
                parts.append("\n".join(line for line in text.splitlines() if line.strip() != "%"))
            return "\n\n".join(parts), str(root)
    raise TaskUnavailable(
        "fortunes needs the Debian package fortunes: apt install fortunes "
        "(or set OPTIMKIT_FORTUNES to a folder of fortune files)"
    )


def make_fortunes(quick: bool = False) -> Task:
    """A 2-layer character transformer on the Debian fortunes (a second real-prose char-LM)."""
    text, source = fortunes_text()
    counts = Counter(text)
    chars = sorted(c for c, n in counts.items() if n >= 20)  # rarer characters -> id 0
    stoi = {c: i + 1 for i, c in enumerate(chars)}
    ids = torch.tensor([stoi.get(c, 0) for c in text], dtype=torch.long)
    vocab = len(chars) + 1
    ctx, batch = 64, 16
    # the files are sorted by topic: validation = every 10th block of 4096 characters
    blocks = torch.arange(len(ids)) // 4096
    is_val = blocks % 10 == 9
    train_ids, val_ids = ids[~is_val], ids[is_val]
    g = torch.Generator().manual_seed(1)
    starts = torch.randint(0, len(val_ids) - ctx - 1, (96,), generator=g)
    val_x = torch.stack([val_ids[s: s + ctx] for s in starts])
    val_y = torch.stack([val_ids[s + 1: s + ctx + 1] for s in starts])

    def batches(gen: torch.Generator) -> Iterator[Batch]:
        offsets = torch.arange(ctx)
        while True:
            s = torch.randint(0, len(train_ids) - ctx - 1, (batch, 1), generator=gen)
            yield train_ids[s + offsets], train_ids[s + offsets + 1]

    return Task(
        name="fortunes",
        make_model=lambda: _CharTransformer(vocab, ctx),
        loss_fn=_lm_loss,
        train_batches=batches,
        val_data=(val_x, val_y),
        metric="perplexity",
        steps=300,
        quick_steps=60,
        target=10.0,
        description="2-layer causal transformer (d=48, 4 heads), characters of Debian fortunes, context 64",
        family="transformer",
        info={"data": source, "chars": len(ids), "vocab": vocab, "context": ctx, "n_val_chars": int(is_val.sum())},
    )
