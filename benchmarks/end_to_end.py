"""Training-step time end to end (forward, backward, optimizer step) on GPT-2-medium shapes.

Same model and loop as benchmarks/release_memory.py; every optimizer in one run:
torch AdamW fused on bf16 params (no master weights), flashoptim 24-bit (when
installed), slimoptim AdamW 24/8 with and without gradient release, and torch
AdamW fused on fp32 params with bf16 autocast. Target (issue 10): slimoptim's
step within 2% of torch AdamW on bf16 params and faster than flashoptim.

Every optimizer is built first and timed round by round (a few steps each per round):
the GPU's clock drifts as it warms, and timing one optimizer after another would fold
that drift (a few per cent) into the comparison.

    python benchmarks/end_to_end.py [--steps 20] [--shape gpt2-medium]

Writes benchmarks/results/end_to_end_<gpu>.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import warnings
from pathlib import Path

import torch
from gpt_model import SHAPES
from release_memory import RESULTS, Clock, build, environment

CONFIGS = (
    "torch_adamw_bf16",
    "flashoptim_adamw",
    "slimoptim_adamw",
    "slimoptim_adamw_release",
    "torch_adamw_fp32_autocast",
)


def main() -> None:
    warnings.filterwarnings("ignore", message=r".*does nothing while gradient release is active")
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="gpt2-medium", choices=sorted(SHAPES))
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per optimizer")
    parser.add_argument("--rounds", type=int, default=5, help="rounds the steps are spread over")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--bucket-mb", type=int, default=32)
    parser.add_argument("--checkpoint", action="store_true", help="activation checkpointing")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--only", default="", help="comma-separated configs (default: all)")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":  # a smoke run: tiny model, few steps
        args.shape, args.batch_size, args.seq_len, args.steps, args.warmup = "tiny", 2, 32, 2, 1
        args.rounds = 2
    configs = args.only.split(",") if args.only else CONFIGS
    unknown = set(configs) - set(CONFIGS)
    if unknown:
        parser.error(f"--only: unknown configs {sorted(unknown)}; choose from {CONFIGS}")
    runs = interleaved(configs, SHAPES[args.shape], device, args)
    for config, run in runs.items():
        print(f"{config:28s} median step {run['step_ms_median']:.2f} ms", flush=True)
    if not runs:
        raise SystemExit("no optimizer could be built (see the lines above)")
    base_name = "torch_adamw_bf16" if "torch_adamw_bf16" in runs else next(iter(runs))
    base = runs[base_name]["step_ms_median"]
    env = environment(device)
    lines = [
        f"# End-to-end training step, {args.shape}",
        "",
        f"{env['device']}, torch {env['torch']}, triton {env['triton']}, commit {env['commit']}, "
        f"{env['date_utc']} UTC. Batch {args.batch_size}x{args.seq_len}, median of "
        f"{len(next(iter(runs.values()))['step_ms_all'])} steps in {args.rounds} interleaved "
        f"rounds after {args.warmup} warm-up; "
        f"release buckets of {args.bucket_mb} MB.",
        "",
        f"| optimizer | step ms (median) | x {base_name} |",
        "|---|---|---|",
    ]
    for config, run in runs.items():
        ms = run["step_ms_median"]
        lines.append(f"| {config} | {ms:.2f} | {ms / base:.3f} |")
    md = "\n".join(lines) + "\n"
    print(md)
    stamp = env["device"].replace(" ", "_")
    args.out.mkdir(parents=True, exist_ok=True)
    report = {"environment": env, "settings": vars(args) | {"out": str(args.out)}, "runs": runs}
    (args.out / f"end_to_end_{stamp}.json").write_text(json.dumps(report, indent=1) + "\n")
    (args.out / f"end_to_end_{stamp}.md").write_text(md)


def interleaved(configs, shape, device, args) -> dict:
    """Median step time of each config, the configs built side by side and timed in turn."""
    built = {}
    for config in configs:
        try:
            built[config] = build(config, shape, device, args)
        except ImportError as error:  # flashoptim is optional
            print(f"{config}: skipped ({error})")
    clock = Clock(device)
    gen = torch.Generator(device=device).manual_seed(1)
    times = {config: [] for config in built}
    per_round = max(1, args.steps // args.rounds)
    for round_ in range(args.rounds + 1):  # round 0 is the warm-up
        # Every other round in reverse: no config always runs right after the same one.
        order = list(built) if round_ % 2 == 0 else list(reversed(built))
        for config in order:
            model, opt, _, autocast = built[config]
            for _ in range(args.warmup if round_ == 0 else per_round):
                tokens = torch.randint(
                    shape.vocab, (args.batch_size, args.seq_len), generator=gen, device=device
                )
                clock.start()
                with autocast:
                    loss = model(tokens, tokens)
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                elapsed = clock.stop_ms()
                if round_ > 0:
                    times[config].append(elapsed)
                if not math.isfinite(loss.item()):
                    raise RuntimeError(f"{config}: non-finite loss")
    return {
        config: {"step_ms_median": statistics.median(t), "step_ms_all": t}
        for config, t in times.items()
    }


if __name__ == "__main__":
    main()
