from .adamw import Adam, AdamW
from .base import SlimOptimizer
from .lion import Lion
from .sgd import SGD

__all__ = ["Adam", "AdamW", "Lion", "SGD", "SlimOptimizer"]
