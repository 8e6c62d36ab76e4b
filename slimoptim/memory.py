"""What an optimizer holds, in bytes, per component."""

from __future__ import annotations

import torch

from .kernels import device_tables, replaced_state
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
    local shard of DTensor parameters. ``optimizer_bytes`` is what the state holds, tensor
    by tensor; ``optimizer_bytes_allocated`` counts by storage the state, the fused step's
    device tables (``kernel_tables``) and, on CUDA, the caching allocator's rounding of
    every block holding them (``allocator_rounding``): with the state on the GPU, what the
    optimizer adds to ``torch.cuda.memory_allocated()`` (bytes on the CPU, such as the step
    counters torch's own non-fused AdamW keeps there, are in the count too, unrounded).
    Not counted: CUDA
    graphs' private pools and the matmul libraries' workspaces a first Muon step may make
    (the model's matmuls share them). ``replaced_state``: state that the kernels' plans
    still hold though ``opt.state`` no longer names it (swapped by hand: freed as the next
    step rebuilds them; a plan a user's CUDA graph captured, kept past a load for that
    graph); counted in the allocated bytes. ``load_state_dict`` itself drops the plans.
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
    tensors = []  # the state's tensors (local shards)
    for state in optimizer.state.values():
        for name, value in state.items():
            if isinstance(value, torch.Tensor):
                nbytes[_component(name)] += _nbytes(value)
                tensors.append(local_tensor(value))
    optimizer_bytes = sum(v for k, v in nbytes.items() if k not in ("params", "grads"))
    total = sum(nbytes.values())
    per_param = {k: v / max(numel, 1) for k, v in nbytes.items()}
    # Allocated memory goes by storage (a view adds nothing); other tensors (sparse,
    # subclasses) at their logical size, which is all they tell.
    tables = _storages(device_tables(optimizer))
    current = _storages(tensors)
    replaced = {k: v for k, v in _storages(replaced_state(optimizer)).items() if k not in current}
    held = current | tables | replaced
    unplain = sum(_nbytes(t) for t in tensors if not _plain(t))
    rounding = allocator_rounding(held)
    allocated = sum(held.values()) + unplain + rounding
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
        "replaced_state": sum(replaced.values()),
        "optimizer_bytes_allocated": allocated,
        "optimizer_bytes_allocated_per_param": allocated / max(numel, 1),
    }


def _plain(t: torch.Tensor) -> bool:
    """A dense tensor of torch's own classes: it has a storage to look up (sparse tensors
    and tensor subclasses, some of which only wrap others, are not looked up)."""
    return type(t) in (torch.Tensor, torch.nn.Parameter) and t.layout == torch.strided


def _storages(tensors) -> dict[int, int]:
    """{address: bytes} of the distinct storages under the plain ``tensors`` (views share
    one)."""
    storages = {}
    for t in filter(_plain, tensors):
        s = t.untyped_storage()
        if s.nbytes():
            storages[s.data_ptr()] = s.nbytes()
    return storages


def allocator_rounding(storages: dict[int, int]) -> int:
    """Bytes by which the CUDA caching allocator's blocks at the addresses of ``storages``
    ({address: bytes}) exceed those bytes: its rounding of each request (a request of
    10 MiB or more takes a block rounded up to 2 MiB unless over 1 MiB would be left).
    0 off CUDA, and with the cudaMallocAsync backend (it keeps no blocks to read)."""
    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return 0
    if torch.cuda.get_allocator_backend() != "native":  # cudaMallocAsync keeps no blocks
        return 0
    try:
        segments = torch.cuda.memory_snapshot(include_traces=False)  # fast with history on
    except TypeError:  # a torch without the argument
        segments = torch.cuda.memory_snapshot()
    blocks = block_sizes(segments)
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
