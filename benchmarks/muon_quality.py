"""Muon pre-training comparison on the demo's byte-level GPT (issue 15). A script, not a test.

    python benchmarks/muon_quality.py --device cuda --size medium --steps 2000 --seeds 0,1,2

Muon for the hidden matrices and AdamW for the rest (``slimoptim.muon_param_groups``), in
two setups on the same initial weights and batches per seed:

* torch: ``torch.optim.Muon`` + ``torch.optim.AdamW`` on float32 params, bf16 autocast;
* slimoptim: ``slimoptim.Muon`` + ``slimoptim.AdamW`` at their defaults (24-bit masters,
  8-bit states) on bf16 params.

Reports each run's final validation loss, the mean per setup and the spread across seeds
(the seed noise the slimoptim mean should stay within). Writes JSON to --out.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

import slimoptim
from slimoptim.demo import GRAD_CLIP, VALIDATION_SEED, evaluate, lr_factor, seed_everything
from slimoptim.demo_data import load_corpus, random_windows
from slimoptim.demo_model import SIZES, ByteGPT

MUON = dict(lr=0.02, momentum=0.95, weight_decay=0.01)
ADAMW = dict(lr=3e-3, betas=(0.9, 0.95), weight_decay=0.0)  # embeddings, norms, biases


# name -> (fp32 params with bf16 autocast?, Muon and AdamW options). "torch" is the
# reference; the extra slimoptim setups tell its gap's sources apart: exact states and
# master on bf16 params (what bf16 compute alone costs), one of the two exact at a time,
# and the 8-bit states on fp32 params (fp32 params are their own master).
SETUPS = {
    "torch": (True, None),
    "slimoptim": (False, {}),
    "slimoptim_32_32": (False, dict(master_weight_bits=32, state_bits=32)),
    "slimoptim_32_8": (False, dict(master_weight_bits=32)),
    "slimoptim_24_32": (False, dict(state_bits=32)),
    "slimoptim_fp32_params": (True, {}),
}


def optimizers(setup: str, model: torch.nn.Module) -> list[torch.optim.Optimizer]:
    split = slimoptim.muon_param_groups(model)
    options = SETUPS[setup][1]
    if options is None:
        return [torch.optim.Muon(split.muon, **MUON), torch.optim.AdamW(split.adamw, **ADAMW)]
    return [
        slimoptim.Muon(split.muon, **MUON, **options),
        slimoptim.AdamW(split.adamw, **ADAMW, **options),
    ]


def train(library: str, size, corpus, steps: int, seed: int, device) -> dict:
    seed_everything(seed)
    model = ByteGPT(size)
    autocast = SETUPS[library][0]  # fp32 params computed in bf16, or bf16 params
    if not autocast:
        slimoptim.cast_model(model)
    model.to(device)
    opts = optimizers(library, model)
    schedules = [torch.optim.lr_scheduler.LambdaLR(o, lambda s: lr_factor(s, steps)) for o in opts]
    batches = torch.Generator().manual_seed(seed)
    windows = random_windows(
        corpus.validation,
        8 * size.batch,
        size.context + 1,
        torch.Generator().manual_seed(VALIDATION_SEED),
    ).to(device)
    start = time.perf_counter()
    for _ in range(steps):
        tokens = random_windows(corpus.train, size.batch, size.context + 1, batches).to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            loss = model.loss(tokens)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
        for opt, schedule in zip(opts, schedules, strict=True):
            opt.step()
            opt.zero_grad(set_to_none=True)
            schedule.step()
    return {
        "library": library,
        "seed": seed,
        "final_validation_loss": evaluate(model, windows, autocast, device),
        "last_train_loss": loss.item(),
        "seconds": time.perf_counter() - start,
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--size", default="medium", choices=sorted(SIZES))
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--setups", default="torch,slimoptim", help=", ".join(SETUPS))
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args(argv)
    setups = args.setups.split(",")
    unknown = [s for s in setups if s not in SETUPS]
    if unknown or "torch" not in setups:
        parser.error(f"--setups: choose from {', '.join(SETUPS)}, torch included ({unknown})")
    if args.threads:
        torch.set_num_threads(args.threads)
    device, size, corpus = torch.device(args.device), SIZES[args.size], load_corpus()
    runs = []
    for seed in (int(s) for s in args.seeds.split(",")):
        for setup in setups:
            runs.append(train(setup, size, corpus, args.steps, seed, device))
            print(runs[-1], flush=True)
    summary = {}
    for setup in setups:
        losses = [r["final_validation_loss"] for r in runs if r["library"] == setup]
        spread = statistics.stdev(losses) if len(losses) > 1 else float("nan")
        summary[setup] = {"mean": statistics.mean(losses), "stdev": spread, "runs": losses}
        if setup != "torch":
            summary[f"{setup}_minus_torch"] = summary[setup]["mean"] - summary["torch"]["mean"]
    print(json.dumps(summary, indent=1))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"size": args.size, "steps": args.steps, "device": str(device), "muon": MUON}
    meta["setups"] = setups
    (out / f"muon_quality_{args.size}.json").write_text(
        json.dumps({"meta": {**meta, "adamw": ADAMW}, "summary": summary, "runs": runs}, indent=1)
    )
    return summary


if __name__ == "__main__":
    main()
