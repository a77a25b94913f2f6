"""optimkit: PyTorch optimizers done right, fast, and with help choosing between them."""

from .optimizers import SGD, Adadelta, Adagrad, Adam, AdamW, Prodigy, RAdam, RMSprop

__version__ = "0.1.0"

__all__ = [
    "SGD",
    "Adagrad",
    "RMSprop",
    "Adam",
    "AdamW",
    "RAdam",
    "Adadelta",
    "Prodigy",
]
