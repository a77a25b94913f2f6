"""Placeholder: being implemented (see the issue)."""
from .._base import OptimizerBase


class RAdam(OptimizerBase):
    def __init__(self, params, **kwargs):
        raise NotImplementedError("RAdam is not implemented yet")
