"""Muon step time at TinyLlama-1.1B hidden-matrix shapes, every optimizer in one run.

A Muon step is ~50 TFLOP of bf16 matmuls (Newton-Schulz) for these 154 matrices, so
a run of it heats the GPU and its clock falls over a minute. Timing the optimizers one
after another then favours whichever runs first. Here every optimizer is built up
front and the timed steps are interleaved round by round (A, B, C, A, B, C, ...), so
all rows see the same clock; the table reports each row's median.

    python benchmarks/muon_step_time.py [--rounds 15] [--profile] [--out FILE]

``--profile`` adds, per optimizer, the CUDA time of one step split into matmuls and
everything else (torch.profiler), which tells the Newton-Schulz cost from ours.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]  # this checkout's slimoptim first

from step_time import (  # noqa: E402
    event_ms,
    muon_optimizers,
    random_params,
    tinyllama_hidden_shapes,
)

import slimoptim  # noqa: E402


def build(shapes, dtype, factory):
    opt = factory(random_params(shapes, dtype))
    opt.step()  # creates the states and compiles the kernels
    return opt


def extra_reserved_bytes(shapes, dtype, factory, steps: int = 4) -> dict:
    """What one optimizer holds beyond params, grads and states after ``steps`` steps
    (scratch buffers, a captured graph's pool): the allocator's reserved bytes, alone."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    before = torch.cuda.memory_reserved()
    opt = build(shapes, dtype, factory)
    for _ in range(steps - 1):
        opt.step()
    torch.cuda.synchronize()
    params = opt.param_groups[0]["params"]
    tensors = 2 * sum(p.nbytes for p in params) + slimoptim.state_nbytes(opt)
    extra = torch.cuda.memory_reserved() - before - tensors
    del opt, params
    torch.cuda.empty_cache()
    return {"extra_reserved_bytes": extra}


def interleaved(opts: dict, rounds: int, warmup: int = 2) -> dict:
    times = {name: [] for name in opts}
    for r in range(warmup + rounds):
        for name, opt in opts.items():
            ms = event_ms(opt.step)
            if r >= warmup:
                times[name].append(ms)
    return {
        name: {
            "ms": round(statistics.median(t), 3),
            "ms_min": round(min(t), 3),
            "ms_max": round(max(t), 3),
        }
        for name, t in times.items()
    }


def profile_split(opt) -> dict:
    """CUDA ms of one step: matmul kernels vs the rest."""
    from torch.profiler import ProfilerActivity, profile  # noqa: PLC0415

    opt.step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        opt.step()
        torch.cuda.synchronize()
    gemm = other = 0.0
    top = {}
    for e in prof.key_averages():
        us = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
        if e.key.startswith("cuda") or us == 0:
            continue
        is_gemm = any(k in e.key.lower() for k in ("gemm", "sm90", "cutlass", "nvjet", "xmma"))
        if is_gemm:
            gemm += us
        else:
            other += us
        top[e.key[:80]] = round(us / 1e3, 3)
    largest = dict(sorted(top.items(), key=lambda kv: -kv[1])[:12])
    return {"gemm_ms": round(gemm / 1e3, 3), "other_ms": round(other / 1e3, 3), "top": largest}


def bit_check(shapes, steps: int = 3) -> dict:
    """Fused vs reference (fused=False) on the GPU at real shapes: identical bits?"""
    torch.manual_seed(1)
    start = [torch.randn(s, device="cuda").mul_(0.02).bfloat16() for s in shapes]
    pairs = []
    for fused in (True, False):
        params = [torch.nn.Parameter(w.clone()) for w in start]
        pairs.append((params, slimoptim.Muon(params, lr=0.02, fused=fused)))
    for _ in range(steps):
        grads = [torch.randn_like(w).mul_(1e-3) for w in start]
        for params, opt in pairs:
            for p, g in zip(params, grads, strict=True):
                p.grad = g.clone()
            opt.step()
    (ours, fused), (theirs, ref) = pairs
    differing = 0
    for p, q in zip(ours, theirs, strict=True):
        differing += int((p.view(torch.int16) != q.view(torch.int16)).sum())
        for name, value in fused.state[p].items():
            other = ref.state[q][name]
            differing += int((value != other).sum()) if value.dim() else int(value != other)
    return {"matrices": len(shapes), "steps": steps, "differing_values": differing}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    shapes = tinyllama_hidden_shapes()
    # Two layers' matrices: several Newton-Schulz batches of each shape.
    check = bit_check(shapes[:14])
    print(
        f"fused vs reference, {check['matrices']} matrices x {check['steps']} steps: "
        f"{check['differing_values']} differing values"
    )
    dtype, factory = muon_optimizers()["slimoptim Muon 24/8"]
    extra = extra_reserved_bytes(shapes, dtype, factory)
    print(
        f"slimoptim Muon 24/8 holds {extra['extra_reserved_bytes'] / 2**20:.0f} MiB beyond "
        "params, grads and states (scratch, graph pool, allocator rounding)"
    )
    opts = {name: build(shapes, dtype, f) for name, (dtype, f) in muon_optimizers().items()}
    rows = interleaved(opts, args.rounds)
    if args.profile:
        for name, opt in opts.items():
            rows[name]["profile"] = profile_split(opt)
    for name, opt in opts.items():
        rows[name]["state_bytes_per_param"] = round(
            slimoptim.state_nbytes(opt) / sum(p.numel() for p in opt.param_groups[0]["params"]),
            3,
        )
    result = {
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": __import__("triton").__version__,
        "matrices": len(shapes),
        "params": sum(torch.Size(s).numel() for s in shapes),
        "rounds": args.rounds,
        "bit_check": check,
        "slimoptim_24_8_extra": extra,
        "rows": rows,
    }
    ref = rows["torch Muon bf16"]["ms"]
    print(f"### Muon step, TinyLlama-1.1B hidden matrices ({result['gpu']}), interleaved")
    print("| optimizer | median ms | min-max ms | x torch bf16 | state B/param |")
    print("|---|---|---|---|---|")
    for name, r in rows.items():
        print(
            f"| {name} | {r['ms']:.2f} | {r['ms_min']:.1f}-{r['ms_max']:.1f} "
            f"| {r['ms'] / ref:.3f} | {r['state_bytes_per_param']:.2f} |"
        )
        if "profile" in r:
            split = r["profile"]
            print(f"|  profile | gemm {split['gemm_ms']} ms, other {split['other_ms']} ms |")
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
