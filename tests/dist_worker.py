"""Multi-process FSDP2/DDP scenarios for tests/test_distributed.py (gloo, CPU).

Run as ``python tests/dist_worker.py STAGE RANK WORLD WORKDIR`` by the test, one
process per rank; the world-size-1 stages also run inside the test process.
Rank 0 writes what the test compares to ``WORKDIR/<stage>_w<WORLD>.pt``.
"""

from __future__ import annotations

import os
import sys
import warnings

import torch
import torch.distributed as dist
from torch import nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import slimoptim  # noqa: E402
from slimoptim import distributed as sdist  # noqa: E402

GROUP_SIZE = 8  # small groups: many of them, and boundaries inside rows
BATCH = 12  # divisible by world sizes 1, 2 and 3
STEPS, SAVE_AT = 6, 3
DATA_SEED = int(os.environ.get("SLIMOPTIM_TEST_SEED", "1234"))


def build(seed: int = 0, dtype=torch.bfloat16) -> nn.Sequential:
    """Rows of 7 and 13 values (groups cross rows), 32 (aligned), and a 2-row layer
    whose third shard is empty."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(7, 13), nn.GELU(), nn.Linear(13, 32), nn.GELU(), nn.Linear(32, 5), nn.Linear(5, 2)
    )
    return slimoptim.cast_model(model, dtype)


def optimizer(model, **kw):
    return slimoptim.AdamW(model.parameters(), lr=1e-2, group_size=GROUP_SIZE, **kw)


def shard(model, world: int, **kw):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh, **kw)
    fully_shard(model, mesh=mesh, **kw)
    return model


def batch(step: int, rank: int, world: int, dtype=torch.bfloat16) -> torch.Tensor:
    gen = torch.Generator().manual_seed(DATA_SEED + step)
    x = torch.randn(BATCH, 7, generator=gen).to(dtype)
    per_rank = BATCH // world
    return x[rank * per_rank : (rank + 1) * per_rank]


def train(model, opt, steps, rank, world, release=False):
    for step in steps:
        model(batch(step, rank, world)).float().square().mean().backward()
        if not release:
            opt.step()
            opt.zero_grad()


def full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if sdist.is_dtensor(t) else t


def snapshot(model, opt) -> dict:
    """Whole params, masters and decoded states (collective: every rank calls it)."""
    out = {}
    for name, p in model.named_parameters():
        group = opt._group_of(p)
        entry = {"param": full(p.detach()).clone()}
        entry["master"] = full(sdist._as_global(p, opt.master_weight(p), tuple(p.shape)))
        state = opt.state.get(p)
        if state:
            local = sdist.local_rows(p)[1], *p.shape[1:]
            values = opt._load_states(state, group, p.to_local().numel())
            for key, value in values.items():
                entry[key] = full(sdist._as_global(p, value.view(local), tuple(p.shape)))
            entry["step"] = state["step"].clone()
        out[name] = entry
    return out


def dcp_options(flatten: bool):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(flatten_optimizer_state_dict=flatten)


def dcp_save(model, opt, path, flatten=False):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    osd = get_optimizer_state_dict(model, opt, options=dcp_options(flatten))
    dcp.save({"model": model.state_dict(), "optim": osd}, checkpoint_id=path)


def dcp_load(model, opt, path, flatten=False):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )

    options = dcp_options(flatten)
    template = {
        "model": model.state_dict(),
        "optim": get_optimizer_state_dict(model, opt, options=options),
    }
    dcp.load(template, checkpoint_id=path)
    model.load_state_dict(template["model"])
    set_optimizer_state_dict(model, opt, template["optim"], options=options)


def fsdp_pair(world: int, seed: int = 0, **kw):
    model = shard(build(seed), world)
    return model, optimizer(model, **kw)


# ------------------------------------------------------------------ stages


def stage_fsdp(rank: int, world: int, workdir: str) -> dict:
    """Training, exact resume, release, flatten, and loading the other world sizes' checkpoints."""
    out = {}
    model, opt = fsdp_pair(world)
    out["init"] = snapshot(model, opt)
    train(model, opt, range(STEPS), rank, world)
    out["straight"] = snapshot(model, opt)
    masters = sdist.sharded_fp32_state_dict(model, opt)
    out["fp32_masters"] = {name: full(v) for name, v in masters.items()}

    for flatten in (False, True):
        model, opt = fsdp_pair(world)
        train(model, opt, range(SAVE_AT), rank, world)
        path = os.path.join(workdir, f"ckpt_w{world}" + ("_flat" if flatten else ""))
        dcp_save(model, opt, path, flatten)
        if not flatten:
            out["at_save"] = snapshot(model, opt)
        model, opt = fsdp_pair(world, seed=1)  # other weights: the load must replace them
        dcp_load(model, opt, path, flatten)
        train(model, opt, range(SAVE_AT, STEPS), rank, world)
        out["resumed_flat" if flatten else "resumed"] = snapshot(model, opt)

    out["resumed_full"] = full_state_dict_resume(rank, world, workdir)

    model, opt = fsdp_pair(world)
    slimoptim.enable_gradient_release(model, opt, bucket_bytes=0)
    train(model, opt, range(STEPS), rank, world, release=True)
    out["release_grads_freed"] = all(p.grad is None for p in model.parameters())
    out["release"] = snapshot(model, opt)

    # DCP resume under release: DCP initialises a fresh optimizer's state with a step at
    # lr 0, which release must run (not skip) and whose gradients it must free.
    path = os.path.join(workdir, f"ckpt_w{world}_release")
    for seed, steps in ((0, range(SAVE_AT)), (1, range(SAVE_AT, STEPS))):
        model, opt = fsdp_pair(world, seed=seed)
        slimoptim.enable_gradient_release(model, opt, bucket_bytes=0)
        if seed == 1:
            dcp_load(model, opt, path)
            out["release_load_grads_freed"] = all(p.grad is None for p in model.parameters())
        train(model, opt, steps, rank, world, release=True)
        if seed == 0:
            dcp_save(model, opt, path)
    out["release_resumed"] = snapshot(model, opt)
    return {**out, **stage_reshard(rank, world, workdir)}


def full_state_dict_resume(rank: int, world: int, workdir: str) -> dict:
    """full_state_dict=True: whole tensors in one file (rank 0 writes it), loaded by all."""
    from torch.distributed.checkpoint import state_dict as dsd

    options = dsd.StateDictOptions(full_state_dict=True, cpu_offload=True)
    model, opt = fsdp_pair(world)
    train(model, opt, range(SAVE_AT), rank, world)
    path = os.path.join(workdir, f"full_w{world}.pt")
    whole = {
        "model": dsd.get_model_state_dict(model, options=options),
        "optim": dsd.get_optimizer_state_dict(model, opt, options=options),
    }
    if rank == 0:
        torch.save(whole, path)
    dist.barrier()
    model, opt = fsdp_pair(world, seed=1)
    whole = torch.load(path)
    load_options = dsd.StateDictOptions(full_state_dict=True)
    dsd.set_model_state_dict(model, whole["model"], options=load_options)
    dsd.set_optimizer_state_dict(model, opt, whole["optim"], options=load_options)
    train(model, opt, range(SAVE_AT, STEPS), rank, world)
    return snapshot(model, opt)


def stage_reshard(rank: int, world: int, workdir: str) -> dict:
    """Load the checkpoints other world sizes wrote before this stage ran, and continue."""
    out = {}
    for other in (1, 2, 3):
        for suffix in ("", "_flat"):
            path = os.path.join(workdir, f"ckpt_w{other}{suffix}")
            if other == world or not os.path.isdir(path):
                continue
            model, opt = fsdp_pair(world, seed=1)
            dcp_load(model, opt, path, flatten=bool(suffix))
            out[f"loaded_w{other}{suffix}"] = snapshot(model, opt)
            train(model, opt, range(SAVE_AT, STEPS), rank, world)
            out[f"continued_w{other}{suffix}"] = snapshot(model, opt)
    return out


def stage_mixed_precision(rank: int, world: int, workdir: str) -> dict:
    """MixedPrecisionPolicy: fp32 params computed in bf16, and bf16 params reduced in fp32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    out = {}
    policies = {
        "fp32_params_bf16_compute": (torch.float32, MixedPrecisionPolicy(torch.bfloat16)),
        "bf16_params_fp32_reduce": (
            torch.bfloat16,
            MixedPrecisionPolicy(torch.bfloat16, reduce_dtype=torch.float32),
        ),
    }
    for name, (dtype, policy) in policies.items():
        model = shard(build(0, dtype), world, mp_policy=policy)
        opt = optimizer(model)
        train(model, opt, range(STEPS), rank, world)
        out[name] = snapshot(model, opt)
        out[name + "_grad_dtype"] = str(next(iter(model.parameters())).dtype)
    return out


def stage_ddp(rank: int, world: int, workdir: str) -> dict:
    model = nn.parallel.DistributedDataParallel(build(0))
    opt = optimizer(model)
    train(model, opt, range(STEPS), rank, world)
    try:
        slimoptim.enable_gradient_release(model, opt)
        error = None
    except ValueError as e:
        error = str(e)
    params = {k: v.detach().clone() for k, v in model.module.state_dict().items()}
    return {"params": params, "release_error": error}


STAGES = {
    "fsdp": stage_fsdp,
    "reshard": stage_reshard,
    "mixed_precision": stage_mixed_precision,
    "ddp": stage_ddp,
}


def run(stages: str, rank: int, world: int, workdir: str, store=None, destroy=True) -> dict:
    """Run the comma-separated ``stages`` in one process group; rank 0 saves their results."""
    if store is None:
        store = dist.FileStore(os.path.join(workdir, f"store_{stages}_w{world}"), world)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world)
    out = {}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for stage in stages.split(","):
                out[stage] = STAGES[stage](rank, world, workdir)
        dist.barrier()
    finally:
        if destroy:
            dist.destroy_process_group()
    if rank == 0:
        torch.save(out, os.path.join(workdir, f"w{world}_{stages}.pt"))
    return out


if __name__ == "__main__":
    torch.set_num_threads(1)
    run(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], destroy=False)
    # Every rank passed the final barrier and rank 0 saved: leave without gloo's teardown,
    # whose transport threads can abort a rank (SIGABRT, "terminate called without an
    # active exception") while its peers are already exiting. Errors raise before this.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
