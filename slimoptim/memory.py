"""What an optimizer holds, in bytes, per component."""

from __future__ import annotations

import torch

from .optimizers.base import local_tensor

_COMPONENT = {"correction": "master_correction", "step": "step"}


def _component(name: str) -> str:
    if name in _COMPONENT:
        return _COMPONENT[name]
    return "state_scales" if name.endswith("_scale") else "states"


def _nbytes(t: torch.Tensor) -> int:
    local = local_tensor(t)
    return local.numel() * local.element_size()


def state_nbytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of every tensor the optimizer holds in its state (not params or grads)."""
    return sum(
        _nbytes(v)
        for s in optimizer.state.values()
        for v in s.values()
        if isinstance(v, torch.Tensor)
    )


def memory_report(optimizer: torch.optim.Optimizer) -> dict:
    """Bytes per component (params, grads, correction, states, scales, step) and bytes/param.

    Counts each distinct parameter once (tied weights share storage) and the
    local shard of DTensor parameters.
    """
    params = {id(p): p for g in optimizer.param_groups for p in g["params"]}.values()
    numel = sum(local_tensor(p).numel() for p in params)
    nbytes = {
        "params": sum(_nbytes(p) for p in params),
        "grads": sum(_nbytes(p.grad) for p in params if p.grad is not None),
        "master_correction": 0,
        "states": 0,
        "state_scales": 0,
        "step": 0,
    }
    for state in optimizer.state.values():
        for name, value in state.items():
            if isinstance(value, torch.Tensor):
                nbytes[_component(name)] += _nbytes(value)
    optimizer_bytes = sum(v for k, v in nbytes.items() if k not in ("params", "grads"))
    total = sum(nbytes.values())
    per_param = {k: v / max(numel, 1) for k, v in nbytes.items()}
    return {
        "num_params": numel,
        "bytes": nbytes,
        "bytes_per_param": per_param,
        "optimizer_bytes": optimizer_bytes,
        "optimizer_bytes_per_param": optimizer_bytes / max(numel, 1),
        "total_bytes": total,
        "total_bytes_per_param": total / max(numel, 1),
    }
