"""The memory headline, measured: a Llama-3.1-8B-shaped model trained on one GPU.

transformers ``LlamaConfig`` (hidden 4096, 32 layers, FFN 14336, 32 heads, 8 KV heads,
vocab 128256, untied), random init directly on the GPU (no download, no CPU copy),
sequence 2048, batch 1, activation checkpointing, a few full training steps (forward,
backward, optimizer step) under ``torch.cuda.set_per_process_memory_fraction`` caps:

    torch AdamW, fp32 params (master) + bf16 autocast   torch AdamW on bf16 params
    slimoptim AdamW 24/8, with and without gradient release
    slimoptim AdamW none/8 with release                  flashoptim rows, if it imports

Each (config, cap) runs in a fresh subprocess, so an OOM cannot poison the rest. Caps
are tried smallest first; a config that fits a cap fits every larger one (its peak is
a property of the program), so larger caps are only run after an OOM (``--all-caps``
runs every cap). Reported: peak allocated memory, median step time and optimizer-step
time, whether it fits, and the memory held between steps (params, gradients, master
corrections and states) next to ``slimoptim plan``'s prediction for the same config.

    python benchmarks/llama8b_memory.py                 # on one GPU, ~4-6 minutes
    python benchmarks/llama8b_memory.py --dry-run       # tiny Llama on the CPU (CI)

Caps are in GB of 1e9 bytes, as ``slimoptim plan --gpu-memory 80GB`` reads them (a
real "80GB" card holds ~85e9 bytes, minus the CUDA context).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from contextlib import nullcontext
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]  # this checkout's slimoptim first

import slimoptim  # noqa: E402
from slimoptim import plan  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
GB = 1e9
LLAMA_8B = dict(
    hidden_size=4096,
    num_hidden_layers=32,
    intermediate_size=14336,
    num_attention_heads=32,
    num_key_value_heads=8,
    vocab_size=128256,
    max_position_embeddings=131072,
    rope_theta=500000.0,
    tie_word_embeddings=False,
)
TINY = dict(LLAMA_8B, hidden_size=64, num_hidden_layers=2, intermediate_size=128,
            num_attention_heads=4, num_key_value_heads=2, vocab_size=512)  # fmt: skip
# name: (label, library, param dtype, master_weight_bits, gradient release)
CONFIGS = {
    "torch_adamw_fp32": ("torch AdamW, fp32 master + bf16 autocast", "torch", "float32", None, 0),
    "torch_adamw_bf16": ("torch AdamW, bf16 params (no master)", "torch", "bfloat16", None, 0),
    "flash_24": ("flashoptim AdamW 24-bit", "flashoptim", "bfloat16", 24, 0),
    "flash_24_release": ("flashoptim AdamW 24-bit + release", "flashoptim", "bfloat16", 24, 1),
    "slim_24_8": ("slimoptim AdamW 24/8", "slimoptim", "bfloat16", 24, 0),
    "slim_24_8_release": ("slimoptim AdamW 24/8 + release", "slimoptim", "bfloat16", 24, 1),
    "slim_none_8_release": ("slimoptim AdamW none/8 + release", "slimoptim", "bfloat16", None, 1),
}
ADAMW = dict(lr=1e-5, betas=(0.9, 0.95), weight_decay=0.1)


def llama_config(tiny: bool):
    from transformers import LlamaConfig

    config = LlamaConfig(**(TINY if tiny else LLAMA_8B))
    config.use_cache = False
    config._attn_implementation = "sdpa"
    return config


def planner_setup(name: str) -> plan.Setup | None:
    label, library, dtype, master, release = CONFIGS[name]
    if library == "torch":
        return plan.Setup(label, "torch", "adamw", pure_bf16=dtype == "bfloat16")
    if library == "slimoptim":
        return plan.Setup(label, "slimoptim", "adamw", False, master, 8, bool(release))
    return None  # the planner knows slimoptim and torch only


def planned_bytes(name: str, config) -> float | None:
    setup = planner_setup(name)
    if setup is None:
        return None
    with torch.device("meta"):
        from transformers import LlamaForCausalLM

        model = LlamaForCausalLM(config)
    tensors = plan.tensors_from_module(model, "Llama-3.1-8B shapes")
    return sum(plan.setup_bytes(setup, tensors).values())


# ------------------------------------------------------------------ one worker


def build(name: str, config, device):
    """Model, optimizer, release handle and autocast context for one config."""
    from transformers import LlamaForCausalLM

    _, library, dtype, master, release = CONFIGS[name]
    torch.manual_seed(0)
    torch.set_default_dtype(getattr(torch, dtype))
    try:
        with device:  # parameters are created on the device: no CPU copy of 8B params
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(torch.float32)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    params = list(model.parameters())
    handle, autocast = None, nullcontext()
    if library == "torch":
        optimizer = torch.optim.AdamW(params, **ADAMW, fused=device.type == "cuda" or None)
        if dtype == "float32":
            autocast = torch.autocast(device.type, dtype=torch.bfloat16)
    elif library == "flashoptim":
        import flashoptim

        optimizer = flashoptim.FlashAdamW(params, **ADAMW, master_weight_bits=master)
        if release:
            handle = flashoptim.enable_gradient_release(model, optimizer)
    else:
        optimizer = slimoptim.AdamW(params, **ADAMW, master_weight_bits=master)
        if release:
            handle = slimoptim.enable_gradient_release(model, optimizer)
    return model, optimizer, handle, autocast


def held_tensor_bytes(model, optimizer) -> int:
    """Bytes of params, grads and optimizer states, counted tensor by tensor (CPU runs)."""
    tensors = {}
    for p in model.parameters():
        tensors[id(p)] = p
        if p.grad is not None:
            tensors[id(p.grad)] = p.grad
    for state in optimizer.state.values():
        for value in state.values():
            if torch.is_tensor(value):
                tensors[id(value)] = value
    return sum(t.numel() * t.element_size() for t in tensors.values())


def train_steps(name: str, args, device) -> dict:
    config = llama_config(args.dry_run)
    model, optimizer, handle, autocast = build(name, config, device)
    cuda = device.type == "cuda"
    generator = torch.Generator(device=device).manual_seed(0)
    step_ms, optimizer_ms, held = [], [], 0
    for i in range(args.steps):
        tokens = torch.randint(
            config.vocab_size, (1, args.seq_len), generator=generator, device=device
        )
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        with autocast:
            loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        if cuda:
            torch.cuda.synchronize()
        step_start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # under release step() is a no-op that warns
            optimizer.step()
        if cuda:
            torch.cuda.synchronize()
        end = time.perf_counter()
        if i == args.steps - 1:  # held between steps, gradients included
            held = torch.cuda.memory_allocated() if cuda else held_tensor_bytes(model, optimizer)
            # The gradients slimoptim's release holds at once; flashoptim's handle does
            # not say, so its held figure leaves them out.
            held += getattr(handle, "max_bucket_bytes", 0)
        optimizer.zero_grad(set_to_none=True)
        if i > 0:  # the first step compiles kernels and creates the states
            step_ms.append((end - start) * 1e3)
            optimizer_ms.append((end - step_start) * 1e3)
    return {
        "fits": True,
        "loss": loss.item(),
        "num_params": sum(p.numel() for p in model.parameters()),
        "peak_allocated_bytes": torch.cuda.max_memory_allocated() if cuda else None,
        "held_bytes": held,
        "step_ms": statistics.median(step_ms) if step_ms else None,
        # Under release the optimizer steps inside backward: no separate step to time.
        "optimizer_step_ms": None
        if handle or not optimizer_ms
        else statistics.median(optimizer_ms),
    }


def worker(args) -> None:
    """Run one (config, cap) and print its result as one JSON line."""
    # An indexed device: set_per_process_memory_fraction refuses a bare "cuda".
    device = torch.device("cpu") if args.dry_run else torch.device("cuda", 0)
    result = {"config": args.worker, "cap_gb": args.cap_gb}
    if device.type == "cuda" and args.cap_gb:
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.cap_gb * GB / total), device)
    try:
        result |= train_steps(args.worker, args, device)
        peak = result["peak_allocated_bytes"]
        if args.cap_gb and peak is not None and peak > args.cap_gb * GB:
            # The allocator did not hold the cap: do not call this a fit.
            result |= {"fits": None, "error": f"peak {peak / GB:.1f} GB above the cap"}
    except torch.OutOfMemoryError as error:
        result |= {"fits": False, "error": str(error).split("\n")[0][:300]}
        if device.type == "cuda":
            result["peak_allocated_bytes"] = torch.cuda.max_memory_allocated()
    print("RESULT " + json.dumps(result), flush=True)


# ------------------------------------------------------------------ the driver


def skip_reason(name: str) -> str | None:
    if CONFIGS[name][1] != "flashoptim":
        return None
    try:
        import flashoptim
    except ImportError as error:
        return f"flashoptim does not import ({error})"
    if CONFIGS[name][4] and not hasattr(flashoptim, "enable_gradient_release"):
        return "flashoptim has no enable_gradient_release to call"
    return None


def run_worker(name: str, cap: float | None, args) -> dict:
    command = [sys.executable, __file__, "--worker", name, "--steps", str(args.steps),
               "--seq-len", str(args.seq_len)]  # fmt: skip
    if cap:
        command += ["--cap-gb", str(cap)]
    if args.dry_run:
        command.append("--dry-run")
    env = dict(os.environ, PYTORCH_CUDA_ALLOC_CONF="expandable_segments:True")
    start = time.perf_counter()
    try:
        done = subprocess.run(command, capture_output=True, text=True, env=env,
                              timeout=args.worker_timeout_s)  # fmt: skip
    except subprocess.TimeoutExpired:
        return {"config": name, "cap_gb": cap, "fits": None, "error": "worker timed out"}
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if not lines:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        return {"config": name, "cap_gb": cap, "fits": None, "error": " | ".join(tail)}
    return json.loads(lines[-1][7:]) | {"wall_s": time.perf_counter() - start}


def measure(name: str, args) -> list[dict]:
    caps = sorted(args.caps) if not args.dry_run else [None]
    rows = []
    for cap in caps:
        row = run_worker(name, cap, args)
        rows.append(row)
        if row.get("fits") and cap is not None and not args.all_caps:
            rows += [dict(row, cap_gb=c, implied=True) for c in caps if c > cap]
            break
    return rows


def _gb(nbytes: float | None) -> str:
    return "-" if nbytes is None else f"{nbytes / GB:.2f}"


def table(rows: list[dict], planned: dict) -> str:
    lines = [
        "| config | cap GB | fits | peak allocated GB | step s | optimizer step ms | held GB "
        "| planner GB | planner error |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        fits = {True: "yes", False: "**OOM**", None: "error"}[r.get("fits")]
        fits += " (implied)" if r.get("implied") else ""
        peak = r.get("peak_allocated_bytes")
        held, want = r.get("held_bytes"), planned.get(r["config"])
        error = f"{held / want - 1:+.2%}" if held and want else "-"
        step, opt_ms = r.get("step_ms"), r.get("optimizer_step_ms")
        lines.append(
            f"| {CONFIGS[r['config']][0]} | {r['cap_gb'] or '-'} | {fits} | {_gb(peak)} | "
            f"{'-' if step is None else f'{step / 1e3:.3f}'} | "
            f"{'-' if opt_ms is None else f'{opt_ms:.1f}'} | {_gb(held)} | {_gb(want)} | {error} |"
        )
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="tiny Llama on the CPU")
    parser.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated")
    parser.add_argument("--caps", default="80,48", help="GB caps, comma-separated")
    parser.add_argument("--all-caps", action="store_true", help="run every cap")
    parser.add_argument("--steps", type=int, default=4, help="training steps (first untimed)")
    parser.add_argument("--seq-len", type=int, help="tokens per sequence (2048; dry run 32)")
    parser.add_argument("--worker-timeout-s", type=float, default=240)
    parser.add_argument("--out", type=Path, help="results JSON")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--cap-gb", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.seq_len = args.seq_len or (32 if args.dry_run else 2048)
    if args.worker:
        return worker(args)
    if not args.dry_run and not torch.cuda.is_available():
        parser.error("needs a CUDA GPU; use --dry-run for the tiny CPU version")
    args.caps = [float(c) for c in args.caps.split(",")]
    names = [n.strip() for n in args.configs.split(",") if n.strip()]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        parser.error(f"--configs: unknown {unknown}; choose from {', '.join(CONFIGS)}")
    config = llama_config(args.dry_run)
    planned = {n: planned_bytes(n, config) for n in names}
    rows, skipped, started = [], {}, time.perf_counter()
    for name in names:
        reason = skip_reason(name)
        if reason:
            skipped[name] = reason
            print(f"skip {name}: {reason}")
            continue
        for row in measure(name, args):
            rows.append(row)
            print(json.dumps(row), flush=True)
    text = table(rows, planned)
    print(text)
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    summary = {
        "model": "tiny Llama (dry run)" if args.dry_run else "Llama-3.1-8B shapes",
        "config": TINY if args.dry_run else LLAMA_8B,
        "seq_len": args.seq_len,
        "batch": 1,
        "steps": args.steps,
        "activation_checkpointing": True,
        "device": gpu,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "planned_bytes": planned,
        "skipped": skipped,
        "rows": rows,
        "seconds": time.perf_counter() - started,
    }
    tag = "dry_run" if args.dry_run else gpu.replace(" ", "_")
    out = args.out or RESULTS / f"llama8b_memory_{tag}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=1) + "\n")
    out.with_suffix(".md").write_text(text + "\n")
    print(f"results: {out} ({summary['seconds']:.0f} s)")
    return summary


if __name__ == "__main__":
    main()
