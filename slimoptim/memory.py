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
    local shard of DTensor parameters. ``optimizer_bytes`` is what the state holds;
    ``optimizer_bytes_allocated`` adds the fused step's device tables (``kernel_tables``)
    and, on CUDA, the caching allocator's rounding of every block holding them or the
    state (``allocator_rounding``): what the optimizer adds to
    ``torch.cuda.memory_allocated()``. Not counted: CUDA graphs' private pools, and the
    matmul libraries' workspaces a first Muon step may make (the model's matmuls share them).
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
    state = [local_tensor(v) for s in optimizer.state.values() for v in s.values()]
    state = [t for t in state if isinstance(t, torch.Tensor)]
    tables = _storages(_device_tables(optimizer))
    for t in (*params, *state):  # a plan's table is never a param's or a state's storage
        tables.pop(local_tensor(t).untyped_storage().data_ptr(), None)
    rounding = allocator_rounding(_storages(state) | tables)
    allocated = optimizer_bytes + sum(tables.values()) + rounding
    return {
        "num_params": numel,
        "bytes": nbytes,
        "bytes_per_param": per_param,
        "optimizer_bytes": optimizer_bytes,
        "optimizer_bytes_per_param": optimizer_bytes / max(numel, 1),
        "total_bytes": total,
        "total_bytes_per_param": total / max(numel, 1),
        # Beyond the state: the fused step's device tables, and what the CUDA caching
        # allocator's blocks holding all these tensors add to their sizes (its rounding).
        "kernel_tables": sum(tables.values()),
        "allocator_rounding": rounding,
        "optimizer_bytes_allocated": allocated,
        "optimizer_bytes_allocated_per_param": allocated / max(numel, 1),
    }


def _device_tables(optimizer) -> list[torch.Tensor]:
    if "_slimoptim_plans" in optimizer.__dict__ or "_slimoptim_muon_plans" in optimizer.__dict__:
        from .kernels import device_tables  # noqa: PLC0415 (plans exist: Triton imported)

        return device_tables(optimizer)
    return []


def _storages(tensors) -> dict[int, int]:
    """{address: bytes} of the distinct storages under ``tensors`` (views share one)."""
    storages = (t.untyped_storage() for t in tensors)
    return {s.data_ptr(): s.nbytes() for s in storages if s.nbytes()}


def allocator_rounding(storages: dict[int, int]) -> int:
    """Bytes by which the CUDA caching allocator's blocks at the addresses of ``storages``
    ({address: bytes}) exceed those bytes: its rounding of each request (e.g. a 1-byte
    state of an odd number of MiB takes a whole 2 MiB-rounded block). 0 off CUDA."""
    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return 0
    blocks = block_sizes(torch.cuda.memory_snapshot())
    return sum(blocks[ptr] - n for ptr, n in storages.items() if ptr in blocks)


def block_sizes(segments: list[dict]) -> dict[int, int]:
    """{address: size} of every allocated block in ``torch.cuda.memory_snapshot()``."""
    sizes = {}
    for segment in segments:
        address = segment["address"]
        for block in segment["blocks"]:
            if block["state"] == "active_allocated":
                sizes[address] = block["size"]
            address += block["size"]
    return sizes
