"""Tables and plots of a quality-study results file (benchmarks/quality.py writes it).

    python benchmarks/quality_report.py benchmarks/results/quality_small_cuda.json

Writes <results>.md next to the JSON and PNG plots to docs/quality/.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality_runs as Q  # noqa: E402

PLOTS = Path(__file__).resolve().parent.parent / "docs" / "quality"
TARGET_RELATIVE = 0.005  # the 0.5%
CODE_FORMATS = ("slimoptim", "slimoptim_nearest", "linear", "flashoptim")
FAMILY_TITLES = {
    "adamw": "AdamW pre-training",
    "lion": "Lion pre-training",
    "sgd": "SGD (Nesterov) pre-training",
    "ft": "Fine-tuning at lr 1e-5 from the pre-trained fp32 reference",
}


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _metric(run: dict) -> float:
    """Final validation loss for pre-training; loss improvement for fine-tuning."""
    return run["improvement"] if run["run"]["family"] == "ft" else run["final_validation_loss"]


def by_name(results: dict) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for run in sorted(results["runs"], key=lambda r: r["seed"]):
        out.setdefault(run["name"], []).append(run)
    return out


def compare(reference: dict, other: dict, finetune: bool, what: str = "val loss") -> str:
    """Verdict of ``other`` against ``reference`` ({seed: value}): relative gap, seed noise
    (unpaired, and paired over the seeds both ran: same init, same batches), 0.5% target.

    For fine-tuning the values are loss improvements (higher is better), else losses."""
    ref_mean, ref_std = mean_std(list(reference.values()))
    mean, std = mean_std(list(other.values()))
    gap = mean - ref_mean
    if finetune:
        relative = mean / ref_mean - 1 if ref_mean else float("nan")
        text = f"improvement {relative:+.1%} against fp32's"
    else:
        relative = gap / ref_mean
        text = f"{what} {relative:+.2%}"
    noise = (ref_std**2 / len(reference) + std**2 / len(other)) ** 0.5
    if len(reference) > 1 and len(other) > 1:
        within = "within" if abs(gap) <= 2 * noise else "outside"
        noise_text = f"{within} seed noise (|gap| {abs(gap):.4f} vs 2 s.e. {2 * noise:.4f})"
    else:
        noise_text = "seed noise unknown (one seed)"
    shared = sorted(set(reference) & set(other))
    if len(shared) > 1:
        paired_mean, paired_std = mean_std([other[s] - reference[s] for s in shared])
        noise_text += f"; paired gap {paired_mean:+.4f} ± {paired_std:.4f} (n={len(shared)})"
    worse = -relative if finetune else relative
    if abs(relative) <= TARGET_RELATIVE:
        target = "within the 0.5% target"
    elif worse > 0:
        target = "**misses** the 0.5% target"
    else:
        target = "better than the reference by more than 0.5%"
    return f"{text}; {noise_text}; {target}"


def family_table(family: str, runs: dict[str, list[dict]]) -> list[str]:
    names = [r.name for r in Q.RUNS if r.family == family and r.name in runs]
    if not names:
        return []
    finetune = family == "ft"
    metric = "loss improvement" if finetune else "final val loss"
    lines = [
        f"### {FAMILY_TITLES[family]}",
        "",
        f"| run | role | seeds | {metric} (mean ± std) | per seed | ms/step |",
        "|---|---|---|---|---|---|",
    ]
    reference = next((n for n in names if runs[n][0]["run"]["role"] == "reference"), None)
    for name in names:
        values = [_metric(r) for r in runs[name]]
        mean, std = mean_std(values)
        per_seed = " / ".join(f"{v:.4f}" for v in values)
        ms = statistics.fmean(r["seconds_per_step"] for r in runs[name]) * 1e3
        seeds = ",".join(str(r["seed"]) for r in runs[name])
        label, role = runs[name][0]["run"]["label"], runs[name][0]["run"]["role"]
        lines.append(
            f"| {label} | {role} | {seeds} | {mean:.4f} ± {std:.4f} | {per_seed} | {ms:.1f} |"
        )
    lines.append("")
    if reference:
        ref_values = {r["seed"]: _metric(r) for r in runs[reference]}
        for name in names:
            if name != reference:
                values = {r["seed"]: _metric(r) for r in runs[name]}
                verdict = compare(ref_values, values, finetune)
                lines.append(f"- {runs[name][0]['run']['label']}: {verdict}.")
        lines.append("")
    return lines


def code_table(codes: list[dict]) -> list[str]:
    lines = [
        "| step | format | m err | m median rel. | v err | v median rel. | update err "
        "| update err, v only | max abs(u)/lr, all (fp32) | heavy groups (fp32) "
        "| v=0 while m≠0 |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    picks = sorted({0, len(codes) // 2, len(codes) - 1})
    for i in picks:
        c, fp32 = codes[i], codes[i]["fp32"]
        for name in CODE_FORMATS:
            f = c.get(name)
            if f is None:
                continue
            lines.append(
                f"| {c['step']} | {name} | {f['momentum_error']:.4f} | "
                f"{f.get('momentum_median_relative_error', float('nan')):.4f} | "
                f"{f['variance_error']:.4f} | "
                f"{f.get('variance_median_relative_error', float('nan')):.4f} | "
                f"{f['update_error']:.4f} | "
                f"{f.get('update_error_v_only', float('nan')):.4f} | "
                f"{f['max_update_over_lr']:.3g} "
                f"({fp32['max_update_over_lr']:.3g}) | {f['max_update_over_lr_heavy']:.3g} "
                f"({fp32['max_update_over_lr_heavy']:.3g}) | {f['zero_v_nonzero_m']:,} |"
            )
    heavy = statistics.fmean(c["heavy_group_fraction"] for c in codes)
    lines += [
        "",
        f"err = ‖decoded − fp32‖ / ‖fp32‖ over all {codes[-1]['elements']:,} elements (set by "
        "the large elements); median rel. = median of |decoded − fp32| / |fp32| over the "
        "non-zero elements (set by the typical ones); update err: the same norm ratio for "
        "the AdamW update m̂/(√v̂+ε); v only: the update from the exact m and the decoded "
        f"v (the variance code's share). {heavy:.2%} of elements (mean over measurements) sit "
        "in heavy-tailed groups (max v / min v > 1e4 within 32 values).",
        "",
    ]
    return lines


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_family(family: str, runs: dict[str, list[dict]], path: Path, title: str) -> bool:
    names = [r.name for r in Q.RUNS if r.family == family and r.name in runs]
    if not names:
        return False
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), dpi=110)
    for i, name in enumerate(names):
        for j, run in enumerate(runs[name]):
            steps = [s for s, _ in run["validation_curve"]]
            losses = [v for _, v in run["validation_curve"]]
            label = run["run"]["label"] if j == 0 else None
            for ax in axes:
                ax.plot(steps, losses, color=f"C{i}", lw=1.2, alpha=0.8, marker=".", label=label)
    last = max(s for r in runs[names[0]] for s, _ in r["validation_curve"])
    tail = [v for n in names for r in runs[n] for s, v in r["validation_curve"] if s >= last / 2]
    axes[1].set_xlim(last / 2, last * 1.02)
    pad = (max(tail) - min(tail)) * 0.1 + 1e-4
    axes[1].set_ylim(min(tail) - pad, max(tail) + pad)
    axes[0].set_title(title, fontsize=9)
    axes[1].set_title("second half (zoom); one line per seed", fontsize=9)
    axes[0].set_ylabel("validation loss (nats/byte)")
    finish(fig, axes, "step", path)
    return True


def finish(fig, axes, xlabel: str, path: Path) -> None:
    """Label, grid, legend (first axes), save and close a figure of loss curves."""
    for ax in axes:
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    _plt().close(fig)


def plot_codes(codes: list[dict], path: Path, title: str) -> None:
    plt = _plt()
    keys = [
        ("momentum_error", "momentum: normalised error"),
        ("momentum_median_relative_error", "momentum: median relative error"),
        ("variance_error", "variance: normalised error"),
        ("variance_median_relative_error", "variance: median relative error"),
        ("update_error", "AdamW update: normalised error"),
        ("max_update_over_lr", "max |update|/lr"),
    ]
    fig, axes = plt.subplots(2, 3, figsize=(13, 6.4), dpi=110)
    axes = axes.reshape(-1)
    steps = [c["step"] for c in codes]
    for ax, (key, name) in zip(axes, keys, strict=True):
        for i, fmt in enumerate(f for f in CODE_FORMATS if f in codes[0]):
            ax.plot(
                steps,
                [max(c[fmt].get(key, float("nan")), 1e-12) for c in codes],
                f"C{i}",
                marker=".",
                label=fmt,
            )
        if key.startswith("max_"):
            ax.plot(steps, [c["fp32"][key] for c in codes], "k--", label="fp32 states")
            ax.legend(fontsize=7)
        ax.set_yscale("log")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_report(results_path: Path, plots: Path = PLOTS) -> list[Path]:
    results = json.loads(Path(results_path).read_text())
    settings, env = results["settings"], results.get("environment", {})
    runs = by_name(results)
    tag = Path(results_path).stem
    model = settings["model"]
    lines = [
        f"# Quality study: {tag}",
        "",
        f"ByteGPT {model['layers']}x{model['width']} ({model['num_params'] / 1e6:.1f}M params), "
        f"{settings['steps']} steps of {model['batch']}x{model['context']} bytes, fine-tuning "
        f"{settings['finetune_steps']} steps; {settings['eval_windows']} fixed validation "
        f"windows; {env.get('device_name')} ({settings['device_type']}), torch "
        f"{env.get('torch')}, triton {env.get('triton')}, commit {env.get('commit')}"
        + (" (uncommitted changes)" if env.get("commit_dirty") else "")
        + f", {env.get('date')}.",
        "",
    ]
    written = []
    plots.mkdir(parents=True, exist_ok=True)
    for family in Q.FAMILIES:
        lines += family_table(family, runs)
        path = plots / f"{tag}_{family}.png"
        if plot_family(family, runs, path, f"{FAMILY_TITLES[family]} ({tag})"):
            written.append(path)
    probe = next((r for n in runs for r in runs[n] if r.get("state_codes")), None)
    if probe:
        codes = probe["state_codes"]
        studies = [("", "coded from the fp32 reference's AdamW states", codes)]
        for i, carried in enumerate(codes[0].get("carried", [])):
            what = f"carried step by step on the reference's gradients, {carried['betas']}"
            studies.append((f"_carried{i}", what, [c["carried"][i] for c in codes]))
        for suffix, what, series in studies:
            lines += [f"### 8-bit codes {what}", ""] + code_table(series)
            path = plots / f"{tag}_state_codes{suffix}.png"
            plot_codes(series, path, f"8-bit codes {what} ({tag})")
            written.append(path)
    md = Path(results_path).with_suffix(".md")
    md.write_text("\n".join(lines) + "\n")
    return [md, *written]


if __name__ == "__main__":
    for arg in sys.argv[1:]:
        for written_path in write_report(Path(arg)):
            print(written_path)
