"""Optional compare tasks on real offline data that is not always installed.

``fortunes``: a character-level transformer language model on the Debian ``fortunes``
package (``/usr/share/games/fortunes``: ~2.5 MB of quotations, jokes and prose in ~40 files;
``apt install fortunes``). It is the charlm task on a second, larger and different body of
English: short informal texts instead of a language reference. Nothing is downloaded; when the
files are missing the task raises :class:`~optimkit.compare.tasks.TaskUnavailable` saying how
to get them. ``OPTIMKIT_FORTUNES`` may name another folder of fortune files.

``fortunes_ft``: fine-tuning. The same transformer, first pretrained (inside the task builder,
deterministically, ~200 steps) on the CPython reference text of the charlm task, then trained
on the fortunes: the setting of LoRA/diffusion fine-tuning where zero-tuning Prodigy presets
are most used.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import torch

from .tasks import Batch, Task, TaskUnavailable, _CharTransformer, _lm_loss

__all__ = ["make_fortunes", "make_fortunes_ft", "fortunes_text"]

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


_PRETRAIN_CACHE: dict[str, object] = {}


def make_fortunes_ft(quick: bool = False) -> Task:
    """Fine-tuning: the charlm transformer pretrained on CPython's reference text, then trained
    on the Debian fortunes (a shift from technical to informal English).

    The pretraining is part of building the task (deterministic: seed 123, AdamW lr 3e-3, 200
    steps, one shared character vocabulary over both texts) and is cached for the process;
    ``make_model`` returns a fresh copy of the pretrained weights, so every run and seed starts
    from the same pretrained model and only the batches differ between seeds.
    """
    from .tasks import _english_text

    target, source = fortunes_text()
    pre_text, pre_source = _english_text()
    counts = Counter(target) + Counter(pre_text)
    chars = sorted(c for c, n in counts.items() if n >= 20)
    stoi = {c: i + 1 for i, c in enumerate(chars)}
    vocab, ctx, batch = len(chars) + 1, 64, 16

    def encode(text: str) -> torch.Tensor:
        return torch.tensor([stoi.get(c, 0) for c in text], dtype=torch.long)

    ids = encode(target)
    is_val = (torch.arange(len(ids)) // 4096) % 10 == 9
    train_ids, val_ids = ids[~is_val], ids[is_val]
    g = torch.Generator().manual_seed(1)
    starts = torch.randint(0, len(val_ids) - ctx - 1, (96,), generator=g)
    val_x = torch.stack([val_ids[s: s + ctx] for s in starts])
    val_y = torch.stack([val_ids[s + 1: s + ctx + 1] for s in starts])
    offsets = torch.arange(ctx)

    key = f"{source}|{pre_source}|{vocab}"
    if key not in _PRETRAIN_CACHE:
        pre_ids = encode(pre_text)
        rng_state = torch.get_rng_state()
        torch.manual_seed(123)
        model = _CharTransformer(vocab, ctx)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        gen = torch.Generator().manual_seed(123)
        for _ in range(200):
            s = torch.randint(0, len(pre_ids) - ctx - 1, (batch, 1), generator=gen)
            opt.zero_grad(set_to_none=True)
            _lm_loss(model(pre_ids[s + offsets]), pre_ids[s + offsets + 1]).backward()
            opt.step()
        torch.set_rng_state(rng_state)  # building a task leaves the global RNG as it found it
        _PRETRAIN_CACHE[key] = {k: v.detach().clone() for k, v in model.state_dict().items()}
    weights = _PRETRAIN_CACHE[key]

    def make_model() -> torch.nn.Module:
        m = _CharTransformer(vocab, ctx)
        m.load_state_dict(weights)
        return m

    def batches(gen: torch.Generator) -> Iterator[Batch]:
        while True:
            s = torch.randint(0, len(train_ids) - ctx - 1, (batch, 1), generator=gen)
            yield train_ids[s + offsets], train_ids[s + offsets + 1]

    return Task(
        name="fortunes_ft",
        make_model=make_model,
        loss_fn=_lm_loss,
        train_batches=batches,
        val_data=(val_x, val_y),
        metric="perplexity",
        steps=300,
        quick_steps=60,
        target=8.0,
        description="fine-tuning: char transformer pretrained on CPython docs (200 AdamW steps), trained on fortunes",
        family="fine-tune",
        info={"data": source, "pretrained_on": pre_source, "pretrain": "AdamW lr 3e-3, 200 steps, seed 123",
              "chars": len(ids), "vocab": vocab, "context": ctx},
    )
