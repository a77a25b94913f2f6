"""One row per classic optimizer: the table every generic test iterates over.

Modelled on torch's ``OptimizerInfo``: configs never include the implementation flags
(``foreach``/``fused``); the tests add those. ``second_group`` holds the overrides for the
second param group of the parity model, so every run also checks per-group hyperparameters.
``error_inputs`` are (kwargs, substring of the message) pairs that must raise ``ValueError``.
``ranges`` is each numeric hyperparameter's valid range exactly as the optimizer checks it
(and its docstring, the registry and docs/optimizers/README.md state it); ``flags`` the
hyperparameters that take only True or False; ``betas`` whether it takes a ``betas`` pair.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

import optimkit
from optimkit._validation import EPS_MIN, range_text


@dataclass(frozen=True)
class Range:
    """``lo <= x <= hi`` (``<`` on an open side)."""

    lo: float
    hi: float
    lo_open: bool = False
    hi_open: bool = False

    def text(self, name: str) -> str:
        """As the error message and the docs write it, e.g. ``0 <= lr < inf``."""
        return range_text(name, self.lo, self.hi, lo_open=self.lo_open, hi_open=self.hi_open)

    def __contains__(self, v: float) -> bool:
        return ((v > self.lo) if self.lo_open else (v >= self.lo)) and (
            (v < self.hi) if self.hi_open else (v <= self.hi))


#: lr, weight decay and other unbounded coefficients: finite and >= 0
FINITE = Range(0.0, math.inf, hi_open=True)
#: eps in a denominator: at least the smallest normal float32, finite
EPS = Range(EPS_MIN, math.inf, hi_open=True)
#: decay rates and momentum: [0, 1)
UNIT_OPEN = Range(0.0, 1.0, hi_open=True)
#: [0, 1]
UNIT = Range(0.0, 1.0)


@dataclass(frozen=True)
class OptimInfo:
    name: str
    cls: type
    oracle: type  # the independent implementation we must match (torch.optim)
    configs: list[dict[str, Any]]
    second_group: dict[str, Any]
    impls: tuple[str, ...]
    error_inputs: list[tuple[dict[str, Any], str]] = field(default_factory=list)
    supports_sparse: bool = False
    # ranges for property-based tests: name -> (low, high) floats, or a tuple of choices
    hyper_space: dict[str, Any] = field(default_factory=dict)
    # the checked (and documented) valid ranges; flags; whether it takes betas
    ranges: dict[str, Range] = field(default_factory=dict)
    flags: tuple[str, ...] = ("maximize",)
    betas: bool = False

    def __repr__(self) -> str:  # pytest ids
        return self.name


IMPL_FLAGS = {
    "reference": dict(foreach=False),
    "foreach": dict(foreach=True),
    "fused": dict(fused=True),
    # flat buffers (the default implementation choice over 1 MiB chunks of them)
    "flat": dict(flat=True),
}

def _oracle_taking_fused(cls: type) -> type:
    """torch.optim ``cls`` that also takes (and ignores) ``fused=``, for the RMSprop/RAdam rows.

    optimkit gives these a fused path that torch lacks; the checkpoint tests build the oracle
    with the same impl flags as ours, and torch's own fastest path is the right partner.
    """
    import inspect

    base_sig = inspect.signature(cls.__init__)

    def __init__(self, params, *args, fused=None, **kwargs):  # noqa: ARG001 - torch has no fused
        cls.__init__(self, params, *args, **kwargs)

    params = list(base_sig.parameters.values())
    params.append(inspect.Parameter("fused", inspect.Parameter.KEYWORD_ONLY, default=None))
    __init__.__signature__ = base_sig.replace(parameters=params)  # type: ignore[attr-defined]
    return type(cls.__name__, (cls,), {"__init__": __init__, "__module__": cls.__module__})


OPTIMS: list[OptimInfo] = [
    OptimInfo(
        "SGD", optimkit.SGD, torch.optim.SGD,
        configs=[
            dict(lr=0.05),
            dict(lr=0.05, momentum=0.9),
            dict(lr=0.05, momentum=0.9, dampening=0.5, weight_decay=1e-2),
            dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3),
            dict(lr=0.05, momentum=0.5, maximize=True),
        ],
        second_group=dict(lr=0.02, weight_decay=5e-3),
        impls=("reference", "foreach", "fused", "flat"),
        error_inputs=[
            (dict(lr=-1.0), "lr=-1.0"),
            (dict(lr=0.1, momentum=-0.1), "momentum=-0.1"),
            (dict(lr=0.1, momentum=1.5), "momentum=1.5"),
            (dict(lr=0.1, weight_decay=-1e-2), "weight_decay=-0.01"),
            (dict(lr=0.1, dampening=2.0), "dampening=2.0"),
            (dict(lr=0.1, nesterov=True), "expected momentum > 0 and dampening == 0"),
            (dict(lr=0.1, momentum=0.9, dampening=0.1, nesterov=True), "dampening=0.1"),
            (dict(lr=float("nan")), "lr=nan"),
            (dict(lr=float("inf")), "lr=inf; expected 0 <= lr < inf"),
            (dict(weight_decay=float("inf")), "weight_decay=inf"),
        ],
        supports_sparse=True,
        hyper_space=dict(lr=(1e-4, 0.5), momentum=(0.0, 0.99), dampening=(0.0, 1.0),
                         weight_decay=(0.0, 0.1), maximize=(False, True)),
        ranges=dict(lr=FINITE, momentum=UNIT_OPEN, dampening=UNIT, weight_decay=FINITE),
        flags=("nesterov", "maximize"),
    ),
    OptimInfo(
        "Adagrad", optimkit.Adagrad, torch.optim.Adagrad,
        configs=[
            dict(lr=0.05),
            dict(lr=0.05, lr_decay=1e-2, weight_decay=1e-2),
            dict(lr=0.05, initial_accumulator_value=0.1, eps=1e-6),
            dict(lr=0.05, maximize=True),
        ],
        second_group=dict(lr=0.02, lr_decay=1e-3),
        impls=("reference", "foreach", "fused", "flat"),
        error_inputs=[
            (dict(lr=-1.0), "lr=-1.0"),
            (dict(lr_decay=-0.5), "lr_decay=-0.5"),
            (dict(weight_decay=-1.0), "weight_decay=-1.0"),
            (dict(initial_accumulator_value=-1.0), "initial_accumulator_value=-1.0"),
            (dict(eps=-1e-3), "eps=-0.001"),
            (dict(eps=0.0), "eps=0.0"),
            (dict(lr_decay=float("inf")), "lr_decay=inf"),
        ],
        supports_sparse=True,
        hyper_space=dict(lr=(1e-4, 0.5), lr_decay=(0.0, 0.1), weight_decay=(0.0, 0.1),
                         initial_accumulator_value=(0.0, 1.0), eps=(1e-10, 1e-3),
                         maximize=(False, True)),
        ranges=dict(lr=FINITE, lr_decay=FINITE, weight_decay=FINITE,
                    initial_accumulator_value=FINITE, eps=EPS),
    ),
    OptimInfo(
        "RMSprop", optimkit.RMSprop, _oracle_taking_fused(torch.optim.RMSprop),
        configs=[
            dict(lr=1e-3),
            dict(lr=1e-3, centered=True),
            dict(lr=1e-3, momentum=0.9, weight_decay=1e-2),
            dict(lr=1e-3, centered=True, momentum=0.5, alpha=0.9, eps=1e-6),
            dict(lr=1e-3, maximize=True, momentum=0.3),
            # plain RMSprop (the fused path) with every term of the fused mapping switched on
            dict(lr=1e-3, alpha=0.9, eps=1e-6, weight_decay=1e-2, maximize=True),
        ],
        second_group=dict(lr=5e-4, alpha=0.95),
        impls=("reference", "foreach", "fused", "flat"),
        error_inputs=[
            (dict(lr=-1.0), "lr=-1.0"),
            (dict(alpha=-0.1), "alpha=-0.1"),
            (dict(alpha=1.5), "alpha=1.5"),
            (dict(eps=-1.0), "eps=-1.0"),
            (dict(momentum=-0.5), "momentum=-0.5"),
            (dict(weight_decay=-0.5), "weight_decay=-0.5"),
            (dict(alpha=1.0), "alpha=1.0; expected 0 <= alpha < 1"),
            (dict(alpha=0.0, centered=True), "alpha=0.0; expected 0 < alpha < 1 with centered=True"),
            (dict(eps=0.0), "eps=0.0"),
        ],
        hyper_space=dict(lr=(1e-4, 1e-2), alpha=(0.5, 0.999), eps=(1e-8, 1e-3),
                         weight_decay=(0.0, 0.1), momentum=(0.0, 0.95),
                         centered=(False, True), maximize=(False, True)),
        # alpha = 1 would never let a gradient into square_avg; centered=True also needs
        # alpha > 0 (tested in test_errors.py)
        ranges=dict(lr=FINITE, alpha=UNIT_OPEN, eps=EPS, weight_decay=FINITE, momentum=UNIT_OPEN),
        flags=("centered", "maximize"),
    ),
    OptimInfo(
        "Adam", optimkit.Adam, torch.optim.Adam,
        configs=[
            dict(lr=1e-3),
            dict(lr=1e-3, weight_decay=1e-2),
            dict(lr=1e-3, amsgrad=True, betas=(0.8, 0.99)),
            dict(lr=1e-3, weight_decay=1e-2, decoupled_weight_decay=True),
            dict(lr=1e-3, maximize=True, eps=1e-6, amsgrad=True),
        ],
        second_group=dict(lr=5e-4, betas=(0.85, 0.995)),
        impls=("reference", "foreach", "fused", "flat"),
        error_inputs=[
            (dict(lr=-1.0), "lr=-1.0"),
            (dict(betas=(1.0, 0.999)), "betas[0]=1.0"),
            (dict(betas=(0.9, -0.1)), "betas[1]=-0.1"),
            (dict(betas=(0.9,)), "betas="),
            (dict(eps=-1e-8), "eps=-1e-08"),
            (dict(weight_decay=-0.1), "weight_decay=-0.1"),
            (dict(eps=0.0), "eps=0.0"),
            (dict(betas=(float("nan"), 0.999)), "betas[0]=nan"),
        ],
        hyper_space=dict(lr=(1e-4, 1e-2), beta1=(0.0, 0.99), beta2=(0.5, 0.9999),
                         eps=(1e-10, 1e-4), weight_decay=(0.0, 0.1), amsgrad=(False, True),
                         maximize=(False, True), decoupled_weight_decay=(False, True)),
        ranges=dict(lr=FINITE, eps=EPS, weight_decay=FINITE),
        flags=("amsgrad", "maximize", "decoupled_weight_decay"),
        betas=True,
    ),
    OptimInfo(
        "AdamW", optimkit.AdamW, torch.optim.AdamW,
        configs=[
            dict(lr=1e-3),
            dict(lr=1e-3, weight_decay=0.1),
            dict(lr=1e-3, amsgrad=True, weight_decay=0.05),
            dict(lr=1e-3, maximize=True, betas=(0.7, 0.9)),
        ],
        second_group=dict(lr=5e-4, weight_decay=0.0),
        impls=("reference", "foreach", "fused", "flat"),
        error_inputs=[
            (dict(lr=-1.0), "lr=-1.0"),
            (dict(betas=(0.9, 1.0)), "betas[1]=1.0"),
            (dict(eps=-1.0), "eps=-1.0"),
            (dict(weight_decay=-0.1), "weight_decay=-0.1"),
            (dict(weight_decay=float("inf")), "weight_decay=inf"),
        ],
        hyper_space=dict(lr=(1e-4, 1e-2), beta1=(0.0, 0.99), beta2=(0.5, 0.9999),
                         eps=(1e-10, 1e-4), weight_decay=(0.0, 0.2), amsgrad=(False, True),
                         maximize=(False, True)),
        ranges=dict(lr=FINITE, eps=EPS, weight_decay=FINITE),
        flags=("amsgrad", "maximize"),
        betas=True,
    ),
    OptimInfo(
        "RAdam", optimkit.RAdam, _oracle_taking_fused(torch.optim.RAdam),
        configs=[
            dict(lr=1e-3),
            dict(lr=1e-3, weight_decay=1e-2),
            dict(lr=1e-3, weight_decay=1e-2, decoupled_weight_decay=True),
            dict(lr=1e-3, betas=(0.8, 0.9), maximize=True),
        ],
        second_group=dict(lr=5e-4, betas=(0.85, 0.99)),
        impls=("reference", "foreach", "fused", "flat"),
        error_inputs=[
            (dict(lr=-1.0), "lr=-1.0"),
            (dict(betas=(-0.1, 0.999)), "betas[0]=-0.1"),
            (dict(eps=-1.0), "eps=-1.0"),
            (dict(weight_decay=-1.0), "weight_decay=-1.0"),
            (dict(eps=1e-300), "eps=1e-300"),
        ],
        hyper_space=dict(lr=(1e-4, 1e-2), beta1=(0.0, 0.99), beta2=(0.5, 0.9999),
                         eps=(1e-10, 1e-4), weight_decay=(0.0, 0.1),
                         decoupled_weight_decay=(False, True), maximize=(False, True)),
        ranges=dict(lr=FINITE, eps=EPS, weight_decay=FINITE),
        flags=("decoupled_weight_decay", "maximize"),
        betas=True,
    ),
    OptimInfo(
        "Adadelta", optimkit.Adadelta, torch.optim.Adadelta,
        configs=[
            dict(),
            dict(lr=0.5, rho=0.95, eps=1e-5),
            dict(weight_decay=1e-2),
            dict(maximize=True, rho=0.8),
        ],
        second_group=dict(lr=0.7, rho=0.85),
        impls=("reference", "foreach", "flat"),
        error_inputs=[
            (dict(lr=-1.0), "lr=-1.0"),
            (dict(rho=1.5), "rho=1.5"),
            (dict(rho=-0.1), "rho=-0.1"),
            (dict(eps=-1.0), "eps=-1.0"),
            (dict(weight_decay=-1.0), "weight_decay=-1.0"),
            (dict(eps=0.0), "eps=0.0"),
            (dict(lr=float("inf")), "lr=inf"),
        ],
        hyper_space=dict(lr=(0.1, 2.0), rho=(0.5, 0.99), eps=(1e-8, 1e-3),
                         weight_decay=(0.0, 0.1), maximize=(False, True)),
        ranges=dict(lr=FINITE, rho=UNIT, eps=EPS, weight_decay=FINITE),
    ),
]

BY_NAME = {o.name: o for o in OPTIMS}


def config_id(cfg: dict[str, Any]) -> str:
    return ",".join(f"{k}={v}" for k, v in cfg.items()) or "defaults"
