"""Bad input: each mismatch is a clear error naming it, and nothing is half-loaded."""

import random
import warnings

import pytest
import torch
from checkpoint_common import (
    assert_same_tensors,
    assert_unchanged,
    build,
    make_model,
    new_seed,
    snapshot,
    train,
)
from torch import nn

import slimoptim
from slimoptim import checkpoint
from slimoptim.state_io import CheckpointError


@pytest.fixture
def trained(tmp_path):
    """A saved AdamW 24/8 checkpoint and a fresh model + optimizer to load it into."""
    model, opt, sched = build("AdamW", torch.bfloat16, 24, 8, seed=new_seed())
    train(model, opt, sched, range(2), new_seed())
    path = tmp_path / "ckpt.pt"
    checkpoint.save_checkpoint(path, model, opt, sched)
    model, opt, sched = build("AdamW", torch.bfloat16, 24, 8, seed=new_seed())
    train(model, opt, sched, range(1), new_seed())  # a non-empty state to protect
    return path, model, opt, sched


def test_unknown_format_version_is_a_clear_error(trained):
    path, model, opt, _ = trained
    for where in ("top", "groups"):
        sd = torch.load(path)["optimizer"]
        headers = (
            [sd["slimoptim"]] if where == "top" else [g["slimoptim"] for g in sd["param_groups"]]
        )
        for header in headers:
            header["format_version"] = 99
        before = snapshot(opt)
        with pytest.raises(CheckpointError, match="format_version 99 is not supported"):
            opt.load_state_dict(sd)
        assert_unchanged(opt, before)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_truncated_or_corrupted_file_names_the_file(trained, damage):
    path, model, opt, sched = trained
    data = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        path.write_bytes(bytes(random.randrange(256) for _ in range(len(data) // 8)))
    else:
        path.write_bytes(b"")
    params = {k: v.clone() for k, v in model.state_dict().items()}
    before = snapshot(opt)
    with pytest.raises(CheckpointError, match="cannot read checkpoint .*ckpt.pt"):
        checkpoint.load_checkpoint(path, model, opt, sched)
    assert_unchanged(opt, before)
    assert_same_tensors(params, model.state_dict())


def _other_model_case(change: str):
    seed = new_seed()
    if change == "shape":
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(12, 41), nn.Tanh(), nn.Linear(41, 7)).bfloat16()
        return model, slimoptim.AdamW(model.parameters())
    if change == "count":
        model = make_model(torch.bfloat16, seed)
        model.append(nn.Linear(7, 7).bfloat16())
        return model, slimoptim.AdamW(model.parameters())
    model = make_model(torch.bfloat16, seed)
    if change == "type":
        return model, slimoptim.Adam(model.parameters())
    if change == "mode":
        return model, slimoptim.AdamW(model.parameters(), state_bits=32)
    if change == "master":
        return model, slimoptim.AdamW(model.parameters(), master_weight_bits=32)
    if change == "group_size":
        return model, slimoptim.AdamW(model.parameters(), group_size=64)
    raise AssertionError(change)


MISMATCHES = {
    "shape": r"'0.weight' has shape \(40, 12\) in the checkpoint and \(41, 12\)",
    "count": r"unexpected keys|missing keys \['3.weight', '3.bias'\]",
    "type": "belongs to a AdamW optimizer, not Adam",
    "mode": "saved with state_bits=8 but the optimizer uses state_bits=32",
    "master": "saved with master_weight_bits=24 but the optimizer uses master_weight_bits=32",
    "group_size": "saved with group_size=32 but the optimizer uses group_size=64",
}


@pytest.mark.parametrize("change", MISMATCHES)
def test_checkpoint_for_another_model_or_optimizer_changes_nothing(trained, change):
    path, *_ = trained
    model, opt = _other_model_case(change)
    model(torch.randn(3, 12, dtype=torch.bfloat16)).float().sum().backward()
    opt.step()
    params = {k: v.clone() for k, v in model.state_dict().items()}
    before = snapshot(opt)
    with pytest.raises(CheckpointError, match=MISMATCHES[change]):
        checkpoint.load_checkpoint(path, model, opt)
    assert_unchanged(opt, before)
    assert_same_tensors(params, model.state_dict())


def test_optimizer_state_for_other_param_count_is_refused(trained):
    path, *_ = trained
    model = make_model(torch.bfloat16, new_seed())
    opt = slimoptim.AdamW(list(model.parameters())[:3])
    with pytest.raises(CheckpointError, match="has 4 parameters in the checkpoint and 3"):
        opt.load_state_dict(torch.load(path)["optimizer"])


def _drop(sd: dict, what: str) -> None:
    if what == "state entry":
        del sd["state"][1]["exp_avg_sq_scale"]
    elif what == "step":
        del sd["state"][0]["step"]
    elif what == "group option":
        del sd["param_groups"][0]["betas"]
    elif what == "state":
        del sd["state"]
    elif what == "header":
        del sd["slimoptim"]
        for group in sd["param_groups"]:
            del group["slimoptim"]


MISSING = {
    "state entry": r"state of parameter 1 \(shape \(40,\)\) has no \['exp_avg_sq_scale'\]",
    "step": r"has no \['step'\]",
    "group option": r"parameter group 0 has no \['betas'\]",
    "state": "expected a dict with 'state' and 'param_groups'",
    "header": "not written by a slimoptim optimizer",
}


@pytest.mark.parametrize("what", MISSING)
def test_missing_key_is_named_and_changes_nothing(trained, what):
    path, model, opt, _ = trained
    sd = torch.load(path)["optimizer"]
    _drop(sd, what)
    before = snapshot(opt)
    with pytest.raises(CheckpointError, match=MISSING[what]):
        opt.load_state_dict(sd)
    assert_unchanged(opt, before)


def test_wrong_dtype_of_a_state_tensor_is_named(trained):
    path, model, opt, _ = trained
    sd = torch.load(path)["optimizer"]
    sd["state"][2]["correction"] = sd["state"][2]["correction"].to(torch.bfloat16)
    before = snapshot(opt)
    with pytest.raises(CheckpointError, match="'correction' of parameter 2 is torch.bfloat16"):
        opt.load_state_dict(sd)
    assert_unchanged(opt, before)


def test_format_version_survives_distributed_checkpoint(tmp_path, monkeypatch):
    dcp = pytest.importorskip("torch.distributed.checkpoint")
    from torch.distributed.checkpoint import state_dict as dsd

    from slimoptim import state_io

    model, opt, sched = build("Lion", torch.bfloat16, 24, 8, seed=new_seed())
    train(model, opt, sched, range(2), new_seed())
    monkeypatch.setattr(state_io, "FORMAT_VERSION", 5)  # as a future slimoptim would write
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"optim": dsd.get_optimizer_state_dict(model, opt)}, checkpoint_id=tmp_path)
        monkeypatch.undo()
        model, opt, _ = build("Lion", torch.bfloat16, 24, 8, seed=new_seed())
        template = {"optim": dsd.get_optimizer_state_dict(model, opt)}
        dcp.load(template, checkpoint_id=tmp_path)
        with pytest.raises(CheckpointError, match="format_version 5 is not supported"):
            dsd.set_optimizer_state_dict(model, opt, template["optim"])


def test_a_scheduler_without_saved_state_is_refused(tmp_path):
    model, opt, sched = build("SGD", torch.bfloat16, 24, 8, seed=new_seed())
    train(model, opt, sched, range(2), new_seed())
    path = tmp_path / "no_sched.pt"
    checkpoint.save_checkpoint(path, model, opt)
    model, opt, sched = build("SGD", torch.bfloat16, 24, 8, seed=new_seed())
    before = snapshot(opt)
    with pytest.raises(CheckpointError, match="no_sched.pt.*holds no scheduler state"):
        checkpoint.load_checkpoint(path, model, opt, sched)
    assert_unchanged(opt, before)
