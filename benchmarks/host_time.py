"""Host (CPU) time of one ``step()`` call with many small tensors, against torch's fused
AdamW: the GPU is synchronised before each call, so it is never the limit. A script, not
a test; ``step_time.py --host`` runs it too and stores the figures with its own.

    python benchmarks/host_time.py [--counts 200,1000,2000] [--only slimoptim] [--parts]
    TRITON_INTERPRET=1 python benchmarks/host_time.py --cpu   # no GPU: launches stubbed

``--parts`` adds what the per-step checks cost per tensor, piece by piece. An A/B of two
source trees: run it with ``PYTHONPATH=<tree>`` for each, alternating, in one session.
"""

from __future__ import annotations

import argparse
import json
import operator
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


def host_time(counts=(200, 1000, 2000), numel=1024, repeats=50, only="", device="cuda") -> dict:
    """CPU time of one step() call with many small tensors (the GPU is never the limit):
    the cases of ``CASES`` (gradients set outside the timed call). New addresses or a new
    learning rate upload new tables that step. ``device="cpu"``: see ``stub_launches``."""
    out = {}
    factories = {
        "torch AdamW fused bf16": lambda p: torch.optim.AdamW(p, lr=1e-4, fused=True),
        # The default picks the kernels on CUDA; on the CPU they run only when asked for.
        "slimoptim AdamW 24/8": lambda p: slimoptim.AdamW(
            p, lr=1e-4, fused=True if device == "cpu" else None
        ),
    }
    sync = torch.cuda.synchronize if device == "cuda" else lambda: None
    for name, factory in factories.items():
        if only not in name:
            continue
        for case, (source, new_lr) in CASES.items():
            key = name + case
            out[key] = {}
            for n in counts:
                params = [
                    torch.nn.Parameter(torch.randn(numel, device=device, dtype=torch.bfloat16))
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
                    sync()
                    t0 = time.perf_counter()
                    opt.step()
                    times.append(time.perf_counter() - t0)
                out[key][n] = round(statistics.median(times[3:]) * 1e3, 4)
            print(f"host ms per step() {key}: {out[key]}", flush=True)
    return out


def stub_launches() -> None:
    """Host work only, on the CPU: the fused step's launches do nothing (the Triton
    interpreter would dominate), and the device check that refuses CPU params is off."""
    import slimoptim.kernels.dispatch as dispatch  # noqa: PLC0415
    import slimoptim.optimizers.base as base  # noqa: PLC0415

    dispatch.launch_plan = lambda *args, **kwargs: None
    base.check_fused_devices = lambda items: None


def check_parts(n=2000, numel=1024, device="cuda", repeats=300) -> dict:
    """ns per tensor of each piece of the per-step checks (kernels/guards.py), and of the
    Python passes they replace."""
    from slimoptim.kernels import guards  # noqa: PLC0415

    params = [
        torch.nn.Parameter(torch.randn(numel, device=device, dtype=torch.bfloat16))
        for _ in range(n)
    ]
    for p in params:
        p.grad = torch.randn_like(p)
    grads = [p.grad for p in params]
    guard, ptrs, indices = guards.layout_guard(grads), [g.data_ptr() for g in grads], list(range(n))

    def ns(fn) -> float:
        t0 = time.perf_counter()
        for _ in range(repeats):
            fn()
        return round((time.perf_counter() - t0) / repeats / n * 1e9, 1)

    out = {
        "p.grad": ns(lambda: list(map(operator.attrgetter("grad"), params))),
        "addresses, C++ or Python": ns(lambda: guards.same_addresses(grads, ptrs, indices)),
        "Python: data_ptr": ns(lambda: list(map(torch.Tensor.data_ptr, grads))),
        "Python: dtype": ns(lambda: list(map(operator.attrgetter("dtype"), grads))),
        "Python: is_contiguous": ns(lambda: all(map(torch.Tensor.is_contiguous, grads))),
        "C++ address check present": hasattr(torch._C, "_tensors_data_ptrs_at_indices_equal"),
    }
    if guard is not None:
        out["layout guard"] = ns(lambda: guard.check(*grads))
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--counts", default="200,1000,2000")
    parser.add_argument("--only", default="", help="a substring of the optimizers' names")
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--parts", action="store_true")
    parser.add_argument("--cpu", action="store_true", help="CPU tensors, launches stubbed")
    args = parser.parse_args()
    device = "cpu" if args.cpu else "cuda"
    if args.cpu:
        stub_launches()
    counts = tuple(int(c) for c in args.counts.split(","))
    result = host_time(counts, repeats=args.repeats, only=args.only, device=device)
    for key, times in result.items():
        slope = (times[counts[-1]] - times[counts[0]]) / (counts[-1] - counts[0]) * 1e3
        print(f"{key}: {slope:.3f} us per extra tensor")
    if args.parts:
        result["ns per tensor"] = check_parts(device=device)
    print(json.dumps(result, indent=1))
