"""Checkpoint bytes/param (model + optimizer, torch.save) per mode, and 1B save/load time.

    python benchmarks/checkpoint_size.py [--out benchmarks/results]
    python benchmarks/checkpoint_size.py --gpu-1b [--dir /tmp/ckpt]   # on a CUDA machine

CPU part: a ~10M-param GPT-like stack (embedding + 4 blocks, bf16 params for
slimoptim, fp32 for torch AdamW), one step with random gradients so every
state exists, then ``torch.save({"model": ..., "optimizer": ...})`` to a file;
bytes/param is the file size over the parameter count. Writes
``checkpoint_size.{json,md}`` to --out.

--gpu-1b: TinyLlama-1.1B shapes on the GPU; times ``slimoptim.save_checkpoint``
and ``load_checkpoint`` (into fresh objects, on the GPU, file in the page cache)
for AdamW 24/8 and for torch AdamW on fp32 params, and measures flashoptim's
FlashAdamW default checkpoint if flashoptim is installed. Writes
``checkpoint_time_1b.{json,md}``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

import slimoptim

# (label, optimizer class or None for torch AdamW, kwargs, param dtype)
MODES = [
    ("torch AdamW, fp32 params", None, {}, torch.float32),
    ("torch AdamW, bf16 params (no master)", None, {}, torch.bfloat16),
    ("AdamW 24-bit master, 8-bit states", "AdamW", dict(master_weight_bits=24), torch.bfloat16),
    ("AdamW 32-bit master, 8-bit states", "AdamW", dict(master_weight_bits=32), torch.bfloat16),
    ("AdamW no master, 8-bit states", "AdamW", dict(master_weight_bits=None), torch.bfloat16),
    ("AdamW 24-bit master, 32-bit states", "AdamW", dict(state_bits=32), torch.bfloat16),
    (
        "AdamW 32-bit master, 32-bit states",
        "AdamW",
        dict(master_weight_bits=32, state_bits=32),
        torch.bfloat16,
    ),
    ("SGD momentum 24-bit master, 8-bit", "SGD", dict(momentum=0.9), torch.bfloat16),
    ("Lion 24-bit master, 8-bit", "Lion", {}, torch.bfloat16),
    ("Lion no master, 8-bit", "Lion", dict(master_weight_bits=None), torch.bfloat16),
]


def gpt_like(dim: int = 384, blocks: int = 4, vocab: int = 8192) -> nn.Module:
    """About 10M params: embedding, then per block LayerNorm, qkv, proj, MLP."""
    layers = [nn.Embedding(vocab, dim)]
    for _ in range(blocks):
        layers += [nn.LayerNorm(dim), nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)]
        layers += [nn.LayerNorm(dim), nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)]
    return nn.ModuleList(layers)


def tinyllama_1b(device) -> nn.Module:
    """TinyLlama-1.1B parameter shapes (201 tensors), as a plain ParameterList."""
    hidden, inter, kv, vocab = 2048, 5632, 256, 32000
    layer = [(hidden, hidden), (kv, hidden), (kv, hidden), (hidden, hidden)]
    layer += [(inter, hidden), (inter, hidden), (hidden, inter), (hidden,), (hidden,)]
    shapes = [(vocab, hidden)] + layer * 22 + [(hidden,), (vocab, hidden)]
    return nn.ParameterList(nn.Parameter(torch.randn(s, device=device) * 0.02) for s in shapes)


def make_optimizer(kind, kwargs, params):
    if kind is None:
        return torch.optim.AdamW(params, lr=1e-3)
    return getattr(slimoptim, kind)(params, lr=1e-3, **kwargs)


def one_step(model: nn.Module, opt) -> None:
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    opt.zero_grad(set_to_none=True)


def file_bytes(obj) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "ckpt.pt")
        torch.save(obj, path)
        return os.path.getsize(path)


def measure_cpu() -> list[dict]:
    rows = []
    for label, kind, kwargs, dtype in MODES:
        torch.manual_seed(0)
        model = gpt_like().to(dtype)
        opt = make_optimizer(kind, kwargs, model.parameters())
        one_step(model, opt)
        n = sum(p.numel() for p in model.parameters())
        model_bytes = file_bytes(model.state_dict())
        opt_bytes = file_bytes(opt.state_dict())
        total = file_bytes({"model": model.state_dict(), "optimizer": opt.state_dict()})
        rows.append(
            dict(
                mode=label,
                params=n,
                model_bytes_per_param=model_bytes / n,
                optimizer_bytes_per_param=opt_bytes / n,
                total_bytes_per_param=total / n,
            )
        )
        print(f"{label:42s} {total / n:6.3f} B/param (model {model_bytes / n:.3f})")
    base = rows[0]["total_bytes_per_param"]
    for row in rows:
        row["vs_torch_adamw_fp32"] = row["total_bytes_per_param"] / base
    return rows


def markdown_cpu(rows: list[dict]) -> str:
    lines = [
        f"Checkpoint size, model + optimizer in one `torch.save` file "
        f"({rows[0]['params'] / 1e6:.1f}M-param GPT-like model, CPU).",
        "",
        "| mode | total B/param | model | optimizer | vs torch AdamW fp32 |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['mode']} | {r['total_bytes_per_param']:.3f} | "
            f"{r['model_bytes_per_param']:.3f} | {r['optimizer_bytes_per_param']:.3f} | "
            f"{r['vs_torch_adamw_fp32']:.2f}x |"
        )
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------ GPU part


def _timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _time_slimoptim(directory: Path, repeats: int) -> dict:
    def build():
        model = tinyllama_1b("cuda").to(torch.bfloat16)
        return model, slimoptim.AdamW(model.parameters(), lr=1e-3)

    model, opt = build()
    one_step(model, opt)
    n = sum(p.numel() for p in model.parameters())
    path = directory / "slimoptim_adamw_24_8.pt"
    save_s = _timed(lambda: slimoptim.save_checkpoint(path, model, opt), repeats)
    fresh_model, fresh_opt = build()
    load_s = _timed(lambda: slimoptim.load_checkpoint(path, fresh_model, fresh_opt), repeats)
    size = path.stat().st_size
    path.unlink()
    return dict(
        mode="slimoptim AdamW 24/8, bf16", params=n, bytes=size, save_s=save_s, load_s=load_s
    )


def _time_torch(directory: Path, repeats: int) -> dict:
    model = tinyllama_1b("cuda")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    one_step(model, opt)
    n = sum(p.numel() for p in model.parameters())
    path = directory / "torch_adamw_fp32.pt"

    def save():
        torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, path)

    def load():
        ckpt = torch.load(path, map_location="cuda", weights_only=True)
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])

    save_s = _timed(save, repeats)
    load_s = _timed(load, repeats)
    size = path.stat().st_size
    path.unlink()
    return dict(mode="torch AdamW fused, fp32", params=n, bytes=size, save_s=save_s, load_s=load_s)


def _flashoptim_size() -> dict | None:
    try:
        from flashoptim import FlashAdamW  # noqa: PLC0415 (optional peer)
    except ImportError:
        print("flashoptim is not installed: its checkpoint size is not measured.")
        return None
    model = tinyllama_1b("cuda").to(torch.bfloat16)
    opt = FlashAdamW(model.parameters(), lr=1e-3)
    one_step(model, opt)
    n = sum(p.numel() for p in model.parameters())
    size = file_bytes({"model": model.state_dict(), "optimizer": opt.state_dict()})
    return dict(mode="flashoptim FlashAdamW default, bf16", params=n, bytes=size)


def measure_gpu(directory: Path, repeats: int) -> list[dict]:
    directory.mkdir(parents=True, exist_ok=True)
    rows = []
    for measure in (_time_slimoptim, _time_torch):
        rows.append(measure(directory, repeats))
        torch.cuda.empty_cache()
    flash = _flashoptim_size()
    if flash is not None:
        rows.append(flash)
    for row in rows:
        row["bytes_per_param"] = row["bytes"] / row["params"]
        print(row)
    return rows


def markdown_gpu(rows: list[dict], device: str) -> str:
    lines = [
        f"1.1B-param checkpoint (TinyLlama shapes) on {device}: save/load medians, "
        "model + optimizer, local disk, file in the page cache on load.",
        "",
        "| checkpoint | GB | B/param | save s | load s |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        save = f"{r['save_s']:.2f}" if "save_s" in r else "-"
        load = f"{r['load_s']:.2f}" if "load_s" in r else "-"
        lines.append(
            f"| {r['mode']} | {r['bytes'] / 1e9:.2f} | {r['bytes_per_param']:.3f} | "
            f"{save} | {load} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--gpu-1b", action="store_true", help="time a 1.1B checkpoint on CUDA")
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()) / "slim_ckpt")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    if args.gpu_1b:
        if not torch.cuda.is_available():
            raise SystemExit("--gpu-1b needs a CUDA device.")
        device = torch.cuda.get_device_name()
        rows = measure_gpu(args.dir, args.repeats)
        meta = dict(date=stamp, device=device, torch=torch.__version__, repeats=args.repeats)
        (args.out / "checkpoint_time_1b.json").write_text(
            json.dumps(dict(meta, rows=rows), indent=1)
        )
        (args.out / "checkpoint_time_1b.md").write_text(markdown_gpu(rows, device))
        return
    rows = measure_cpu()
    meta = dict(date=stamp, device="cpu", torch=torch.__version__)
    (args.out / "checkpoint_size.json").write_text(json.dumps(dict(meta, rows=rows), indent=1))
    (args.out / "checkpoint_size.md").write_text(markdown_cpu(rows))


if __name__ == "__main__":
    main()
