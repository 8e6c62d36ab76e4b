"""The files behind save_checkpoint/save_model: atomic, checksummed, loadable by design.

* :func:`write_checkpoint` first checks that every part (model, optimizer,
  scheduler, ``extra``) survives ``torch.load(weights_only=True)``,
  then adds a checksum record (:mod:`slimoptim.integrity`) and writes the
  file atomically (:mod:`slimoptim._io`).
* :func:`read_checkpoint` loads it and verifies every checksum before the
  caller uses anything. Files of format 1 (before checksums) load with a warning.
* :func:`write_safetensors`/:func:`read_safetensors` do the same for safetensors
  files, with the checksum record in the file's string metadata.
"""

from __future__ import annotations

import collections
import io
import json
import os
import warnings

import safetensors
import safetensors.torch
import torch

from . import _io, integrity
from .errors import CheckpointError

FORMAT_KEY = "slimoptim_checkpoint"
CHECKPOINT_FORMAT = 2  # 2: with checksums; 1: without (read with a warning)
INTEGRITY_KEY = "integrity"
SAFETENSORS_CHECKSUMS = "slimoptim.checksums"
_SAFETENSORS_HEADER_BYTES = 64 * 1024  # generous: the JSON header of a model's file


# ------------------------------------------------- weights_only loadability


def _without_tensor_data(obj):
    """``obj`` with plain tensors replaced by empty ones of their dtype: weights_only loads
    any plain tensor, so the check need not copy their data (an EMA model in extra)."""
    if type(obj) in (torch.Tensor, torch.nn.Parameter):
        return torch.empty(0, dtype=obj.dtype)
    if type(obj) in (dict, collections.OrderedDict):  # a module's state_dict is ordered
        copy = type(obj)((key, _without_tensor_data(value)) for key, value in obj.items())
        if hasattr(obj, "__dict__"):  # a state_dict's _metadata (versions)
            copy.__dict__.update(obj.__dict__)
        return copy
    if type(obj) in (list, tuple):
        return type(obj)(_without_tensor_data(value) for value in obj)
    return obj


def _round_trip_error(obj) -> str | None:
    """None if ``obj`` survives torch.save + torch.load(weights_only=True), else why not."""
    buffer = io.BytesIO()
    try:
        torch.save(_without_tensor_data(obj), buffer)
    except Exception as error:  # pickling raises TypeError, AttributeError, PicklingError...
        first_line = (str(error).splitlines() or [""])[0][:200]
        return f"cannot be pickled ({type(error).__name__}: {first_line})"
    buffer.seek(0)
    try:
        torch.load(buffer, weights_only=True)
    except Exception:  # torch's message is long: how to load untrusted files anyway
        return "weights_only loading (torch.load(weights_only=True)) refuses"
    return None


def _children(obj):
    if isinstance(obj, dict):
        return list(obj.items())
    if isinstance(obj, (list, tuple)):
        return list(enumerate(obj))
    return []


def _first_unloadable(obj, path: str):
    """(path, object, reason) of the innermost object that does not round-trip."""
    failure = _round_trip_error(obj)
    if failure is None:
        return None
    for key, value in _children(obj):
        found = _first_unloadable(value, f"{path}[{key!r}]")
        if found is not None:
            return found
    return path, obj, failure


def check_loadable(obj, name: str) -> None:
    """Raise TypeError naming the object in ``obj`` that load_checkpoint could not read."""
    found = _first_unloadable(obj, name)
    if found is None:
        return
    path, bad, reason = found
    kind = f"{type(bad).__module__}.{type(bad).__qualname__}"
    raise TypeError(
        f"save_checkpoint: {path} is of type {kind}, which {reason}, so load_checkpoint could "
        "not read the file. Nothing was written. "
        "Store plain data instead (dict, list, tuple, str, int, float, bool, None, tensors; "
        "e.g. vars(args) for an argparse.Namespace), or allow the type with "
        "torch.serialization.add_safe_globals([...]) in the saving and the loading process."
    )


# ---------------------------------------------------------- resume files


def _storage_nbytes(obj) -> int:
    """Bytes of the distinct tensor storages in ``obj``: what torch.save writes, about."""
    storages, stack = {}, [obj]
    while stack:
        item = stack.pop()
        if isinstance(item, torch.Tensor) and item.layout != torch.strided:
            storages[id(item)] = item.numel() * item.element_size()  # sparse: at most dense
        elif isinstance(item, torch.Tensor):
            storage = item.untyped_storage()
            storages[(item.device, storage.data_ptr())] = storage.nbytes()
        else:
            stack.extend(value for _, value in _children(item))
    return sum(storages.values()) + 64 * 1024  # + pickle and zip records


def write_checkpoint(path, payload: dict) -> None:
    """Check that every part of ``payload`` round-trips, add checksums, write it atomically.

    Every part, not only the user's ``extra``: a numpy float in a param group (an LR
    schedule computed with numpy) or a module's extra state can be what weights_only
    loading refuses, and the file would replace a loadable one."""
    for name, part in payload.items():
        check_loadable(part, name)
    payload = {FORMAT_KEY: CHECKPOINT_FORMAT, **payload}
    payload[INTEGRITY_KEY] = integrity.checksums(payload)
    with _io.atomic_open(path, "wb", size_hint=_storage_nbytes(payload)) as f:
        torch.save(payload, f)


def _torch_load(path, map_location, weights_only: bool):
    try:
        return torch.load(path, map_location=map_location, weights_only=weights_only)
    except FileNotFoundError:
        raise
    except Exception as error:  # torch raises RuntimeError, EOFError, UnpicklingError, ...
        raise CheckpointError(
            f"cannot read checkpoint {os.fspath(path)!r}: it is truncated or corrupted, not a "
            "torch.save file, or holds objects that weights_only loading refuses "
            f"({type(error).__name__}: {error})"
        ) from error


def read_checkpoint(path, map_location="cpu", weights_only: bool = True):
    """``torch.load`` a checkpoint; a slimoptim one has its checksums verified (and removed).

    Raises CheckpointError naming the file when it is truncated, corrupted, or
    fails a checksum. A slimoptim file of format 1 (no checksums) loads with a
    warning; other objects are returned as they are.
    """
    ckpt = _torch_load(path, map_location, weights_only)
    if not isinstance(ckpt, dict) or FORMAT_KEY not in ckpt:
        return ckpt
    where = f"checkpoint {os.fspath(path)!r}"
    if INTEGRITY_KEY in ckpt:
        integrity.verify(ckpt, ckpt.pop(INTEGRITY_KEY), where)
    elif ckpt[FORMAT_KEY] == 1:
        warnings.warn(
            f"{where} was written by an older slimoptim (checkpoint format 1) and holds no "
            "checksums, so damage to it cannot be detected. Save it again to add them.",
            stacklevel=3,
        )
    else:
        raise CheckpointError(f"{where} is corrupted: its checksum record is missing.")
    return ckpt


# ------------------------------------------------------ safetensors files


def _checked_part(tensors: dict, metadata: dict) -> dict:
    """What the safetensors checksums cover, in an order independent of the file layout."""
    return {"metadata": dict(sorted(metadata.items())), "tensors": dict(sorted(tensors.items()))}


def write_safetensors(path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """safetensors.torch.save_file, atomic, with a checksum record in the metadata."""
    record = integrity.checksums(_checked_part(tensors, metadata))
    metadata = {**metadata, SAFETENSORS_CHECKSUMS: json.dumps(record)}
    size = sum(t.numel() * t.element_size() for t in tensors.values()) + _SAFETENSORS_HEADER_BYTES
    with _io.atomic_path(path, size_hint=size) as temp:
        safetensors.torch.save_file(tensors, temp, metadata=metadata)


def read_safetensors(path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a safetensors file, checksums verified if it carries them.

    A file written by save_model before checksums (it has slimoptim metadata but
    no checksums) loads with a warning; a file from another tool has none to check.
    """
    where = f"safetensors file {os.fspath(path)!r}"
    try:
        with safetensors.safe_open(os.fspath(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except FileNotFoundError:
        raise
    except Exception as error:
        raise CheckpointError(
            f"cannot read {where}: it is truncated, corrupted or not a safetensors file "
            f"({type(error).__name__}: {error})"
        ) from error
    stored = metadata.pop(SAFETENSORS_CHECKSUMS, None)
    if stored is not None:
        try:
            record = json.loads(stored)
        except ValueError as error:
            message = f"{where} is corrupted: its checksum record is damaged."
            raise CheckpointError(message) from error
        integrity.verify(_checked_part(tensors, metadata), record, where)
    elif "slimoptim.weights" in metadata:
        warnings.warn(
            f"{where} was written by an older slimoptim and holds no checksums, so damage to "
            "it cannot be detected. Save it again to add them.",
            stacklevel=3,
        )
    return tensors, metadata
