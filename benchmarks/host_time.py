"""Host (CPU) time of one ``step()`` call with many small tensors, against torch's fused
AdamW: the GPU is synchronised before each call, so it is never the limit. A script, not
a test; ``step_time.py --host`` runs it too and stores the figures with its own.

    python benchmarks/host_time.py [--counts 200,1000,2000]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import slimoptim

# Row label suffix: (where each step's gradients come from, a new learning rate every step).
# "same": the same gradient tensors (zero_grad(set_to_none=False), accumulation);
# "cycled": four sets of gradient tensors in turn, so every step's addresses are new (the
# worst case: the addresses are uploaded every step);
# "reallocated": zero_grad() frees the gradients and new ones are allocated, as a backward
# pass does (the caching allocator picks their addresses: often the last step's).
CASES = {
    "": ("same", False),
    ", new grads each step": ("cycled", False),
    ", zero_grad() + new grads": ("reallocated", False),
    ", new lr each step": ("same", True),
}


def _set_grads(opt, params, grad_sets, source: str, i: int) -> None:
    if source == "reallocated":
        opt.zero_grad(set_to_none=True)
        for p, g in zip(params, grad_sets[0], strict=True):
            p.grad = g.clone()
    else:
        for p, g in zip(params, grad_sets[i % len(grad_sets)], strict=True):
            p.grad = g


def host_time(counts=(200, 1000, 2000), numel=1024, repeats=50) -> dict:
    """CPU time of one step() call with many small tensors (the GPU is never the limit):
    the cases of ``CASES`` (gradients set outside the timed call). New addresses or a new
    learning rate upload new tables that step."""
    out = {}
    factories = {
        "torch AdamW fused bf16": lambda p: torch.optim.AdamW(p, lr=1e-4, fused=True),
        "slimoptim AdamW 24/8": lambda p: slimoptim.AdamW(p, lr=1e-4),
    }
    for name, factory in factories.items():
        for case, (source, new_lr) in CASES.items():
            key = name + case
            out[key] = {}
            for n in counts:
                params = [
                    torch.nn.Parameter(torch.randn(numel, device="cuda", dtype=torch.bfloat16))
                    for _ in range(n)
                ]
                sets = 4 if source == "cycled" else 1
                grad_sets = [[torch.randn_like(p) for p in params] for _ in range(sets)]
                opt = factory(params)
                times = []
                for i in range(3 + repeats):
                    _set_grads(opt, params, grad_sets, source, i)
                    if new_lr:
                        opt.param_groups[0]["lr"] = 1e-4 * (1 - i / 1000)
                    torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    opt.step()
                    times.append(time.perf_counter() - t0)
                out[key][n] = round(statistics.median(times[3:]) * 1e3, 4)
            print(f"host ms per step() {key}: {out[key]}", flush=True)
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--counts", default="200,1000,2000")
    args = parser.parse_args()
    counts = tuple(int(c) for c in args.counts.split(","))
    print(json.dumps(host_time(counts), indent=1))
