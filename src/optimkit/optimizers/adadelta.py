"""Placeholder: being implemented (see the issue)."""
from .._base import OptimizerBase


class Adadelta(OptimizerBase):
    def __init__(self, params, **kwargs):
        raise NotImplementedError("Adadelta is not implemented yet")
