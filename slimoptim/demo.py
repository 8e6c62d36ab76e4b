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
from .cli_common import OPTIMIZERS, CommandError, optimizer_class, require_cli_extra
from .demo_data import Corpus, load_corpus, random_windows
from .demo_model import SIZES, ByteGPT, ModelSize
from .demo_report import comparison_lines, results_table, save_plot

DEFAULT_STEPS = {"tiny": 40, "small": 300, "medium": 2000}
EVAL_POINTS = 12  # validation losses per run, besides the one at step 0
EVAL_BATCHES = 8
VALIDATION_SEED = 1234  # the validation windows do not change with --seed
GRAD_CLIP = 1.0


@dataclass(frozen=True)
class RunSpec:
    """One training run: which optimizer, on which parameter dtype."""

    label: str
    optimizer: str  # adamw | sgd | lion
    library: str  # torch | slimoptim
    param_dtype: str  # float32 | bfloat16
    autocast: bool  # bf16 autocast around a float32 model (the baseline on bf16 hardware)
    compute_dtype: str  # matmul dtype: bfloat16 | float32
    master_weight_bits: int | None = None
    state_bits: int | None = None
    gradient_release: bool = False


def plan_runs(args, compute_dtype: torch.dtype) -> list[RunSpec]:
    """The baseline, then one slimoptim run per optimizer and mode asked for."""
    autocast = compute_dtype == torch.bfloat16
    compute = str(compute_dtype).removeprefix("torch.")
    baseline = "fp32 + bf16 autocast" if autocast else "fp32"
    runs = [RunSpec(f"torch AdamW {baseline}", "adamw", "torch", "float32", autocast, compute)]
    if args.pure_bf16_baseline:
        runs.append(RunSpec("torch AdamW pure bf16", "adamw", "torch", "bfloat16", False, compute))
    for name in args.optimizers:
        for master in args.master_weight_bits:
            for state in args.state_bits:
                master_bits = None if master == "none" else int(master)
                label = f"slimoptim {OPTIMIZERS[name].class_name} {master}/{state}"
                if args.gradient_release:
                    label += " +release"
                runs.append(
                    RunSpec(
                        label,
                        name,
                        "slimoptim",
                        "bfloat16",
                        False,
                        compute,
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


def _median_seconds(fn, repeats: int = 7) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[repeats // 2]


def bf16_matmul_ratio(size: ModelSize) -> float:
    """Time of a bf16 matmul of the model's MLP shape over the float32 one, on this CPU.
    CPUs without bf16 instructions emulate it, several times slower than float32."""
    x = torch.randn(size.batch * size.context, size.width)
    w = torch.randn(4 * size.width, size.width)
    xb, wb = x.bfloat16(), w.bfloat16()
    torch.nn.functional.linear(x, w), torch.nn.functional.linear(xb, wb)  # warm up
    fp32 = _median_seconds(lambda: torch.nn.functional.linear(x, w))
    bf16 = _median_seconds(lambda: torch.nn.functional.linear(xb, wb))
    return bf16 / fp32


def choose_compute_dtype(
    requested: str, device: torch.device, size: ModelSize
) -> tuple[torch.dtype, str]:
    """The dtype every run's matmuls use, and why. bf16 where it is fast; elsewhere float32,
    for both runs, so that the demo finishes in minutes on any CPU (the slimoptim run keeps
    bf16 weights, gradients and states either way: only the arithmetic is float32)."""
    if requested != "auto":
        return getattr(torch, requested), "--compute-dtype"
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return torch.bfloat16, "this GPU supports bf16"
        return torch.float32, "this GPU has no bf16 support"
    if device.type != "cpu":
        return torch.float32, f"the default on {device.type}"
    ratio = bf16_matmul_ratio(size)
    if ratio < 1:
        return torch.bfloat16, f"a bf16 matmul took {ratio:.2f}x the float32 time on this CPU"
    return torch.float32, (
        f"a bf16 matmul took {ratio:.1f}x the float32 time on this CPU (no bf16 "
        "instructions), so both runs compute in float32"
    )


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
    hyper = OPTIMIZERS[spec.optimizer].demo_hyperparameters
    if spec.library == "torch":
        fused = True if next(model.parameters()).is_cuda else None
        return torch.optim.AdamW(groups, **hyper, fused=fused)
    return optimizer_class(spec.optimizer)(
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


class Progress:
    """A tqdm bar on a terminal (with the cli extra installed); elsewhere, as on a pipe or
    in a file, one flushed line per evaluation, so a log shows the run moving."""

    def __init__(self, label: str, steps: int, bar: bool):
        self.label, self.steps, self.start = label, steps, time.perf_counter()
        self.bar = None
        if bar:
            try:
                from tqdm.auto import tqdm
            except ImportError:
                pass  # lines instead
            else:
                self.bar = tqdm(total=steps, desc=label, leave=True, ncols=90)

    def step(self) -> None:
        if self.bar is not None:
            self.bar.update()

    def evaluated(self, step: int, loss: float, tokens_per_second: float) -> None:
        if self.bar is not None:
            self.bar.set_postfix(val_loss=f"{loss:.3f}")
            return
        elapsed = time.perf_counter() - self.start
        print(
            f"  {self.label}: step {step:>{len(str(self.steps))}}/{self.steps}  "
            f"validation loss {loss:.3f}  {tokens_per_second:,.0f} tokens/s  {elapsed:.0f} s",
            flush=True,
        )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def train_run(
    spec: RunSpec, size: ModelSize, corpus: Corpus, steps: int, seed: int, device, bar: bool
) -> dict:
    seed_everything(seed)
    # bf16 compute: bf16 weights compute in bf16, the float32 baseline under autocast (its
    # residual stream stays float32). float32 compute: every run's activations in float32.
    model = ByteGPT(size, compute_dtype=torch.float32 if spec.compute_dtype == "float32" else None)
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
    progress = Progress(spec.label, steps, bar)
    for step in range(1, steps + 1):
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
        progress.step()
        if step in eval_at:
            validation.append((step, evaluate(model, windows, spec.autocast, device)))
            speed = step * size.batch * size.context / train_seconds
            progress.evaluated(step, validation[-1][1], speed)
    progress.close()
    if release is not None:
        release.remove()

    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return {
        "label": spec.label,
        "spec": asdict(spec),
        "hyperparameters": OPTIMIZERS[spec.optimizer].demo_hyperparameters,
        "final_validation_loss": validation[-1][1],
        "validation_curve": validation,
        "train_loss": torch.stack(train_losses).float().tolist(),
        "train_seconds": train_seconds,
        "tokens_per_second": steps * size.batch * size.context / train_seconds,
        "memory_report": report,
        "peak_memory_bytes": peak,
    }


def run_demo(args) -> dict:
    started = time.perf_counter()
    device = resolve_device(args.device)
    size = SIZES[args.size]
    steps = args.steps or DEFAULT_STEPS[args.size]
    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise CommandError(f"cannot create the output folder {out}: {error}") from None
    if not args.no_plot:  # before minutes of training, not after
        require_cli_extra("matplotlib", "the plot", "pass --no-plot")

    compute_dtype, why = choose_compute_dtype(args.compute_dtype, device, size)
    runs = plan_runs(args, compute_dtype)
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
    print(f"compute: {str(compute_dtype).removeprefix('torch.')} matmuls: {why}", flush=True)
    bar = sys.stderr.isatty()  # bars on a terminal; a line per evaluation in logs
    results = [train_run(spec, size, corpus, steps, args.seed, device, bar) for spec in runs]

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
        "compute_dtype": str(compute_dtype).removeprefix("torch."),
        "compute_dtype_reason": why,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "data": corpus.describe(),
        "runs": results,
    }
    results_path = out / "results.json"
    if not args.no_plot:
        plot_path = out / "results.png"
        title = (
            f"byte-level GPT ({num_params / 1e6:.2f}M params) on the Python standard library, "
            f"{device.type}, {summary['compute_dtype']} matmuls"
        )
        save_plot(results, plot_path, title)
    summary["wall_seconds"] = time.perf_counter() - started
    _io.write_text(results_path, json.dumps(summary, indent=1) + "\n")  # atomic
    print(f"\nresults: {results_path}")
    if not args.no_plot:
        print(f"plot:    {plot_path}")
    print(f"wall time {summary['wall_seconds']:.0f} s")
    return summary
