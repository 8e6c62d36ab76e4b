"""Lion: how often does the 8-bit momentum flip the sign of the update? A script, not a test.

    python benchmarks/lion_sign_flips.py --lr 1e-3 --steps 300

Trains the demo's byte-level GPT (``small``, 4 x 128) with float32 Lion on the CPU. Each
rounding variant keeps a shadow momentum, coded in 8 bits after every step and fed the
same gradients as the float32 one; per step, the share of elements whose update sign
sign(beta1 m + (1 - beta1) g) differs from float32's is that variant's flip rate (Lion's
whole update error: every flip is a step of lr the wrong way). Prints the mean flip rate
per 100 steps and writes JSON to --out.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout first
from slimoptim import formats  # noqa: E402
from slimoptim.demo import GRAD_CLIP, seed_everything  # noqa: E402
from slimoptim.demo_data import load_corpus, random_windows  # noqa: E402
from slimoptim.demo_model import SIZES, ByteGPT  # noqa: E402

BETA1, BETA2, WEIGHT_DECAY, GROUP = 0.9, 0.99, 0.3, 32
# name -> (forget passed to quantize_momentum, levels, sequenced dither); None: Lion's own
# 1 - beta2 (the decay rule); "move": the movement rule, dithering where this step changed
# the state by less than half a level; 0.0: every value dithered (the stochastic rule)
VARIANTS = {
    "square, stochastic (format 2)": (1e-9, "square", False),
    "square, nearest unless one step of decay is under half a level": (None, "square", False),
    "square, nearest": (1.0, "square", False),
    "linear-square, nearest unless freezing": (None, "linear_square", False),
    "linear-square, nearest": (1.0, "linear_square", False),
    "square, nearest unless this step's change is under half a level": ("move", "square", False),
    "square, stochastic, sequenced dither (Lion's code)": (0.0, "square", True),
}


def coded(m_new, noise, variant: str, m_old) -> torch.Tensor:
    forget, levels, _ = VARIANTS[variant]
    if forget == "move":
        code, scale = formats.quantize_momentum(m_new, GROUP, noise, None, levels, previous=m_old)
    else:
        forget = 1 - BETA2 if forget is None else forget
        code, scale = formats.quantize_momentum(m_new, GROUP, noise, forget, levels)
    return formats.dequantize_momentum(code, scale, GROUP, levels)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    seed_everything(args.seed)
    model = ByteGPT(SIZES["small"])
    params = list(model.parameters())
    m = [torch.zeros(p.numel()) for p in params]
    shadow = {v: [torch.zeros(p.numel()) for p in params] for v in VARIANTS}
    corpus, batches = load_corpus(), torch.Generator().manual_seed(args.seed)
    flips = {v: [] for v in VARIANTS}
    for step in range(1, args.steps + 1):
        model.zero_grad(set_to_none=True)
        model.loss(random_windows(corpus.train, 16, 129, batches)).backward()
        torch.nn.utils.clip_grad_norm_(params, GRAD_CLIP)
        lr = args.lr * min(1.0, step / 40)
        wrong, total = dict.fromkeys(VARIANTS, 0), 0
        with torch.no_grad():
            for i, p in enumerate(params):
                g = p.grad.reshape(-1)
                sign = torch.sign(m[i] * BETA1 + g * (1 - BETA1))
                at = torch.tensor(float(step))
                noise = {s: formats.dither(g.numel(), at, sequenced=s)[0] for s in (False, True)}
                for v in VARIANTS:
                    mq = shadow[v][i]
                    wrong[v] += int((torch.sign(mq * BETA1 + g * (1 - BETA1)) != sign).sum())
                    new = coded(mq * BETA2 + g * (1 - BETA2), noise[VARIANTS[v][2]], v, mq)
                    shadow[v][i] = new
                p.mul_(1 - lr * WEIGHT_DECAY).add_(sign.view_as(p), alpha=-lr)
                m[i] = m[i] * BETA2 + g * (1 - BETA2)
                total += g.numel()
        for v in VARIANTS:
            flips[v].append(wrong[v] / total)
        if step % 100 == 0:
            print(f"steps {step - 99}-{step}:")
            for v in VARIANTS:
                print(f"  {v:66s} {sum(flips[v][-100:]) / 100:.4f}")
    result = {"lr": args.lr, "steps": args.steps, "seed": args.seed, "flip_rate": flips}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"lion_sign_flips_lr{args.lr:g}.json").write_text(json.dumps(result) + "\n")
    return result


if __name__ == "__main__":
    main()
