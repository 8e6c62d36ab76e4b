"""slimoptim: memory-efficient drop-in replacements for torch.optim optimizers."""

from .memory import memory_report, state_nbytes
from .model import cast_model
from .optimizers import SGD, Adam, AdamW, Lion, SlimOptimizer

__version__ = "0.1.0"
__all__ = [
    "SGD",
    "Adam",
    "AdamW",
    "Lion",
    "SlimOptimizer",
    "cast_model",
    "memory_report",
    "state_nbytes",
]
