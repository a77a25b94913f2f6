"""Names to optimizers: the registry, ``key=value`` argument parsing, create_optimizer, param groups."""

from .args import parse_optimizer_args
from .create import create_optimizer, resolve_optimizer
from .groups import param_groups
from .registry import REGISTRY, HyperParam, OptimizerSpec, get_spec, list_optimizers

__all__ = [
    "REGISTRY",
    "HyperParam",
    "OptimizerSpec",
    "get_spec",
    "list_optimizers",
    "parse_optimizer_args",
    "create_optimizer",
    "resolve_optimizer",
    "param_groups",
]
