"""One training run of a comparison: (task, optimizer, hyperparameters, seed) -> a JSON record.

A trial is a pure function of its inputs: the seed is set before the model is built, the
batches come from a generator seeded from the seed alone, and the worker runs torch with one
thread, so the same trial gives the same numbers in any process, in any order. That is what
makes ``--jobs 1`` and ``--jobs 2`` (and a resumed run) agree.

What is measured (every list is per step unless named otherwise):

* ``train_loss``: the minibatch loss of each step (before the step's update);
* ``step_ms``: wall time of a whole step (batch, forward, backward, ``optimizer.step()``);
  ``opt_ms``: of ``optimizer.step()`` alone;
* ``eval_steps`` / ``val_loss`` / ``metric``: on the held-out data every ``eval_every`` steps
  and after the last step (step 0 = the initial model); evaluation time is not in ``step_ms``;
* ``d`` / ``effective_lr``: Prodigy-style optimizers' ``group["d"]`` after each step;
* ``state_bytes``: bytes of every tensor in the optimizer state after the run;
* a run whose loss becomes non-finite or grows 1e4-fold is stopped and marked ``diverged``.
"""

from __future__ import annotations

import math
import os
import sysconfig
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from .tasks import Batch, Task

__all__ = ["run_trial", "user_frame", "minibatches", "evaluate", "state_bytes"]

_DIVERGE_FACTOR = 1e4

#: ``on_step(step, loss)`` is called every few steps (progress display)
StepCallback = Callable[[int, float], None]


def _to(x: Any, device: torch.device) -> Any:
    if isinstance(x, Tensor):
        return x.to(device)
    if isinstance(x, (list, tuple)):
        return type(x)(_to(v, device) for v in x)
    return x


def minibatches(data: Batch, batch_size: int | None, gen: torch.Generator) -> Iterator[Batch]:
    """Shuffled epochs of ``batch_size`` examples (the last partial batch of an epoch is dropped)."""
    x, y = data
    n = len(y)
    if batch_size is None or batch_size >= n:
        while True:
            yield x, y
    while True:
        perm = torch.randperm(n, generator=gen).to(y.device)
        for i in range(0, n - batch_size + 1, batch_size):
            idx = perm[i : i + batch_size]
            yield _index(x, idx), y[idx]


def _index(x: Any, idx: Tensor) -> Any:
    if isinstance(x, Tensor):
        return x[idx]
    if isinstance(x, (list, tuple)):
        return type(x)(_index(v, idx) for v in x)
    raise TypeError(f"train_data inputs must be Tensors (or tuples of them), got {type(x).__name__}")


@torch.no_grad()
def evaluate(task: Task, model: nn.Module, val: Batch | None, chunk: int = 512) -> tuple[float, float]:
    """(validation loss, metric) of ``model`` on ``val``, in chunks of ``chunk`` examples."""
    if val is None:
        return math.nan, math.nan
    model.eval()
    x, y = val
    n = len(y)
    total, outs = 0.0, []
    for i in range(0, n, chunk):
        xi = _index(x, torch.arange(i, min(n, i + chunk), device=y.device)) if n > chunk else x
        yi = y[i : i + chunk] if n > chunk else y
        out = model(xi)
        total += float(task.loss_fn(out, yi)) * len(yi)
        if task.metric is not None and task.metric != "perplexity":
            outs.append((out, yi))
    model.train()
    loss = total / n
    if task.metric is None:
        metric = math.nan
    elif task.metric == "perplexity":
        metric = math.exp(min(loss, 50.0))
    elif task.metric == "accuracy":
        metric = sum(int((o.argmax(-1) == t).sum()) for o, t in outs) / n
    else:
        metric = float(task.metric(torch.cat([o for o, _ in outs]), torch.cat([t for _, t in outs])))
    return loss, metric


def state_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes of every distinct tensor storage in the optimizer state (and a wrapped optimizer's)."""
    seen: set[int] = set()
    total = 0

    def walk(obj: Any) -> None:
        nonlocal total
        if isinstance(obj, Tensor):
            key = obj.untyped_storage().data_ptr() if obj.numel() else id(obj)
            if key not in seen:
                seen.add(key)
                total += obj.numel() * obj.element_size()
        elif isinstance(obj, dict):
            for v in obj.values():
                walk(v)
        elif isinstance(obj, (list, tuple)):
            for v in obj:
                walk(v)

    walk(dict(opt.state))
    inner = getattr(opt, "optimizer", None) or getattr(opt, "base_optimizer", None)
    if isinstance(inner, torch.optim.Optimizer) and inner is not opt:
        walk(dict(inner.state))
    return total


def run_trial(*args: Any, **kwargs: Any) -> dict[str, Any]:
    """Train a fresh model of ``task`` with optimizer ``name`` for ``steps`` steps; return the record.

    Same arguments as :func:`_run_trial`. Warnings raised during the run (the optimizer's advice,
    the user's model) are not printed from every worker: they are kept, once each, in the
    record's ``warnings`` (first line of each message).
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rec = _run_trial(*args, **kwargs)
    seen: list[str] = []
    for w in caught:
        line = f"{w.category.__name__}: {str(w.message).splitlines()[0] if str(w.message) else ''}"
        if line not in seen:
            seen.append(line)
    rec["warnings"] = seen[:10]
    return rec


def _run_trial(
    task: Task,
    name: str,
    lr: float | None,
    args: dict[str, Any],
    seed: int,
    steps: int,
    eval_every: int,
    device: torch.device,
    data: tuple[Batch | None, Batch | None] | None = None,
    on_step: StepCallback | None = None,
) -> dict[str, Any]:
    """Train a fresh model of ``task`` with optimizer ``name`` for ``steps`` steps; return the record.

    ``data`` is ``(train, val)`` already on ``device`` (moved here when ``None``). Exceptions of
    the task or the optimizer propagate (the caller records them with :func:`user_frame`).
    """
    from ..factory import create_optimizer

    if data is None:
        data = (_to(task.train_data, device), _to(task.val_data, device))
    train, val = data
    rec: dict[str, Any] = {
        "train_loss": [], "step_ms": [], "opt_ms": [], "eval_steps": [], "val_loss": [], "metric": [],
        "d_steps": [], "d": [], "effective_lr": [], "state_bytes": 0, "n_params": 0, "diverged": False,
    }
    torch.manual_seed(seed)
    model = task.make_model().to(device)
    model.train()
    rec["n_params"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    opt = create_optimizer(name, model, lr=lr, optimizer_args=dict(args))
    gen = torch.Generator().manual_seed(10_000 + seed)
    batches = task.train_batches(gen) if task.train_batches is not None else minibatches(train, task.batch_size, gen)

    def record_eval(step: int) -> None:
        vl, m = evaluate(task, model, val)
        rec["eval_steps"].append(step)
        rec["val_loss"].append(vl)
        rec["metric"].append(m)

    record_eval(0)
    first: float | None = None
    for step in range(1, steps + 1):
        t0 = time.perf_counter()
        x, y = next(batches)
        x, y = _to(x, device), _to(y, device)
        opt.zero_grad(set_to_none=True)
        loss = task.loss_fn(model(x), y)
        loss.backward()
        t1 = time.perf_counter()
        opt.step()
        t2 = time.perf_counter()
        lv = float(loss.detach())  # one host sync per step, needed for the curve anyway
        rec["step_ms"].append((t2 - t0) * 1e3)
        rec["opt_ms"].append((t2 - t1) * 1e3)
        rec["train_loss"].append(lv)
        group = opt.param_groups[0]
        if "d" in group:  # Prodigy-style optimizers mirror their scalar d into every group
            d = float(group["d"])
            rec["d_steps"].append(step)
            rec["d"].append(d)
            eff = group.get("effective_lr")
            rec["effective_lr"].append(float(eff) if eff is not None else d * float(group["lr"]))
        if first is None:
            first = lv
        if not math.isfinite(lv) or abs(lv) > _DIVERGE_FACTOR * max(1.0, abs(first)):
            rec["diverged"] = True
            if on_step:
                on_step(step, lv)
            break
        if step % eval_every == 0 or step == steps:
            record_eval(step)
        if on_step and (step % 5 == 0 or step == steps):
            on_step(step, lv)
    rec["state_bytes"] = state_bytes(opt)
    return rec


def _library_dirs() -> tuple[str, ...]:
    import optimkit

    dirs = [os.path.dirname(optimkit.__file__), os.path.dirname(torch.__file__), sysconfig.get_paths()["stdlib"]]
    return tuple(os.path.abspath(d) + os.sep for d in dirs)


def user_frame(exc: BaseException) -> str | None:
    """``"file.py:12 in forward"``: the innermost frame of ``exc`` outside optimkit, torch and the stdlib.

    That is where the user's own code (their model, loss or task) failed; ``None`` when every
    frame is library code.
    """
    skip = _library_dirs()
    for fr in reversed(traceback.extract_tb(exc.__traceback__)):
        if not os.path.abspath(fr.filename).startswith(skip):
            return f"{fr.filename}:{fr.lineno} in {fr.name}"
    return None
