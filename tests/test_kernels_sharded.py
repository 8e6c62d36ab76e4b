"""The fused kernels step FSDP2's DTensor shards (their local tensors), bit for bit.

One process, a one-rank mesh: the shards are the whole tensors, which is enough to
check that the dispatcher steps DTensors in the kernels rather than the reference.
Multi-rank behaviour is tested with the distributed module's own tests.
"""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist

import slimoptim

pytest.importorskip("triton")
tensor_api = pytest.importorskip("torch.distributed.tensor")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def mesh():
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    dist.init_process_group("nccl" if DEVICE == "cuda" else "gloo", rank=0, world_size=1)
    try:
        yield tensor_api.init_device_mesh(DEVICE, (1,))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("cls", (slimoptim.AdamW, slimoptim.SGD, slimoptim.Lion))
def test_dtensor_shards_step_in_the_kernels_like_the_reference(mesh, cls):
    shard = [tensor_api.Shard(0)]
    gen = torch.Generator().manual_seed(0)
    shapes = ((4097,), (33, 7), (1,))
    values = [torch.randn(s, generator=gen).bfloat16().to(DEVICE) for s in shapes]
    ps = [torch.nn.Parameter(tensor_api.distribute_tensor(v, mesh, shard)) for v in values]
    qs = [torch.nn.Parameter(v.clone()) for v in values]
    kw = {"momentum": 0.9} if cls is slimoptim.SGD else {}
    fused = cls(ps, lr=1e-2, fused=True, **kw)
    ref = cls(qs, lr=1e-2, fused=False, **kw)
    for _ in range(3):
        for p, q in zip(ps, qs, strict=True):
            g = torch.randn(q.shape, generator=gen).bfloat16().to(DEVICE)
            p.grad = tensor_api.distribute_tensor(g, mesh, shard)
            q.grad = g.clone()
        fused.step()
        ref.step()
    plans = fused.__dict__.get("_slimoptim_plans", {}).values()
    assert any(plan.device is not None for plan in plans), "the DTensors were not fused"
    for p, q in zip(ps, qs, strict=True):
        local = p.to_local()
        assert torch.equal(local.view(torch.int16), q.detach().view(torch.int16))
        for name, value in ref.state[q].items():
            mine = fused.state[p][name]
            mine = mine.to_local() if hasattr(mine, "to_local") else mine
            assert torch.equal(mine.reshape(-1).cpu(), value.reshape(-1).cpu()), name
