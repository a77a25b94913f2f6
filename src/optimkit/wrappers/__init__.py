"""Wrappers around any torch.optim.Optimizer."""

from .lookahead import Lookahead

__all__ = ["Lookahead"]
