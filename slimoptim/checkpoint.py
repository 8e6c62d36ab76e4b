"""Checkpoints: exact-resume files, fp32 weight export/import, torch.optim interop.

* ``save_checkpoint``/``load_checkpoint``: model + optimizer (+ scheduler) in one
  ``torch.save`` file, in their native compact dtypes; written atomically with
  checksums, and loading verifies and checks everything before changing anything
  and names what does not match (the file itself: :mod:`slimoptim.checkpoint_file`).
* ``fp32_state_dict``/``load_fp32_state_dict`` and the safetensors helpers
  ``save_model``/``load_model``: weights as float32 masters (bf16 param + its
  correction), and back into a low-precision model with the corrections set.
* ``to_torch_state_dict``/``from_torch_state_dict`` (from :mod:`slimoptim.torch_interop`):
  optimizer states as torch.optim's float32 tensors, and back (quantizing, see
  docs/checkpoints.md for the error this costs).
"""

from __future__ import annotations

import json
import os

import torch
from torch import nn

from . import formats, ieee, state_io
from .checkpoint_file import (
    CHECKPOINT_FORMAT,
    FORMAT_KEY,
    read_checkpoint,
    read_safetensors,
    write_checkpoint,
    write_safetensors,
)
from .errors import CheckpointError
from .optimizers.arguments import LOW_PRECISION
from .optimizers.base import correction_bits
from .torch_interop import (  # noqa: F401 (re-exported: this module's torch.optim interop)
    from_torch_state_dict,
    refuse_dtensor,
    to_torch_state_dict,
)


def _managed(optimizer) -> dict[int, torch.Tensor]:
    return {id(p): p for group in optimizer.param_groups for p in group["params"]}


# -------------------------------------------------------- model state checks


# The key suffix of a module's get_extra_state() entry (torch's private constant, if any).
EXTRA_STATE = getattr(nn.modules.module, "_EXTRA_STATE_KEY_SUFFIX", "_extra_state")


def _is_extra_state(name: str) -> bool:
    """A module's ``get_extra_state()`` entry (any object, not a parameter or buffer)."""
    return name.rsplit(".", 1)[-1] == EXTRA_STATE


def _check_model_state(model: nn.Module, sd: dict, *, strict: bool, same_dtype: bool) -> None:
    """Raise CheckpointError naming every key, shape or dtype that does not match."""
    if not isinstance(sd, dict):
        raise CheckpointError(f"model state_dict must be a dict, got {type(sd).__name__}.")
    live = model.state_dict(keep_vars=True)
    problems = []
    if strict:
        missing = [k for k in live if k not in sd]
        unexpected = [k for k in sd if k not in live]
        if missing:
            problems.append(f"missing keys {missing}")
        if unexpected:
            problems.append(f"unexpected keys {unexpected}")
    for name, value in sd.items():
        target = live.get(name)
        if target is None or _is_extra_state(name):
            continue  # a module's extra state is whatever its set_extra_state accepts
        if not isinstance(value, torch.Tensor):
            problems.append(f"'{name}' is a {type(value).__name__}, not a tensor")
        elif value.shape != target.shape:
            problems.append(
                f"'{name}' has shape {tuple(value.shape)} in the checkpoint and "
                f"{tuple(target.shape)} in the model"
            )
        elif same_dtype and value.dtype != target.dtype:
            problems.append(
                f"'{name}' is {value.dtype} in the checkpoint and {target.dtype} in the model "
                "(to load float32 weights into a low-precision model use load_fp32_state_dict)"
            )
    if problems:
        raise CheckpointError("cannot load model state_dict: " + "; ".join(problems) + ".")


# ------------------------------------------------------------ resume files


def save_checkpoint(path, model: nn.Module, optimizer, scheduler=None, extra=None) -> None:
    """Save model, optimizer (and scheduler) state_dicts, as they are, to one file.

    The file is written atomically (a failed save leaves the previous file at
    ``path`` as it was) and carries a checksum of every tensor and of the rest.
    Every part must be readable by ``torch.load(weights_only=True)`` (``extra``, the
    scheduler state, a numpy value in a param group, a module's extra state); otherwise
    TypeError names the object and nothing is written.
    """
    scheduler_state = None if scheduler is None else scheduler.state_dict()
    model_state = model.state_dict()
    if any(hasattr(v, "to_local") for v in model_state.values()):
        raise NotImplementedError(
            "save_checkpoint writes whole (unsharded) tensors from one process; this model "
            "holds DTensors (FSDP2): save it with torch.distributed.checkpoint "
            "(docs/checkpoints.md). Nothing was written."
        )
    payload = {
        "model": model_state,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler_state,
        "extra": extra,
    }
    write_checkpoint(path, payload)


def load_checkpoint(
    path, model: nn.Module, optimizer=None, scheduler=None, *, map_location="cpu"
) -> object:
    """Load a ``save_checkpoint`` file into freshly built objects for an exact resume.

    The file's checksums are verified, then the model (keys, shapes and dtypes),
    optimizer and scheduler parts are all checked before any is loaded, so a
    failed load changes nothing. Returns the ``extra`` object that was saved.
    """
    ckpt = read_checkpoint(path, map_location)  # checksums verified here
    where = f"checkpoint {os.fspath(path)!r}"
    if not isinstance(ckpt, dict) or FORMAT_KEY not in ckpt:
        raise CheckpointError(f"{where} was not written by slimoptim.save_checkpoint.")
    if ckpt[FORMAT_KEY] not in (1, CHECKPOINT_FORMAT):
        raise CheckpointError(
            f"{where} has checkpoint format {ckpt[FORMAT_KEY]!r}; this slimoptim "
            f"reads formats 1 and {CHECKPOINT_FORMAT}."
        )
    try:
        _check_model_state(model, ckpt["model"], strict=True, same_dtype=True)
        plan = None if optimizer is None else state_io.check(optimizer, ckpt["optimizer"])
        if scheduler is not None and not isinstance(ckpt["scheduler"], dict):
            raise CheckpointError("it holds no scheduler state, but a scheduler was given.")
    except CheckpointError as error:
        raise CheckpointError(f"{where}: {error}") from error
    model.load_state_dict(ckpt["model"])
    if plan is not None:
        state_io.apply(plan, weights_loaded=True)
    if scheduler is not None:
        scheduler.load_state_dict(ckpt["scheduler"])
    return ckpt["extra"]


# ------------------------------------------------------ fp32 master weights


def fp32_state_dict(model: nn.Module, optimizer) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` with every parameter the optimizer steps as its float32 master.

    Other entries (buffers, params the optimizer does not manage) are as they
    are. Like ``model.state_dict()``, entries may share memory with the model.
    """
    managed = _managed(optimizer)
    masters = {}  # one tensor per parameter, so tied names share it (and save once)
    out = {}
    for name, value in model.state_dict(keep_vars=True).items():
        if id(value) in managed:
            refuse_dtensor(value)
            if id(value) not in masters:
                masters[id(value)] = optimizer.master_weight(value).detach()
            out[name] = masters[id(value)]
        else:  # a buffer, an unmanaged param, or a module's extra state (any object)
            out[name] = value.detach() if isinstance(value, torch.Tensor) else value
    return out


@torch.no_grad()
def load_fp32_state_dict(model: nn.Module, optimizer, state_dict: dict, strict: bool = True):
    """Load float32 weights into a (low-precision) model and set its optimizer corrections.

    Each managed bf16/fp16 param gets the nearest low-precision value and its
    correction the nearest code of the remainder (``formats.split_master``), so
    ``optimizer.master_weight(p)`` is the loaded value to within half a code,
    ``ulp(param) / 2**(master_weight_bits - 15)`` (one code next to a midpoint), and
    exactly a value ``fp32_state_dict`` exported. Params
    without a correction (float32, or ``master_weight_bits=None``) are loaded
    as ``model.load_state_dict`` would (rounded to nearest).
    """
    _check_model_state(model, state_dict, strict=strict, same_dtype=False)
    live = model.state_dict(keep_vars=True)
    managed = _managed(optimizer)
    converted, corrections = {}, []
    for name, value in state_dict.items():
        target = live.get(name)
        if target is None or id(target) not in managed or target.dtype not in LOW_PRECISION:
            converted[name] = value
            continue
        refuse_dtensor(target)
        group = optimizer._group_of(target)
        bits = correction_bits(target, group["master_weight_bits"])
        w = value.detach().to(device=target.device, dtype=torch.float32).reshape(-1)
        if bits is None:
            b = ieee.round_to_dtype(w, target.dtype)
        else:
            b, code = formats.split_master(w, target.dtype, bits)
            corrections.append((target, group, code))
        converted[name] = ieee.as_low_precision(b, target.dtype).view(target.shape)
    model.load_state_dict(converted, strict=strict)
    for p, group, code in corrections:
        optimizer._ensure_state(p, group)["correction"].copy_(code)


def _dedupe_shared(sd: dict) -> tuple[dict, dict]:
    """Tensors for safetensors (which refuses shared memory) and {alias: kept name} for ties."""
    tensors, aliases, seen, storages = {}, {}, {}, set()
    for name, t in sd.items():
        t = t.detach()
        view = (t.data_ptr(), t.dtype, tuple(t.shape), t.stride())
        if view in seen:
            aliases[name] = seen[view]
            continue
        seen[view] = name
        storage = t.untyped_storage().data_ptr()
        shared = storage in storages
        storages.add(storage)
        tensors[name] = t.clone() if shared else t.contiguous()
    return tensors, aliases


def save_model(model: nn.Module, path, optimizer=None, *, fp32: bool = False) -> None:
    """Save the model's weights as a safetensors file; ``fp32=True`` saves the fp32 masters."""
    if fp32 and optimizer is None:
        raise ValueError("fp32=True needs the optimizer: the master weights live in it.")
    sd = fp32_state_dict(model, optimizer) if fp32 else model.state_dict()
    others = [name for name, value in sd.items() if not isinstance(value, torch.Tensor)]
    if others:
        raise ValueError(
            f"save_model: safetensors files hold tensors only, and {others} "
            f"{'is' if len(others) == 1 else 'are'} not (a module's extra state). Save the "
            "model with save_checkpoint, or keep that state elsewhere. Nothing was written."
        )
    tensors, aliases = _dedupe_shared({k: v.cpu() for k, v in sd.items()})
    metadata = {
        "format": "pt",
        "slimoptim.weights": "fp32_master" if fp32 else "model",
        "slimoptim.aliases": json.dumps(aliases),
    }
    write_safetensors(path, tensors, metadata)  # atomic, with checksums


def load_model(model: nn.Module, path, optimizer=None, *, strict: bool = True) -> None:
    """Load a safetensors file of weights; with ``optimizer``, as masters (load_fp32_state_dict)."""
    sd, metadata = read_safetensors(path)  # checksums verified here
    for alias, name in json.loads(metadata.get("slimoptim.aliases", "{}")).items():
        sd[alias] = sd[name]
    if optimizer is not None:
        load_fp32_state_dict(model, optimizer, sd, strict=strict)
    else:
        _check_model_state(model, sd, strict=strict, same_dtype=False)
        model.load_state_dict(sd, strict=strict)


__all__ = [
    "CheckpointError",
    "fp32_state_dict",
    "from_torch_state_dict",
    "load_checkpoint",
    "load_fp32_state_dict",
    "load_model",
    "read_checkpoint",
    "save_checkpoint",
    "save_model",
    "to_torch_state_dict",
]
