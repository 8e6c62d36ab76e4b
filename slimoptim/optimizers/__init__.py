from .adamw import Adam, AdamW
from .base import SlimOptimizer
from .lion import Lion
from .muon import Muon, MuonParams, muon_param_groups
from .sgd import SGD

__all__ = [
    "Adam",
    "AdamW",
    "Lion",
    "Muon",
    "MuonParams",
    "SGD",
    "SlimOptimizer",
    "muon_param_groups",
]
