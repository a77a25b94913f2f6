"""Progress of a comparison: what is running, and an ETA from each task's measured step cost.

The ETA is ``remaining work / workers``, where the remaining work of a task is its steps not
yet run (planned trials x steps, minus the steps done) times that task's measured seconds per
step (wall time of its runs so far, building and evaluation included, divided by their steps).
Tasks cost very different amounts per step (the transformer ~10x the logistic regression), so
a single global rate is wrong by that factor until the end; per task, it is right as soon as
each task has run once. The plan enqueues trials round-robin over tasks, so every task is
measured within the first ``n_tasks`` trials. A task not measured yet is costed at the mean of
the measured ones.
"""

from __future__ import annotations

import time
from typing import Any

__all__ = ["Progress", "RichProgress", "Eta"]


class Eta:
    """Seconds left, from per-task measured step costs; see the module docstring."""

    def __init__(self, workers: int) -> None:
        self.workers = max(1, workers)
        self.planned: dict[str, int] = {}  # task -> planned steps (all trials)
        self.done: dict[str, int] = {}  # task -> steps of finished trials
        self.spent: dict[str, float] = {}  # task -> seconds of finished trials
        self.running: dict[str, tuple[str, float, int]] = {}  # key -> (task, start, step)

    def plan(self, task: str, steps: int) -> None:
        """Add ``steps`` of planned (not yet finished) work to ``task``."""
        self.planned[task] = self.planned.get(task, 0) + steps

    def start(self, key: str, task: str, now: float | None = None) -> None:
        self.running[key] = (task, time.perf_counter() if now is None else now, 0)

    def step(self, key: str, step: int) -> None:
        if key in self.running:
            task, t0, _ = self.running[key]
            self.running[key] = (task, t0, step)

    def end(self, key: str, steps: int, now: float | None = None) -> None:
        """A trial of ``steps`` planned steps finished (diverged runs count in full)."""
        if key not in self.running:
            return
        task, t0, _ = self.running.pop(key)
        now = time.perf_counter() if now is None else now
        self.done[task] = self.done.get(task, 0) + steps
        self.spent[task] = self.spent.get(task, 0.0) + (now - t0)

    def cost(self, task: str, now: float | None = None) -> float | None:
        """Measured seconds per step of ``task`` (finished trials, else the running ones)."""
        if self.done.get(task):
            return self.spent[task] / self.done[task]
        now = time.perf_counter() if now is None else now
        runs = [(now - t0, s) for t, t0, s in self.running.values() if t == task and s > 0]
        if runs:
            return sum(r[0] for r in runs) / sum(r[1] for r in runs)
        return None

    def seconds_left(self, now: float | None = None) -> float | None:
        now = time.perf_counter() if now is None else now
        costs = {t: self.cost(t, now) for t in self.planned}
        known = [c for c in costs.values() if c is not None]
        if not known:
            return None
        fallback = sum(known) / len(known)
        running_steps: dict[str, int] = {}
        for t, _, s in self.running.values():
            running_steps[t] = running_steps.get(t, 0) + s
        left = 0.0
        for t, planned in self.planned.items():
            rest = max(0, planned - self.done.get(t, 0) - running_steps.get(t, 0))
            c = costs[t] if costs[t] is not None else fallback
            left += rest * c
        return left / self.workers


class Progress:
    """What the runner reports while it runs (the CLI plugs in :class:`RichProgress`)."""

    def start(self, total_steps: int) -> None: ...
    def update(self, description: str, step: int, steps: int, loss: float | None, done_steps: int,
               eta_s: float | None) -> None: ...
    def note(self, message: str) -> None: ...
    def stop(self) -> None: ...


def _clock(s: float | None) -> str:
    if s is None:
        return "-:--"
    s = int(round(s))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class RichProgress(Progress):
    """A rich progress bar on stderr: task, optimizer, step, current loss, ETA (per-task costs)."""

    def __init__(self) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, TextColumn
        from rich.progress import Progress as _P

        self.console = Console(stderr=True)
        self._p = _P(
            TextColumn("{task.description}"),
            TextColumn("step {task.fields[step]:>4}/{task.fields[steps]:<4}"),
            TextColumn("loss {task.fields[loss]:>7}"),
            BarColumn(bar_width=12),
            TextColumn("ETA {task.fields[eta]}"),
            console=self.console,
            transient=True,
        )
        self._id: Any = None

    def start(self, total_steps: int) -> None:
        self._p.start()
        self._id = self._p.add_task("", total=max(1, total_steps), step=0, steps=0, loss="-", eta="-:--")

    def update(self, description: str, step: int, steps: int, loss: float | None, done_steps: int,
               eta_s: float | None) -> None:
        self._p.update(self._id, description=description, step=step, steps=steps,
                       loss="-" if loss is None else f"{loss:.4g}", completed=done_steps, eta=_clock(eta_s))

    def note(self, message: str) -> None:
        self.console.print(message, markup=False, highlight=False)

    def stop(self) -> None:
        self._p.stop()
