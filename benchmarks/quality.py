"""Quality study: does slimoptim train as well as float32 torch.optim? (docs/quality.md)

A byte-level GPT (slimoptim.demo_model.ByteGPT; ``--size small`` is GPT-2-small-sized,
85M params, 16 x 512 bytes per step) pre-trained on the Python standard library's
sources (slimoptim.demo_data) with warm-up + cosine and global-norm clipping at 1.0:

* AdamW (lr 6e-4, betas (0.9, 0.95), wd 0.1): torch AdamW with an fp32 master + bf16
  autocast (reference); slimoptim AdamW 24/8 (default), 32/8, none/8; torch AdamW on
  bf16 params without a master.
* Lion: slimoptim Lion 32/32 on fp32 params (reference; tests check it against a
  float64 Lion) vs slimoptim Lion 24/8 (default), 32/8, none/8, and 24/32, 32/32 on
  bf16 params (which part of the format costs what). SGD with Nesterov momentum: fp32
  torch SGD vs slimoptim SGD 24/8, 32/8, none/8 and torch SGD on bf16 params.
* Fine-tuning (``ft``): from the pre-trained fp32 reference, AdamW at lr 1e-5 on the
  first half of the validation files (never seen in pre-training). The metric is the loss
  on fixed windows of that half: how far an optimizer gets when every update is far below
  a bf16 ulp. The second half's loss is recorded too (at GPT-2 size, 300 steps overfit the
  ~0.5 MB half and it rises for every optimizer alike).
* State codes: during the first AdamW reference run, its float32 states are coded with
  slimoptim's, a linear and the flashoptim 8-bit format every N steps, and each format
  also carries its own states on the run's gradients, with the run's betas and with
  beta2 0.999 (quality_codes.py; ``--no-carried`` skips the carried states).

    python benchmarks/quality.py --device cuda --size small --only adamw --seeds 0,1,2
    python benchmarks/quality.py --size cpu --only adamw,lion,sgd --seeds 0,1,2   # CPU
    python benchmarks/quality.py --size tiny --steps 4 --out /tmp/q.json           # smoke

Results merge into benchmarks/results/quality_<size>_<device>.json (one entry per run
and seed, so several invocations fill one table); tables and plots are rewritten from
it by quality_report.py.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]  # this checkout's slimoptim first

import quality_codes  # noqa: E402  (benchmarks/ is not a package)
import quality_report  # noqa: E402
import quality_runs as Q  # noqa: E402

import slimoptim  # noqa: E402
from slimoptim.demo import lr_factor, resolve_device, seed_everything  # noqa: E402
from slimoptim.demo_data import load_corpus, random_windows  # noqa: E402
from slimoptim.demo_model import ByteGPT  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
EVAL_POINTS = 12
# The state-code probe carries each format's states on the run's gradients with the run's
# own betas and with torch's default ones (beta2 0.999: v moves 0.1% per step).
CARRIED_BETAS = (None, (0.9, 0.999))


def build_optimizer(run: Q.Run, model: torch.nn.Module, hyper: dict, fused: bool | None = None):
    # Weight decay on matrices only, as GPT-2 training does.
    params = list(model.parameters())
    groups = [
        {"params": [p for p in params if p.dim() >= 2]},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    if run.library == "torch":
        if run.optimizer == "sgd":
            return torch.optim.SGD(groups, **hyper)
        return torch.optim.AdamW(groups, **hyper, fused=True if params[0].is_cuda else None)
    cls = getattr(slimoptim, Q.OPTIMIZER_CLASSES[run.optimizer])
    bits = dict(master_weight_bits=run.master_weight_bits, state_bits=run.state_bits)
    return cls(groups, **hyper, **bits, fused=fused)


def load_start(run: Q.Run, model, optimizer, state_dict: dict) -> None:
    """Start from float32 weights: slimoptim keeps them exactly as a bf16 value plus its
    correction; plain bf16 params round them to nearest."""
    if run.library == "slimoptim" and run.param_dtype == "bfloat16":
        slimoptim.load_fp32_state_dict(model, optimizer, state_dict)
    else:
        model.load_state_dict(state_dict)


@torch.no_grad()
def evaluate(model, windows: torch.Tensor, batch: int, autocast: bool) -> float:
    model.eval()
    total = 0.0
    with torch.autocast(windows.device.type, dtype=torch.bfloat16, enabled=autocast):
        for chunk in windows.split(batch):
            total += model.loss(chunk).item() * len(chunk)
    model.train()
    return total / len(windows)


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class SideClock:
    """Seconds spent on measurements inside the training loop (left out of its timing)."""

    def __init__(self, device):
        self.device, self.seconds = device, 0.0

    @contextlib.contextmanager
    def __call__(self):
        _sync(self.device)
        start = time.perf_counter()
        yield
        _sync(self.device)
        self.seconds += time.perf_counter() - start


class Study:
    """Settings and data shared by every run of one invocation."""

    def __init__(self, args, device):
        self.args, self.device = args, device
        self.size = Q.SIZES[args.size]
        corpus = load_corpus()
        self.corpus = corpus
        held_out = torch.Generator().manual_seed(1234)  # the same windows for every run
        count, length = Q.EVAL_BATCHES[args.size] * self.size.batch, self.size.context + 1
        self.eval_windows = random_windows(corpus.validation, count, length, held_out).to(device)
        half = corpus.validation.numel() // 2
        self.ft_train, ft_other = corpus.validation[:half], corpus.validation[half:]
        self.ft_fit_windows = random_windows(self.ft_train, count, length, held_out).to(device)
        self.ft_heldout_windows = random_windows(ft_other, count, length, held_out).to(device)
        self.pretrained: dict | None = None

    def train(self, run: Q.Run, seed: int, probe: bool = False) -> dict:
        size, device, args = self.size, self.device, self.args
        steps = args.finetune_steps if run.finetune else args.steps
        hyper = Q.hyperparameters(run.optimizer, args.size, run.finetune)
        seed_everything(seed)
        model = ByteGPT(size)
        if run.param_dtype == "bfloat16":
            slimoptim.cast_model(model)
        model.to(device)
        optimizer = build_optimizer(run, model, hyper, args.fused)
        if run.finetune:
            load_start(run, model, optimizer, self.pretrained)
            schedule = None  # constant lr
        else:
            schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, steps))
        data = self.ft_train if run.finetune else self.corpus.train
        windows = self.ft_fit_windows if run.finetune else self.eval_windows
        batches = torch.Generator().manual_seed(seed + run.finetune * Q.FINETUNE_SEED_OFFSET)
        eval_at = {round(i * steps / EVAL_POINTS) for i in range(1, EVAL_POINTS + 1)}
        code_every = args.code_every or max(1, steps // EVAL_POINTS)
        curve = [(0, evaluate(model, windows, size.batch, run.autocast))]
        if run.finetune:
            heldout = [evaluate(model, self.ft_heldout_windows, size.batch, run.autocast)]
        losses, codes, side = [], [], SideClock(device)
        carried = [quality_codes.CarriedStates(b) for b in CARRIED_BETAS if probe and args.carried]
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        _sync(device)
        start = time.perf_counter()
        for step in range(1, steps + 1):
            tokens = random_windows(data, size.batch, size.context + 1, batches).to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=run.autocast):
                loss = model.loss(tokens)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), Q.GRAD_CLIP)
            if carried:
                with side():
                    for states in carried:
                        states.observe(optimizer, step)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if schedule is not None:
                schedule.step()
            losses.append(loss.detach())
            if probe and step % code_every == 0:
                with side():
                    codes.append(quality_codes.measure_adamw_states(optimizer, step))
                    if carried:
                        codes[-1]["carried"] = [c.measure(optimizer, step) for c in carried]
            if step in eval_at:
                with side():
                    curve.append((step, evaluate(model, windows, size.batch, run.autocast)))
        _sync(device)
        train_seconds = time.perf_counter() - start - side.seconds
        if run.name == "adamw_fp32" and self.pretrained is None:
            state = model.state_dict()
            self.pretrained = {k: v.detach().float().cpu().clone() for k, v in state.items()}
        result = {
            "name": run.name,
            "seed": seed,
            "run": asdict(run),
            "hyperparameters": hyper,
            "steps": steps,
            "final_validation_loss": curve[-1][1],
            "validation_curve": curve,
            "train_loss": torch.stack(losses).float().tolist(),
            "train_seconds": train_seconds,
            "seconds_per_step": train_seconds / steps,
            "peak_memory_bytes": torch.cuda.max_memory_allocated(device)
            if device.type == "cuda"
            else None,
        }
        if run.finetune:
            result["improvement"] = curve[0][1] - curve[-1][1]
            heldout.append(evaluate(model, self.ft_heldout_windows, size.batch, run.autocast))
            result["heldout_loss_start_end"] = heldout
        if codes:
            result["state_codes"] = codes
        return result


# ------------------------------------------------------------------ bookkeeping


def _git(*args: str) -> str:
    try:
        done = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True)
    except OSError:
        return ""
    return done.stdout.strip() if done.returncode == 0 else ""


def environment(device) -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    # A device machine's copy of the tree may carry a stale .git: SLIMOPTIM_COMMIT names it.
    named = os.environ.get("SLIMOPTIM_COMMIT")
    commit = named or _git("rev-parse", "HEAD")
    return {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or platform.machine(),
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "triton": triton_version,
        "python": platform.python_version(),
        "slimoptim": str(Path(slimoptim.__file__).parent),
        # None where the checkout has no .git (a copied working tree) or git is missing.
        "commit": commit or None,
        "commit_dirty": bool(_git("status", "--porcelain", "--untracked-files=no"))
        if commit and not named
        else None,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


def merge_results(path: Path, settings: dict, new_runs: list[dict]) -> dict:
    """Add ``new_runs`` to the results at ``path`` (same settings), replacing equal (name,
    seed); results of other settings are replaced whole."""
    old = json.loads(path.read_text()) if path.exists() else None
    keep = []
    if old and old.get("settings") == settings:
        fresh = {(r["name"], r["seed"]) for r in new_runs}
        keep = [r for r in old["runs"] if (r["name"], r["seed"]) not in fresh]
    elif old:
        print(f"note: {path} held results of other settings; they are replaced.")
    return {"settings": settings, "runs": keep + new_runs}


def estimate_seconds(run: Q.Run, steps: int, measured: dict) -> float | None:
    """Seconds a run should take, from runs of the same kind (or the slowest seen x1.3)."""
    kind = (run.optimizer, run.library, run.param_dtype, run.master_weight_bits, run.state_bits)
    if kind in measured:
        return measured[kind] * steps
    return max(measured.values()) * 1.3 * steps if measured else None


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--size", choices=sorted(Q.SIZES), default="cpu")
    parser.add_argument("--steps", type=int, help="pre-training steps (size's default)")
    parser.add_argument("--finetune-steps", type=int, help="fine-tuning steps")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated, e.g. 0,1,2")
    parser.add_argument("--all-seeds", action="store_true", help="variants get every seed too")
    parser.add_argument("--only", help="runs or families (adamw,lion,sgd,ft), comma-separated")
    parser.add_argument("--code-every", type=int, help="state-code measurement period (steps)")
    parser.add_argument(
        "--no-codes", action="store_true", help="skip the state-code probe of the first AdamW run"
    )
    parser.add_argument(
        "--no-carried",
        dest="carried",
        action="store_false",
        help="state-code probe: skip the codes carried step by step on the run's gradients",
    )
    parser.add_argument("--budget-s", type=float, help="skip runs that would end past this")
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.add_argument(
        "--fused",
        action="store_true",
        default=None,
        help="force slimoptim's Triton kernels (on the CPU only with TRITON_INTERPRET=1)",
    )
    parser.add_argument("--out", type=Path, help="results JSON (default benchmarks/results/)")
    parser.add_argument("--plots", type=Path, default=quality_report.PLOTS, help="plot folder")
    parser.add_argument("--no-report", action="store_true", help="skip tables and plots")
    args = parser.parse_args(argv)
    args.steps = args.steps or Q.DEFAULT_STEPS[args.size]
    args.finetune_steps = args.finetune_steps or Q.DEFAULT_FINETUNE_STEPS[args.size]
    try:
        args.seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        parser.error(f"--seeds {args.seeds!r}: expected integers separated by commas, e.g. 0,1,2")
    if not args.seeds or args.steps < 1 or args.finetune_steps < 1:
        parser.error("--seeds needs at least one seed; --steps and --finetune-steps >= 1")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    runs = Q.select_runs(args.only)
    plan = Q.order_runs(runs, args.seeds, args.all_seeds)
    if any(r.finetune for r, _ in plan) and not any(r.name == "adamw_fp32" for r, _ in plan):
        # Fine-tuning starts from the pre-trained reference: train it first.
        plan.insert(0, (Q.RUNS_BY_NAME["adamw_fp32"], args.seeds[0]))
    study = Study(args, device)
    size = study.size
    params = sum(p.numel() for p in ByteGPT(size).parameters())
    print(
        f"quality study on {device}: ByteGPT '{args.size}' ({params / 1e6:.1f}M params, "
        f"{size.layers}x{size.width}), {args.steps} steps of {size.batch}x{size.context} bytes, "
        f"fine-tuning {args.finetune_steps} steps; {len(plan)} runs planned"
        + (f", budget {args.budget_s:.0f} s" if args.budget_s else "")
    )
    settings = {
        "size": args.size,
        "model": size.as_dict() | {"num_params": params},
        "steps": args.steps,
        "finetune_steps": args.finetune_steps,
        "device_type": device.type,
        "eval_windows": Q.EVAL_BATCHES[args.size] * size.batch,
        "grad_clip": Q.GRAD_CLIP,
        "data": study.corpus.describe() | {"python": platform.python_version()},
    }
    out = args.out or RESULTS / f"quality_{args.size}_{device.type}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    env = environment(device)
    invocation = {"argv": sys.argv[1:] if argv is None else argv, "skipped": []}
    started, measured, summary = time.perf_counter(), {}, None
    probed = args.no_codes
    for run, seed in plan:
        steps = args.finetune_steps if run.finetune else args.steps
        estimate = estimate_seconds(run, steps, measured)
        elapsed = time.perf_counter() - started
        if args.budget_s and estimate is not None and elapsed + estimate > args.budget_s:
            invocation["skipped"].append(f"{run.name} seed {seed} (needs ~{estimate:.0f} s)")
            print(f"  skip {run.name} seed {seed}: ~{estimate:.0f} s would pass the budget")
            continue
        probe = run.name == "adamw_fp32" and not probed
        probed |= probe
        run_start = time.perf_counter()
        result = study.train(run, seed, probe=probe)
        wall = time.perf_counter() - run_start
        kind = (run.optimizer, run.library, run.param_dtype, run.master_weight_bits, run.state_bits)
        measured[kind] = wall / steps
        # Saved after every run: a run cut short by a time limit keeps what it finished.
        summary = merge_results(
            out, settings, [result | {"wall_seconds": wall, "environment": env}]
        )
        invocation["seconds"] = time.perf_counter() - started
        summary |= {"environment": env, "last_invocation": invocation}
        out.write_text(json.dumps(summary, indent=1) + "\n")
        extra = f", improvement {result['improvement']:+.4f}" if run.finetune else ""
        print(
            f"  {run.label:<48} seed {seed}: val loss {result['final_validation_loss']:.4f}"
            f"{extra} ({result['seconds_per_step'] * 1e3:.1f} ms/step, {wall:.0f} s)",
            flush=True,
        )
    total = time.perf_counter() - started
    skipped = invocation["skipped"]
    print(f"ran for {total:.0f} s; skipped {len(skipped)}: {skipped or '-'}")
    if summary is None:
        return {}
    print(f"results: {out}")
    if not args.no_report:
        for path in quality_report.write_report(out, args.plots):
            print(f"report:  {path}")
    return summary


if __name__ == "__main__":
    main()
