"""Placeholder: being implemented (see the issue)."""
from .._base import OptimizerBase


class Adagrad(OptimizerBase):
    def __init__(self, params, **kwargs):
        raise NotImplementedError("Adagrad is not implemented yet")
