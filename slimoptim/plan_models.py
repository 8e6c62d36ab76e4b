"""What ``slimoptim plan`` plans for: the tensors of a model, from a count, a module
factory or a Hugging Face config, built on the meta device (no memory, no downloads)."""

from __future__ import annotations

import importlib
import math
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .cli_common import CommandError
from .model import cast_model
from .optimizers import muon_param_groups

_COUNT_SUFFIX = {"": 1, "k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9, "t": 1e12}
_MEMORY_UNIT = {
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
_NUMBER = r"([+-]?\d+(?:\.\d*)?(?:e[+-]?\d+)?)"
MAX_COUNT = 10**15  # a quadrillion parameters: anything above is a typo


def parse_count(text: str) -> int | None:
    """'7e9', '1.1B', '350M', '7,000,000' -> int; None when ``text`` is not a number at
    all (a model name); a number that is no parameter count (0, -5B, 1e400) is an error."""
    match = re.fullmatch(_NUMBER + r"\s*([kmbgt]?)", text.strip().lower().replace(",", ""))
    if not match:
        return None
    value = float(match.group(1)) * _COUNT_SUFFIX[match.group(2)]
    if not math.isfinite(value) or value > MAX_COUNT:
        raise CommandError(f"{text!r}: too many parameters to plan for (at most 1e15)")
    if round(value) < 1:
        raise CommandError(f"{text!r}: a parameter count must be at least 1 (e.g. 7B, 350M)")
    return round(value)


def parse_memory(text: str) -> int:
    """'80GB' (80e9 bytes), '24GiB' (24 * 2**30), '80e9B' -> bytes. A unit is required:
    a bare '80' is refused rather than read as 80 bytes."""
    match = re.fullmatch(_NUMBER + r"\s*([a-z]*)", text.strip().lower())
    if match and not match.group(2):
        number = match.group(1)
        raise CommandError(
            f"--gpu-memory {text!r} has no unit: write {number}GB ({number}e9 bytes) or "
            f"{number}GiB ({number} x 2^30 bytes)"
        )
    if not match or match.group(2) not in _MEMORY_UNIT:
        raise CommandError(
            f"--gpu-memory {text!r}: expected a size such as 80GB (80e9 bytes) or 24GiB."
        )
    value = float(match.group(1)) * _MEMORY_UNIT[match.group(2)]
    if not math.isfinite(value) or value < 1:
        raise CommandError(f"--gpu-memory {text!r}: must be a positive size such as 80GB.")
    return round(value)


@dataclass
class ModelTensors:
    """Tensors as (numel, dtype): as trained in fp32, and as slimoptim trains them (after
    cast_model: bf16, BatchNorm kept fp32). Frozen tensors hold weights only.

    For a model (not a bare count), ``shapes`` and ``muon`` describe the trainable tensors
    in the same order: each one's shape, and whether slimoptim.muon_param_groups gives it
    to Muon (a hidden matrix) rather than to AdamW (embeddings, head, norms, biases)."""

    source: str
    fp32: list[tuple[int, torch.dtype]]
    slim: list[tuple[int, torch.dtype]]
    shapes_known: bool = True  # False for a bare count: the largest tensor is unknown
    frozen_fp32: list[tuple[int, torch.dtype]] = field(default_factory=list)
    frozen_slim: list[tuple[int, torch.dtype]] = field(default_factory=list)
    shapes: list[tuple[int, ...]] = field(default_factory=list)
    muon: list[bool] = field(default_factory=list)

    @property
    def num_params(self) -> int:
        """Trainable parameters."""
        return sum(n for n, _ in self.fp32)

    @property
    def frozen_params(self) -> int:
        return sum(n for n, _ in self.frozen_fp32)


def tensors_from_count(count: int) -> ModelTensors:
    return ModelTensors(
        "a bare parameter count", [(count, torch.float32)], [(count, torch.bfloat16)], False
    )


def tensors_from_module(model: nn.Module, source: str) -> ModelTensors:
    """Distinct parameters (tied weights once), trainable and frozen, before and after
    cast_model."""
    params = list(model.parameters())  # parameters() already skips tied repeats
    trainable = [p for p in params if p.requires_grad]
    frozen = [p for p in params if not p.requires_grad]
    if not trainable:
        raise CommandError(f"{source} has no trainable parameters.")
    fp32 = [(p.numel(), torch.float32) for p in trainable]
    frozen_fp32 = [(p.numel(), torch.float32) for p in frozen]
    hidden = {id(p) for p in muon_param_groups(model).muon}
    cast_model(model)  # on the meta device: changes dtypes, allocates nothing
    slim = [(p.numel(), p.dtype) for p in trainable]
    frozen_slim = [(p.numel(), p.dtype) for p in frozen]
    shapes = [tuple(p.shape) for p in trainable]
    muon = [id(p) in hidden for p in trainable]
    return ModelTensors(source, fp32, slim, True, frozen_fp32, frozen_slim, shapes, muon)


def module_from_factory(spec: str, kwargs: dict | None = None) -> tuple[nn.Module, str]:
    """Call ``pkg.mod:factory(**kwargs)`` under the meta device; the current folder is
    importable."""
    kwargs = kwargs or {}
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
    call = f"{attr}({', '.join(f'{k}={v!r}' for k, v in kwargs.items())})"
    try:
        with torch.device("meta"):
            model = factory(**kwargs)
    except Exception as error:  # the user's code: any failure is reported, not traced
        hint = " (pass its arguments with --module-arg KEY=VALUE)" if not kwargs else ""
        raise CommandError(
            f"--module {spec!r}: {call} raised {type(error).__name__}: {error}{hint}"
        ) from None
    if not isinstance(model, nn.Module):
        raise CommandError(
            f"--module {spec!r}: {call} returned {type(model).__name__}, not an nn.Module"
        )
    return model, spec if not kwargs else f"{module_name}:{call}"


def _transformers(purpose: str):
    try:
        import transformers
    except ImportError:
        raise CommandError(f"{purpose} need transformers: pip install transformers") from None
    return transformers


def model_from_hf_config(config) -> nn.Module:
    transformers = _transformers("Hugging Face configs")
    with torch.device("meta"):
        try:
            return transformers.AutoModelForCausalLM.from_config(config)
        except ValueError:  # not a causal LM (e.g. BERT): the base model
            return transformers.AutoModel.from_config(config)


def hf_config_from_path(path: str):
    # A missing file is reported as such whether or not transformers is installed.
    if not Path(path).exists():
        raise CommandError(f"--hf-config {path}: no such file or folder")
    transformers = _transformers("Hugging Face configs")
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
    if args.module_arg and not args.module:
        raise CommandError("--module-arg is for a --module factory; there is none here")
    if args.module:
        return tensors_from_module(*module_from_factory(args.module, dict(args.module_arg)))
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
