"""Checkpoints: compact on disk, exact resume (also in a new process), DCP, bad input."""

import os
import random
import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn

import slimoptim
from slimoptim import checkpoint
from slimoptim.state_io import CheckpointError

OPTIMIZERS = {
    "AdamW": lambda ps, **mode: slimoptim.AdamW(ps, lr=2e-2, weight_decay=0.1, **mode),
    "Adam": lambda ps, **mode: slimoptim.Adam(ps, lr=2e-2, weight_decay=0.01, **mode),
    "SGD": lambda ps, **mode: slimoptim.SGD(ps, lr=2e-2, momentum=0.9, weight_decay=0.01, **mode),
    "SGD-nesterov": lambda ps, **mode: slimoptim.SGD(
        ps, lr=2e-2, momentum=0.9, nesterov=True, **mode
    ),
    "Lion": lambda ps, **mode: slimoptim.Lion(ps, lr=2e-3, weight_decay=0.1, **mode),
}
# (param dtype, master_weight_bits, state_bits); fp32 params keep no correction, so
# only one master setting is distinct for them.
MODES = [
    (dtype, master, state)
    for dtype in (torch.bfloat16, torch.float16)
    for master in (24, 32, None)
    for state in (8, 32)
] + [(torch.float32, 24, 8), (torch.float32, 24, 32)]


def new_seed() -> int:
    return random.randrange(2**31)


def make_model(dtype, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    # Sizes that are not multiples of the 32-value quantization group.
    return nn.Sequential(nn.Linear(12, 40), nn.Tanh(), nn.Linear(40, 7)).to(dtype)


def build(name: str, dtype, master, state, seed: int):
    """Model, optimizer and a scheduler that also moves betas/momentum (OneCycleLR)."""
    model = make_model(dtype, seed)
    opt = OPTIMIZERS[name](model.parameters(), master_weight_bits=master, state_bits=state)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=opt.defaults["lr"], total_steps=50)
    return model, opt, sched


def train(model, opt, sched, steps: range, data_seed: int) -> None:
    dtype = next(model.parameters()).dtype
    for step in steps:
        gen = torch.Generator().manual_seed(data_seed + step)
        x = torch.randn(16, 12, generator=gen).to(dtype)
        target = torch.randn(16, 7, generator=gen)
        loss = (model(x).float() - target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()


def assert_same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        assert torch.equal(a[key], b[key]), f"{key} differs"


def snapshot(opt) -> tuple:
    """A deep copy of everything load may change: per-param state and group options."""
    state = {id(p): {k: v.clone() for k, v in s.items()} for p, s in opt.state.items()}
    groups = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
    return state, repr(groups)


def assert_unchanged(opt, before: tuple) -> None:
    state, groups = snapshot(opt)
    assert groups == before[1]
    assert state.keys() == before[0].keys()
    for pid in state:
        assert_same_tensors(state[pid], before[0][pid])


# ------------------------------------------------------------------- size


def test_adamw_24_8_checkpoint_is_at_most_5_2_bytes_per_param(tmp_path):
    torch.manual_seed(new_seed())
    model = nn.Sequential(nn.Linear(2048, 1024), nn.Linear(1024, 2048)).to(torch.bfloat16)
    opt = slimoptim.AdamW(model.parameters())
    model(torch.randn(2, 2048, dtype=torch.bfloat16)).sum().backward()
    opt.step()
    sd = opt.state_dict()
    correction = sd["state"][0]["correction"]
    assert correction.dtype == torch.int8 and correction.element_size() == 1
    path = tmp_path / "ckpt.pt"
    torch.save({"model": model.state_dict(), "optimizer": sd}, path)
    n = sum(p.numel() for p in model.parameters())
    assert n > 4_000_000
    per_param = path.stat().st_size / n
    # 2 (bf16) + 1 (correction) + 1 + 1 (states) + 2 * 2 / 32 (bf16 scales) = 5.125
    assert 5.1 < per_param <= 5.2, per_param


# ---------------------------------------------------------- exact resume


def resume_case(name, dtype, master, state, tmp_path, k=4, n=4):
    """(params of an uninterrupted run, params after save at k / load / n more)."""
    data_seed = new_seed()
    model, opt, sched = build(name, dtype, master, state, seed=1)
    train(model, opt, sched, range(k + n), data_seed)
    straight = model.state_dict()

    model, opt, sched = build(name, dtype, master, state, seed=1)
    train(model, opt, sched, range(k), data_seed)
    path = tmp_path / f"{name}.pt"
    checkpoint.save_checkpoint(path, model, opt, sched, extra={"step": k})
    # Fresh objects, built from another init: everything must come from the file.
    model, opt, sched = build(name, dtype, master, state, seed=2)
    extra = checkpoint.load_checkpoint(path, model, opt, sched)
    assert extra == {"step": k}
    train(model, opt, sched, range(k, k + n), data_seed)
    return straight, model.state_dict(), opt


@pytest.mark.parametrize("name", OPTIMIZERS)
@pytest.mark.parametrize("dtype,master,state", MODES, ids=str)
def test_resume_from_disk_is_bit_identical(name, dtype, master, state, tmp_path):
    straight, resumed, opt = resume_case(name, dtype, master, state, tmp_path)
    assert_same_tensors(straight, resumed)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_load_keeps_native_dtypes_without_casting_to_the_param_dtype(dtype, tmp_path):
    # torch.optim.Optimizer.load_state_dict would cast float32 states (and the
    # int8 correction) to the param dtype; ours must keep every bit.
    model, opt, sched = build("AdamW", dtype, 24, 32, seed=new_seed())
    train(model, opt, sched, range(3), new_seed())
    saved = opt.state_dict()
    path = tmp_path / "opt.pt"
    torch.save(saved, path)
    fresh_model, fresh, _ = build("AdamW", dtype, 24, 32, seed=new_seed())
    fresh.load_state_dict(torch.load(path))
    loaded = fresh.state_dict()
    for pid, entries in saved["state"].items():
        assert loaded["state"][pid]["exp_avg_sq"].dtype == torch.float32
        assert loaded["state"][pid]["correction"].dtype == torch.int8
        assert_same_tensors(entries, loaded["state"][pid])
    # The float32 states hold values a bf16/fp16 cast would change.
    v = saved["state"][0]["exp_avg_sq"]
    assert not torch.equal(v.to(dtype).float(), v)


CHILD = """
import sys, torch
sys.path.insert(0, sys.argv[1])
import test_checkpoint as t
from slimoptim import checkpoint
name, dtype, master, state = sys.argv[2], getattr(torch, sys.argv[3]), sys.argv[4], int(sys.argv[5])
master = None if master == "None" else int(master)
model, opt, sched = t.build(name, dtype, master, state, seed=3)
checkpoint.load_checkpoint(sys.argv[6], model, opt, sched)
t.train(model, opt, sched, range(4, 8), int(sys.argv[7]))
torch.save(model.state_dict(), sys.argv[8])
"""


@pytest.mark.parametrize(
    "name,dtype,master,state",
    [
        ("AdamW", "bfloat16", 24, 8),
        ("SGD-nesterov", "float16", 32, 32),
        ("Lion", "bfloat16", None, 8),
    ],
)
def test_resume_in_a_new_process_is_bit_identical(name, dtype, master, state, tmp_path):
    data_seed = new_seed()
    torch_dtype = getattr(torch, dtype)
    model, opt, sched = build(name, torch_dtype, master, state, seed=1)
    train(model, opt, sched, range(4), data_seed)
    path, out = tmp_path / "ckpt.pt", tmp_path / "params.pt"
    checkpoint.save_checkpoint(path, model, opt, sched)
    train(model, opt, sched, range(4, 8), data_seed)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    args = [os.path.dirname(os.path.abspath(__file__)), name, dtype, str(master), str(state)]
    subprocess.run(
        [sys.executable, "-c", CHILD, *args, str(path), str(data_seed), str(out)],
        check=True,
        env=env,
    )
    assert_same_tensors(model.state_dict(), torch.load(out))


# ------------------------------------------------------------------- DCP


@pytest.mark.parametrize("flatten", [False, True])
@pytest.mark.parametrize("name", ["AdamW", "SGD", "Lion"])
def test_distributed_checkpoint_resume_is_bit_identical(name, flatten, tmp_path):
    dcp = pytest.importorskip("torch.distributed.checkpoint")
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )

    options = StateDictOptions(flatten_optimizer_state_dict=flatten)
    data_seed = new_seed()
    model, opt, sched = build(name, torch.bfloat16, 24, 8, seed=1)
    train(model, opt, sched, range(6), data_seed)
    straight = model.state_dict()

    model, opt, sched = build(name, torch.bfloat16, 24, 8, seed=1)
    train(model, opt, sched, range(3), data_seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "no process group: running without one"
        osd = get_optimizer_state_dict(model, opt, options=options)
        saved = {"model": model.state_dict(), "optim": osd, "sched": sched.state_dict()}
        dcp.save(saved, checkpoint_id=tmp_path)
        model, opt, sched = build(name, torch.bfloat16, 24, 8, seed=2)
        template = {
            "model": model.state_dict(),
            "optim": get_optimizer_state_dict(model, opt, options=options),
            "sched": sched.state_dict(),
        }
        dcp.load(template, checkpoint_id=tmp_path)
        model.load_state_dict(template["model"])
        set_optimizer_state_dict(model, opt, template["optim"], options=options)
        sched.load_state_dict(template["sched"])
    for saved_state in opt.state.values():
        assert saved_state["correction"].dtype == torch.int8
    train(model, opt, sched, range(3, 6), data_seed)
    assert_same_tensors(straight, model.state_dict())


# -------------------------------------------------------------- bad input


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
