"""Checksums of saved objects: every tensor's bytes, and everything else (the metadata).

:func:`checksums` walks a nested object (dicts, lists, tuples, tensors, plain
values) in a fixed order and returns an xxh3-128 digest of each tensor's bytes,
keyed by the tensor's path in the object (``optimizer['state'][0]['exp_avg']``),
and one digest of the rest: the structure, every non-tensor value, and each
tensor's dtype, shape and strides. :func:`verify` recomputes them on the loaded
object and raises ``CheckpointError`` naming what differs. A flipped bit in a
tensor changes its digest; one in the metadata changes the metadata digest (or
makes the file unreadable); one in the stored digests no longer matches.

xxh3 is not cryptographic: it detects accidental damage (disk, network, a
truncated copy), not tampering. It hashes at memory speed, about 10x faster than
reading the file (docs/checkpoints.md, benchmarks/checksum_speed.py).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import xxhash

from .errors import CheckpointError

ALGORITHM = "xxh3_128"


def tensor_digest(t: torch.Tensor) -> str:
    """xxh3-128 of the tensor's elements in row-major order (a GPU tensor is copied to CPU)."""
    t = t.detach().resolve_conj().resolve_neg()  # lazy views: their values, not their bits
    if t.layout != torch.strided:
        t = t.to_dense()
    flat = t.cpu().contiguous().reshape(-1).view(torch.uint8)
    return xxhash.xxh3_128_hexdigest(flat.numpy())


def _child_path(path: str, key) -> str:
    if not path and isinstance(key, str):
        return key  # top-level keys bare: optimizer['state'][0]['exp_avg']
    return f"{path}[{key!r}]"


def _walk(obj, path: str, tokens: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (path, tensor) for every tensor; append a token describing every other node."""
    if isinstance(obj, torch.Tensor):
        strides = obj.stride() if obj.layout == torch.strided else obj.layout
        tokens.append(f"T({obj.dtype},{tuple(obj.shape)},{strides})")
        yield path, obj
    elif isinstance(obj, dict):
        tokens.append(f"{type(obj).__qualname__}{{{len(obj)}")
        for key, value in obj.items():
            tokens.append(f"{type(key).__qualname__}:{key!r}")
            yield from _walk(value, _child_path(path, key), tokens)
        tokens.append("}")
        attributes = getattr(obj, "__dict__", None)  # a state_dict's _metadata (versions)
        if attributes:
            yield from _walk(attributes, f"{path}.__dict__", tokens)
    elif isinstance(obj, (list, tuple)):
        tokens.append(f"{type(obj).__qualname__}[{len(obj)}")
        for i, value in enumerate(obj):
            yield from _walk(value, _child_path(path, i), tokens)
        tokens.append("]")
    elif isinstance(obj, (set, frozenset)):  # iteration order varies between processes
        tokens.append(f"{type(obj).__qualname__}:{sorted(repr(v) for v in obj)!r}")
    else:  # repr of a float round-trips exactly; strings are quoted and escaped
        tokens.append(f"{type(obj).__qualname__}:{obj!r}")


def checksums(obj) -> dict:
    """The checksum record of ``obj``: {"algorithm", "tensors": {path: digest}, "metadata"}."""
    tokens: list[str] = []
    tensors: dict[str, str] = {}
    seen: dict[tuple, str] = {}  # tied tensors (same view of the same memory) hashed once
    for path, t in _walk(obj, "", tokens):
        if t.layout != torch.strided or t.is_conj() or t.is_neg():
            tensors[path] = tensor_digest(t)  # no address (sparse) or not its bits (lazy views)
            continue
        view = (t.device, t.data_ptr(), t.dtype, tuple(t.shape), t.stride())
        if view not in seen or t.numel() == 0:
            seen[view] = tensor_digest(t)
        tensors[path] = seen[view]
    metadata = xxhash.xxh3_128_hexdigest("\n".join(tokens).encode("utf-8", "backslashreplace"))
    return {"algorithm": ALGORITHM, "tensors": tensors, "metadata": metadata}


def verify(obj, record, where: str) -> None:
    """Raise CheckpointError (naming ``where`` and what differs) unless ``obj`` matches."""
    if (
        not isinstance(record, dict)
        or record.get("algorithm") != ALGORITHM
        or not isinstance(record.get("tensors"), dict)
        or not isinstance(record.get("metadata"), str)
    ):
        raise CheckpointError(
            f"{where} is corrupted: its checksum record is damaged or of an unknown kind."
        )
    actual = checksums(obj)
    expected = record["tensors"]
    bad = [path for path, digest in actual["tensors"].items() if expected.get(path) != digest]
    if bad:
        shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise CheckpointError(
            f"{where} is corrupted: tensor {shown} does not match its checksum ({ALGORITHM}). "
            "Nothing was loaded; use another copy of the file."
        )
    if actual["metadata"] != record["metadata"] or actual["tensors"].keys() != expected.keys():
        raise CheckpointError(
            f"{where} is corrupted: its metadata (structure, options, dtypes or shapes) does not "
            f"match its checksum ({ALGORITHM}). Nothing was loaded; use another copy of the file."
        )
