"""slimoptim: memory-efficient drop-in replacements for torch.optim optimizers."""

from .memory import memory_report, state_nbytes
from .model import cast_model
from .optimizers import SGD, Adam, AdamW, Lion, SlimOptimizer
from .release import GradientRelease, enable_gradient_release

__version__ = "0.1.0"
__all__ = [
    "SGD",
    "Adam",
    "AdamW",
    "Lion",
    "SlimOptimizer",
    "GradientRelease",
    "cast_model",
    "enable_gradient_release",
    "memory_report",
    "state_nbytes",
]
