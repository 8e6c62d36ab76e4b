"""Training-step time end to end (forward, backward, optimizer step) on GPT-2-medium shapes.

Same model and loop as benchmarks/release_memory.py; every optimizer in one run:
torch AdamW fused on bf16 params (no master weights), flashoptim 24-bit (when
installed), slimoptim AdamW 24/8 with and without gradient release, and torch
AdamW fused on fp32 params with bf16 autocast. Target (issue 10): slimoptim's
step within 2% of torch AdamW on bf16 params and faster than flashoptim.

    python benchmarks/end_to_end.py [--steps 20] [--shape gpt2-medium]

Writes benchmarks/results/end_to_end_<gpu>.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path

import torch
from gpt_model import SHAPES
from release_memory import RESULTS, environment, run_config

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
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--bucket-mb", type=int, default=32)
    parser.add_argument("--checkpoint", action="store_true", help="activation checkpointing")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--only", default="", help="comma-separated configs (default: all)")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":  # a smoke run: tiny model, few steps
        args.shape, args.batch_size, args.seq_len, args.steps, args.warmup = "tiny", 2, 32, 2, 1
    runs = {}
    configs = args.only.split(",") if args.only else CONFIGS
    unknown = set(configs) - set(CONFIGS)
    if unknown:
        parser.error(f"--only: unknown configs {sorted(unknown)}; choose from {CONFIGS}")
    for config in configs:
        try:
            runs[config] = run_config(config, SHAPES[args.shape], device, args)
        except ImportError as error:  # flashoptim is optional
            print(f"{config}: skipped ({error})")
            continue
        print(f"{config:28s} median step {runs[config]['step_ms_median']:.2f} ms", flush=True)
    base = runs.get("torch_adamw_bf16", next(iter(runs.values())))["step_ms_median"]
    env = environment(device)
    lines = [
        f"# End-to-end training step, {args.shape}",
        "",
        f"{env['device']}, torch {env['torch']}, triton {env['triton']}, commit {env['commit']}, "
        f"{env['date_utc']} UTC. Batch {args.batch_size}x{args.seq_len}, median of "
        f"{args.steps} steps after {args.warmup} warm-up.",
        "",
        f"| optimizer | step ms (median) | x {next(iter(runs))} |",
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


if __name__ == "__main__":
    main()
