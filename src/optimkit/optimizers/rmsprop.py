"""Placeholder: being implemented (see the issue)."""
from .._base import OptimizerBase


class RMSprop(OptimizerBase):
    def __init__(self, params, **kwargs):
        raise NotImplementedError("RMSprop is not implemented yet")
