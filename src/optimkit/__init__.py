"""optimkit: PyTorch optimizers done right, fast, and with help choosing between them."""

from .optimizers import SGD, Adadelta, Adagrad, Adam, AdamW, Prodigy, RAdam, RMSprop
from .optimizers.prodigy import ProdigyDiagnosisWarning
from .wrappers import Lookahead
from .factory import create_optimizer, get_spec, list_optimizers, param_groups, parse_optimizer_args

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
    "ProdigyDiagnosisWarning",
    "Lookahead",
    "create_optimizer",
    "parse_optimizer_args",
    "list_optimizers",
    "get_spec",
    "param_groups",
]
