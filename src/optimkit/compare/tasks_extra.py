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
from pathlib import Path

import torch

from .tasks import Task, TaskUnavailable, _CharTransformer, _lm_loss, char_lm_task, char_vocab, encode_chars

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
    stoi = char_vocab(text)  # rarer characters -> id 0
    ids = encode_chars(text, stoi)
    vocab = len(stoi) + 1
    ctx = 64
    # the files are sorted by topic: validation = every 10th block of 4096 characters
    is_val = (torch.arange(len(ids)) // 4096) % 10 == 9
    train_ids, val_ids = ids[~is_val], ids[is_val]
    return char_lm_task(
        "fortunes", train_ids, val_ids, lambda: _CharTransformer(vocab, ctx),
        target=10.0,
        description="2-layer causal transformer (d=48, 4 heads), characters of Debian fortunes, context 64",
        family="transformer",
        info={"data": source, "chars": len(ids), "vocab": vocab, "context": ctx, "n_val_chars": int(is_val.sum())},
        ctx=ctx,
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
    stoi = char_vocab(target, pre_text)
    vocab, ctx, batch = len(stoi) + 1, 64, 16

    def encode(text: str) -> torch.Tensor:
        return encode_chars(text, stoi)

    ids = encode(target)
    is_val = (torch.arange(len(ids)) // 4096) % 10 == 9
    train_ids, val_ids = ids[~is_val], ids[is_val]
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

    return char_lm_task(
        "fortunes_ft", train_ids, val_ids, make_model,
        target=8.0,
        description="fine-tuning: char transformer pretrained on CPython docs (200 AdamW steps), trained on fortunes",
        family="fine-tune",
        info={"data": source, "pretrained_on": pre_source, "pretrain": "AdamW lr 3e-3, 200 steps, seed 123",
              "chars": len(ids), "vocab": vocab, "context": ctx},
        ctx=ctx, batch=batch,
    )
