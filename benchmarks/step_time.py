"""Optimizer step time at TinyLlama-1.1B and GPT-2-124M shapes (issue 4). A script, not a test.

    python benchmarks/step_time.py [--sets tinyllama,gpt2] [--steps 30] [--out benchmarks/results]

Per optimizer: median step ms (CUDA events, warm-up excluded), bytes moved per step
(2 x param + grad + 2 x optimizer state: everything read once and written once, our
own count), achieved GB/s and % of a device-to-device copy ceiling measured in the
same run, optimizer-state bytes/param. Also checks on the GPU that the fused kernels
and the reference path give identical bits. Writes JSON and markdown to --out.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import time
from pathlib import Path

import torch
from host_time import host_time

import slimoptim


def tinyllama_shapes() -> list[tuple[int, ...]]:
    hidden, inter, kv, vocab = 2048, 5632, 256, 32000
    layer = [(hidden, hidden), (kv, hidden), (kv, hidden), (hidden, hidden)]
    layer += [(inter, hidden), (inter, hidden), (hidden, inter), (hidden,), (hidden,)]
    return [(vocab, hidden)] + layer * 22 + [(hidden,), (vocab, hidden)]  # 201 tensors


def gpt2_shapes() -> list[tuple[int, ...]]:
    d = 768
    layer = [(d,), (d,), (d, 3 * d), (3 * d,), (d, d), (d,), (d,), (d,)]
    layer += [(d, 4 * d), (4 * d,), (4 * d, d), (d,)]
    return [(50257, d), (1024, d)] + layer * 12 + [(d,), (d,)]  # 148 tensors


SETS = {"tinyllama-1.1b": tinyllama_shapes, "gpt2-124m": gpt2_shapes}


def event_ms(fn) -> float:
    """GPU time of one call of ``fn`` between two CUDA events."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


def median_ms(fn, steps: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    return statistics.median(event_ms(fn) for _ in range(steps))


def back_to_back_ms(fn, samples: int, calls: int = 10) -> float:
    """Median over ``samples`` of the GPU time per call of ``calls`` calls in a row (the
    host's launches overlap the GPU's work, as in training)."""
    return median_ms(lambda: [fn() for _ in range(calls)], samples) / calls


def copy_ceiling_gbs(nbytes: int = 2 << 30) -> float:
    """Device-to-device copy rate, bytes read + written, GB/s: the faster of one copy per
    pair of events and ten back to back (the two read up to ~3 % apart in one call; the
    ceiling is the rate the GPU can reach, so the higher one)."""
    src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    single = median_ms(lambda: dst.copy_(src), 30)
    back_to_back = back_to_back_ms(lambda: dst.copy_(src), 7)
    return 2 * nbytes / min(single, back_to_back) / 1e6


def optimizers() -> dict:
    """name -> (param dtype, factory(params) -> optimizer)."""
    bf16, fp32 = torch.bfloat16, torch.float32
    out = {
        "torch AdamW fused fp32": (fp32, lambda p: torch.optim.AdamW(p, lr=1e-4, fused=True)),
        "torch AdamW fused bf16": (bf16, lambda p: torch.optim.AdamW(p, lr=1e-4, fused=True)),
        "slimoptim AdamW 24/8": (bf16, lambda p: slimoptim.AdamW(p, lr=1e-4)),
        "slimoptim AdamW 32/8": (
            bf16,
            lambda p: slimoptim.AdamW(p, lr=1e-4, master_weight_bits=32),
        ),
        "slimoptim AdamW 24/32": (bf16, lambda p: slimoptim.AdamW(p, lr=1e-4, state_bits=32)),
        "slimoptim AdamW none/8": (
            bf16,
            lambda p: slimoptim.AdamW(p, lr=1e-4, master_weight_bits=None),
        ),
        "slimoptim SGD-m 24/8": (bf16, lambda p: slimoptim.SGD(p, lr=1e-3, momentum=0.9)),
        "slimoptim SGD-m none/8": (
            bf16,
            lambda p: slimoptim.SGD(p, lr=1e-3, momentum=0.9, master_weight_bits=None),
        ),
        "slimoptim Lion 24/8": (bf16, lambda p: slimoptim.Lion(p, lr=1e-4)),
        "slimoptim Lion none/8": (
            bf16,
            lambda p: slimoptim.Lion(p, lr=1e-4, master_weight_bits=None),
        ),
    }
    try:
        import flashoptim  # noqa: PLC0415  (not a dependency)
    except ImportError:
        return out
    out["flashoptim AdamW 24"] = (bf16, lambda p: flashoptim.FlashAdamW(p, lr=1e-4))
    out["flashoptim AdamW none"] = (
        bf16,
        lambda p: flashoptim.FlashAdamW(p, lr=1e-4, master_weight_bits=None),
    )
    out["flashoptim SGD-m 24"] = (bf16, lambda p: flashoptim.FlashSGD(p, lr=1e-3, momentum=0.9))
    out["flashoptim Lion 24"] = (bf16, lambda p: flashoptim.FlashLion(p, lr=1e-4))
    return out


def random_params(shapes, dtype) -> list[torch.nn.Parameter]:
    """CUDA params of ``shapes`` with gradients, the same values on every call."""
    torch.manual_seed(0)
    params = [
        torch.nn.Parameter(torch.randn(s, device="cuda").mul_(0.02).to(dtype)) for s in shapes
    ]
    for p in params:
        p.grad = torch.randn_like(p).mul_(1e-3)
    return params


def bench_one(shapes, dtype, factory, steps: int, ceiling: float) -> dict:
    params = random_params(shapes, dtype)
    n = sum(p.numel() for p in params)
    before = torch.cuda.memory_allocated()
    opt = factory(params)
    opt.step()  # creates the states
    torch.cuda.synchronize()
    allocated_bytes = torch.cuda.memory_allocated() - before  # incl. allocator rounding
    # What the optimizer holds, tensor by tensor: the bytes a step must read and write,
    # without the caching allocator's rounding. flashoptim keeps part of its state
    # outside optimizer.state, so for it only the allocator's count is complete.
    ours = isinstance(opt, slimoptim.SlimOptimizer) or type(opt).__module__.startswith("torch.")
    state_bytes = slimoptim.state_nbytes(opt) if ours else allocated_bytes
    # memory_report's count of the same delta: state, kernel tables, allocator rounding.
    reported = slimoptim.memory_report(opt)["optimizer_bytes_allocated"] if ours else None
    ms = median_ms(opt.step, steps)
    # Back to back, as in training (host work overlaps the previous step's kernels).
    pipelined = back_to_back_ms(opt.step, max(3, steps // 5))
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(10):
        opt.step()
    host_ms = (time.perf_counter() - t0) * 100  # enqueue time per step (no sync inside)
    torch.cuda.synchronize()
    param_bytes = sum(p.nbytes for p in params)
    grad_bytes = sum(p.grad.nbytes for p in params)
    moved = 2 * param_bytes + grad_bytes + 2 * state_bytes
    gbs = moved / ms / 1e6
    opt = params = None  # free the memory before the next optimizer
    torch.cuda.empty_cache()
    return {
        "ms": round(ms, 3),
        "ms_back_to_back": round(pipelined, 3),
        "host_ms": round(host_ms, 3),
        "bytes_moved": moved,
        "bytes_per_param_moved": round(moved / n, 3),
        "gbs": round(gbs, 1),
        "pct_of_copy": round(100 * gbs / ceiling, 1),
        "state_bytes_per_param": round(state_bytes / n, 3),
        "allocated_state_bytes": allocated_bytes,
        "allocated_state_bytes_per_param": round(allocated_bytes / n, 4),
        "reported_allocated_bytes": reported,  # None: not a slimoptim or torch optimizer
        "params": n,
    }


def bit_check(shapes) -> dict:
    """Fused vs reference on the GPU, identical bits after 3 steps, per optimizer mode."""
    cases = {
        "AdamW 24/8": (slimoptim.AdamW, dict(lr=1e-3, weight_decay=0.1)),
        "AdamW 32/8 maximize": (slimoptim.AdamW, dict(master_weight_bits=32, maximize=True)),
        "AdamW none/32": (slimoptim.AdamW, dict(master_weight_bits=None, state_bits=32)),
        "Adam 24/8 L2": (slimoptim.Adam, dict(weight_decay=0.01)),
        "SGD-m 24/8": (slimoptim.SGD, dict(lr=1e-2, momentum=0.9)),
        "SGD nesterov 24/32": (slimoptim.SGD, dict(momentum=0.9, nesterov=True, state_bits=32)),
        "SGD plain 32-bit master, L2": (
            slimoptim.SGD,
            dict(lr=0.05, weight_decay=1e-3, master_weight_bits=32),
        ),
        "Lion 24/8": (slimoptim.Lion, dict(lr=1e-4, weight_decay=0.1)),
    }
    out = {}
    for name, (cls, kw) in cases.items():
        torch.manual_seed(0)
        ps = [torch.nn.Parameter(torch.randn(s, device="cuda").bfloat16()) for s in shapes]
        qs = [torch.nn.Parameter(p.detach().clone()) for p in ps]
        fused, ref = cls(ps, fused=True, **kw), cls(qs, fused=False, **kw)
        for step in range(3):
            for p, q in zip(ps, qs, strict=True):
                g = torch.randn_like(p) * 10.0 ** torch.randint_like(p, -4, 2)
                if step == 1 and p.numel() > 100:
                    g[..., 0] = float("nan")  # a non-finite group is skipped
                p.grad, q.grad = g.clone(), g.clone()
            fused.step()
            ref.step()
        differing, total = 0, 0
        for p, q in zip(ps, qs, strict=True):
            pairs = [(p.detach(), q.detach())]
            pairs += [(fused.state[p][k], ref.state[q][k]) for k in fused.state[p]]
            for a, b in pairs:
                a = a.view(torch.int16) if a.element_size() == 2 else a
                b = b.view(torch.int16) if b.element_size() == 2 else b
                differing += int((a != b).sum())
                total += a.numel()
        out[name] = {"differing_values": differing, "compared_values": total}
    return out


SWEPT = ("slimoptim AdamW 24/8", "slimoptim SGD-m 24/8", "slimoptim Lion 24/8")


def _set_config(dispatch, cfg: str) -> None:
    """'BLOCKxWARPS[tTILES][rREGS]', e.g. '128x1t16': elements per tile, warps per program,
    tiles per program, register cap."""
    block, rest = cfg.split("x")
    rest, _, regs = rest.partition("r")
    warps, _, tiles = rest.partition("t")
    dispatch.CONFIG.update(
        block=int(block),
        num_warps=int(warps),
        tiles=int(tiles or dispatch.CONFIG["tiles"]),
        maxnreg=(int(regs or 0),) * 3,  # the same cap for every number of states
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sets", default=",".join(SETS))
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--only", default="", help="comma-separated substrings of names")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    parser.add_argument("--sweep", default="", help="block x warps configs to try, e.g. 2048x8")
    parser.add_argument("--no-check", action="store_true")
    parser.add_argument("--host", action="store_true", help="also time step()'s host work")
    args = parser.parse_args()
    import triton  # noqa: PLC0415

    from slimoptim.kernels import dispatch  # noqa: PLC0415

    # The device machine gets a copy of the tree without .git: pass SLIMOPTIM_COMMIT there.
    commit = (
        os.environ.get("SLIMOPTIM_COMMIT")
        or subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        ).stdout.strip()
    )
    meta = {
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "commit": commit or "unknown",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    ceiling = copy_ceiling_gbs()
    meta["copy_ceiling_gbs"] = round(ceiling, 1)
    print(meta, flush=True)
    if args.sweep:  # kernel launch configs on the 1.1B steps; the tables use the defaults
        default = dict(dispatch.CONFIG)
        timings = {}
        for cfg in args.sweep.split(","):
            _set_config(dispatch, cfg)
            for name in SWEPT:
                dtype, factory = optimizers()[name]
                r = bench_one(tinyllama_shapes(), dtype, factory, 10, ceiling)
                timings.setdefault(name, {})[cfg] = r["ms_back_to_back"]
                print(f"sweep {cfg:12s} {name:22s} back to back {r['ms_back_to_back']} ms")
        dispatch.CONFIG.update(default)
        meta["sweep_ms_back_to_back"] = timings
    meta["kernel_config"] = dict(dispatch.CONFIG)
    results = {}
    for set_name in args.sets.split(","):
        shapes = SETS[set_name]()
        results[set_name] = {}
        for name, (dtype, factory) in optimizers().items():
            if args.only and not any(s in name for s in args.only.split(",")):
                continue
            r = bench_one(shapes, dtype, factory, args.steps, ceiling)
            results[set_name][name] = r
            print(f"{set_name:15s} {name:26s} {r}", flush=True)
    if args.host:
        meta["host_ms_per_step"] = host_time()
    check = {} if args.no_check else bit_check(gpt2_shapes()[:30] + [(1,), (31,), (33,), (4097,)])
    print("bit check (differing values, fused vs reference):", check, flush=True)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = meta["gpu"].replace(" ", "_")
    (out / f"step_time_{stamp}.json").write_text(
        json.dumps({"meta": meta, "results": results, "bit_check": check}, indent=1)
    )
    (out / f"step_time_{stamp}.md").write_text(markdown(meta, results, check))
    print(markdown(meta, results, check))


def markdown(meta, results, check) -> str:
    lines = [
        f"GPU: {meta['gpu']}; torch {meta['torch']}, triton {meta['triton']}; commit "
        f"{meta['commit']}; {meta['date']}. Copy ceiling: {meta['copy_ceiling_gbs']} GB/s "
        "(bytes read + written).",
        "",
    ]
    for set_name, rows in results.items():
        ref = rows.get("torch AdamW fused fp32", {}).get("ms")
        lines += [
            f"### {set_name} ({next(iter(rows.values()))['params'] / 1e6:.0f}M params)",
            "",
            "| optimizer | step ms | × torch fp32 | bytes moved/param | GB/s | % of copy "
            "| state B/param | back-to-back ms | host ms |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for name, r in rows.items():
            rel = f"{r['ms'] / ref:.2f}" if ref else "-"
            lines.append(
                f"| {name} | {r['ms']:.2f} | {rel} | {r['bytes_per_param_moved']:.2f} "
                f"| {r['gbs']:.0f} | {r['pct_of_copy']:.0f}% | {r['state_bytes_per_param']:.2f} "
                f"| {r['ms_back_to_back']:.2f} | {r['host_ms']:.2f} |"
            )
        lines.append("")
    lines += ["Allocator delta over the first step / `memory_report`'s count of it, bytes:", ""]
    for set_name, rows in results.items():
        pairs = (
            f"{name} {r['allocated_state_bytes']:,} / {r['reported_allocated_bytes']:,}"
            for name, r in rows.items()
            if name.startswith("slimoptim")
        )
        lines += [f"- {set_name}: " + "; ".join(pairs), ""]
    bad = {k: v for k, v in check.items() if v["differing_values"]}
    lines.append(
        "GPU bit check, fused vs reference (3 steps, 34 tensors, bf16): "
        + ("all identical" if not bad else f"DIFFERENCES {bad}")
    )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()


# ------------------------------------------------------------- Muon (issue 15)
# Kept apart from main(): python -c "import sys; sys.path.insert(0, 'benchmarks'); \
#   import step_time as s; print(s.muon_markdown(s.bench_muon()))"


def tinyllama_hidden_shapes() -> list[tuple[int, ...]]:
    """TinyLlama-1.1B's attention and MLP matrices: what Muon steps (154 tensors, 968M)."""
    return [s for s in tinyllama_shapes()[1:-1] if len(s) == 2]


def muon_optimizers() -> dict:
    """name -> (param dtype, factory): torch.optim.Muon on fp32 and bf16 params, and ours."""
    bf16, fp32 = torch.bfloat16, torch.float32
    return {
        "torch Muon fp32": (fp32, lambda p: torch.optim.Muon(p, lr=0.02)),
        "torch Muon bf16": (bf16, lambda p: torch.optim.Muon(p, lr=0.02)),
        "slimoptim Muon 24/8": (bf16, lambda p: slimoptim.Muon(p, lr=0.02)),
        "slimoptim Muon 24/8 unfused": (
            bf16,
            lambda p: slimoptim.Muon(p, lr=0.02, fused=False),
        ),
        "slimoptim Muon none/8": (
            bf16,
            lambda p: slimoptim.Muon(p, lr=0.02, master_weight_bits=None),
        ),
    }


def bench_muon(steps: int = 10) -> dict:
    """Step time of every Muon row at TinyLlama-1.1B hidden-matrix shapes, in one run."""
    ceiling = copy_ceiling_gbs()
    shapes = tinyllama_hidden_shapes()
    rows = {
        name: bench_one(shapes, dtype, f, steps, ceiling)
        for name, (dtype, f) in muon_optimizers().items()
    }
    return {
        "gpu": torch.cuda.get_device_name(),
        "copy_ceiling_gbs": round(ceiling, 1),
        "rows": rows,
    }


def muon_markdown(result: dict) -> str:
    ref = result["rows"]["torch Muon bf16"]["ms"]
    lines = [
        f"### Muon, TinyLlama-1.1B hidden matrices ({result['gpu']})",
        "",
        "| optimizer | step ms | × torch bf16 | state B/param | back-to-back ms | host ms |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in result["rows"].items():
        lines.append(
            f"| {name} | {r['ms']:.2f} | {r['ms'] / ref:.2f} | {r['state_bytes_per_param']:.2f} "
            f"| {r['ms_back_to_back']:.2f} | {r['host_ms']:.2f} |"
        )
    return "\n".join(lines) + "\n"
