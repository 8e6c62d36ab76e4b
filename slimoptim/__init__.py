"""slimoptim: memory-efficient drop-in replacements for torch.optim optimizers."""

from .checkpoint import (
    CheckpointError,
    fp32_state_dict,
    from_torch_state_dict,
    load_checkpoint,
    load_fp32_state_dict,
    load_model,
    save_checkpoint,
    save_model,
    to_torch_state_dict,
)
from .memory import memory_report, state_nbytes
from .model import cast_model
from .optimizers import SGD, Adam, AdamW, Lion, Muon, SlimOptimizer, muon_param_groups
from .release import GradientRelease, enable_gradient_release

__version__ = "0.1.0"
__all__ = [
    "SGD",
    "Adam",
    "AdamW",
    "Lion",
    "Muon",
    "muon_param_groups",
    "SlimOptimizer",
    "GradientRelease",
    "CheckpointError",
    "fp32_state_dict",
    "from_torch_state_dict",
    "load_checkpoint",
    "load_fp32_state_dict",
    "load_model",
    "save_checkpoint",
    "save_model",
    "to_torch_state_dict",
    "cast_model",
    "enable_gradient_release",
    "memory_report",
    "state_nbytes",
]
