"""Peak memory and step time of gradient release on a GPT-2-sized model.

Memory part (default): a GPT-2-medium-sized model (~355M params, random init)
trained a few steps with
  (a) torch AdamW (fused) on float32 params with bfloat16 autocast,
  (b) slimoptim AdamW on bfloat16 params (24-bit master, 8-bit states),
  (c) (b) with gradient release.
Reports peak allocated memory and its breakdown: params, gradients (all of
them for a/b; the largest bucket stepped at once for c), optimizer state, and
activations = peak - the rest (activations plus temporaries). Targets: (b) <=
0.55x and (c) <= 0.40x of (a)'s non-activation memory, (b)/(c) no slower.

Speed part (--speed): GPT-2-small-sized model (~124M), slimoptim AdamW with
a plain step vs gradient release (default buckets and one tensor per bucket);
target overhead <= ~5% of a training step.

    python benchmarks/release_memory.py               # memory part, on a GPU
    python benchmarks/release_memory.py --speed       # speed part, on a GPU
    python benchmarks/release_memory.py --tiny        # quick check of both on CPU

Results are written to benchmarks/results/release_memory.{json,md} (merged:
each part updates its own section); --tiny writes under /tmp instead.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import time
import warnings
from contextlib import nullcontext
from pathlib import Path

import torch
from gpt_model import GPT, SHAPES, GPTShape

import slimoptim

RESULTS = Path(__file__).resolve().parent / "results"
SETTINGS = ("batch_size", "seq_len", "steps", "warmup", "bucket_mb", "checkpoint")
MB = 2**20


# ------------------------------------------------------------- measurement


class Clock:
    """Wall time of a region: CUDA events on the GPU, perf_counter on the CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def start(self):
        if self.cuda:
            self._start = torch.cuda.Event(enable_timing=True)
            self._end = torch.cuda.Event(enable_timing=True)
            self._start.record()
        else:
            self._t0 = time.perf_counter()

    def stop_ms(self) -> float:
        if self.cuda:
            self._end.record()
            self._end.synchronize()
            return self._start.elapsed_time(self._end)
        return (time.perf_counter() - self._t0) * 1e3


def nbytes(tensors) -> int:
    unique = {id(t): t for t in tensors if t is not None}.values()
    return sum(t.numel() * t.element_size() for t in unique)


def build(config: str, shape: GPTShape, device, args):
    """Model, optimizer, release handle (or None) and autocast context for a config."""
    torch.manual_seed(0)
    with device:  # initialise on the device: much faster than on the CPU for 355M params
        model = GPT(shape, args.checkpoint)
    adamw = dict(lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1)
    if config == "torch_adamw_fp32_autocast":
        opt = torch.optim.AdamW(model.parameters(), fused=True, **adamw)
        autocast = torch.autocast(device.type, dtype=torch.bfloat16)
        return model, opt, None, autocast
    slimoptim.cast_model(model, torch.bfloat16)
    if config == "torch_adamw_bf16":  # what people do to save memory: no master weights
        return (
            model,
            torch.optim.AdamW(model.parameters(), fused=True, **adamw),
            None,
            nullcontext(),
        )
    if config == "flashoptim_adamw":  # the public peer, 24-bit master (not a dependency)
        import flashoptim  # noqa: PLC0415

        return model, flashoptim.FlashAdamW(model.parameters(), **adamw), None, nullcontext()
    opt = slimoptim.AdamW(model.parameters(), **adamw)
    handle = None
    if config.startswith("slimoptim_adamw_release"):
        bucket_bytes = 0 if config.endswith("per_tensor") else args.bucket_mb * MB
        handle = slimoptim.enable_gradient_release(model, opt, bucket_bytes=bucket_bytes)
    return model, opt, handle, nullcontext()


def run_config(config: str, shape: GPTShape, device, args) -> dict:
    model, opt, handle, autocast = build(config, shape, device, args)
    clock = Clock(device)
    gen = torch.Generator(device=device).manual_seed(1)
    params = list(model.parameters())
    times, losses, grad_bytes = [], [], 0
    for i in range(args.warmup + args.steps):
        if i == args.warmup and device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        tokens = torch.randint(
            shape.vocab, (args.batch_size, args.seq_len), generator=gen, device=device
        )
        targets = torch.randint(shape.vocab, tokens.shape, generator=gen, device=device)
        clock.start()
        with autocast:
            loss = model(tokens, targets)
        loss.backward()
        grad_bytes = max(grad_bytes, nbytes(p.grad for p in params))
        opt.step()
        opt.zero_grad(set_to_none=True)
        elapsed = clock.stop_ms()
        if i >= args.warmup:
            times.append(elapsed)
        losses.append(loss.item())
    if handle is not None:
        grad_bytes = handle.max_bucket_bytes  # what release holds in gradients at once
    # Plans are the fused kernels' cached launch tables: 0 means the reference path ran.
    plans = opt.__dict__.get("_slimoptim_plans", {}).values()
    fused_plans = sum(getattr(plan, "device", None) is not None for plan in plans)
    result = {
        "num_params": sum(p.numel() for p in {id(p): p for p in params}.values()),
        "step_ms_median": statistics.median(times),
        "step_ms_all": times,
        "losses": losses,
        "fused_plans": fused_plans if isinstance(opt, slimoptim.SlimOptimizer) else None,
        "bytes": {
            "params": nbytes(params),
            "grads": grad_bytes,
            "optimizer_state": slimoptim.state_nbytes(opt),
        },
    }
    nonact = sum(result["bytes"].values())
    result["bytes"]["non_activation"] = nonact
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated()
        result["bytes"]["peak_allocated"] = peak
        result["bytes"]["activations_and_temporaries"] = peak - nonact
        result["bytes"]["held_between_steps"] = torch.cuda.memory_allocated()
    if handle is not None:
        handle.remove()
    del model, opt, handle, params
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    if not all(math.isfinite(x) for x in losses):
        raise RuntimeError(f"{config}: non-finite loss {losses}")
    return result


# ---------------------------------------------------------------- reports


def environment(device) -> dict:
    def git(*cmd):
        try:
            return subprocess.run(
                ["git", *cmd], capture_output=True, text=True, cwd=RESULTS.parent, check=True
            ).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return None

    try:
        import triton  # noqa: PLC0415

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton_version,
        "slimoptim": slimoptim.__version__,
        "python": platform.python_version(),
        # the device machine's copy of the tree has no history: it is passed in
        "commit": os.environ.get("SLIMOPTIM_COMMIT") or git("rev-parse", "HEAD"),
        "dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
        "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
    }


def memory_part(device, args) -> dict:
    shape = SHAPES["tiny" if args.tiny else "gpt2-medium"]
    configs = ["torch_adamw_fp32_autocast", "slimoptim_adamw", "slimoptim_adamw_release"]
    runs = {}
    for config in configs:
        print(f"memory: {config} ...", flush=True)
        runs[config] = run_config(config, shape, device, args)
    base = runs[configs[0]]
    checks = {}
    for config, target in (("slimoptim_adamw", 0.55), ("slimoptim_adamw_release", 0.40)):
        ratio = runs[config]["bytes"]["non_activation"] / base["bytes"]["non_activation"]
        speed = runs[config]["step_ms_median"] / base["step_ms_median"]
        checks[config] = {
            "non_activation_ratio": ratio,
            "non_activation_target": target,
            "memory_ok": ratio <= target,
            "step_time_ratio": speed,
            "speed_ok": speed <= 1.0,
        }
    same = runs["slimoptim_adamw_release"]["losses"] == runs["slimoptim_adamw"]["losses"]
    return {
        "shape": vars(shape),
        "runs": runs,
        "vs_torch_adamw": checks,
        "release_losses_identical": same,
    }


def speed_part(device, args) -> dict:
    shape = SHAPES["tiny" if args.tiny else "gpt2-small"]
    configs = ["slimoptim_adamw", "slimoptim_adamw_release", "slimoptim_adamw_release_per_tensor"]
    runs = {}
    for config in configs:
        print(f"speed: {config} ...", flush=True)
        runs[config] = run_config(config, shape, device, args)
    base = runs[configs[0]]["step_ms_median"]
    overhead = {c: runs[c]["step_ms_median"] / base - 1 for c in configs[1:]}
    same = all(runs[c]["losses"] == runs[configs[0]]["losses"] for c in configs[1:])
    return {
        "shape": vars(shape),
        "runs": runs,
        "release_overhead": overhead,
        "release_losses_identical": same,
    }


def fmt_bytes(x, unit: float) -> str:
    return "—" if x is None else f"{x / unit:.3f}"


def identical_line(part: dict) -> str:
    if part["release_losses_identical"]:
        return "Losses with gradient release are bit-identical to the plain step's."
    return (
        "Losses with gradient release differ from the plain step's. On a GPU this can come "
        "from non-deterministic backward kernels (attention, embedding); the CPU tests check "
        "bit-identity. A large difference needs a look."
    )


def step_path(run: dict) -> str:
    if run["fused_plans"] is None:
        return "torch"
    return "fused kernels" if run["fused_plans"] else "reference (no kernels)"


def markdown(report: dict) -> str:
    env = report["environment"]
    lines = [
        "# Gradient release: memory and speed",
        "",
        f"{env['device']}, torch {env['torch']} (CUDA {env['cuda']}, triton {env['triton']}), "
        f"slimoptim {env['slimoptim']} at {env['commit']}{' (dirty)' if env['dirty'] else ''}, "
        f"{env['date_utc']} UTC.",
        "",
    ]
    if "memory" in report:
        mem = report["memory"]
        tiny = mem["shape"]["n_embd"] < 256
        unit, unit_name = (1e6, "MB") if tiny else (1e9, "GB")
        lines += [
            f"## Memory ({mem['shape']['n_layer']} layers, d={mem['shape']['n_embd']}, "
            f"{next(iter(mem['runs'].values()))['num_params'] / 1e6:.1f}M params)",
            "",
            f"Settings: {mem['settings']}. "
            f"{unit_name}; grads for release = the largest bucket stepped at once; "
            "activations = peak - params - grads - state (activations and temporaries).",
            "",
            "| config | peak | params | grads | optimizer state | non-activation | "
            "activations | held between steps | step ms (median) | optimizer step |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        columns = ("peak_allocated", "params", "grads", "optimizer_state", "non_activation")
        columns += ("activations_and_temporaries", "held_between_steps")
        for config, run in mem["runs"].items():
            cells = [fmt_bytes(run["bytes"].get(key), unit) for key in columns]
            lines.append(
                f"| {config} | {' | '.join(cells)} | {run['step_ms_median']:.1f} | "
                f"{step_path(run)} |"
            )
        lines += ["", "| vs torch AdamW | non-activation ratio | target | step-time ratio |"]
        lines += ["|---|---|---|---|"]
        for config, c in mem["vs_torch_adamw"].items():
            lines.append(
                f"| {config} | {c['non_activation_ratio']:.3f} "
                f"({'ok' if c['memory_ok'] else 'MISSED'}) | <= {c['non_activation_target']} | "
                f"{c['step_time_ratio']:.3f} ({'ok' if c['speed_ok'] else 'slower'}) |"
            )
        lines += ["", identical_line(mem), ""]
    if "speed" in report:
        spd = report["speed"]
        lines += [
            f"## Speed of release ({spd['shape']['n_layer']} layers, d={spd['shape']['n_embd']})",
            "",
            f"Settings: {spd['settings']}.",
            "",
            "| config | step ms (median) | overhead vs plain step | optimizer step |",
            "|---|---|---|---|",
        ]
        for config, run in spd["runs"].items():
            over = spd["release_overhead"].get(config)
            over_text = "—" if over is None else f"{100 * over:+.1f}%"
            lines.append(
                f"| {config} | {run['step_ms_median']:.1f} | {over_text} | {step_path(run)} |"
            )
        lines += ["", identical_line(spd), ""]
    return "\n".join(lines)


def main():
    # The training loop calls step()/zero_grad() as usual; with release they are no-ops.
    warnings.filterwarnings("ignore", message=r".*does nothing while gradient release is active")
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--speed", action="store_true", help="run the speed part (GPT-2 small)")
    parser.add_argument("--tiny", action="store_true", help="tiny model on CPU, both parts")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=6, help="measured steps per config")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--bucket-mb", type=int, default=32)
    parser.add_argument("--checkpoint", action="store_true", help="activation checkpointing")
    parser.add_argument("--out", type=Path, default=None, help="output prefix (no suffix)")
    args = parser.parse_args()
    if args.tiny:
        device = torch.device("cpu")
        args.batch_size, args.seq_len = min(args.batch_size, 2), min(args.seq_len, 32)
        args.steps, args.warmup = min(args.steps, 3), min(args.warmup, 1)
        out = args.out or Path("/tmp/slimoptim_release_memory_tiny")
    else:
        if not torch.cuda.is_available():
            raise SystemExit("no GPU: run with --tiny for a CPU check")
        device = torch.device("cuda")
        out = args.out or RESULTS / "release_memory"
    json_path = out.with_suffix(".json")
    report = json.loads(json_path.read_text()) if json_path.exists() else {}
    report["environment"] = environment(device)
    settings = {key: vars(args)[key] for key in SETTINGS}
    if args.tiny or not args.speed:
        report["memory"] = dict(memory_part(device, args), settings=settings)
    if args.tiny or args.speed:
        report["speed"] = dict(speed_part(device, args), settings=settings)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(report, indent=1) + "\n")
    md = markdown(report)
    out.with_suffix(".md").write_text(md)
    print(md)
    print(f"wrote {json_path} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
