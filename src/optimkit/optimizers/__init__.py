"""One module per optimizer: the class, its per-tensor reference and its fast path(s)."""

from .adadelta import Adadelta
from .adagrad import Adagrad
from .adam import Adam, AdamW
from .prodigy import Prodigy
from .radam import RAdam
from .rmsprop import RMSprop
from .sgd import SGD

__all__ = ["SGD", "Adagrad", "RMSprop", "Adam", "AdamW", "RAdam", "Adadelta", "Prodigy"]
