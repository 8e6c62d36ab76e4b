"""``slimoptim plan``: memory of the training state, per component, before training.

The figures are computed tensor by tensor from the layout slimoptim really
allocates (``SlimOptimizer._expected_state``, the function that creates the
states on the first step), so they match ``slimoptim.memory_report`` after a
step to the byte, partial scale groups and step counters included. A bare
parameter count is planned as one tensor of that size. Frozen parameters hold
their weights only; they count in the weights, the totals and the verdict.
"""

from __future__ import annotations

import json
import math
import textwrap
from dataclasses import asdict, dataclass
from typing import NamedTuple

import torch
from torch import nn

from .cli_common import PLAN_OPTIMIZERS, CommandError, format_table, optimizer_class
from .memory import _component  # state name -> memory_report component
from .plan_models import (  # noqa: F401 (re-exported: the plan's inputs)
    ModelTensors,
    load_tensors,
    parse_count,
    parse_memory,
    tensors_from_count,
    tensors_from_module,
)

# memory_report's components, then the weights of frozen parameters
COMPONENTS = ("params", "master_correction", "grads", "states", "state_scales", "step")
FROZEN = "frozen_weights"
STEP_BYTES = 4  # torch.optim and slimoptim keep a float32 step counter per tensor
RELEASE_BUCKET_BYTES = 32 * 2**20  # enable_gradient_release's default bucket_bytes
DEFAULT_MODES = ((24, 8), (None, 8))  # (master weight bits, state bits) shown by default
ALL_MODES = tuple((m, s) for m in (24, 32, None) for s in (8, 32))


# ------------------------------------------------------------ the formulas


@dataclass(frozen=True)
class Setup:
    """A way to train: torch AdamW (fp32 or pure bf16) or a slimoptim optimizer and mode."""

    label: str
    library: str  # torch | slimoptim
    optimizer: str  # a key of cli_common.PLAN_OPTIMIZERS
    pure_bf16: bool = False  # torch only: bf16 params and states, no master weights
    master_weight_bits: int | None = 24
    state_bits: int = 8
    gradient_release: bool = False


def all_setups(optimizers=tuple(PLAN_OPTIMIZERS), modes=ALL_MODES) -> list[Setup]:
    setups = [
        Setup("torch AdamW, fp32", "torch", "adamw"),
        Setup("torch AdamW, pure bf16", "torch", "adamw", pure_bf16=True),
    ]
    for name in optimizers:
        for master, state in modes:
            label = (
                f"{PLAN_OPTIMIZERS[name].class_name} {'none' if master is None else master}/{state}"
            )
            for release in (False, True):
                setups.append(
                    Setup(
                        label + (" +release" if release else ""),
                        "slimoptim",
                        name,
                        master_weight_bits=master,
                        state_bits=state,
                        gradient_release=release,
                    )
                )
    return setups


class Part(NamedTuple):
    """The tensors one optimizer of a setup trains."""

    optimizer: str  # a key of cli_common.PLAN_OPTIMIZERS
    tensors: list[tuple[tuple[int, ...], torch.dtype]]  # (shape, dtype)
    sharded: bool  # FSDP shards it over the GPUs; Muon's matrices stay whole


MUON_NEEDS_SHAPES = (
    "Muon is not planned for a bare parameter count: which tensors are hidden matrices "
    "(Muon) and which go to AdamW (embeddings, head, norms, biases) depends on the model's "
    "shapes. Give them with --module, --hf-config or a model name."
)
MUON_RELEASE_SHARDED = (
    "Muon +release is not planned with --world-size > 1: Muon's matrices are not sharded "
    "(data parallel), and gradient release would step them before their gradients are "
    "all-reduced."
)
MUON_TWO_BUCKETS = (
    "Muon +release: Muon and AdamW each release their gradients in their own bucket (two "
    "buckets at most)."
)
MUON_WHOLE = (
    "Muon's matrices are not sharded (Newton-Schulz needs whole matrices): each GPU holds "
    "them, their gradients and states whole; the AdamW part is sharded."
)


def unplanned(setup: Setup, model: ModelTensors, world_size: int = 1) -> str | None:
    """Why ``setup`` gets no row for ``model``, or None when it does."""
    if setup.library != "slimoptim" or setup.optimizer != "muon":
        return None
    if not model.shapes_known:
        return MUON_NEEDS_SHAPES
    if setup.gradient_release and world_size > 1:
        return MUON_RELEASE_SHARDED
    return None


def _setup_notes(setup: Setup, world_size: int) -> list[str]:
    """What the footer says about a planned setup's row."""
    if setup.library != "slimoptim" or setup.optimizer != "muon":
        return []
    notes = [MUON_WHOLE] if world_size > 1 else []
    return notes + ([MUON_TWO_BUCKETS] if setup.gradient_release else [])


def setup_parts(setup: Setup, model: ModelTensors) -> list[Part]:
    """What each optimizer of ``setup`` trains: one optimizer for every tensor, or Muon on
    the hidden matrices and AdamW on the rest (slimoptim.muon_param_groups' split)."""
    if setup.library == "torch":
        tensors = model.fp32 if not setup.pure_bf16 else model.slim
        return [Part("adamw", [((n,), d) for n, d in tensors], True)]
    if setup.optimizer != "muon":
        return [Part(setup.optimizer, [((n,), d) for n, d in model.slim], True)]
    if not model.shapes_known:
        raise CommandError(MUON_NEEDS_SHAPES)
    split = {True: [], False: []}
    for shape, (_, dtype), hidden in zip(model.shapes, model.slim, model.muon, strict=True):
        split[hidden].append((shape, dtype))
    parts = [Part("muon", split[True], False), Part("adamw", split[False], True)]
    return [part for part in parts if part.tensors]


def _slim_state_bytes(setup: Setup, part: Part, group_size: int) -> dict[str, int]:
    """Bytes per component of slimoptim's states, from the optimizer's own layout."""
    params = [nn.Parameter(torch.empty(s, dtype=d, device="meta")) for s, d in part.tensors]
    optimizer = optimizer_class(part.optimizer)(
        params,
        master_weight_bits=setup.master_weight_bits,
        state_bits=setup.state_bits,
        group_size=group_size,
        **PLAN_OPTIMIZERS[part.optimizer].plan_arguments,
    )
    group = optimizer.param_groups[0]
    out = dict.fromkeys(COMPONENTS, 0)
    for p in params:
        for name, (dtype, shape) in optimizer._expected_state(p, group).items():
            out[_component(name)] += math.prod(shape) * dtype.itemsize
    return out


def _part_bytes(setup: Setup, part: Part, group_size: int, world_size: int, shapes_known: bool):
    """Bytes per memory_report component of one part on one GPU."""
    if setup.library == "torch":
        # torch.optim.AdamW: exp_avg and exp_avg_sq in the parameter's dtype, one step counter.
        out = dict.fromkeys(COMPONENTS, 0)
        out["states"] = sum(2 * math.prod(s) * d.itemsize for s, d in part.tensors)
        out["step"] = STEP_BYTES * len(part.tensors)
    else:
        out = _slim_state_bytes(setup, part, group_size)
    grad_bytes = [math.prod(s) * d.itemsize for s, d in part.tensors]
    out["params"] = out["grads"] = sum(grad_bytes)
    shards = world_size if part.sharded else 1
    out = {k: v / shards for k, v in out.items()} if shards > 1 else out
    if setup.gradient_release:
        # Gradients are stepped and freed in buckets of RELEASE_BUCKET_BYTES as they arrive:
        # at most one bucket per optimizer is held, and it can overshoot by its last tensor.
        largest = max(grad_bytes) / shards if shapes_known else 0
        out["grads"] = min(out["grads"], RELEASE_BUCKET_BYTES + largest)
    return out


def setup_bytes(
    setup: Setup, model: ModelTensors, group_size: int = 32, world_size: int = 1
) -> dict[str, float]:
    """Bytes per memory_report component on one GPU, plus the frozen weights; FSDP over
    ``world_size`` GPUs shards everything evenly, except that each GPU holds its own
    gradient-release bucket and Muon's matrices whole."""
    out = dict.fromkeys(COMPONENTS, 0)
    for part in setup_parts(setup, model):
        for key, value in _part_bytes(
            setup, part, group_size, world_size, model.shapes_known
        ).items():
            out[key] += value
    # Frozen weights are stored like the rest of the model: fp32, or as cast_model casts.
    fp32_model = setup.library == "torch" and not setup.pure_bf16
    frozen = model.frozen_fp32 if fp32_model else model.frozen_slim
    out[FROZEN] = sum(n * d.itemsize for n, d in frozen) / world_size
    return out


def build_plan(
    model: ModelTensors,
    setups: list[Setup],
    world_size: int = 1,
    gpu_memory: int | None = None,
    group_size: int = 32,
) -> dict:
    all_params = model.num_params + model.frozen_params
    rows, notes = [], []
    for setup in setups:
        reason = unplanned(setup, model, world_size)
        for note in [reason] if reason else _setup_notes(setup, world_size):
            notes += [note] if note not in notes else []
        if reason:
            continue
        per_gpu = setup_bytes(setup, model, group_size, world_size)
        total = sum(per_gpu.values())  # frozen weights included: they take memory too
        rows.append(
            {
                "setup": asdict(setup),
                "bytes": per_gpu,
                "total_bytes": total,
                "bytes_per_param": total * world_size / all_params,
                "fits": None if gpu_memory is None else total <= gpu_memory,
            }
        )
    return {
        "source": model.source,
        "num_params": all_params,
        "trainable_params": model.num_params,
        "frozen_params": model.frozen_params,
        "num_tensors": len(model.fp32) + len(model.frozen_fp32) if model.shapes_known else None,
        "world_size": world_size,
        "gpu_memory_bytes": gpu_memory,
        "group_size": group_size,
        "per_gpu": True,
        "excludes": "activations, temporary buffers, the CUDA context and allocator slack",
        "notes": notes,  # setups left out, and why; how Muon is laid out over GPUs
        "setups": rows,
    }


# ---------------------------------------------------------------- output


def _unit(nbytes: float) -> tuple[str, float]:
    for name, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if nbytes >= size:
            return name, size
    return "B", 1


def _table_row(row: dict, size: float) -> list[str]:
    """weights (frozen included), master, grads, states (with their scales and step
    counters), total and B/param of one setup."""
    b = row["bytes"]
    cells = [b["params"] + b[FROZEN], b["master_correction"], b["grads"]]
    cells += [b["states"] + b["state_scales"] + b["step"], row["total_bytes"]]
    return [*(f"{c / size:.2f}" for c in cells), f"{row['bytes_per_param']:.2f}"]


def _header_lines(plan: dict, unit: str, size: float) -> list[str]:
    tensors = f" in {plan['num_tensors']:,} tensors" if plan["num_tensors"] else ""
    lines = [f"Training state of {plan['source']}, per GPU, in {unit} ({size:.0e} bytes):"]
    if plan["frozen_params"]:
        lines += [
            f"{plan['num_params']:,} parameters{tensors}: {plan['trainable_params']:,} "
            f"trainable, {plan['frozen_params']:,} frozen.",
            "Frozen parameters hold their weights only (fp32 in the torch fp32 row, else as "
            "cast_model\ncasts them): counted in weights, total and fits; no master, grads "
            "or states.",
        ]
    else:
        lines.append(f"{plan['num_params']:,} parameters{tensors}, all trainable.")
    return lines


def _footer_lines(plan: dict) -> list[str]:
    lines = [
        "24/8 = master weight bits / state bits ('none': the bf16 weights only); master = the",
        "master-weight correction; states include their 8-bit scales and step counters;",
        "B/param = total / all parameters; +release = total with gradient release",
        "(slimoptim.enable_gradient_release), which holds one 32 MiB bucket of gradients at",
    ]
    if plan["num_tensors"] is None:
        lines.append(
            "most, plus its last tensor (unknown for a bare count: use --module or --hf-config)."
        )
    else:
        lines.append("most, plus its last tensor (the largest).")
    if plan["gpu_memory_bytes"] is not None:
        lines.append("fits? = without / with gradient release.")
    lines.append("Not included: activations, temporary buffers, the CUDA context, allocator slack.")
    if plan["world_size"] > 1:
        lines.append(
            f"FSDP full sharding over {plan['world_size']} GPUs: every figure is the whole "
            f"model's / {plan['world_size']}\n(each GPU holds its own release bucket); B/param "
            "is per parameter of the whole model."
        )
    for note in plan["notes"]:
        lines += textwrap.wrap(note, 92)
    lines.append("--all-modes lists every mode; --json gives every component in bytes.")
    return lines


def format_plan(plan: dict, gpu_text: str | None = None) -> str:
    """One row per setup; the gradient-release variant of a slimoptim mode goes on its row.
    Fits in 100 columns."""
    unit, size = _unit(max(r["total_bytes"] for r in plan["setups"]))
    gpu = plan["gpu_memory_bytes"]
    release_of = {
        r["setup"]["label"].removesuffix(" +release"): r
        for r in plan["setups"]
        if r["setup"]["gradient_release"]
    }
    header = ["setup", "weights", "master", "grads", "states", "total", "B/param", "+release"]
    if gpu is not None:
        header.append(f"fits {gpu_text or f'{gpu / size:g} {unit}'}?")

    def fits(row) -> str:
        return "-" if row is None else ("yes" if row["fits"] else "no")

    rows, section = [], None
    for row in plan["setups"]:
        setup = row["setup"]
        if setup["gradient_release"]:
            continue
        if setup["library"] == "slimoptim" and section != setup["optimizer"]:
            section = setup["optimizer"]
            entry = PLAN_OPTIMIZERS[section]
            rows.append(entry.plan_heading or f"slimoptim {entry.class_name}, bf16 weights:")
        indent = "  " if setup["library"] == "slimoptim" else ""
        released = release_of.get(setup["label"])
        line = [indent + setup["label"], *_table_row(row, size)]
        line.append("-" if released is None else f"{released['total_bytes'] / size:.2f}")
        if gpu is not None:
            line.append(f"{fits(row)} / {fits(released)}")
        rows.append(line)
    table = format_table(header, rows)
    return "\n".join([*_header_lines(plan, unit, size), "", table, "", *_footer_lines(plan)])


def run_plan(args) -> dict:
    gpu_memory = parse_memory(args.gpu_memory) if args.gpu_memory else None
    model = load_tensors(args)
    if args.optimizers is None:  # the default: every optimizer the plan can show here
        optimizers = list(PLAN_OPTIMIZERS)
    elif "muon" in args.optimizers and not model.shapes_known:
        raise CommandError(f"--optimizers muon: {MUON_NEEDS_SHAPES}")
    else:
        optimizers = args.optimizers
    setups = all_setups(optimizers, ALL_MODES if args.all_modes else DEFAULT_MODES)
    plan = build_plan(model, setups, args.world_size, gpu_memory, args.group_size)
    print(json.dumps(plan, indent=1) if args.json else format_plan(plan, args.gpu_memory))
    return plan
