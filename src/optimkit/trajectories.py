"""``optimkit trajectories``: optimizer paths on classic 2-D test functions, drawn as one PNG.

Functions (each with a known minimum value):

* **rosenbrock**  ``(1-x)^2 + 100 (y-x^2)^2``: a curved, narrow valley; minimum 0 at (1, 1).
* **beale**  ``(1.5-x+xy)^2 + (2.25-x+xy^2)^2 + (2.625-x+xy^3)^2``: flat plateaus and sharp
  ridges; minimum 0 at (3, 0.5).
* **saddle**  ``x^2 - y^2/2 + y^4/4``: a saddle at the origin between two minima (-0.25 at
  (0, +-1)); starting almost on the ridge shows who escapes a saddle quickly.
* **quadratic**  ``(u^2 + 50 v^2)/2`` in coordinates rotated by 30 degrees: ill-conditioned
  (condition number 50), not axis-aligned, so a diagonal preconditioner cannot fix it fully.

Each optimizer's learning rate: the registry's default lr is calibrated for neural nets, not for
these functions (SGD's 0.1 diverges on all of them), so by default the lr of every optimizer
that ``needs_lr_tuning`` is picked per function from ``default_lr x 10^{-3..2}`` (decades, then
x0.3 and x3 around the best) by the lowest mean ``log10(f - f_min)`` along the path (fast *and*
accurate); Prodigy and Adadelta keep lr=1.
``tune=False`` uses the default lrs as they are.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

__all__ = ["TestFunction", "FUNCTIONS", "optimize_path", "draw_trajectories", "FIGSIZE", "DPI"]

FIGSIZE = (14.0, 11.0)
DPI = 100
#: coarse grid (multiples of the default lr), then x0.3 and x3 around the best point
_TUNE_FACTORS = (1e-3, 1e-2, 0.1, 1.0, 10.0, 100.0)


@dataclass(frozen=True)
class TestFunction:
    name: str
    f: Callable[[Tensor, Tensor], Tensor]
    start: tuple[float, float]
    minimum: tuple[float, float]
    f_min: float
    xlim: tuple[float, float]
    ylim: tuple[float, float]
    steps: int
    log_levels: bool


def _rot(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    c, s = math.cos(math.pi / 6), math.sin(math.pi / 6)
    return c * x + s * y, -s * x + c * y


FUNCTIONS: dict[str, TestFunction] = {
    "rosenbrock": TestFunction("rosenbrock", lambda x, y: (1 - x) ** 2 + 100 * (y - x**2) ** 2,
                               (-1.5, 2.0), (1.0, 1.0), 0.0, (-2.0, 2.0), (-1.0, 3.0), 500, True),
    "beale": TestFunction("beale", lambda x, y: (1.5 - x + x * y) ** 2 + (2.25 - x + x * y**2) ** 2
                          + (2.625 - x + x * y**3) ** 2,
                          (0.7, 1.4), (3.0, 0.5), 0.0, (-1.0, 4.0), (-1.5, 2.0), 400, True),
    "saddle": TestFunction("saddle", lambda x, y: x**2 - y**2 / 2 + y**4 / 4,
                           (1.2, 1e-3), (0.0, 1.0), -0.25, (-1.5, 1.5), (-1.5, 1.5), 200, False),
    "quadratic": TestFunction("quadratic", lambda x, y: 0.5 * (_rot(x, y)[0] ** 2 + 50 * _rot(x, y)[1] ** 2),
                              (-2.5, 1.5), (0.0, 0.0), 0.0, (-3.0, 3.0), (-2.0, 2.0), 200, True),
}


@dataclass
class Path2D:
    label: str
    lr: float | None
    xs: list[float]
    ys: list[float]
    values: list[float]
    diverged: bool


def optimize_path(fn: TestFunction, name: str, args: dict[str, Any], lr: float | None, steps: int) -> Path2D:
    """Run one optimizer on ``fn`` from its start point; stop early if it leaves a wide box."""
    from .factory import create_optimizer

    p = torch.nn.Parameter(torch.tensor(fn.start, dtype=torch.float64))
    opt = create_optimizer(name, [p], lr=lr, optimizer_args=dict(args))
    xs, ys, vals = [fn.start[0]], [fn.start[1]], [float(fn.f(p[0], p[1]).detach())]
    span = max(fn.xlim[1] - fn.xlim[0], fn.ylim[1] - fn.ylim[0])
    diverged = False
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        v = fn.f(p[0], p[1])
        v.backward()
        opt.step()
        x, y = (float(v) for v in p.detach())
        if not (math.isfinite(x) and math.isfinite(y)) or max(abs(x), abs(y)) > 10 * span:
            diverged = True
            break
        xs.append(x)
        ys.append(y)
        vals.append(float(fn.f(torch.tensor(x), torch.tensor(y))))
    return Path2D(name, lr, xs, ys, vals, diverged)


def _score(path: Path2D, fn: TestFunction, steps: int) -> float:
    if path.diverged:
        return math.inf
    gaps = [math.log10(max(v - fn.f_min, 1e-12)) for v in path.values]
    return sum(gaps) / len(gaps)


def _best_path(fn: TestFunction, choice: Any, steps: int, tune: bool) -> Path2D:
    lrs = [choice.lr]
    if tune and choice.needs_lr_tuning and choice.lr is not None and not choice.lr_given:
        lrs = [choice.lr * f for f in _TUNE_FACTORS]
    paths = [optimize_path(fn, choice.name, choice.args, lr, steps) for lr in lrs]
    best = min(paths, key=lambda p: _score(p, fn, steps))
    if len(paths) > 1 and best.lr is not None:
        paths += [optimize_path(fn, choice.name, choice.args, best.lr * f, steps) for f in (0.3, 3.0)]
        best = min(paths, key=lambda p: _score(p, fn, steps))
    best.label = choice.label
    return best


def draw_trajectories(
    out: str | Path,
    optimizers: Sequence[str] | None = None,
    functions: Sequence[str] | None = None,
    steps: int | None = None,
    tune: bool = True,
) -> Path:
    """Draw every optimizer's path on every function (contours + paths, one panel each).

    Args:
        out: the PNG file to write (``FIGSIZE`` x ``DPI`` pixels).
        optimizers: names or ``name:key=value`` specs (default: every registry optimizer). An
            explicit ``lr`` in a spec is used as is (never tuned).
        functions: names from :data:`FUNCTIONS` (default: all).
        steps: steps per path (default: each function's own).
        tune: pick each lr-tuned optimizer's lr per function (see the module docstring).

    Returns:
        the path written.
    """
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.colors import LogNorm

    from .compare.runner import default_choices, parse_optimizer_choice

    choices = [parse_optimizer_choice(s) for s in optimizers] if optimizers else default_choices()
    names = list(functions or FUNCTIONS)
    for n in names:
        if n not in FUNCTIONS:
            raise ValueError(f"unknown function {n!r}; choose from {', '.join(FUNCTIONS)}")
    cmap = matplotlib.colormaps["tab10" if len(choices) <= 10 else "tab20"]
    colors = {c.label: cmap(i % cmap.N) for i, c in enumerate(choices)}
    ncols = 2 if len(names) > 1 else 1
    nrows = math.ceil(len(names) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=FIGSIZE, dpi=DPI, layout="constrained", squeeze=False)
    fig.suptitle("optimizer paths on 2-D test functions" + (" (lr tuned per function for optimizers that need "
                 "it; Prodigy/Adadelta at lr=1)" if tune else " (default learning rates)"), fontsize=11)
    old_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for ax, fname in zip(axes.flat, names):
            fn = FUNCTIONS[fname]
            n = steps or fn.steps
            gx = np.linspace(*fn.xlim, 300)
            gy = np.linspace(*fn.ylim, 300)
            X, Y = np.meshgrid(gx, gy)
            Z = fn.f(torch.from_numpy(X), torch.from_numpy(Y)).numpy() - fn.f_min
            if fn.log_levels:
                levels = np.logspace(math.log10(max(Z.min(), 1e-3)), math.log10(Z.max()), 25)
                ax.contourf(X, Y, Z + 1e-12, levels=levels, norm=LogNorm(), cmap="Greys", alpha=0.35)
                ax.contour(X, Y, Z + 1e-12, levels=levels, norm=LogNorm(), colors="0.55", linewidths=0.4)
            else:
                ax.contourf(X, Y, Z, levels=25, cmap="Greys", alpha=0.35)
                ax.contour(X, Y, Z, levels=25, colors="0.55", linewidths=0.4)
            for c in choices:
                path = _best_path(fn, c, n, tune)
                lr_txt = f"lr={path.lr:.2g}" if path.lr is not None else "default lr"
                end = f"f-f*={path.values[-1] - fn.f_min:.1e}" if not path.diverged else "diverged"
                ax.plot(path.xs, path.ys, "-", color=colors[c.label], lw=1.3, alpha=0.9,
                        label=f"{c.label} ({lr_txt}; {end})")
                ax.plot(path.xs[-1:], path.ys[-1:], "o", color=colors[c.label], ms=4)
            ax.plot(*fn.start, "k^", ms=8, label="start")
            ax.plot(*fn.minimum, "r*", ms=12, label="minimum")
            if fname == "saddle":
                ax.plot([0.0], [-1.0], "r*", ms=12)
            ax.set_xlim(*fn.xlim)
            ax.set_ylim(*fn.ylim)
            ax.set_title(f"{fname} ({n} steps)", fontsize=10)
            ax.set_xlabel("x")
            ax.set_ylabel("y")
            ax.legend(fontsize=6.5, loc="best", framealpha=0.8)
        for ax in list(axes.flat)[len(names):]:
            ax.set_visible(False)
    finally:
        torch.set_num_threads(old_threads)
    out = Path(out)
    if not out.suffix:  # matplotlib would add ".png": return the path actually written
        out = out.with_suffix(".png")
    if out.parent and not out.parent.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=DPI)
    plt.close(fig)
    return out
