"""How fast are checkpoints verified? xxh3-128 over a 1.1B-param AdamW 24/8 checkpoint.

Builds, in memory, the tensors a ``save_checkpoint`` file of TinyLlama-1.1B holds
with slimoptim AdamW (24-bit master, 8-bit states): per parameter tensor its bf16
weight, int8 correction, int8 exp_avg, uint8 exp_avg_sq and two bf16 scales per 32
values, 5.13 bytes per parameter, 5.6 GB in all (``--layers`` fewer for less
memory). Then times :func:`slimoptim.integrity.checksums` on one CPU thread, which
is what ``load_checkpoint`` adds to a load. Prints GB/s and the time for the whole.

    python benchmarks/checksum_speed.py              # 5.6 GB, needs ~6 GB of RAM
    python benchmarks/checksum_speed.py --layers 4   # ~1.2 GB
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

from slimoptim import integrity

# TinyLlama-1.1B: hidden 2048, MLP 5632, 22 layers, 4 KV heads of 64, vocab 32000.
HIDDEN, MLP, KV, VOCAB, LAYERS = 2048, 5632, 256, 32000, 22
GROUP = 32


def layer_shapes() -> list[tuple[int, int]]:
    attention = [(HIDDEN, HIDDEN), (KV, HIDDEN), (KV, HIDDEN), (HIDDEN, HIDDEN)]
    mlp = [(MLP, HIDDEN), (MLP, HIDDEN), (HIDDEN, MLP)]
    return [*attention, *mlp, (HIDDEN, 1), (HIDDEN, 1)]  # + two norms


def filled(numel: int, dtype: torch.dtype) -> torch.Tensor:
    """Random bytes: untouched memory would read as the shared zero page, far too fast."""
    t = torch.empty(numel, dtype=dtype)
    t.view(torch.uint8).random_()
    return t


def checkpoint_tensors(layers: int) -> dict:
    shapes = [(VOCAB, HIDDEN), (VOCAB, HIDDEN), (HIDDEN, 1)]  # embedding, head, final norm
    shapes += layer_shapes() * layers
    model, state = {}, {}
    for i, (rows, cols) in enumerate(shapes):
        n = rows * cols
        model[f"p{i}"] = filled(n, torch.bfloat16).view(rows, cols)
        groups = (n + GROUP - 1) // GROUP
        state[i] = {
            "step": torch.tensor(100.0),
            "correction": filled(n, torch.int8),
            "exp_avg": filled(n, torch.int8),
            "exp_avg_scale": filled(groups, torch.bfloat16),
            "exp_avg_sq": filled(n, torch.uint8),
            "exp_avg_sq_scale": filled(groups, torch.bfloat16),
        }
    return {"model": model, "optimizer": {"state": state, "param_groups": [{"lr": 1e-3}]}}


def nbytes(obj) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(nbytes(v) for v in obj.values())
    if isinstance(obj, list):
        return sum(nbytes(v) for v in obj)
    return 0


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=LAYERS, help="transformer layers (22)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    payload = checkpoint_tensors(args.layers)
    size = nbytes(payload)
    params = sum(t.numel() for t in payload["model"].values())
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        integrity.checksums(payload)
        times.append(time.perf_counter() - start)
    best = min(times)
    print(f"CPU: {cpu_name()} (1 thread)")
    tensors = len(payload["model"])
    print(f"checkpoint: {params / 1e9:.3f}B params, {size / 1e9:.2f} GB, {tensors} parameters")
    speed = size / best / 1e9
    print(f"checksums (xxh3-128): best {best:.2f} s of {args.repeats}, {speed:.1f} GB/s")
    print(f"5.6 GB checkpoint: {5.6e9 / (size / best):.2f} s to verify")


if __name__ == "__main__":
    main()
