"""The task protocol and the built-in tasks ``optimkit compare`` races optimizers on.

A :class:`Task` is a small, self-contained training problem: a model factory, a loss, the
training data (tensors sampled in minibatches, or your own batch iterator), validation data
and a metric. Built-in tasks use only real data that ships inside installed packages or a
recognised procedural generator; nothing is ever downloaded.

Built-in suite (run by ``optimkit compare`` with no arguments):

========== ============================================================================
logreg     convex: multinomial logistic regression on scikit-learn's bundled digits
           (1797 8x8 images, 64 standardised pixel features, 10 classes)
cnn        image classifier: a small CNN on the same digits as 1x8x8 images
charlm     a 2-layer causal transformer language model over characters of real English
           prose: the Python Language Reference topics shipped in CPython's standard
           library (``pydoc_data.topics``, ~450 KB); falls back to scikit-learn's dataset
           descriptions (``sklearn/datasets/descr/*.rst``, ~43 KB) if it is missing
docbow     sparse features: which library (numpy, torch, scikit-learn, matplotlib) a
           docstring comes from, a linear classifier on word counts (``EmbeddingBag``); the
           docstrings are read from the installed packages' source files. Most words are
           rare, so each embedding row sees few gradients: the setting where per-coordinate
           step sizes (Adagrad, RMSprop) are expected to shine
========== ============================================================================

Optional tasks (run them with ``--tasks``; skipped with a one-line hint when their data is
missing): ``mnist1d`` (an MLP on the procedurally generated MNIST-1D, PyPI ``mnist1d``,
extra ``optimkit[data]``) and ``fashion`` (a CNN on Fashion-MNIST from the Debian package
``dataset-fashion-mnist``).

Why these sources: scikit-learn is a dependency, so digits is always there; the char-LM needs
a few hundred KB of prose and the CPython reference topics are the largest body of real
English that every Python installation ships (the sklearn descriptions alone are 43 KB, half
of it tables); scikit-learn's bundled data are all dense numeric, so the sparse task builds
its bag of words from docstrings, the one large labelled text source every installation has.
"""

from __future__ import annotations

import gzip
import importlib
import importlib.util
import os
import re
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "Task",
    "TaskUnavailable",
    "BUILTIN_TASKS",
    "DEFAULT_SUITE",
    "OPTIONAL_TASKS",
    "build_task",
    "load_user_task",
]


class TaskUnavailable(RuntimeError):
    """A task's optional data is missing; the message is a one-line hint for the user."""


Batch = tuple[Any, Tensor]


@dataclass
class Task:
    """One training problem for ``optimkit compare``.

    The runner calls ``make_model()`` once per (optimizer, seed) after seeding torch, so the
    same seed gives every optimizer the same initial weights. Each training step takes one
    batch ``(inputs, targets)``, computes ``loss_fn(model(inputs), targets)`` (a scalar),
    calls ``backward()`` and ``optimizer.step()``.

    Attributes:
        name: short identifier, used in tables, file names and ``--tasks``.
        make_model: builds a fresh ``nn.Module`` (weights drawn from torch's global RNG).
        loss_fn: ``(model_output, targets) -> scalar Tensor`` to minimise.
        train_data: ``(inputs, targets)`` tensors with examples along dim 0; the runner
            draws minibatches of ``batch_size`` from shuffled epochs (``None``: full batch).
        val_data: ``(inputs, targets)`` evaluated every ``eval_every`` steps (no grad).
        batch_size: minibatch size for ``train_data``; ``None`` for full-batch training.
        train_batches: alternative to ``train_data``: ``f(generator) -> iterator`` yielding
            ``(inputs, targets)`` batches forever; ``generator`` is a seeded
            ``torch.Generator`` so runs are reproducible.
        metric: ``"accuracy"`` (argmax over the last dim of the output), ``"perplexity"``
            (``exp`` of the validation loss), a callable ``(output, targets) -> float``, or
            ``None`` (rank by validation loss only).
        metric_name: column title for a callable metric.
        higher_is_better: direction of a callable metric.
        steps: optimizer steps of a full run; ``quick_steps`` for ``--quick``.
        eval_every: steps between evaluations (default: ``steps // 20``).
        target: the value of the metric (or of the validation loss when ``metric`` is None)
            that counts as "reached" for the steps-to-target column.
        description: one line for the report.
        family: what kind of problem this is (``convex``, ``image``, ``transformer``,
            ``sparse``, ...); ``optimkit recommend`` cites built-in tasks by family.
        info: provenance of the data (source, sizes), copied to the JSON report.
    """

    name: str
    make_model: Callable[[], nn.Module]
    loss_fn: Callable[[Any, Tensor], Tensor]
    train_data: Batch | None = None
    val_data: Batch | None = None
    batch_size: int | None = 64
    train_batches: Callable[[torch.Generator], Iterator[Batch]] | None = None
    metric: str | Callable[[Any, Tensor], float] | None = "accuracy"
    metric_name: str | None = None
    higher_is_better: bool = True
    steps: int = 200
    quick_steps: int | None = None
    eval_every: int | None = None
    target: float | None = None
    description: str = ""
    family: str = ""
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.name or not re.fullmatch(r"[A-Za-z0-9_.\-]+", self.name):
            raise ValueError(f"Task: invalid name={self.name!r}; expected letters, digits, _ . -")
        if (self.train_data is None) == (self.train_batches is None):
            raise ValueError(f"Task {self.name}: give exactly one of train_data or train_batches")
        if isinstance(self.metric, str) and self.metric not in ("accuracy", "perplexity"):
            raise ValueError(
                f"Task {self.name}: invalid metric={self.metric!r}; expected 'accuracy', "
                "'perplexity', a callable or None"
            )
        if self.metric == "accuracy":
            self.metric_name, self.higher_is_better = "accuracy", True
        elif self.metric == "perplexity":
            self.metric_name, self.higher_is_better = "perplexity", False
        elif self.metric is not None and self.metric_name is None:
            self.metric_name = "metric"
        if self.steps < 1:
            raise ValueError(f"Task {self.name}: invalid steps={self.steps}; expected >= 1")

    def steps_for(self, quick: bool) -> int:
        """Step budget of a normal or a ``--quick`` run."""
        if quick:
            return self.quick_steps or max(1, self.steps // 4)
        return self.steps


# ----------------------------------------------------------------------------- data
def _digits() -> tuple[Tensor, Tensor]:
    from sklearn.datasets import load_digits

    d = load_digits()
    return torch.tensor(d.data, dtype=torch.float32), torch.tensor(d.target, dtype=torch.long)


def _split(n: int, val_fraction: float, seed: int = 0) -> tuple[Tensor, Tensor]:
    # a fixed permutation: the train/validation split never depends on the run's seed
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_val = int(round(n * val_fraction))
    return perm[n_val:], perm[:n_val]


def _accuracy_target(name: str) -> float:
    return {"logreg": 0.93, "cnn": 0.95, "docbow": 0.85, "mnist1d": 0.6, "fashion": 0.8}[name]


def make_logreg(quick: bool = False) -> Task:
    """Multinomial logistic regression on digits (a convex problem)."""
    x, y = _digits()
    tr, va = _split(len(y), 0.25)
    mean, std = x[tr].mean(0), x[tr].std(0).clamp_min(1e-3)  # standardise on train only
    x = (x - mean) / std
    return Task(
        name="logreg",
        make_model=lambda: nn.Linear(64, 10),
        loss_fn=nn.functional.cross_entropy,
        train_data=(x[tr], y[tr]),
        val_data=(x[va], y[va]),
        batch_size=64,
        steps=300,
        quick_steps=60,
        target=_accuracy_target("logreg"),
        description="multinomial logistic regression, sklearn digits (64 features, 10 classes)",
        family="convex",
        info={"data": "sklearn.datasets.load_digits", "n_train": len(tr), "n_val": len(va)},
    )


class _SmallCNN(nn.Module):
    def __init__(self, in_ch: int = 1, side: int = 8, n_classes: int = 10, width: int = 16):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_ch, width, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        flat = 2 * width * (side // 2) ** 2
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(flat, 64), nn.ReLU(), nn.Linear(64, n_classes))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


def make_cnn(quick: bool = False) -> Task:
    """A small CNN on the digits as 1x8x8 images."""
    x, y = _digits()
    x = (x / 16.0).reshape(-1, 1, 8, 8)
    tr, va = _split(len(y), 0.25)
    return Task(
        name="cnn",
        make_model=lambda: _SmallCNN(),
        loss_fn=nn.functional.cross_entropy,
        train_data=(x[tr], y[tr]),
        val_data=(x[va], y[va]),
        batch_size=64,
        steps=300,
        quick_steps=60,
        target=_accuracy_target("cnn"),
        description="small CNN (2 conv + 2 fc), sklearn digits as 8x8 images",
        family="image",
        info={"data": "sklearn.datasets.load_digits", "n_train": len(tr), "n_val": len(va)},
    )


def _english_text() -> tuple[str, str]:
    """Real English prose shipped with the installation, and where it came from."""
    try:
        from pydoc_data.topics import topics  # CPython's Language Reference, as help() texts

        return "\n\n".join(topics[k] for k in sorted(topics)), "pydoc_data.topics (CPython stdlib)"
    except ImportError:  # stripped-down Pythons: the scikit-learn dataset descriptions
        import sklearn.datasets

        root = Path(sklearn.datasets.__file__).parent / "descr"
        text = "\n\n".join(p.read_text(encoding="utf-8") for p in sorted(root.glob("*.rst")))
        return text, "sklearn/datasets/descr/*.rst"


class _CharTransformer(nn.Module):
    """A pre-norm causal transformer over characters (GPT-style, tiny)."""

    def __init__(self, vocab: int, ctx: int, d: int = 48, heads: int = 4, layers: int = 2):
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.zeros(ctx, d))
        nn.init.normal_(self.pos, std=0.02)
        layer = nn.TransformerEncoderLayer(
            d, heads, dim_feedforward=4 * d, dropout=0.0, batch_first=True, norm_first=True
        )
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d)
        self.out = nn.Linear(d, vocab)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(ctx), persistent=False)

    def forward(self, idx: Tensor) -> Tensor:
        t = idx.shape[1]
        h = self.tok(idx) + self.pos[:t]
        h = self.blocks(h, mask=self.mask[:t, :t], is_causal=True)
        return self.out(self.norm(h))


def _lm_loss(logits: Tensor, targets: Tensor) -> Tensor:
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def char_vocab(*texts: str) -> dict[str, int]:
    """Character -> id over ``texts``; characters seen fewer than 20 times share id 0."""
    counts: Counter[str] = Counter()
    for t in texts:
        counts.update(t)
    chars = sorted(c for c, n in counts.items() if n >= 20)
    return {c: i + 1 for i, c in enumerate(chars)}


def encode_chars(text: str, stoi: dict[str, int]) -> Tensor:
    return torch.tensor([stoi.get(c, 0) for c in text], dtype=torch.long)


def char_lm_task(
    name: str,
    train_ids: Tensor,
    val_ids: Tensor,
    make_model: Callable[[], nn.Module],
    *,
    target: float,
    description: str,
    family: str,
    info: dict[str, Any],
    ctx: int = 64,
    batch: int = 16,
) -> Task:
    """A character-LM task: next-character cross-entropy, validation perplexity on 96 fixed
    windows of ``ctx`` characters (seeded), training batches of ``batch`` random windows;
    targets are the inputs shifted by one character."""
    g = torch.Generator().manual_seed(1)
    starts = torch.randint(0, len(val_ids) - ctx - 1, (96,), generator=g)
    val_x = torch.stack([val_ids[s : s + ctx] for s in starts])
    val_y = torch.stack([val_ids[s + 1 : s + ctx + 1] for s in starts])

    def batches(gen: torch.Generator) -> Iterator[Batch]:
        offsets = torch.arange(ctx)
        while True:
            s = torch.randint(0, len(train_ids) - ctx - 1, (batch, 1), generator=gen)
            yield train_ids[s + offsets], train_ids[s + offsets + 1]

    return Task(
        name=name,
        make_model=make_model,
        loss_fn=_lm_loss,
        train_batches=batches,
        val_data=(val_x, val_y),
        metric="perplexity",
        steps=300,
        quick_steps=60,
        target=target,
        description=description,
        family=family,
        info=info,
    )


def make_charlm(quick: bool = False) -> Task:
    """A small character-level transformer language model on real English prose."""
    text, source = _english_text()
    stoi = char_vocab(text)
    ids = encode_chars(text, stoi)
    vocab = len(stoi) + 1
    ctx = 64
    n_val = len(ids) // 10
    train_ids, val_ids = ids[:-n_val], ids[-n_val:]  # validation = the last 10%, unseen text
    return char_lm_task(
        "charlm", train_ids, val_ids, lambda: _CharTransformer(vocab, ctx),
        target=10.0,
        description="2-layer causal transformer (d=48, 4 heads), characters of English prose, context 64",
        family="transformer",
        info={"data": source, "chars": len(ids), "vocab": vocab, "context": ctx},
        ctx=ctx,
    )


_DOC_PACKAGES = ("numpy", "torch", "sklearn", "matplotlib")
# the packages' own names give the label away; they are dropped from the vocabulary
_GIVEAWAYS = {"numpy", "np", "torch", "sklearn", "scikit", "learn", "matplotlib", "mpl", "plt", "pyplot"}
_DOCSTRING = re.compile(r'\n[ \t]+[rRuU]?"""(.*?)"""', re.S)
_WORD = re.compile(r"[a-z][a-z_]+")


def _docstrings(package: str, limit: int) -> list[str]:
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise TaskUnavailable(f"docbow needs the installed package {package!r}")
    root = Path(spec.origin).parent
    files = sorted(
        p for p in root.rglob("*.py")
        if not ({"tests", "testing", "_vendor"} & set(p.relative_to(root).parts)) and not p.name.startswith("test")
    )
    docs: list[str] = []
    for f in files:
        try:
            found = _DOCSTRING.findall(f.read_text(encoding="utf-8", errors="replace"))
        except OSError:
            continue
        docs.extend(d for d in found if len(d.split()) >= 8)
    # an evenly spaced sample, so every part of the package is represented
    if len(docs) > limit:
        docs = [docs[int(i * len(docs) / limit)] for i in range(limit)]
    return docs


def make_docbow(quick: bool = False) -> Task:
    """Bag-of-words docstring classification: which library wrote this docstring?"""
    per_package, max_words = 700, 48
    texts: list[list[str]] = []
    labels: list[int] = []
    for label, pkg in enumerate(_DOC_PACKAGES):
        for d in _docstrings(pkg, per_package):
            words = [w for w in _WORD.findall(d.lower()) if w not in _GIVEAWAYS][:max_words]
            if words:
                texts.append(words)
                labels.append(label)
    tr, va = _split(len(labels), 0.25)
    df = Counter(w for i in tr.tolist() for w in set(texts[i]))
    vocab = {w: j + 1 for j, w in enumerate(sorted(w for w, n in df.items() if n >= 2))}  # 0 = padding
    x = torch.zeros(len(texts), max_words, dtype=torch.long)
    for i, words in enumerate(texts):
        ids = [vocab[w] for w in words if w in vocab][:max_words]
        x[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
    y = torch.tensor(labels, dtype=torch.long)
    keep = (x != 0).any(1)  # a docstring with no known word carries no features
    tr, va = tr[keep[tr]], va[keep[va]]
    n_vocab = len(vocab) + 1
    freq = sorted(df[w] for w in vocab)
    return Task(
        name="docbow",
        make_model=lambda: _BagOfWords(n_vocab, len(_DOC_PACKAGES)),
        loss_fn=nn.functional.cross_entropy,
        train_data=(x[tr], y[tr]),
        val_data=(x[va], y[va]),
        batch_size=64,
        steps=300,
        quick_steps=60,
        target=_accuracy_target("docbow"),
        description="linear bag-of-words classifier (EmbeddingBag, sum): docstring -> library of 4",
        family="sparse",
        info={
            "data": "docstrings of " + ", ".join(f"{p} {_version(p)}" for p in _DOC_PACKAGES),
            "n_train": len(tr),
            "n_val": len(va),
            "vocab": n_vocab,
            "median_document_frequency": freq[len(freq) // 2] if freq else 0,
        },
    )


class _BagOfWords(nn.Module):
    """A linear classifier on word counts (sparse multinomial logistic regression).

    ``EmbeddingBag(mode="sum")`` with one column per class is exactly ``counts @ W``: each
    step touches only the rows of the words present, so rare words get rare gradients.
    """

    def __init__(self, vocab: int, n_classes: int):
        super().__init__()
        self.emb = nn.EmbeddingBag(vocab, n_classes, mode="sum", padding_idx=0)
        nn.init.normal_(self.emb.weight, std=0.01)
        with torch.no_grad():
            self.emb.weight[0].zero_()  # the padding row
        self.bias = nn.Parameter(torch.zeros(n_classes))

    def forward(self, ids: Tensor) -> Tensor:
        return self.emb(ids) + self.bias


def _version(pkg: str) -> str:
    try:
        from importlib.metadata import version

        return version({"sklearn": "scikit-learn"}.get(pkg, pkg))
    except Exception:  # noqa: BLE001 - provenance only
        return "?"


def make_mnist1d(quick: bool = False) -> Task:
    """An MLP on MNIST-1D, generated procedurally by PyPI ``mnist1d`` (no download)."""
    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError as e:
        raise TaskUnavailable("mnist1d needs the package mnist1d: pip install 'optimkit[data]'") from e
    args = get_dataset_args()
    args.num_samples = 4000
    data = make_dataset(args)  # deterministic: the generator seeds itself from args.seed
    x = torch.tensor(data["x"], dtype=torch.float32)
    y = torch.tensor(data["y"], dtype=torch.long)
    xv = torch.tensor(data["x_test"], dtype=torch.float32)
    yv = torch.tensor(data["y_test"], dtype=torch.long)
    d = x.shape[1]
    return Task(
        name="mnist1d",
        make_model=lambda: nn.Sequential(nn.Linear(d, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10)),
        loss_fn=nn.functional.cross_entropy,
        train_data=(x, y),
        val_data=(xv, yv),
        batch_size=100,
        steps=600,
        quick_steps=100,
        target=_accuracy_target("mnist1d"),
        description="MLP (2x128) on MNIST-1D (procedural, mnist1d package)",
        family="mlp",
        info={"data": "mnist1d.data.make_dataset", "n_train": len(y), "n_val": len(yv)},
    )


_FASHION_DIRS = ("/usr/share/dataset-fashion-mnist", "/usr/share/fashion-mnist", "/usr/share/datasets/fashion-mnist")


def _idx(path: Path) -> Tensor:
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return torch.frombuffer(bytearray(raw[4 + 4 * ndim :]), dtype=torch.uint8).reshape(dims)


def _find_fashion() -> Path | None:
    dirs = [os.environ["OPTIMKIT_FASHION_MNIST"]] if os.environ.get("OPTIMKIT_FASHION_MNIST") else []
    for d in dirs + list(_FASHION_DIRS):
        for sub in (Path(d), Path(d) / "data" / "fashion"):
            if any(sub.glob("train-images-idx3-ubyte*")):
                return sub
    return None


def make_fashion(quick: bool = False) -> Task:
    """A small CNN on a 12k-image subset of Fashion-MNIST (Debian ``dataset-fashion-mnist``)."""
    root = _find_fashion()
    if root is None:
        raise TaskUnavailable(
            "fashion needs Fashion-MNIST: apt install dataset-fashion-mnist "
            "(or set OPTIMKIT_FASHION_MNIST to a folder with the idx files)"
        )

    def load(prefix: str) -> tuple[Tensor, Tensor]:
        img = next(root.glob(f"{prefix}-images-idx3-ubyte*"))
        lab = next(root.glob(f"{prefix}-labels-idx1-ubyte*"))
        return _idx(img), _idx(lab)

    xi, yi = load("train")
    xt, yt = load("t10k")
    xi, yi, xt, yt = xi[:10000], yi[:10000], xt[:2000], yt[:2000]
    prep = lambda a: (a.float() / 255.0).unsqueeze(1)  # noqa: E731
    return Task(
        name="fashion",
        make_model=lambda: nn.Sequential(nn.AvgPool2d(2), _SmallCNN(side=14)),
        loss_fn=nn.functional.cross_entropy,
        train_data=(prep(xi), yi.long()),
        val_data=(prep(xt), yt.long()),
        batch_size=64,
        steps=400,
        quick_steps=80,
        target=_accuracy_target("fashion"),
        description="small CNN on Fashion-MNIST (10k train / 2k val, 14x14)",
        family="image",
        info={"data": str(root), "n_train": 10000, "n_val": 2000},
    )


#: name -> builder; builders take ``quick`` and may raise :class:`TaskUnavailable`
BUILTIN_TASKS: dict[str, Callable[[bool], Task]] = {
    "logreg": make_logreg,
    "cnn": make_cnn,
    "charlm": make_charlm,
    "docbow": make_docbow,
    "mnist1d": make_mnist1d,
    "fashion": make_fashion,
    "fortunes": (lambda quick=False: importlib.import_module(".tasks_extra", __package__).make_fortunes(quick)),
    "fortunes_ft": (lambda quick=False: importlib.import_module(".tasks_extra", __package__).make_fortunes_ft(quick)),
}
# tasks_extra imports this module, so its builders are imported on first use; their one-line docs:
BUILTIN_TASKS["fortunes"].__doc__ = "A char transformer on Debian's fortunes (apt install fortunes)."
BUILTIN_TASKS["fortunes_ft"].__doc__ = "Fine-tuning: the char transformer pretrained on CPython docs, trained on fortunes."
DEFAULT_SUITE: tuple[str, ...] = ("logreg", "cnn", "charlm", "docbow")
OPTIONAL_TASKS: tuple[str, ...] = ("mnist1d", "fashion", "fortunes", "fortunes_ft")


def build_task(spec: str, quick: bool = False) -> Task:
    """Build a built-in task by name, or a user task from ``"module:function"``.

    Raises:
        KeyError: unknown built-in name (the message lists the known ones).
        TaskUnavailable: the task's optional data is missing.
        ValueError: a user task spec that cannot be loaded.
    """
    if ":" in spec:
        return load_user_task(spec)
    if spec not in BUILTIN_TASKS:
        raise KeyError(f"unknown task {spec!r}; built-in tasks: {', '.join(BUILTIN_TASKS)} (or module:function)")
    return BUILTIN_TASKS[spec](quick)


def load_user_task(spec: str) -> Task:
    """Load ``"package.module:function"`` (or ``"path/to/file.py:function"``) and call it.

    ``function()`` takes no arguments and returns a :class:`Task`. Any failure becomes a
    ``ValueError`` with a one-line message.
    """
    mod_name, _, func_name = spec.rpartition(":")
    if not mod_name or not func_name:
        raise ValueError(f"invalid task spec {spec!r}; expected module:function")
    try:
        if mod_name.endswith(".py"):
            path = Path(mod_name)
            if not path.is_file():
                raise ValueError(f"task file {mod_name!r} not found")
            mspec = importlib.util.spec_from_file_location(path.stem, path)
            assert mspec is not None and mspec.loader is not None
            module = importlib.util.module_from_spec(mspec)
            sys.modules.setdefault(path.stem, module)
            mspec.loader.exec_module(module)
        else:
            if "" not in sys.path and os.getcwd() not in sys.path:
                sys.path.insert(0, os.getcwd())  # like `python -m`: the current folder is importable
            module = importlib.import_module(mod_name)
    except ValueError:
        raise
    except Exception as e:  # noqa: BLE001 - any import failure becomes one line
        raise ValueError(f"cannot import {mod_name!r} for task {spec!r}: {type(e).__name__}: {e}") from e
    func = getattr(module, func_name, None)
    if func is None or not callable(func):
        raise ValueError(f"task {spec!r}: module {mod_name!r} has no callable {func_name!r}")
    try:
        task = func()
    except Exception as e:  # noqa: BLE001
        from .trial import user_frame

        where = user_frame(e)
        at = f" at {where}" if where else ""
        raise ValueError(f"task {spec!r}: {func_name}() failed: {type(e).__name__}: {e}{at}") from e
    if not isinstance(task, Task):
        raise ValueError(
            f"task {spec!r}: {func_name}() returned {type(task).__name__}; expected optimkit.compare.Task"
        )
    return task
