"""FSDP2 + slimoptim on GPUs: correctness at world size 1 (NCCL), and 2-GPU runs (issue 13).

One command runs everything the GPUs present allow (about 5-8 minutes on 2 H200s):

    python benchmarks/fsdp2_gpu.py            # writes benchmarks/results/fsdp2_gpu.json

Parts (each also runs alone: ``python benchmarks/fsdp2_gpu.py PART``; the 2-GPU parts
launch themselves with torchrun and NVLink multicast off):

* ``w1``: NCCL, one GPU. FSDP2 at world size 1 vs the unsharded model, 20 steps:
  bit-identical params with ``step()`` and with gradient release; a DCP save at
  step 10 resumed into fresh objects gives bit-identical params at step 20.
The correctness parts (``w1``, ``single``, ``fsdp``, ``reshard1``) run deterministic
kernels: attention through SDPA's math backend (cuDNN's and flash attention's backward
accumulate with atomics), ``torch.use_deterministic_algorithms`` and cuBLAS's fixed
workspace; the warnings of ops that still lack a deterministic kernel are recorded.

* ``single``: the GPT-2-small-shaped byte model (12 x 768, context 1024), 200 steps on
  one GPU without FSDP: the reference loss curve.
* ``fsdp`` (torchrun, 2 GPUs): the same 200 steps with FSDP2 (same global batch), a
  DCP save at step 100, a resume from it in fresh objects (bit-identical params at
  step 200 is checked), a run with gradient release, and the uninterrupted run once
  more: the control that tells non-deterministic kernels apart from a resume or release
  bug (``uninterrupted_repeat_bit_identical``).
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
import time

import torch
import torch.distributed as dist
from fsdp2_common import (
    BACKEND,
    CKPT,
    DEVICE,
    LARGE,
    LR,
    OUT,
    ROOT,
    SAFE_ENV,
    SAVE_AT,
    SMALL,
    SMOKE,
    STEPS,
    ModelSize,
    all_ranks,
    batch,
    build,
    dcp_load,
    dcp_save,
    first_difference,
    init,
    local_params,
    math_attention,
    optimizer,
    same,
    shard,
    slimoptim,
    sync,
    train,
    write,
)

# ------------------------------------------------------------------- parts


def part_w1() -> None:
    rank, world = init()
    size = SMALL if SMOKE else ModelSize(layers=2, width=256, heads=4, context=128, batch=8)
    result = {"torch": torch.__version__, "backend": BACKEND}
    if DEVICE == "cuda":
        result["gpu"] = torch.cuda.get_device_name()
    with math_attention(result):
        ref = build(size)
        train(ref, optimizer(ref), range(20), 0, 1, size)
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


def one_device(name: str, dtype, make_optimizer, autocast: bool = False) -> None:
    """The 200 steps on one device (no process group), deterministic kernels."""
    torch.manual_seed(0)
    if DEVICE == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    result = {}
    with math_attention(result):
        model = build(SMALL, dtype=dtype)
        opt = make_optimizer(model)
        start = time.perf_counter()
        with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=autocast):
            result["losses"] = train(model, opt, range(STEPS), 0, 1, SMALL)
    write(name, {**result, "seconds": time.perf_counter() - start})


def part_single() -> None:
    one_device("single", torch.bfloat16, optimizer)


def part_single_fp32() -> None:
    """The same steps with torch's AdamW on float32 params and bf16 autocast: the format's
    own gap to fp32 AdamW, against which the world-size gap is judged."""
    one_device(
        "single_fp32",
        torch.float32,
        lambda model: torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.1),
        autocast=True,
    )


def fsdp_run(world, rank, steps, seed=0, load=None, save=None, release=False):
    """One FSDP2 run from fresh objects: its losses and final local params."""
    model = shard(build(SMALL, seed=seed), world)
    opt = optimizer(model)
    if load is not None:
        dcp_load(model, opt, load)
    if release:
        slimoptim.enable_gradient_release(model, opt)
    losses = []
    for part in [steps[:SAVE_AT], steps[SAVE_AT:]] if save is not None else [steps]:
        losses += train(model, opt, part, rank, world, SMALL, release=release)
        if save is not None and part[-1] == SAVE_AT - 1:
            dcp_save(model, opt, save)
    return losses, local_params(model)


def part_fsdp() -> None:
    rank, world = init()
    result = {"world": world}
    path = CKPT / "ckpt_w2_step100"
    with math_attention(result):
        start = time.perf_counter()
        losses, straight = fsdp_run(world, rank, range(STEPS), save=path)
        result.update(losses=losses, seconds=time.perf_counter() - start)
        # The control: the uninterrupted run again, without the save. Losses that differ
        # before step 100 mean non-deterministic kernels (then the resume and release
        # comparisons say nothing); only after it, the save too may have changed something.
        repeat, repeated = fsdp_run(world, rank, range(STEPS))
        result["uninterrupted_repeat_bit_identical"] = all_ranks(same(straight, repeated))
        resumed, params = fsdp_run(world, rank, range(SAVE_AT, STEPS), seed=1, load=path)
        result["resumed_losses"] = resumed
        result["resume_bit_identical"] = all_ranks(same(straight, params))
        released, params = fsdp_run(world, rank, range(STEPS), release=True)
        result["release_losses"] = released
        result["release_bit_identical"] = all_ranks(same(straight, params))
        # Neither saved at step 100: tells a release bug apart from a save with side effects.
        result["release_vs_repeat_bit_identical"] = all_ranks(same(repeated, params))
    result["first_loss_difference"] = {
        "repeat": first_difference(losses, repeat),
        "resume": first_difference(losses[SAVE_AT:], resumed),
        "release": first_difference(losses, released),
    }
    write("fsdp", result)
    dist.destroy_process_group()


def part_reshard1() -> None:
    rank, world = init()
    result = {"world": world}
    with math_attention(result):
        model = shard(build(SMALL, seed=1), world)
        opt = optimizer(model)
        dcp_load(model, opt, CKPT / "ckpt_w2_step100")
        result["losses"] = train(model, opt, range(SAVE_AT, STEPS), rank, world, SMALL)
    write("reshard1", result)
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

TWO_PROCESS_PARTS = ("fsdp", "memory")  # `fsdp2_gpu.py fsdp` launches itself with torchrun


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
    """The CUDA/NCCL FSDP2 tests (release on 1 and 2 GPUs, CPU-held state), and the
    Accelerate + FSDP2 example."""
    env = {**os.environ, **SAFE_ENV, "PYTHONPATH": str(ROOT)}
    test = [sys.executable, "-m", "pytest", "-q", "-rs", "-k", "fsdp2"]
    test += ["tests/test_release_usage.py", "tests/test_fsdp2_cuda.py"]
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
    if part in TWO_PROCESS_PARTS and "RANK" not in os.environ:  # not under torchrun yet
        sys.exit(launch(part, 2))
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
