"""Shared by benchmarks/fsdp2_gpu.py's parts: sizes, process group, model, data, training."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import slimoptim  # noqa: E402
from slimoptim import demo_data  # noqa: E402
from slimoptim.demo_model import ByteGPT, ModelSize  # noqa: E402

OUT = ROOT / "benchmarks" / "results" / "fsdp2_gpu"
CKPT = Path(tempfile.gettempdir()) / "slimoptim_fsdp2_gpu"  # DCP checkpoints (GBs): not in git
SMALL = ModelSize(layers=12, width=768, heads=12, context=1024, batch=16)  # global batch
LARGE = ModelSize(layers=30, width=2048, heads=16, context=1024, batch=4)  # per GPU
STEPS, SAVE_AT, LR = 200, 100, 6e-4
# SLIMOPTIM_BENCH_SMOKE=1: tiny sizes on CPU with gloo, to check the script without a GPU.
SMOKE = os.environ.get("SLIMOPTIM_BENCH_SMOKE") == "1"
DEVICE, BACKEND = ("cpu", "gloo") if SMOKE else ("cuda", "nccl")
if SMOKE:
    OUT = Path(os.environ.get("SLIMOPTIM_BENCH_OUT", "/tmp/fsdp2_gpu_smoke"))
    SMALL = ModelSize(layers=2, width=32, heads=2, context=16, batch=4)
    LARGE = ModelSize(layers=2, width=64, heads=2, context=16, batch=2)
    STEPS, SAVE_AT = 6, 3
# NVLink multicast stays off on the shared GPU hosts (device docs).
SAFE_ENV = {
    "NCCL_NVLS_ENABLE": "0",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
    "NVSHMEM_DISABLE_NVLS": "1",
    # deterministic cuBLAS, for the bit-identity checks (init(deterministic=True))
    "CUBLAS_WORKSPACE_CONFIG": ":4096:8",
}


# ----------------------------------------------------------------- helpers


def init(deterministic: bool = True) -> tuple[int, int]:
    # Bit-identity across runs needs deterministic kernels: cuBLAS's split-K reductions are
    # not by default on the GPU, nor attention's backward (see math_attention). The
    # memory/speed part leaves them. cuBLAS reads its workspace setting when its first
    # handle is made: set here too, for a part launched with torchrun by hand.
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
    if "RANK" in os.environ:
        dist.init_process_group(BACKEND)
    else:
        dist.init_process_group(BACKEND, store=dist.HashStore(), rank=0, world_size=1)
    rank, world = dist.get_rank(), dist.get_world_size()
    if DEVICE == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    return rank, world


@contextlib.contextmanager
def math_attention(record: dict):
    """SDPA through its math backend (deterministic matmuls and softmax: cuDNN's and flash
    attention's backward add with atomics in a run-dependent order); ``record`` gets the
    warnings of ops without a deterministic kernel (warn_only=True would only print them)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            yield
        finally:
            found = {str(w.message)[:200] for w in caught if "determinis" in str(w.message)}
            record["nondeterministic_op_warnings"] = sorted(found)


def first_difference(a: list[float], b: list[float]) -> int | None:
    """The first step index whose losses differ (None: bit-identical losses)."""
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), None)


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def build(size: ModelSize, seed: int = 0, dtype=torch.bfloat16) -> ByteGPT:
    torch.manual_seed(seed)
    return slimoptim.cast_model(ByteGPT(size), dtype).to(DEVICE)


def shard(model: ByteGPT, world: int, **kw) -> ByteGPT:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(DEVICE, (world,))
    for block in model.blocks:
        fully_shard(block, mesh=mesh, **kw)
    fully_shard(model, mesh=mesh, **kw)
    return model


_CORPUS = None


def batch(step: int, rank: int, world: int, size: ModelSize, per_rank: bool = False):
    """The global batch of ``step`` (the same on every run), this rank's slice of it."""
    global _CORPUS
    _CORPUS = _CORPUS or demo_data.load_corpus()
    count = size.batch * (world if per_rank else 1)
    gen = torch.Generator().manual_seed(1000 + step)
    tokens = demo_data.random_windows(_CORPUS.train, count, size.context + 1, gen)
    share = count // world
    return tokens[rank * share : (rank + 1) * share].to(DEVICE)


def local_params(model) -> list[torch.Tensor]:
    return [
        (p.to_local() if hasattr(p, "to_local") else p).detach().clone() for p in model.parameters()
    ]


def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def all_ranks(flag: bool) -> bool:
    t = torch.tensor([int(flag)], device=DEVICE)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def train(model, opt, steps, rank, world, size, release=False) -> list[float]:
    losses = []
    for step in steps:
        loss = model.loss(batch(step, rank, world, size))
        loss.backward()
        if not release:
            opt.step()
            opt.zero_grad()
        reduced = loss.detach().clone()
        if world > 1:
            dist.all_reduce(reduced, op=dist.ReduceOp.AVG)
        losses.append(reduced.item())
    return losses


def dcp_save(model, opt, path) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    dcp.save(
        {"model": model.state_dict(), "optim": get_optimizer_state_dict(model, opt)},
        checkpoint_id=str(path),
    )


def dcp_load(model, opt, path) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )

    state = {"model": model.state_dict(), "optim": get_optimizer_state_dict(model, opt)}
    dcp.load(state, checkpoint_id=str(path))
    model.load_state_dict(state["model"])
    set_optimizer_state_dict(model, opt, state["optim"])


def write(name: str, result: dict) -> None:
    if dist.is_initialized() and dist.get_rank() != 0:
        return
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"{name}.json").write_text(json.dumps(result, indent=1))
    print(name, json.dumps(result)[:2000], flush=True)


def optimizer(model):
    return slimoptim.AdamW(model.parameters(), lr=LR, weight_decay=0.1)
