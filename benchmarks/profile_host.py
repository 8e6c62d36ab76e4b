"""Where step()'s host time goes: cProfile of slimoptim AdamW steps on many small tensors.

    python benchmarks/profile_host.py [--tensors 200] [--steps 200]

Prints the functions with the most own time, and the host microseconds per step with and
without the profiler (the GPU never limits: 1024-element tensors).
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time

import torch

import slimoptim


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tensors", type=int, default=200)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    params = [
        torch.nn.Parameter(torch.randn(1024, device="cuda", dtype=torch.bfloat16))
        for _ in range(args.tensors)
    ]
    for p in params:
        p.grad = torch.randn_like(p)
    opt = slimoptim.AdamW(params, lr=1e-4)
    for _ in range(5):
        opt.step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        opt.step()
    host = (time.perf_counter() - t0) / args.steps
    torch.cuda.synchronize()
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(args.steps):
        opt.step()
    profiler.disable()
    torch.cuda.synchronize()
    print(f"{args.tensors} tensors: {host * 1e6:.1f} us host per step (no profiler)")
    pstats.Stats(profiler).sort_stats("tottime").print_stats(args.top)


if __name__ == "__main__":
    main()
