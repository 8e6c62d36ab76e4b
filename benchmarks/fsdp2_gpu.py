"""FSDP2 + slimoptim on GPUs: correctness at world size 1 (NCCL), and 2-GPU runs (issue 13).

One command runs everything the GPUs present allow (about 5-8 minutes on 2 H200s):

    python benchmarks/fsdp2_gpu.py            # writes benchmarks/results/fsdp2_gpu.json

Parts (each also runs alone: ``python benchmarks/fsdp2_gpu.py PART``):

* ``w1``: NCCL, one GPU. FSDP2 at world size 1 vs the unsharded model, 20 steps:
  bit-identical params with ``step()`` and with gradient release; a DCP save at
  step 10 resumed into fresh objects gives bit-identical params at step 20.
* ``single``: the GPT-2-small-shaped byte model (12 x 768, context 1024), 200 steps on
  one GPU without FSDP: the reference loss curve.
* ``fsdp`` (torchrun, 2 GPUs): the same 200 steps with FSDP2 (same global batch), a
  DCP save at step 100, a resume from it in fresh objects (bit-identical params at
  step 200 is checked), and a run with gradient release.
* ``reshard1`` (1 GPU): the 2-GPU step-100 checkpoint loaded at world size 1
  (FSDP2, NCCL) and trained to step 200.
* ``memory`` (torchrun, 2 GPUs): a ~1.5B-parameter model (30 x 2048), FSDP2 +
  slimoptim AdamW 24/8 (bf16 params) vs FSDP2 + torch AdamW (fp32 params,
  bf16 compute, fp32 reduce, fused): per-GPU peak memory, non-activation bytes
  per local param, optimizer step time, tokens/s.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
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
    # Bit-identity across runs needs deterministic kernels: flash attention's backward
    # and cuBLAS split-K are not by default on the GPU. The memory/speed part leaves them.
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
    if "RANK" in os.environ:
        dist.init_process_group(BACKEND)
    else:
        dist.init_process_group(BACKEND, store=dist.HashStore(), rank=0, world_size=1)
    rank, world = dist.get_rank(), dist.get_world_size()
    if DEVICE == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    return rank, world


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


# ------------------------------------------------------------------- parts


def part_w1() -> None:
    rank, world = init()
    size = SMALL if SMOKE else ModelSize(layers=2, width=256, heads=4, context=128, batch=8)
    result = {"torch": torch.__version__, "backend": BACKEND}
    if DEVICE == "cuda":
        result["gpu"] = torch.cuda.get_device_name()
    ref = build(size)
    ref_opt = optimizer(ref)
    train(ref, ref_opt, range(20), 0, 1, size)
    for release in (False, True):
        model = shard(build(size), 1)
        opt = optimizer(model)
        if release:
            slimoptim.enable_gradient_release(model, opt)
        train(model, opt, range(20), 0, 1, size, release=release)
        name = "release_bit_identical" if release else "step_bit_identical"
        result[name] = same(local_params(ref), local_params(model))
    model = shard(build(size), 1)
    opt = optimizer(model)
    train(model, opt, range(10), 0, 1, size)
    path = CKPT / "ckpt_w1"
    dcp_save(model, opt, path)
    model = shard(build(size, seed=1), 1)
    opt = optimizer(model)
    dcp_load(model, opt, path)
    train(model, opt, range(10, 20), 0, 1, size)
    result["dcp_resume_bit_identical"] = same(local_params(ref), local_params(model))
    result["passed"] = all(v for k, v in result.items() if k.endswith("identical"))
    write("w1", result)
    dist.destroy_process_group()


def part_single() -> None:
    torch.manual_seed(0)
    model = build(SMALL)
    opt = optimizer(model)
    start = time.perf_counter()
    losses = train(model, opt, range(STEPS), 0, 1, SMALL)
    write("single", {"losses": losses, "seconds": time.perf_counter() - start})


def part_fsdp() -> None:
    rank, world = init()
    result = {"world": world}
    model = shard(build(SMALL), world)
    opt = optimizer(model)
    start = time.perf_counter()
    losses = train(model, opt, range(SAVE_AT), rank, world, SMALL)
    dcp_save(model, opt, CKPT / "ckpt_w2_step100")
    losses += train(model, opt, range(SAVE_AT, STEPS), rank, world, SMALL)
    result.update(losses=losses, seconds=time.perf_counter() - start)
    straight = local_params(model)
    del model, opt

    model = shard(build(SMALL, seed=1), world)
    opt = optimizer(model)
    dcp_load(model, opt, CKPT / "ckpt_w2_step100")
    result["resumed_losses"] = train(model, opt, range(SAVE_AT, STEPS), rank, world, SMALL)
    result["resume_bit_identical"] = all_ranks(same(straight, local_params(model)))
    del model, opt

    model = shard(build(SMALL), world)
    opt = optimizer(model)
    slimoptim.enable_gradient_release(model, opt)
    result["release_losses"] = train(model, opt, range(STEPS), rank, world, SMALL, release=True)
    result["release_bit_identical"] = all_ranks(same(straight, local_params(model)))
    write("fsdp", result)
    dist.destroy_process_group()


def part_reshard1() -> None:
    rank, world = init()
    model = shard(build(SMALL, seed=1), world)
    opt = optimizer(model)
    dcp_load(model, opt, CKPT / "ckpt_w2_step100")
    losses = train(model, opt, range(SAVE_AT, STEPS), rank, world, SMALL)
    write("reshard1", {"world": world, "losses": losses})
    dist.destroy_process_group()


def measure(model, opt, rank, world, steps=25, warmup=5) -> dict:
    """Peak memory, non-activation bytes per local param, step and optimizer times."""
    numel = sum((p.to_local() if hasattr(p, "to_local") else p).numel() for p in model.parameters())
    step_ms, opt_ms = [], []
    cuda = DEVICE == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    held = 0
    for step in range(steps):
        sync()
        t0 = time.perf_counter()
        model.loss(batch(step, rank, world, LARGE, per_rank=True)).backward()
        sync()
        t1 = time.perf_counter()
        opt.step()
        sync()
        t2 = time.perf_counter()
        if step == steps - 1 and cuda:
            held = torch.cuda.memory_allocated()  # params + grads + states, no activations
        opt.zero_grad()
        if step >= warmup:
            step_ms.append((t2 - t0) * 1e3)
            opt_ms.append((t2 - t1) * 1e3)
    tokens = LARGE.batch * LARGE.context * world
    median = sorted(step_ms)[len(step_ms) // 2]
    return {
        "local_params": numel,
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        "optimizer_state_bytes_per_param": slimoptim.state_nbytes(opt) / numel,
        "non_activation_bytes_per_param": held / numel,
        "step_ms_median": median,
        "optimizer_ms_median": sorted(opt_ms)[len(opt_ms) // 2],
        "tokens_per_s": tokens / (median / 1e3),
    }


def part_memory() -> None:
    from torch.distributed.fsdp import MixedPrecisionPolicy

    rank, world = init(deterministic=False)
    result = {"world": world, "model": LARGE.as_dict()}
    model = shard(build(LARGE), world)
    result["params"] = sum(p.numel() for p in model.parameters())
    result["slimoptim_adamw_24_8"] = measure(model, optimizer(model), rank, world)
    del model
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    model = shard(build(LARGE, dtype=torch.float32), world, mp_policy=policy)
    try:
        fused = DEVICE == "cuda"
        opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.1, fused=fused)
        result["torch_adamw_fused_fp32"] = measure(model, opt, rank, world)
    except (RuntimeError, NotImplementedError) as error:  # fused on DTensors: torch-version
        result["torch_fused_error"] = str(error)[:300]
        opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.1, foreach=True)
        result["torch_adamw_foreach_fp32"] = measure(model, opt, rank, world)
    write("memory", result)
    dist.destroy_process_group()


# ------------------------------------------------------------------ driver


def launch(part: str, gpus: int, script: str = __file__, torchrun: bool = False) -> int:
    """Run ``script part`` on ``gpus`` GPUs (torchrun for more than one); its exit code."""
    env = {**os.environ, **SAFE_ENV, "PYTHONPATH": str(ROOT)}
    args = [script, part] if part else [script]
    if gpus == 1 and not torchrun:
        cmd = [sys.executable, *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        cmd += [f"--nproc-per-node={gpus}", *args]
    print("$", " ".join(cmd), flush=True)
    return subprocess.run(cmd, env=env, cwd=ROOT).returncode


def run_checks(gpus: int) -> dict:
    """The GPU variant of the FSDP2 release test, and the Accelerate + FSDP2 example."""
    env = {**os.environ, **SAFE_ENV, "PYTHONPATH": str(ROOT)}
    test = [sys.executable, "-m", "pytest", "-q", "tests/test_release.py", "-k", "fsdp2", "-rs"]
    print("$", " ".join(test), flush=True)
    codes = {"pytest_release_fsdp2": subprocess.run(test, env=env, cwd=ROOT).returncode}
    example = str(ROOT / "examples" / "accelerate_fsdp2.py")
    for n in sorted({1, min(gpus, 2)}):  # torchrun: Accelerate shards only when launched
        codes[f"accelerate_fsdp2_example_{n}gpu"] = launch("", n, example, torchrun=True)
    return codes


def summary() -> dict:
    parts = {p.stem: json.loads(p.read_text()) for p in sorted(OUT.glob("*.json"))}
    out = {"parts": parts}
    single, fsdp = parts.get("single"), parts.get("fsdp")
    if single and fsdp:
        a, b = single["losses"], fsdp["losses"]
        out["fsdp_vs_single_max_abs_loss_gap"] = max(abs(x - y) for x, y in zip(a, b, strict=True))
        out["fsdp_vs_single_last20_mean"] = [sum(a[-20:]) / 20, sum(b[-20:]) / 20]
        out["release_vs_fsdp_max_abs_loss_gap"] = max(
            abs(x - y) for x, y in zip(b, fsdp["release_losses"], strict=True)
        )
    if fsdp and parts.get("reshard1"):
        c = parts["reshard1"]["losses"]
        out["reshard1_vs_fsdp_last20_mean"] = [sum(fsdp["losses"][-20:]) / 20, sum(c[-20:]) / 20]
    return out


def main() -> None:
    part = sys.argv[1] if len(sys.argv) > 1 else "all"
    if part != "all":
        globals()[f"part_{part}"]()
        return
    gpus = 2 if SMOKE else torch.cuda.device_count()
    codes = {"w1": launch("w1", 1), "single": launch("single", 1)}
    if not SMOKE:
        codes.update(run_checks(gpus))
    if gpus >= 2:
        codes["fsdp"] = launch("fsdp", 2)
        codes["reshard1"] = launch("reshard1", 1)
        codes["memory"] = launch("memory", 2)
    result = {"exit_codes": codes, "gpus": gpus, **summary()}
    if gpus < 2:
        result["not_run"] = "fsdp, reshard1, memory: need 2 GPUs"
    path = OUT.parent / "fsdp2_gpu.json" if not SMOKE else OUT / "all.json"
    path.write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "parts"}, indent=1))


if __name__ == "__main__":
    main()
