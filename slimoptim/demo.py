"""``slimoptim demo``: train a byte-level GPT with torch AdamW and with slimoptim, compare.

Every run starts from the same initial weights (the slimoptim runs from their
bf16 rounding) and sees the same batches in the same order, so the curves
differ only by optimizer and precision. The baseline is the usual mixed
precision recipe: float32 parameters, gradients and AdamW states, matmuls in
bf16 autocast where the device supports it (on CPU too: it is faster than
plain float32 on CPUs with bf16 instructions and is what a GPU run does).
"""

from __future__ import annotations

import json
import math
import platform
import random
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

import slimoptim

from . import _io
from .cli import OPTIMIZER_CLASSES, CommandError, format_table
from .demo_data import Corpus, load_corpus, random_windows
from .demo_model import SIZES, ByteGPT, ModelSize

DEFAULT_STEPS = {"tiny": 40, "small": 300, "medium": 2000}
EVAL_POINTS = 12  # validation losses per run, besides the one at step 0
EVAL_BATCHES = 8
VALIDATION_SEED = 1234  # the validation windows do not change with --seed
GRAD_CLIP = 1.0

# AdamW as for small GPTs; SGD and Lion picked by a short sweep on the tiny size (SGD at
# lr 0.5 diverged early, Lion at 3e-4 crawled). Lion wants a smaller step and more decay.
HYPERPARAMETERS = {
    "adamw": dict(lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1),
    "sgd": dict(lr=0.1, momentum=0.9, weight_decay=0.0),
    "lion": dict(lr=1.5e-3, betas=(0.9, 0.99), weight_decay=0.2),
}


@dataclass(frozen=True)
class RunSpec:
    """One training run: which optimizer, on which parameter dtype."""

    label: str
    optimizer: str  # adamw | sgd | lion
    library: str  # torch | slimoptim
    param_dtype: str  # float32 | bfloat16
    autocast: bool
    master_weight_bits: int | None = None
    state_bits: int | None = None
    gradient_release: bool = False


def _bits_label(bits: int | None) -> str:
    return "none" if bits is None else str(bits)


def plan_runs(args, autocast: bool) -> list[RunSpec]:
    baseline = "fp32 + bf16 autocast" if autocast else "fp32"
    runs = [RunSpec(f"torch AdamW {baseline}", "adamw", "torch", "float32", autocast)]
    if args.pure_bf16_baseline:
        runs.append(RunSpec("torch AdamW pure bf16", "adamw", "torch", "bfloat16", False))
    for name in args.optimizers:
        for master in args.master_weight_bits:
            for state in args.state_bits:
                master_bits = None if master == "none" else int(master)
                label = f"slimoptim {OPTIMIZER_CLASSES[name]} {master}/{state}"
                if args.gradient_release:
                    label += " +release"
                runs.append(
                    RunSpec(
                        label,
                        name,
                        "slimoptim",
                        "bfloat16",
                        False,
                        master_bits,
                        int(state),
                        args.gradient_release,
                    )
                )
    return runs


# ------------------------------------------------------------------ checks


def resolve_device(text: str) -> torch.device:
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise CommandError(f"unknown device {text!r}: use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise CommandError(
                f"--device {text}: CUDA is not available (torch {torch.__version__}, "
                f"{'a CPU-only build' if torch.version.cuda is None else 'no GPU visible'})."
            )
        index = device.index or 0
        if index >= torch.cuda.device_count():
            raise CommandError(
                f"--device {text}: only {torch.cuda.device_count()} CUDA device(s) visible."
            )
        return torch.device("cuda", index)
    if device.type == "mps" and torch.backends.mps.is_available():
        return device
    if device.type != "cpu":
        raise CommandError(f"--device {text}: this command runs on cpu or cuda.")
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


# ---------------------------------------------------------------- training


def lr_factor(step: int, steps: int) -> float:
    """Linear warm-up over the first 10% of steps, then cosine decay to 10%."""
    warmup = max(1, steps // 10)
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.1 + 0.45 * (1 + math.cos(math.pi * progress))


def build_optimizer(spec: RunSpec, model: torch.nn.Module) -> torch.optim.Optimizer:
    # Weight decay on matrices only, as GPT-2 training does.
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]
    hyper = HYPERPARAMETERS[spec.optimizer]
    if spec.library == "torch":
        fused = True if next(model.parameters()).is_cuda else None
        return torch.optim.AdamW(groups, **hyper, fused=fused)
    cls = getattr(slimoptim, OPTIMIZER_CLASSES[spec.optimizer])
    return cls(
        groups, **hyper, master_weight_bits=spec.master_weight_bits, state_bits=spec.state_bits
    )


@torch.no_grad()
def evaluate(model, windows: torch.Tensor, autocast: bool, device) -> float:
    model.eval()
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
        loss = model.loss(windows)
    model.train()
    return loss.item()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_run(
    spec: RunSpec, size: ModelSize, corpus: Corpus, steps: int, seed: int, device, progress: bool
) -> dict:
    from tqdm.auto import tqdm

    seed_everything(seed)
    model = ByteGPT(size)
    if spec.param_dtype == "bfloat16":
        slimoptim.cast_model(model)
    model.to(device)
    optimizer = build_optimizer(spec, model)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, steps))
    release = None
    if spec.gradient_release:
        # Global-norm clipping needs every gradient at once; release clips tensor by tensor.
        release = slimoptim.enable_gradient_release(
            model, optimizer, clip_grad_norm_per_tensor=GRAD_CLIP
        )

    batches = torch.Generator().manual_seed(seed)
    held_out = torch.Generator().manual_seed(VALIDATION_SEED)
    windows = random_windows(
        corpus.validation, EVAL_BATCHES * size.batch, size.context + 1, held_out
    ).to(device)
    eval_at = {round(i * steps / EVAL_POINTS) for i in range(1, EVAL_POINTS + 1)}
    validation = [(0, evaluate(model, windows, spec.autocast, device))]
    train_losses, report = [], None
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)

    train_seconds = 0.0
    bar = tqdm(range(1, steps + 1), desc=spec.label, disable=not progress, leave=True, ncols=90)
    for step in bar:
        tokens = random_windows(corpus.train, size.batch, size.context + 1, batches).to(device)
        _sync(device)
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=spec.autocast):
            loss = model.loss(tokens)
        loss.backward()
        if release is None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
            optimizer.step()
        else:
            with warnings.catch_warnings():
                # A no-op under release (backward stepped): called so the LR schedule
                # knows a step happened. Its "does nothing" warning is expected here.
                warnings.simplefilter("ignore")
                optimizer.step()
        if step == steps:
            report = slimoptim.memory_report(optimizer)  # with the gradients still held
        if release is None:
            optimizer.zero_grad(set_to_none=True)
        schedule.step()
        _sync(device)
        train_seconds += time.perf_counter() - start
        train_losses.append(loss.detach())
        if step in eval_at:
            validation.append((step, evaluate(model, windows, spec.autocast, device)))
            bar.set_postfix(val_loss=f"{validation[-1][1]:.3f}")
    bar.close()
    if release is not None:
        release.remove()

    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return {
        "label": spec.label,
        "spec": asdict(spec),
        "hyperparameters": HYPERPARAMETERS[spec.optimizer],
        "final_validation_loss": validation[-1][1],
        "validation_curve": validation,
        "train_loss": torch.stack(train_losses).float().tolist(),
        "train_seconds": train_seconds,
        "tokens_per_second": steps * size.batch * size.context / train_seconds,
        "memory_report": report,
        "peak_memory_bytes": peak,
    }


# ----------------------------------------------------------------- output


def results_table(results: list[dict], on_gpu: bool) -> str:
    memory = "peak MiB" if on_gpu else "held MiB"
    header = ["run", "val loss", "tokens/s", memory, "param", "grad", "master", "states", "scales"]
    header.append("total B/param")
    rows = []
    for r in results:
        per_param = r["memory_report"]["bytes_per_param"]
        held = r["peak_memory_bytes"] if on_gpu else r["memory_report"]["total_bytes"]
        scales = per_param["state_scales"] + per_param["step"]
        cells = [per_param[k] for k in ("params", "grads", "master_correction", "states")]
        rows.append(
            [
                r["label"],
                f"{r['final_validation_loss']:.3f}",
                f"{r['tokens_per_second']:,.0f}",
                f"{held / 2**20:.2f}",
                *(f"{c:.2f}" for c in cells),
                f"{scales:.2f}",
                f"{r['memory_report']['total_bytes_per_param']:.2f}",
            ]
        )
    return format_table(header, rows)


def comparison_lines(results: list[dict], on_gpu: bool) -> list[str]:
    base = results[0]
    key = "peak_memory_bytes" if on_gpu else None

    def held(r):
        return r[key] if key else r["memory_report"]["total_bytes"]

    lines = []
    for r in results[1:]:
        change = r["final_validation_loss"] / base["final_validation_loss"] - 1
        lines.append(
            f"{r['label']}: {held(r) / held(base):.2f}x the "
            f"{'peak memory' if on_gpu else 'memory held'} of the baseline, "
            f"validation loss {change:+.1%}"
        )
    return lines


def save_plot(results: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    for i, r in enumerate(results):
        color = f"C{i}"
        train = torch.tensor(r["train_loss"])
        # A running mean over 10 steps keeps the training curve readable.
        window = min(10, len(train))
        smooth = train.unfold(0, window, 1).mean(dim=1)
        ax.plot(range(window, len(train) + 1), smooth, color=color, alpha=0.35, lw=1)
        steps = [step for step, _ in r["validation_curve"]]
        losses = [loss for _, loss in r["validation_curve"]]
        ax.plot(steps, losses, color=color, marker="o", ms=3, lw=1.5, label=r["label"])
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats per byte)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(title="validation (dots), training (faint)", fontsize=8, title_fontsize=8)
    final = [r["final_validation_loss"] for r in results]
    ax.set_ylim(min(final) - 0.3, max(r["validation_curve"][0][1] for r in results) + 0.1)
    fig.tight_layout()
    with _io.atomic_open(path) as f:  # a half-written plot never replaces a good one
        fig.savefig(f, format=Path(path).suffix.lstrip(".") or "png")
    plt.close(fig)


def run_demo(args) -> dict:
    device = resolve_device(args.device)
    size = SIZES[args.size]
    steps = args.steps or DEFAULT_STEPS[args.size]
    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise CommandError(f"cannot create the output folder {out}: {error}") from None

    autocast = device.type == "cpu" or (device.type == "cuda" and torch.cuda.is_bf16_supported())
    runs = plan_runs(args, autocast)
    corpus = load_corpus()
    num_params = sum(p.numel() for p in ByteGPT(size).parameters())
    tokens = steps * size.batch * size.context
    print(
        f"slimoptim demo: byte-level GPT '{args.size}' ({num_params / 1e6:.2f}M params, "
        f"{size.layers} layers x {size.width} wide), {steps} steps of {size.batch}x"
        f"{size.context} bytes ({tokens / 1e6:.1f}M tokens) on {device}, seed {args.seed}"
    )
    print(
        f"data: {corpus.train_files} train / {corpus.validation_files} validation files "
        f"({corpus.train.numel() / 1e6:.1f} / {corpus.validation.numel() / 1e6:.1f} MB) "
        f"of the Python {platform.python_version()} standard library"
    )
    progress = sys.stderr.isatty()  # bars on a terminal; one line per run in logs
    results = []
    for spec in runs:
        results.append(train_run(spec, size, corpus, steps, args.seed, device, progress))
        if not progress:
            print(f"  {spec.label}: validation loss {results[-1]['final_validation_loss']:.3f}")

    on_gpu = device.type == "cuda"
    print()
    print(results_table(results, on_gpu))
    print(
        "Bytes per parameter held between steps (slimoptim.memory_report): param, grad, master-"
        "\nweight correction, optimizer states, scales (8-bit state scales + step counters)."
        + (" Peak MiB: torch.cuda.max_memory_allocated." if on_gpu else "")
    )
    for line in comparison_lines(results, on_gpu):
        print(line)

    summary = {
        "arguments": {k: v for k, v in vars(args).items() if k != "handler"},
        "size": args.size,
        "model": size.as_dict() | {"num_params": num_params},
        "steps": steps,
        "seed": args.seed,
        "device": str(device),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "data": corpus.describe(),
        "runs": results,
    }
    results_path = out / "results.json"
    _io.write_text(results_path, json.dumps(summary, indent=1) + "\n")  # atomic
    print(f"\nresults: {results_path}")
    if not args.no_plot:
        plot_path = out / "loss_curves.png"
        title = (
            f"byte-level GPT ({num_params / 1e6:.2f}M params) on the Python standard library, "
            f"{device.type}"
        )
        save_plot(results, plot_path, title)
        print(f"plot:    {plot_path}")
    return summary
