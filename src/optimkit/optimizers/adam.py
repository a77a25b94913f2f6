"""Placeholder: being implemented (see the issue)."""
from .._base import OptimizerBase


class Adam(OptimizerBase):
    def __init__(self, params, **kwargs):
        raise NotImplementedError("Adam is not implemented yet")


class AdamW(OptimizerBase):
    def __init__(self, params, **kwargs):
        raise NotImplementedError("AdamW is not implemented yet")
