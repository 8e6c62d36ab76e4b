"""Checkpoints: compact on disk, exact resume (also in a new process), DCP, bad input.
fp32 exports, safetensors and torch.optim state dicts: tests/test_checkpoint_interop.py."""

import os
import subprocess
import sys
import warnings

import pytest
import torch
from checkpoint_common import (
    OPTIMIZERS,
    assert_same_tensors,
    build,
    new_seed,
    train,
)
from torch import nn

import slimoptim
from slimoptim import checkpoint

# (param dtype, master_weight_bits, state_bits); fp32 params keep no correction, so
# only one master setting is distinct for them.
MODES = [
    (dtype, master, state)
    for dtype in (torch.bfloat16, torch.float16)
    for master in (24, 32, None)
    for state in (8, 32)
] + [(torch.float32, 24, 8), (torch.float32, 24, 32)]


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
def test_load_keeps_native_dtypes_without_casting_to_the_param_dtype(dtype, tmp_path, monkeypatch):
    # torch.optim.Optimizer.load_state_dict would cast float32 states (and the
    # int8 correction) to the param dtype; ours must keep every bit and not call it.
    def torch_load_state_dict(*args, **kwargs):
        raise AssertionError("torch.optim.Optimizer.load_state_dict was called")

    monkeypatch.setattr(torch.optim.Optimizer, "load_state_dict", torch_load_state_dict)
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
import checkpoint_common as t
from slimoptim import checkpoint, formats
from slimoptim.state_io import CheckpointError
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
