"""Checksummed checkpoints: damage is refused before anything changes; unloadable extras
are refused before anything is written."""

from __future__ import annotations

import argparse
import json
import random
import struct
import warnings
import zipfile

import pytest
import safetensors.torch
import torch
from checkpoint_common import assert_same_tensors, build, new_seed, snapshot, train
from test_state_io import assert_unchanged

from slimoptim import checkpoint
from slimoptim.state_io import CheckpointError


@pytest.fixture
def saved(tmp_path):
    """A saved AdamW 24/8 checkpoint and fresh objects (with their own state) to load into."""
    model, opt, sched = build("AdamW", torch.bfloat16, 24, 8, seed=new_seed())
    train(model, opt, sched, range(2), new_seed())
    path = tmp_path / "ckpt.pt"
    checkpoint.save_checkpoint(path, model, opt, sched, extra={"step": 2})
    saved_state = (model.state_dict(), opt.state_dict())
    model, opt, sched = build("AdamW", torch.bfloat16, 24, 8, seed=new_seed())
    train(model, opt, sched, range(1), new_seed())
    return path, saved_state, (model, opt, sched)


def tensor_records(path) -> list[tuple[str, int, int]]:
    """(name, data offset, size) of every tensor record in a torch.save zip."""
    records = []
    with zipfile.ZipFile(path) as archive, open(path, "rb") as f:
        for info in archive.infolist():
            if "/data/" not in info.filename:
                continue
            f.seek(info.header_offset + 26)
            name_len, extra_len = struct.unpack("<HH", f.read(4))
            start = info.header_offset + 30 + name_len + extra_len
            records.append((info.filename, start, info.file_size))
    return records


def flip_bit(path, offset: int, bit: int) -> bytes:
    data = bytearray(path.read_bytes())
    original = bytes(data)
    data[offset] ^= 1 << bit
    path.write_bytes(bytes(data))
    return original


def load_outcome(path, objects) -> str:
    """'refused' (and nothing changed), or 'loaded' with exactly the saved contents."""
    model, opt, sched = objects
    params = {k: v.clone() for k, v in model.state_dict().items()}
    before = snapshot(opt)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            checkpoint.load_checkpoint(path, model, opt, sched)
    except CheckpointError:
        assert_unchanged(opt, before)
        assert_same_tensors(params, model.state_dict())
        return "refused"
    return "loaded"


def test_a_flipped_bit_in_any_tensor_record_is_refused_naming_the_tensor(saved):
    """Issue case 1: one flipped bit mid-record loaded silently for 28 of 34 records."""
    path, _, objects = saved
    records = tensor_records(path)
    assert len(records) >= 10
    for name, start, size in records:
        if size == 0:
            continue
        original = flip_bit(path, start + size // 2, random.randrange(8))
        with pytest.raises(CheckpointError, match=r"ckpt\.pt.* is corrupted: tensor .*checksum"):
            checkpoint.load_checkpoint(path, *objects)
        assert load_outcome(path, objects) == "refused", name
        path.write_bytes(original)


def test_any_flipped_bit_or_zeroed_block_is_refused_or_changes_nothing(saved):
    """Flips anywhere (zip headers, pickle, checksum record, tensors): the file is refused,
    or what loads is bit for bit what was saved (a flip in zip padding or a CRC field)."""
    path, (model_sd, opt_sd), objects = saved
    size = path.stat().st_size
    offsets = random.sample(range(size), 60)
    outcomes = []
    for offset in offsets:
        original = flip_bit(path, offset, random.randrange(8))
        outcome = load_outcome(path, objects)
        if outcome == "loaded":
            assert_same_tensors(model_sd, objects[0].state_dict())
            loaded = objects[1].state_dict()["state"]
            for index, entry in opt_sd["state"].items():
                assert_same_tensors(entry, loaded[index])
        outcomes.append(outcome)
        path.write_bytes(original)
    assert outcomes.count("refused") > len(offsets) // 2
    data = bytearray(path.read_bytes())
    data[size // 2 : size // 2 + 256] = bytes(256)  # issue: zeroing 256 bytes loaded
    path.write_bytes(bytes(data))
    assert load_outcome(path, objects) == "refused"


def test_a_checkpoint_without_checksums_loads_with_a_warning(saved, tmp_path):
    """Format 1 (before checksums) still loads, with a warning that says how to fix it."""
    path, (model_sd, _), objects = saved
    ckpt = checkpoint.read_checkpoint(path)
    ckpt["slimoptim_checkpoint"] = 1
    old = tmp_path / "old.pt"
    torch.save(ckpt, old)
    with pytest.warns(UserWarning, match="no checksums.*Save it again"):
        assert checkpoint.load_checkpoint(old, *objects) == {"step": 2}
    assert_same_tensors(model_sd, objects[0].state_dict())
    ckpt["slimoptim_checkpoint"] = 2  # format 2 must carry its checksums
    torch.save(ckpt, old)
    with pytest.raises(CheckpointError, match="checksum record is missing"):
        checkpoint.load_checkpoint(old, *objects)


@pytest.mark.parametrize("fp32", [False, True])
def test_safetensors_files_are_verified(tmp_path, fp32):
    model, opt, sched = build("AdamW", torch.bfloat16, 24, 8, seed=new_seed())
    train(model, opt, sched, range(1), new_seed())
    path = tmp_path / "weights.safetensors"
    checkpoint.save_model(model, path, opt, fp32=fp32)
    fresh, fresh_opt, _ = build("AdamW", torch.bfloat16, 24, 8, seed=new_seed())
    with safetensors.safe_open(str(path), framework="pt") as f:
        header_len = 8 + struct.unpack("<Q", path.read_bytes()[:8])[0]
        names = list(f.keys())
    data_size = path.stat().st_size - header_len
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    for _ in range(8):  # flips in the tensor data
        original = flip_bit(path, header_len + random.randrange(data_size), random.randrange(8))
        with pytest.raises(CheckpointError, match="is corrupted: tensor tensors"):
            checkpoint.load_model(fresh, path, fresh_opt if fp32 else None)
        path.write_bytes(original)
    # a changed metadata value (the kind of weights) is caught by the metadata checksum
    tensors, metadata = safetensors.torch.load_file(str(path)), None
    with safetensors.safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    metadata["slimoptim.weights"] = "model" if fp32 else "fp32_master"
    safetensors.torch.save_file(tensors, str(path), metadata=metadata)
    with pytest.raises(CheckpointError, match="its metadata .* does not match"):
        checkpoint.load_model(fresh, path, fresh_opt if fp32 else None)
    assert_same_tensors(before, fresh.state_dict())
    # a slimoptim file from before checksums: a warning; a foreign file: nothing to check
    del metadata["slimoptim.checksums"]
    safetensors.torch.save_file(tensors, str(path), metadata=metadata)
    with pytest.warns(UserWarning, match="no checksums"):
        checkpoint.load_model(fresh, path, fresh_opt if fp32 else None, strict=False)
    safetensors.torch.save_file(tensors, str(path))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        checkpoint.load_model(fresh, path, fresh_opt if fp32 else None, strict=False)
    assert set(names) <= set(fresh.state_dict())


# ------------------------------------------------- extras load_checkpoint cannot read


@pytest.mark.parametrize(
    "extra,where,kind",
    [
        ({"args": argparse.Namespace(lr=0.1)}, r"extra\['args'\]", "argparse.Namespace"),
        ({"hooks": [1, lambda: 0]}, r"extra\['hooks'\]\[1\]", "function"),
        ({"rng": random.Random(0)}, r"extra\['rng'\]", "random.Random"),
    ],
    ids=["namespace", "lambda", "random"],
)
def test_an_extra_that_load_checkpoint_cannot_read_is_refused_before_writing(
    saved, extra, where, kind
):
    """Issue case 3: an argparse.Namespace saved fine and every load failed."""
    path, (model_sd, _), objects = saved
    model, opt, sched = build("AdamW", torch.bfloat16, 24, 8, seed=new_seed())
    before = path.read_bytes()
    with pytest.raises(TypeError, match=rf"{where} is of type .*{kind}.*Nothing was written.*vars"):
        checkpoint.save_checkpoint(path, model, opt, sched, extra=extra)
    assert path.read_bytes() == before
    assert sorted(p.name for p in path.parent.iterdir()) == ["ckpt.pt"]
    json.dumps(vars(argparse.Namespace(lr=0.1)))  # the suggested fix is plain data
    checkpoint.save_checkpoint(path, model, opt, sched, extra={"args": {"lr": 0.1}})
    assert checkpoint.load_checkpoint(path, *objects) == {"args": {"lr": 0.1}}
