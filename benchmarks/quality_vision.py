"""Vision / SGD quality: a small CNN on scikit-learn's handwritten digits, fp32 vs slimoptim.

The data set is the UCI optical-recognition handwritten digits (1,797 grey 8x8 images,
10 classes) that ships inside the scikit-learn wheel (``sklearn.datasets.load_digits``
reads it from the installed package: no download). A fixed 80/20 split (seeded),
inputs standardised with the training split's mean and std.

Model: three 3x3 conv layers with BatchNorm and ReLU (16, 32, 32 channels), a 2x2 max
pool, global average pool and a linear classifier (14k params). Runs: SGD with momentum
0.9 (lr 0.05, wd 5e-4) and AdamW (lr 2e-3, wd 0.05), cosine schedule, batch 64, each as
fp32 torch.optim on an fp32 model (reference) against slimoptim 24/8 on a bf16 model
(BatchNorm kept in fp32 by slimoptim.cast_model), plus torch SGD on the bf16 model
without a master. Every run of a seed starts from the same weights and sees the same
batches.

    pip install scikit-learn && python benchmarks/quality_vision.py --threads 1
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]  # this checkout's slimoptim first

import quality_report  # noqa: E402

import slimoptim  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
HYPER = {
    "sgd": dict(lr=0.05, momentum=0.9, weight_decay=5e-4),
    "adamw": dict(lr=2e-3, betas=(0.9, 0.999), weight_decay=0.05),
}
# name: (label, optimizer, library, param dtype, role)
RUNS = {
    "sgd_fp32": ("torch SGD momentum, fp32", "sgd", "torch", "float32", "reference"),
    "sgd_24_8": ("slimoptim SGD 24/8, bf16 model", "sgd", "slimoptim", "bfloat16", "default"),
    "sgd_torch_bf16": ("torch SGD, bf16 params (no master)", "sgd", "torch", "bfloat16", "variant"),
    "adamw_fp32": ("torch AdamW, fp32", "adamw", "torch", "float32", "reference"),
    "adamw_24_8": ("slimoptim AdamW 24/8, bf16 model", "adamw", "slimoptim", "bfloat16", "default"),
}


def load_digits_split(seed: int = 0):
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise SystemExit("the vision study needs scikit-learn: pip install scikit-learn") from None
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1)
    labels = torch.tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    test, train = order[: len(order) // 5], order[len(order) // 5 :]
    mean, std = images[train].mean(), images[train].std()
    images = (images - mean) / std
    return (images[train], labels[train]), (images[test], labels[test])


class DigitsCNN(nn.Module):
    def __init__(self):
        super().__init__()

        def block(cin, cout):
            return [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU()]

        self.features = nn.Sequential(
            *block(1, 16), *block(16, 32), nn.MaxPool2d(2), *block(32, 32)
        )
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        return self.head(self.features(x).mean(dim=(2, 3)))


def build_optimizer(optimizer: str, library: str, model: nn.Module):
    params = model.parameters()
    if library == "torch":
        cls = torch.optim.SGD if optimizer == "sgd" else torch.optim.AdamW
        return cls(params, **HYPER[optimizer])
    cls = slimoptim.SGD if optimizer == "sgd" else slimoptim.AdamW
    return cls(params, **HYPER[optimizer])


@torch.no_grad()
def evaluate(model, images, labels, dtype) -> tuple[float, float]:
    model.eval()
    logits = model(images.to(dtype)).float()
    model.train()
    accuracy = (logits.argmax(1) == labels).float().mean().item()
    return F.cross_entropy(logits, labels).item(), accuracy


def train(name: str, seed: int, data, epochs: int, batch: int) -> dict:
    label, optimizer_name, library, dtype_name, role = RUNS[name]
    (x_train, y_train), (x_test, y_test) = data
    dtype = getattr(torch, dtype_name)
    torch.manual_seed(seed)
    model = DigitsCNN()
    if dtype == torch.bfloat16:
        slimoptim.cast_model(model)  # BatchNorm stays in fp32
    optimizer = build_optimizer(optimizer_name, library, model)
    steps_per_epoch = math.ceil(len(y_train) / batch)
    total = epochs * steps_per_epoch
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total))
    )
    batches = torch.Generator().manual_seed(seed)
    curve, start = [], time.perf_counter()
    for epoch in range(1, epochs + 1):
        order = torch.randperm(len(y_train), generator=batches)
        epoch_loss = 0.0
        for idx in order.split(batch):
            loss = F.cross_entropy(model(x_train[idx].to(dtype)).float(), y_train[idx])
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            schedule.step()
            epoch_loss += loss.item() * len(idx)
        test_loss, accuracy = evaluate(model, x_test, y_test, dtype)
        curve.append((epoch, epoch_loss / len(y_train), test_loss, accuracy))
    return {
        "name": name,
        "seed": seed,
        "run": {
            "label": label,
            "role": role,
            "family": optimizer_name,
            "library": library,
            "param_dtype": dtype_name,
        },  # fmt: skip
        "hyperparameters": HYPER[optimizer_name],
        "test_loss": curve[-1][2],
        "test_accuracy": curve[-1][3],
        "curve": curve,
        "seconds": time.perf_counter() - start,
    }


def report(summary: dict, md: Path, plot: Path | None) -> None:
    by_name: dict[str, list[dict]] = {}
    for r in summary["runs"]:
        by_name.setdefault(r["name"], []).append(r)
    lines = [
        "| run | role | seeds | test loss (mean ± std) | test accuracy (mean ± std) |",
        "|---|---|---|---|---|",
    ]
    for runs in by_name.values():
        loss = quality_report.mean_std([r["test_loss"] for r in runs])
        acc = quality_report.mean_std([r["test_accuracy"] for r in runs])
        lines.append(
            f"| {runs[0]['run']['label']} | {runs[0]['run']['role']} | {len(runs)} | "
            f"{loss[0]:.4f} ± {loss[1]:.4f} | {acc[0]:.2%} ± {acc[1]:.2%} |"
        )
    lines.append("")
    for family in ("sgd", "adamw"):
        ref = {r["seed"]: r["test_loss"] for r in by_name.get(f"{family}_fp32", [])}
        for name, runs in by_name.items():
            if name.startswith(family) and name != f"{family}_fp32" and ref:
                values = {r["seed"]: r["test_loss"] for r in runs}
                verdict = quality_report.compare(ref, values, False, "loss")
                lines.append(f"- {runs[0]['run']['label']}: test {verdict}.")
    md.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    if plot is None:
        return
    plt = quality_report._plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), dpi=110)
    for i, runs in enumerate(by_name.values()):
        for j, r in enumerate(runs):
            epochs = [c[0] for c in r["curve"]]
            label = r["run"]["label"] if j == 0 else None
            kwargs = dict(color=f"C{i}", lw=1, alpha=0.7, label=label)
            axes[0].plot(epochs, [c[1] for c in r["curve"]], **kwargs)
            axes[1].plot(epochs, [c[2] for c in r["curve"]], **kwargs)
    axes[0].set_title("training loss (one line per seed)", fontsize=9)
    axes[1].set_title("test loss", fontsize=9)
    for ax in axes:
        ax.set_yscale("log")
    quality_report.finish(fig, axes, "epoch", plot)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--only", help="runs, comma-separated: " + ",".join(RUNS))
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.add_argument("--out", type=Path, default=RESULTS / "quality_vision_digits_cpu.json")
    parser.add_argument("--plot", type=Path, default=quality_report.PLOTS / "vision_digits.png")
    parser.add_argument("--no-plot", action="store_true")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    names = args.only.split(",") if args.only else list(RUNS)
    if unknown := [n for n in names if n not in RUNS]:
        parser.error(f"--only: unknown runs {unknown}; choose from {', '.join(RUNS)}")
    seeds = [int(s) for s in args.seeds.split(",")]
    data = load_digits_split()
    runs = []
    for seed in seeds:
        for name in names:
            runs.append(train(name, seed, data, args.epochs, args.batch))
            r = runs[-1]
            print(
                f"  {name} seed {seed}: test loss {r['test_loss']:.4f}, "
                f"accuracy {r['test_accuracy']:.2%} ({r['seconds']:.1f} s)",
                flush=True,
            )
    import sklearn

    summary = {
        "data": {
            "name": "sklearn load_digits",
            "sklearn": sklearn.__version__,
            "train": len(data[0][1]),
            "test": len(data[1][1]),
        },  # fmt: skip
        "epochs": args.epochs,
        "batch": args.batch,
        "device": "cpu",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu_threads": torch.get_num_threads(),
        "runs": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=1) + "\n")
    report(summary, args.out.with_suffix(".md"), None if args.no_plot else args.plot)
    return summary


if __name__ == "__main__":
    main()
