"""Checkpoints: exact-resume files, fp32 weight export/import, torch.optim interop.

* ``save_checkpoint``/``load_checkpoint``: model + optimizer (+ scheduler) in one
  ``torch.save`` file, in their native compact dtypes; written atomically with
  checksums, and loading verifies and checks everything before changing anything
  and names what does not match (the file itself: :mod:`slimoptim.checkpoint_file`).
* ``fp32_state_dict``/``load_fp32_state_dict`` and the safetensors helpers
  ``save_model``/``load_model``: weights as float32 masters (bf16 param + its
  correction), and back into a low-precision model with the corrections set.
* ``to_torch_state_dict``/``from_torch_state_dict``: optimizer states as
  torch.optim's float32 tensors, and back (quantizing, see docs/checkpoints.md
  for the error this costs).
"""

from __future__ import annotations

import copy
import json
import os

import torch
from torch import nn

from . import formats, state_io
from .checkpoint_file import (
    CHECKPOINT_FORMAT,
    FORMAT_KEY,
    read_checkpoint,
    read_safetensors,
    write_checkpoint,
    write_safetensors,
)
from .optimizers.base import LOW_PRECISION, correction_bits
from .optimizers.sgd import SGD
from .state_io import CheckpointError

_MODE_KEYS = state_io._GROUP_MODE_KEYS
# torch.optim group options that slimoptim has no use for (implementation choices).
_TORCH_ONLY_KEYS = ("foreach", "capturable", "differentiable", "fused", "decoupled_weight_decay")


def _managed(optimizer) -> dict[int, torch.Tensor]:
    return {id(p): p for group in optimizer.param_groups for p in group["params"]}


def _refuse_dtensor(p: torch.Tensor) -> None:
    if hasattr(p, "to_local"):
        raise NotImplementedError(
            "fp32 export/import and torch.optim interop work on whole (unsharded) tensors; for "
            "DTensor (FSDP2) parameters use torch.distributed.checkpoint (docs/checkpoints.md)."
        )


# -------------------------------------------------------- model state checks


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
        if target is None:
            continue
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
    ``extra`` (and the scheduler state) must be readable by
    ``torch.load(weights_only=True)``; otherwise TypeError names the object and
    nothing is written.
    """
    scheduler_state = None if scheduler is None else scheduler.state_dict()
    payload = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler_state,
        "extra": extra,
    }
    write_checkpoint(path, payload, {"extra": extra, "scheduler": scheduler_state})


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
        state_io.apply(plan)
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
            _refuse_dtensor(value)
            if id(value) not in masters:
                masters[id(value)] = optimizer.master_weight(value).detach()
            out[name] = masters[id(value)]
        else:
            out[name] = value.detach()
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
        _refuse_dtensor(target)
        group = optimizer._group_of(target)
        bits = correction_bits(target, group["master_weight_bits"])
        w = value.detach().to(device=target.device, dtype=torch.float32).reshape(-1)
        if bits is None:
            b = formats.round_to_dtype(w, target.dtype)
        else:
            b, code = formats.split_master(w, target.dtype, bits)
            corrections.append((target, group, code))
        converted[name] = b.to(target.dtype).view(target.shape)
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


# ------------------------------------------------------- torch.optim interop


def _state_names(optimizer, group) -> list[str]:
    return [spec.name for spec in optimizer._specs_for(group)]


def _keeps_step(optimizer) -> bool:
    # torch.optim.SGD keeps only the momentum buffer; Adam-family and Lion a step.
    return not isinstance(optimizer, SGD)


def to_torch_state_dict(optimizer) -> dict:
    """The optimizer's state as a torch.optim state_dict: dequantized float32, param-shaped.

    ``torch.optim.AdamW/Adam/SGD(...).load_state_dict`` accepts it (for the
    matching type). Weights are not in it: load ``fp32_state_dict`` into the
    torch model to carry the master weights over.
    """
    index, state, groups = 0, {}, []
    for group in optimizer.param_groups:
        ids = []
        for p in group["params"]:
            ids.append(index)
            saved = optimizer.state.get(p)
            names = _state_names(optimizer, group)
            if saved and names:
                _refuse_dtensor(p)
                values = optimizer._load_states(saved, group, p.numel())
                entry = {name: values[name].detach().clone().view(p.shape) for name in names}
                if _keeps_step(optimizer):
                    entry["step"] = saved["step"].detach().clone()
                state[index] = entry
            index += 1
        torch_group = {
            k: copy.deepcopy(v) for k, v in group.items() if k not in ("params", *_MODE_KEYS)
        }
        if hasattr(optimizer, "decoupled"):  # torch >= 2.6 Adam/AdamW carry this flag
            torch_group["decoupled_weight_decay"] = optimizer.decoupled
        torch_group["params"] = ids
        groups.append(torch_group)
    return {"state": state, "param_groups": groups}


def _torch_fail(message: str):
    raise CheckpointError(f"cannot load torch.optim state_dict: {message}")


def _check_torch_group(optimizer, i: int, group: dict, saved: dict) -> None:
    if state_io.HEADER_KEY in saved:
        _torch_fail("it is a slimoptim state_dict; load it with optimizer.load_state_dict.")
    needed = [k for k in optimizer.defaults if k not in _MODE_KEYS]
    missing = [k for k in needed if k not in saved]
    if missing:
        _torch_fail(
            f"parameter group {i} has no {missing}: it is not a {type(optimizer).__name__}-"
            "style optimizer's state_dict."
        )
    if saved.get("amsgrad"):
        _torch_fail("it uses amsgrad=True, which slimoptim does not support.")
    decoupled = getattr(optimizer, "decoupled", None)
    saved_decoupled = saved.get("decoupled_weight_decay")
    if decoupled is not None and saved_decoupled is not None and saved_decoupled != decoupled:
        kind = "AdamW (decoupled weight decay)" if saved_decoupled else "Adam (L2 weight decay)"
        _torch_fail(f"it is a torch {kind} state_dict, not one for {type(optimizer).__name__}.")
    if len(saved["params"]) != len(group["params"]):
        _torch_fail(
            f"parameter group {i} has {len(saved['params'])} parameters in the checkpoint and "
            f"{len(group['params'])} in the optimizer."
        )


def _torch_entry_values(optimizer, p, group, saved_id, entry: dict) -> dict:
    """Checked float32 flat values of one param's torch state (state name -> tensor)."""
    names = _state_names(optimizer, group)
    present = {k: v for k, v in entry.items() if v is not None and k != "step"}
    unexpected = sorted(set(present) - set(names))
    if unexpected:
        _torch_fail(
            f"state of parameter {saved_id} has entries {unexpected} that "
            f"{type(optimizer).__name__} does not keep (expected {names})."
        )
    missing = sorted(set(names) - set(present))
    if present and missing:
        _torch_fail(f"state of parameter {saved_id} has no {missing}.")
    values = {}
    for name, value in present.items():
        if not isinstance(value, torch.Tensor) or not value.is_floating_point():
            _torch_fail(f"state '{name}' of parameter {saved_id} is not a floating tensor.")
        if value.numel() != p.numel():
            _torch_fail(
                f"state '{name}' of parameter {saved_id} has shape {tuple(value.shape)}, the "
                f"parameter {tuple(p.shape)}."
            )
        values[name] = value.detach().to(device=p.device, dtype=torch.float32).reshape(-1)
    return values


def _quantized_state(optimizer, p, group, step: float, values: dict) -> dict:
    """A complete slimoptim state for ``p`` holding ``values``; keeps p's correction."""
    state = {
        name: torch.zeros(shape, dtype=dtype, device=p.device)
        for name, (dtype, shape) in optimizer._expected_state(p, group).items()
    }
    state["step"].fill_(step)
    if "correction" in optimizer.state.get(p, {}):
        state["correction"].copy_(optimizer.state[p]["correction"])
    size = group["group_size"]
    for spec in optimizer._specs_for(group):
        if spec.name not in values:
            continue
        value = values[spec.name]
        if group["state_bits"] == 32:
            state[spec.name].copy_(value)
            continue
        if spec.signed:  # one-off conversion: nearest level (noise = half range), not dithered
            code, scale = formats.quantize_momentum_nearest(value, size, spec.levels)
        else:
            code, scale = formats.quantize_variance(value, size)
        state[spec.name].copy_(code)
        state[spec.scale_name].copy_(scale)
    return state


def from_torch_state_dict(optimizer, torch_state_dict: dict) -> None:
    """Load a torch.optim (AdamW/Adam/SGD, float32 states) state_dict into ``optimizer``.

    States are quantized to the optimizer's format (8-bit: round to nearest;
    32-bit: exact); hyper-parameters come from the checkpoint's groups; each
    param's master-weight correction is kept (load the weights separately, e.g.
    with ``load_fp32_state_dict``). All is checked first; a failed load changes
    nothing.
    """
    sd = torch_state_dict
    if not isinstance(sd, dict) or "state" not in sd or "param_groups" not in sd:
        _torch_fail("expected a dict with 'state' and 'param_groups'.")
    if len(sd["param_groups"]) != len(optimizer.param_groups):
        _torch_fail(
            f"it has {len(sd['param_groups'])} parameter groups, the optimizer has "
            f"{len(optimizer.param_groups)}."
        )
    new_state, new_options = {}, []
    pairs = zip(optimizer.param_groups, sd["param_groups"], strict=True)
    for i, (live, saved) in enumerate(pairs):
        _check_torch_group(optimizer, i, live, saved)
        options = {
            k: copy.deepcopy(v)
            for k, v in saved.items()
            if k not in ("params", *_MODE_KEYS, *_TORCH_ONLY_KEYS)
        }
        new_options.append(options)
        # States follow the loaded options (SGD's momentum decides whether it keeps a buffer).
        group = {**live, **options}
        for p, saved_id in zip(group["params"], saved["params"], strict=True):
            _refuse_dtensor(p)
            entry = sd["state"].get(saved_id)
            if not entry:
                continue
            values = _torch_entry_values(optimizer, p, group, saved_id, entry)
            if not values and "step" not in entry:
                continue
            # torch SGD keeps no step; any step >= 1 means "the buffer is started".
            step = float(entry.get("step", 1))
            new_state[p] = _quantized_state(optimizer, p, group, step, values)
    # Params without torch state keep only their correction (a zero state, as if fresh).
    for live, options in zip(optimizer.param_groups, new_options, strict=True):
        for p in live["params"]:
            if p not in new_state and "correction" in optimizer.state.get(p, {}):
                new_state[p] = _quantized_state(optimizer, p, {**live, **options}, 0.0, {})
    for live, options in zip(optimizer.param_groups, new_options, strict=True):
        live.update(options)
    optimizer.state.clear()
    optimizer.state.update(new_state)


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
