"""``slimoptim plan``: memory of the training state, per component, before training.

The figures are computed tensor by tensor from the layout slimoptim really
allocates (``SlimOptimizer._expected_state``, the function that creates the
states on the first step), so they match ``slimoptim.memory_report`` after a
step to the byte, partial scale groups and step counters included. A bare
parameter count is planned as one tensor of that size.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import re
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

import slimoptim

from .cli import OPTIMIZER_CLASSES, CommandError, format_table
from .memory import _component  # state name -> memory_report component
from .model import cast_model

COMPONENTS = ("params", "master_correction", "grads", "states", "state_scales", "step")
STEP_BYTES = 4  # torch.optim and slimoptim keep a float32 step counter per tensor
RELEASE_BUCKET_BYTES = 32 * 2**20  # enable_gradient_release's default bucket_bytes

_COUNT_SUFFIX = {"": 1, "k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9, "t": 1e12}
_MEMORY_UNIT = {
    "": 1,
    "b": 1,
    "kb": 1e3,
    "mb": 1e6,
    "gb": 1e9,
    "tb": 1e12,
    "k": 1e3,
    "m": 1e6,
    "g": 1e9,
    "t": 1e12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
_NUMBER = r"(\d+(?:\.\d*)?(?:e[+-]?\d+)?)"


def parse_count(text: str) -> int | None:
    """'7e9', '1.1B', '350M', '7,000,000' -> int; None when ``text`` is not a count."""
    match = re.fullmatch(_NUMBER + r"\s*([kmbgt]?)", text.strip().lower().replace(",", ""))
    if not match:
        return None
    count = round(float(match.group(1)) * _COUNT_SUFFIX[match.group(2)])
    return count if count >= 1 else None


def parse_memory(text: str) -> int:
    """'80GB' (80e9 bytes), '24GiB' (24 * 2**30), '80e9' -> bytes."""
    match = re.fullmatch(_NUMBER + r"\s*([a-z]*)", text.strip().lower())
    if not match or match.group(2) not in _MEMORY_UNIT or float(match.group(1)) <= 0:
        raise CommandError(
            f"--gpu-memory {text!r}: expected a size such as 80GB (80e9 bytes) or 24GiB."
        )
    return round(float(match.group(1)) * _MEMORY_UNIT[match.group(2)])


# ------------------------------------------------------------ model shapes


@dataclass
class ModelTensors:
    """Trainable tensors as (numel, dtype): as trained in fp32, and as slimoptim trains them."""

    source: str
    fp32: list[tuple[int, torch.dtype]]
    slim: list[tuple[int, torch.dtype]]  # after slimoptim.cast_model (bf16, norms kept)
    shapes_known: bool = True  # False for a bare count: the largest tensor is unknown
    frozen_params: int = 0

    @property
    def num_params(self) -> int:
        return sum(n for n, _ in self.fp32)


def tensors_from_count(count: int) -> ModelTensors:
    return ModelTensors(
        "a bare parameter count", [(count, torch.float32)], [(count, torch.bfloat16)], False
    )


def tensors_from_module(model: nn.Module, source: str) -> ModelTensors:
    """Distinct trainable parameters (tied weights once), before and after cast_model."""
    params = list(model.parameters())  # parameters() already skips tied repeats
    trainable = [p for p in params if p.requires_grad]
    frozen = sum(p.numel() for p in params if not p.requires_grad)
    fp32 = [(p.numel(), torch.float32) for p in trainable]
    cast_model(model)  # on the meta device: changes dtypes, allocates nothing
    slim = [(p.numel(), p.dtype) for p in trainable]
    if not trainable:
        raise CommandError(f"{source} has no trainable parameters.")
    return ModelTensors(source, fp32, slim, True, frozen)


def module_from_factory(spec: str) -> tuple[nn.Module, str]:
    """Call ``pkg.mod:factory`` under the meta device; the current folder is importable."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise CommandError(f"--module {spec!r}: expected PKG.MOD:FACTORY, e.g. mymodels:build")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except ImportError as error:
        raise CommandError(f"--module {spec!r}: cannot import {module_name}: {error}") from None
    except AttributeError:
        raise CommandError(f"--module {spec!r}: {module_name} has no {attr!r}") from None
    with torch.device("meta"):
        model = factory()
    if not isinstance(model, nn.Module):
        raise CommandError(f"--module {spec!r} returned {type(model).__name__}, not an nn.Module")
    return model, spec


def _transformers():
    try:
        import transformers
    except ImportError:
        raise CommandError(
            "Hugging Face configs and model names need transformers: pip install transformers"
        ) from None
    return transformers


def model_from_hf_config(config) -> nn.Module:
    transformers = _transformers()
    with torch.device("meta"):
        try:
            return transformers.AutoModelForCausalLM.from_config(config)
        except ValueError:  # not a causal LM (e.g. BERT): the base model
            return transformers.AutoModel.from_config(config)


def hf_config_from_path(path: str):
    transformers = _transformers()
    if not Path(path).exists():
        raise CommandError(f"--hf-config {path}: no such file or folder")
    try:
        return transformers.AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as error:
        raise CommandError(f"--hf-config {path}: not a Hugging Face config: {error}") from None


def hf_config_from_name(name: str):
    """A model type (llama: its default config) or a hub id already in the local cache."""
    try:
        import transformers
    except ImportError:
        raise CommandError(
            f"{name!r} is not a parameter count (7e9, 1.1B, 350M); model names need "
            "transformers: pip install transformers"
        ) from None
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never download
    mapping = transformers.models.auto.configuration_auto.CONFIG_MAPPING
    if name in mapping:
        return transformers.AutoConfig.for_model(name)  # that architecture's default sizes
    try:
        return transformers.AutoConfig.from_pretrained(name, local_files_only=True)
    except (OSError, ValueError):
        raise CommandError(
            f"{name!r} is neither a parameter count (7e9, 1.1B, 350M), a transformers model "
            "type (llama, gpt2, ...) nor a model in the local Hugging Face cache; nothing is "
            "downloaded: pass --hf-config path/to/config.json instead."
        ) from None


def load_tensors(args) -> ModelTensors:
    if args.module:
        return tensors_from_module(*module_from_factory(args.module))
    if args.hf_config:
        config = hf_config_from_path(args.hf_config)
        return tensors_from_module(model_from_hf_config(config), args.hf_config)
    count = parse_count(args.model)
    if count is not None:
        return tensors_from_count(count)
    config = hf_config_from_name(args.model)
    if args.model == config.model_type:
        source = f"{args.model} (transformers' default {type(config).__name__})"
    else:
        source = f"{args.model} (from the local Hugging Face cache)"
    return tensors_from_module(model_from_hf_config(config), source)


# ------------------------------------------------------------ the formulas


@dataclass(frozen=True)
class Setup:
    """A way to train: torch AdamW (fp32 or pure bf16) or a slimoptim optimizer and mode."""

    label: str
    library: str  # torch | slimoptim
    optimizer: str  # adamw | sgd | lion
    pure_bf16: bool = False  # torch only: bf16 params and states, no master weights
    master_weight_bits: int | None = 24
    state_bits: int = 8
    gradient_release: bool = False


# SGD keeps a state only with momentum: plan it with momentum.
SLIM_EXTRA_ARGS = {"adamw": {}, "sgd": {"momentum": 0.9}, "lion": {}}


def all_setups(optimizers=("adamw", "sgd", "lion")) -> list[Setup]:
    setups = [
        Setup("torch AdamW, fp32 master weights", "torch", "adamw"),
        Setup("torch AdamW, pure bf16", "torch", "adamw", pure_bf16=True),
    ]
    for name in optimizers:
        for master in (24, 32, None):
            for state in (8, 32):
                label = f"{OPTIMIZER_CLASSES[name]} {'none' if master is None else master}/{state}"
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


def _slim_state_bytes(setup: Setup, tensors: list[tuple[int, torch.dtype]], group_size: int):
    """Bytes per component of slimoptim's states, from the optimizer's own layout."""
    params = [nn.Parameter(torch.empty(n, dtype=d, device="meta")) for n, d in tensors]
    optimizer = getattr(slimoptim, OPTIMIZER_CLASSES[setup.optimizer])(
        params,
        master_weight_bits=setup.master_weight_bits,
        state_bits=setup.state_bits,
        group_size=group_size,
        **SLIM_EXTRA_ARGS[setup.optimizer],
    )
    group = optimizer.param_groups[0]
    out = dict.fromkeys(COMPONENTS, 0)
    for p in params:
        for name, (dtype, shape) in optimizer._expected_state(p, group).items():
            out[_component(name)] += math.prod(shape) * dtype.itemsize
    return out


def setup_bytes(
    setup: Setup, model: ModelTensors, group_size: int = 32, world_size: int = 1
) -> dict[str, float]:
    """Bytes per memory_report component on one GPU; FSDP over ``world_size`` GPUs shards
    everything evenly, except that each GPU holds its own gradient-release bucket."""
    if setup.library == "torch":
        # torch.optim.AdamW: exp_avg and exp_avg_sq in the parameter's dtype, one step counter.
        tensors = model.slim if setup.pure_bf16 else model.fp32
        out = dict.fromkeys(COMPONENTS, 0)
        out["states"] = sum(2 * n * d.itemsize for n, d in tensors)
        out["step"] = STEP_BYTES * len(tensors)
    else:
        tensors = model.slim
        out = _slim_state_bytes(setup, tensors, group_size)
    grad_bytes = [n * d.itemsize for n, d in tensors]
    out["params"] = out["grads"] = sum(grad_bytes)
    if world_size > 1:
        out = {k: v / world_size for k, v in out.items()}
    if setup.gradient_release:
        # Gradients are stepped and freed in buckets of RELEASE_BUCKET_BYTES as they arrive:
        # at most one bucket is held, and a bucket can overshoot by its last tensor.
        largest = max(grad_bytes) / world_size if model.shapes_known else 0
        out["grads"] = min(out["grads"], RELEASE_BUCKET_BYTES + largest)
    return out


def build_plan(
    model: ModelTensors,
    setups: list[Setup],
    world_size: int = 1,
    gpu_memory: int | None = None,
    group_size: int = 32,
) -> dict:
    rows = []
    for setup in setups:
        per_gpu = setup_bytes(setup, model, group_size, world_size)
        total = sum(per_gpu.values())
        rows.append(
            {
                "setup": asdict(setup),
                "bytes": per_gpu,
                "total_bytes": total,
                "bytes_per_param": total * world_size / model.num_params,
                "fits": None if gpu_memory is None else total <= gpu_memory,
            }
        )
    return {
        "source": model.source,
        "num_params": model.num_params,
        "num_tensors": len(model.fp32) if model.shapes_known else None,
        "frozen_params": model.frozen_params,
        "world_size": world_size,
        "gpu_memory_bytes": gpu_memory,
        "group_size": group_size,
        "per_gpu": True,
        "excludes": "activations, temporary buffers, the CUDA context and allocator slack",
        "setups": rows,
    }


# ---------------------------------------------------------------- output


def _unit(nbytes: float) -> tuple[str, float]:
    for name, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if nbytes >= size:
            return name, size
    return "B", 1


def format_plan(plan: dict, gpu_text: str | None = None) -> str:
    """One row per setup; the gradient-release variant of a slimoptim mode goes on its row."""
    unit, size = _unit(max(r["total_bytes"] for r in plan["setups"]))
    gpu = plan["gpu_memory_bytes"]
    release_of = {
        r["setup"]["label"].removesuffix(" +release"): r
        for r in plan["setups"]
        if r["setup"]["gradient_release"]
    }
    header = ["setup", "weights", "master", "grads", "states", "scales", "total", "B/param"]
    header += ["+release", "B/param"]
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
            rows.append(f"slimoptim {OPTIMIZER_CLASSES[section]}, bf16 weights:")
        b = row["bytes"]
        cells = [b["params"], b["master_correction"], b["grads"], b["states"]]
        cells += [b["state_scales"] + b["step"], row["total_bytes"]]
        indent = "  " if setup["library"] == "slimoptim" else ""
        line = [indent + setup["label"], *(f"{c / size:.2f}" for c in cells)]
        line.append(f"{row['bytes_per_param']:.2f}")
        released = release_of.get(setup["label"])
        if released is None:
            line += ["-", "-"]
        else:
            line += [f"{released['total_bytes'] / size:.2f}", f"{released['bytes_per_param']:.2f}"]
        if gpu is not None:
            line.append(f"{fits(row)} / {fits(released)}")
        rows.append(line)

    tensors = f" in {plan['num_tensors']:,} tensors" if plan["num_tensors"] else ""
    lines = [
        f"Training state of {plan['source']}:",
        f"{plan['num_params']:,} trainable parameters{tensors}; {unit} ({size:.0e} bytes) per GPU.",
        "",
        format_table(header, rows),
        "",
        "24/8 = master weight bits / state bits ('none': the bf16 weights only). master = the",
        "master-weight correction; scales = 8-bit state scales and step counters; +release =",
        "total with gradient release (slimoptim.enable_gradient_release), which holds one",
    ]
    if plan["num_tensors"] is None:
        lines.append(
            "32 MiB bucket of gradients at most, plus its last tensor (unknown for a bare "
            "count:\nuse --module or --hf-config to count it)."
        )
    else:
        lines.append("32 MiB bucket of gradients at most, plus its last tensor (the largest).")
    if gpu is not None:
        lines.append("fits? = without / with gradient release.")
    lines.append("Not included: activations, temporary buffers, the CUDA context, allocator slack.")
    if plan["world_size"] > 1:
        lines.append(
            f"FSDP full sharding over {plan['world_size']} GPUs: every figure is the whole "
            f"model's / {plan['world_size']}\n(each GPU holds its own release bucket); B/param "
            "is per parameter of the whole model."
        )
    if plan["frozen_params"]:
        lines.append(f"{plan['frozen_params']:,} frozen parameters are not counted.")
    return "\n".join(lines)


def run_plan(args) -> dict:
    gpu_memory = parse_memory(args.gpu_memory) if args.gpu_memory else None
    model = load_tensors(args)
    setups = all_setups(args.optimizers)
    plan = build_plan(model, setups, args.world_size, gpu_memory, args.group_size)
    print(json.dumps(plan, indent=1) if args.json else format_plan(plan, args.gpu_memory))
    return plan
