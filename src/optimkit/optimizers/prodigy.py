"""Placeholder: being implemented (see the issue)."""
from .._base import OptimizerBase


class Prodigy(OptimizerBase):
    def __init__(self, params, **kwargs):
        raise NotImplementedError("Prodigy is not implemented yet")
