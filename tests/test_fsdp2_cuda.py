"""FSDP2 on CUDA with NCCL: gradient release on two GPUs, and CPU-held state on one.

Both skip without the GPUs they need (the CPU/gloo variants are in test_distributed.py
and test_release_usage.py). On a 2-GPU machine:

    python -m pytest -q tests/test_fsdp2_cuda.py
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

import slimoptim

NCCL = dist.is_available() and dist.is_nccl_available()
GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0
# NVLink multicast off on shared hosts; a fixed cuBLAS workspace for deterministic matmuls.
ENV = {
    "NCCL_NVLS_ENABLE": "0",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
    "NVSHMEM_DISABLE_NVLS": "1",
    "CUBLAS_WORKSPACE_CONFIG": ":4096:8",
}


@pytest.mark.skipif(not (NCCL and GPUS >= 2), reason="needs 2 CUDA GPUs and NCCL")
def test_release_on_two_gpus_is_bit_identical_to_step(tmp_path):
    """Release steps each shard on FSDP2's reduce-scatter stream, inside its hooks (delayed
    there on purpose); params, states and losses must equal step()'s bit for bit."""
    worker = os.path.join(os.path.dirname(__file__), "nccl_worker.py")
    env = {**os.environ, **ENV}
    procs = [
        subprocess.Popen(
            [sys.executable, worker, str(rank), "2", str(tmp_path)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for rank in range(2)
    ]
    logs = [p.communicate(timeout=300)[0].decode() for p in procs]
    for rank, (proc, log) in enumerate(zip(procs, logs, strict=True)):
        assert proc.returncode == 0, f"rank {rank} failed:\n{log[-4000:]}"
    for rank in range(2):
        out = json.loads((tmp_path / f"rank{rank}.json").read_text())
        context = f"rank {rank}; non-deterministic ops: {out['nondeterministic']}"
        assert out["step_counts"] == {"side_stream": 0, "default_stream": 5}, context
        hooks, buckets = out["hooks"], out["buckets"]
        # The runs went where they should: every step in the hooks, or both places.
        assert hooks["counts"]["default_stream"] == 0 and hooks["counts"]["side_stream"] > 0
        assert buckets["counts"]["default_stream"] > 0 and buckets["counts"]["side_stream"] > 0
        for name, result in (("hooks", hooks), ("buckets", buckets)):
            assert result["compared"] > 0
            assert not result["differing"], f"release ({name}) differs: {result} ({context})"
            assert result["same_losses"], f"{name}: {result['losses']} vs {out['step_losses']}"


def _to_cpu(value):
    """A state_dict's tensors as whole CPU tensors, as Accelerate's load_state hands them."""
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_to_cpu(v) for v in value]
    if isinstance(value, torch.Tensor):
        return (value.full_tensor() if hasattr(value, "full_tensor") else value).cpu()
    return value


@pytest.mark.skipif(not (NCCL and GPUS >= 1), reason="needs a CUDA GPU and NCCL")
def test_cpu_optimizer_state_loads_into_a_cuda_fsdp2_model():
    """Accelerate's load_state gives set_optimizer_state_dict CPU tensors for a CUDA model
    (examples/accelerate_fsdp2.py exited 1 on the H200 with a device mismatch in the
    group-scale gather); the load must be exact and training continue bit for bit."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.nn import Linear, Sequential

    seed = random.randrange(2**31)
    dist.init_process_group("nccl", store=dist.HashStore(), rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cuda", (1,))

        def pair(model_seed):
            torch.manual_seed(model_seed)
            # 40 x 24: rows whose 24 values cross the groups of 32 (phases differ by row).
            model = slimoptim.cast_model(Sequential(Linear(24, 40), Linear(40, 24)), torch.bfloat16)
            model = model.cuda()
            fully_shard(model[0], mesh=mesh)
            fully_shard(model, mesh=mesh)
            return model, slimoptim.AdamW(model.parameters(), lr=1e-2)

        gen = torch.Generator().manual_seed(seed)
        data = [torch.randn(6, 24, generator=gen).bfloat16().cuda() for _ in range(4)]

        def train(model, opt, xs):
            for x in xs:
                model(x).float().square().mean().backward()
                opt.step()
                opt.zero_grad()

        model, opt = pair(0)
        train(model, opt, data[:2])
        saved = _to_cpu(opt.state_dict())
        resumed, resumed_opt = pair(1)
        resumed.load_state_dict(model.state_dict())
        resumed_opt.load_state_dict(saved)
        for p, q in zip(model.parameters(), resumed.parameters(), strict=True):
            for key, value in opt.state[p].items():
                loaded = resumed_opt.state[q][key]
                assert loaded.device == value.device, f"{key} (seed {seed})"
                assert torch.equal(loaded, value), f"{key} (seed {seed})"
        train(model, opt, data[2:])
        train(resumed, resumed_opt, data[2:])
        for p, q in zip(model.parameters(), resumed.parameters(), strict=True):
            assert torch.equal(p.to_local(), q.to_local()), f"seed {seed}"
    finally:
        dist.destroy_process_group()
