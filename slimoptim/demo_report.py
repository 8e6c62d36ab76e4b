"""What ``slimoptim demo`` prints and draws: the results table and the two-panel figure."""

from __future__ import annotations

from pathlib import Path

import torch

from . import _io
from .cli_common import format_table

# One hue and marker per run (validation: markers; training: a thin line of the same hue).
# Later runs get hollow markers and dashes, so curves that coincide stay visible.
RUN_COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2")
RUN_MARKERS = ("o", "s", "^", "D", "v", "P", "X")
# memory_report component -> (legend label, colour) for the bytes/param panel
COMPONENTS = {
    "params": ("parameters", "#4c4c4c"),
    "grads": ("gradients", "#9a9a9a"),
    "master_correction": ("master correction", "#e0a800"),
    "states": ("optimizer states", "#3a7dc9"),
    "scales": ("scales + step", "#a6cee3"),
}


def _bytes_per_param(result: dict) -> dict[str, float]:
    per_param = result["memory_report"]["bytes_per_param"]
    out = {k: per_param[k] for k in ("params", "grads", "master_correction", "states")}
    out["scales"] = per_param["state_scales"] + per_param["step"]
    return out


def results_table(results: list[dict], on_gpu: bool) -> str:
    memory = "peak MiB" if on_gpu else "held MiB"
    header = ["run", "val loss", "tokens/s", memory, "param", "grad", "master", "states", "scales"]
    header.append("total B/param")
    rows = []
    for r in results:
        held = r["peak_memory_bytes"] if on_gpu else r["memory_report"]["total_bytes"]
        rows.append(
            [
                r["label"],
                f"{r['final_validation_loss']:.3f}",
                f"{r['tokens_per_second']:,.0f}",
                f"{held / 2**20:.2f}",
                *(f"{c:.2f}" for c in _bytes_per_param(r).values()),
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


def _smoothed(losses: list[float]) -> tuple[range, torch.Tensor]:
    """A running mean over 10 steps keeps the training curve readable."""
    train = torch.tensor(losses)
    window = min(10, len(train))
    return range(window, len(train) + 1), train.unfold(0, window, 1).mean(dim=1)


def _draw_losses(ax, results: list[dict], zoom: bool) -> None:
    for i, r in enumerate(results):
        colour = RUN_COLOURS[i % len(RUN_COLOURS)]
        steps, smooth = _smoothed(r["train_loss"])
        ax.plot(steps, smooth, color=colour, alpha=0.5, lw=0.8)
        val_steps = [step for step, _ in r["validation_curve"]]
        val = [loss for _, loss in r["validation_curve"]]
        style = dict(ls="-", ms=4) if i == 0 else dict(ls="--", ms=7, mfc="none", mew=1.3)
        marker = RUN_MARKERS[i % len(RUN_MARKERS)]
        ax.plot(val_steps, val, color=colour, marker=marker, lw=1.4, label=r["label"], **style)
    if zoom:
        # The second half of training, where a difference between the runs would show.
        last = max(step for step, _ in results[0]["validation_curve"])
        late = [loss for r in results for step, loss in r["validation_curve"] if step >= last / 2]
        pad = max(0.02, 0.15 * (max(late) - min(late)))
        ax.set_xlim(last / 2, last * 1.02)
        ax.set_ylim(min(late) - pad, max(late) + pad)


def _draw_memory(ax, results: list[dict]) -> None:
    labels = [r["label"] for r in results]
    left = [0.0] * len(results)
    for key, (name, colour) in COMPONENTS.items():
        widths = [_bytes_per_param(r)[key] for r in results]
        ax.barh(labels, widths, left=left, color=colour, label=name, height=0.55)
        left = [a + b for a, b in zip(left, widths, strict=True)]
    for y, total in enumerate(left):
        ax.text(total + 0.2, y, f"{total:.2f}", va="center", fontsize=9)
    ax.invert_yaxis()
    ax.set_xlim(0, max(left) * 1.18)
    ax.set_xlabel("bytes per parameter held between steps")
    ax.tick_params(axis="y", labelsize=8)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.45, -0.2), ncol=3, frameon=False)
    ax.grid(axis="x", alpha=0.3)


def save_plot(results: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (loss_ax, memory_ax) = plt.subplots(
        1, 2, figsize=(11, 4.6), dpi=120, gridspec_kw={"width_ratios": [1.25, 1]}
    )
    _draw_losses(loss_ax, results, zoom=False)
    loss_ax.set_xlabel("step")
    loss_ax.set_ylabel("loss (nats per byte)")
    loss_ax.grid(alpha=0.3)
    loss_ax.legend(
        title="validation (markers), training (thin lines, 10-step mean)",
        fontsize=8,
        title_fontsize=8,
        loc="upper center",
        bbox_to_anchor=(0.5, -0.2),
        ncol=2,
        frameon=False,
    )
    inset = loss_ax.inset_axes([0.45, 0.45, 0.52, 0.5])
    _draw_losses(inset, results, zoom=True)
    inset.set_title("second half, zoomed", fontsize=8)
    inset.tick_params(labelsize=7)
    inset.grid(alpha=0.3)
    loss_ax.indicate_inset_zoom(inset, edgecolor="0.5")
    _draw_memory(memory_ax, results)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    with _io.atomic_open(path) as f:  # a half-written plot never replaces a good one
        fig.savefig(f, format=Path(path).suffix.lstrip(".") or "png")
    plt.close(fig)
