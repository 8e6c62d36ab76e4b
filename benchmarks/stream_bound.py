"""How close to the copy ceiling can *any* kernel get that reads and writes what a step
kernel does? A script, not a test (issue 10, target 1).

    python benchmarks/stream_bound.py [--n 1100000000] [--configs 256x1x8,1024x4x4] [--out DIR]

A step of 24-bit master, 8-bit states moves, per element: the bf16 gradient and param,
the correction code, one byte per state and one bf16 scale per 32 elements per state,
all but the gradient written back. The "twin" kernel here moves exactly those streams
with next to no arithmetic (each stored value is a cheap function of the loaded ones, so
no load can be dropped), over flat buffers of ``n`` elements in whole tiles: the best
case of that access pattern on this GPU. Its time against the copy ceiling (torch's
device-to-device copy, measured in the same run as step_time.py measures it) bounds what
the optimizer's kernels can reach; the step kernels' own times come from
``step_time.py``. Prints a table and writes JSON and markdown to --out.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
from pathlib import Path

import torch
import triton
import triton.language as tl
from step_time import back_to_back_ms, copy_ceiling_gbs

GROUP = 32  # elements per state scale, as slimoptim's default group_size

# name -> (correction code bytes, number of 8-bit states): the step kernels' streams.
PATTERNS = {
    "SGD-m / Lion 24/8": (1, 1),
    "SGD-m / Lion none/8": (0, 1),
    "AdamW 24/8": (1, 2),
    "AdamW 32/8": (2, 2),
    "AdamW none/8": (0, 2),
}


@triton.jit
def twin_kernel(
    g, p, c, s0, s0_scale, s1, s1_scale,
    BLOCK: tl.constexpr, TILES: tl.constexpr, CODE_BYTES: tl.constexpr,
    N_STATES: tl.constexpr, G: tl.constexpr,
):  # fmt: skip
    """TILES whole tiles of BLOCK elements per program: p += g (as int16 bits), the code
    and state bytes +1 (code also xor g's low bits), each group's scale bits +1."""
    for t in range(TILES):
        start = (tl.program_id(0) * TILES + t) * BLOCK
        offs = start + tl.arange(0, BLOCK)
        grad = tl.load(g + offs)
        tl.store(p + offs, tl.load(p + offs) + grad)
        if CODE_BYTES == 1:
            tl.store(c + offs, (tl.load(c + offs) ^ grad.to(tl.int8)) + 1)
        elif CODE_BYTES == 2:
            tl.store(c + offs, (tl.load(c + offs) ^ grad) + 1)
        groups = start // G + tl.arange(0, BLOCK // G)
        if N_STATES >= 1:
            tl.store(s0 + offs, tl.load(s0 + offs) + 1)
            tl.store(s0_scale + groups, tl.load(s0_scale + groups) + 1)
        if N_STATES >= 2:
            tl.store(s1 + offs, tl.load(s1 + offs) + 1)
            tl.store(s1_scale + groups, tl.load(s1_scale + groups) + 1)


def twin_buffers(n: int, code_bytes: int, n_states: int, device) -> dict:
    """Random int16/int8 buffers of the pattern's streams (unused streams: 1 element)."""

    def ints(count, dtype):
        info = torch.iinfo(dtype)
        return torch.randint(info.min, info.max, (count,), dtype=dtype, device=device)

    code = {0: (1, torch.int8), 1: (n, torch.int8), 2: (n, torch.int16)}[code_bytes]
    return {
        "g": ints(n, torch.int16),
        "p": ints(n, torch.int16),
        "c": ints(*code),
        "s0": ints(n if n_states >= 1 else 1, torch.int8),
        "s0_scale": ints(n // GROUP if n_states >= 1 else 1, torch.int16),
        "s1": ints(n if n_states >= 2 else 1, torch.int8),
        "s1_scale": ints(n // GROUP if n_states >= 2 else 1, torch.int16),
    }


def launch_twin(bufs: dict, code_bytes: int, n_states: int, block: int, warps: int, tiles: int):
    n = bufs["g"].numel()
    if n % (block * tiles) or block % GROUP:
        raise ValueError(f"n={n} must be a multiple of block*tiles={block * tiles}")
    twin_kernel[(n // (block * tiles),)](
        *bufs.values(), BLOCK=block, TILES=tiles, CODE_BYTES=code_bytes, N_STATES=n_states,
        G=GROUP, num_warps=warps,
    )  # fmt: skip


def bytes_moved(n: int, code_bytes: int, n_states: int) -> int:
    """Read once and written once, but the gradient (read only); our own count."""
    per_element = 2 + 2 * (2 + code_bytes + n_states)
    return n * per_element + 2 * 2 * n_states * (n // GROUP)


def parse_config(text: str) -> tuple[int, int, int]:
    block, warps, tiles = (int(x) for x in text.split("x"))
    return block, warps, tiles


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=1_100_000_000, help="elements (rounded down)")
    parser.add_argument("--configs", default="256x1x8,512x1x8,1024x4x4,2048x4x2,4096x8x1")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("stream_bound.py measures a GPU: no CUDA device here")
    configs = [parse_config(c) for c in args.configs.split(",")]
    step = max(b * t for b, _, t in configs)
    n = args.n // step * step
    ceiling = copy_ceiling_gbs()
    rows = []
    for name, (code_bytes, n_states) in PATTERNS.items():
        bufs = twin_buffers(n, code_bytes, n_states, "cuda")
        for block, warps, tiles in configs:
            step = functools.partial(launch_twin, bufs, code_bytes, n_states, block, warps, tiles)
            ms = back_to_back_ms(step, 7)
            gbs = bytes_moved(n, code_bytes, n_states) / ms / 1e6
            rows.append(
                {
                    "pattern": name,
                    "config": f"{block}x{warps}x{tiles}",
                    "ms": round(ms, 3),
                    "gbs": round(gbs, 1),
                    "pct_of_copy": round(100 * gbs / ceiling, 1),
                }
            )
            print(f"| {name} | {rows[-1]['config']} | {ms:.3f} | {gbs:.0f} | "
                  f"{rows[-1]['pct_of_copy']}% |", flush=True)  # fmt: skip
        bufs.clear()  # free this pattern's buffers before the next one's
        torch.cuda.empty_cache()
    meta = {
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "commit": os.environ.get("SLIMOPTIM_COMMIT", "unknown"),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "elements": n,
        "copy_ceiling_gbs": round(ceiling, 1),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"stream_bound_{meta['gpu'].replace(' ', '_')}_{meta['commit']}"
    (out / f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = [
        f"GPU: {meta['gpu']}; torch {meta['torch']}, triton {meta['triton']}; commit "
        f"{meta['commit']}; {meta['date']}. Copy ceiling {meta['copy_ceiling_gbs']} GB/s; "
        f"{n} elements per stream, flat buffers, whole tiles (block x warps x tiles).",
        "",
        "| streams of | config | ms | GB/s | % of copy |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['pattern']} | {r['config']} | {r['ms']} | {r['gbs']} | {r['pct_of_copy']}% |"
        for r in rows
    ]
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
