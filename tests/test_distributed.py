"""FSDP2 and DDP on CPU with gloo: 1, 2 and 3 processes (scenarios in dist_worker.py).

One module fixture runs every scenario once (world size 1 in this process, 2 and 3
as subprocesses, in the order that lets each load the others' checkpoints); the
tests compare what the ranks wrote.
"""

from __future__ import annotations

import copy
import os
import random
import subprocess
import sys

import pytest
import safetensors.torch
import torch
import torch.distributed as dist

import slimoptim
from slimoptim import distributed as sdist
from slimoptim.state_io import CheckpointError

if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("needs torch.distributed with the gloo backend", allow_module_level=True)

import dist_worker as worker  # noqa: E402  (tests/ is on sys.path under pytest)

SEED = random.randrange(2**31)
LEVEL = 1.01 / 127  # half a momentum level at the top of a group, relative to its scale


def spawn(stages: str, world: int, workdir: str) -> None:
    env = dict(os.environ, SLIMOPTIM_TEST_SEED=str(SEED))
    procs = [
        subprocess.Popen(
            [sys.executable, worker.__file__, stages, str(rank), str(world), workdir],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for rank in range(world)
    ]
    logs = [p.communicate(timeout=300)[0].decode() for p in procs]
    for rank, (proc, log) in enumerate(zip(procs, logs, strict=True)):
        assert proc.returncode == 0, f"rank {rank} of {world} failed (seed {SEED}):\n{log}"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("dist"))
    worker.DATA_SEED = SEED
    out = {1: worker.run("fsdp", 0, 1, workdir, store=dist.HashStore())}
    spawn("fsdp,ddp,mixed_precision", 2, workdir)  # loads the world-size-1 checkpoint
    spawn("fsdp", 3, workdir)  # loads those of world sizes 1 and 2
    for world in (2, 3):
        name = "fsdp,ddp,mixed_precision" if world == 2 else "fsdp"
        out[world] = torch.load(os.path.join(workdir, f"w{world}_{name}.pt"))
    out["reshard_to_1"] = worker.run("reshard", 0, 1, workdir, store=dist.HashStore())["reshard"]
    out["workdir"] = workdir
    return out


def assert_same(a: dict, b: dict, what: str) -> None:
    for name in a:
        for key in a[name]:
            assert torch.equal(a[name][key], b[name][key]), f"{what}: {name}.{key} (seed {SEED})"


def relative_gap(a: dict, b: dict, init: dict) -> float:
    """Largest ||a - b|| / ||a - init|| over the parameters' masters."""
    return max(
        (
            (a[n]["master"] - b[n]["master"]).norm() / (a[n]["master"] - init[n]["master"]).norm()
        ).item()
        for n in a
    )


def plain_run(steps) -> tuple:
    """The unsharded single-process run the FSDP2 runs are compared with."""
    model = worker.build(0)
    opt = worker.optimizer(model)
    worker.train(model, opt, steps, 0, 1)
    return model, opt


# ------------------------------------------------------------------- FSDP2


def test_world_size_1_is_bit_identical_to_unsharded_training(runs):
    model, opt = plain_run(range(worker.STEPS))
    fsdp = runs[1]["fsdp"]["straight"]
    for name, p in model.named_parameters():
        assert torch.equal(p.detach(), fsdp[name]["param"]), f"{name} (seed {SEED})"
        assert torch.equal(opt.master_weight(p), fsdp[name]["master"])


@pytest.mark.parametrize("world", [1, 2, 3])
def test_dcp_resume_is_bit_identical(runs, world):
    fsdp = runs[world]["fsdp"]
    assert_same(fsdp["straight"], fsdp["resumed"], f"resume at world size {world}")
    assert_same(fsdp["straight"], fsdp["resumed_flat"], f"flattened resume, world {world}")


@pytest.mark.parametrize("world", [1, 2, 3])
def test_full_state_dict_resume_is_bit_identical(runs, world):
    fsdp = runs[world]["fsdp"]
    assert_same(fsdp["straight"], fsdp["resumed_full"], f"full_state_dict, world {world}")


@pytest.mark.parametrize("world", [1, 2, 3])
def test_sharded_fp32_state_dict_holds_the_masters(runs, world):
    fsdp = runs[world]["fsdp"]
    for name, entry in fsdp["straight"].items():
        assert fsdp["fp32_masters"][name].dtype == torch.float32
        assert torch.equal(fsdp["fp32_masters"][name], entry["master"]), name


@pytest.mark.parametrize("world", [1, 2, 3])
def test_gradient_release_is_bit_identical_and_frees_sharded_grads(runs, world):
    fsdp = runs[world]["fsdp"]
    assert fsdp["release_grads_freed"]
    assert_same(fsdp["straight"], fsdp["release"], f"gradient release at world size {world}")


@pytest.mark.parametrize("world", [1, 2, 3])
def test_dcp_resume_under_gradient_release_is_bit_identical(runs, world):
    fsdp = runs[world]["fsdp"]
    assert fsdp["release_load_grads_freed"]  # DCP's initialising step left no gradient
    assert_same(fsdp["straight"], fsdp["release_resumed"], f"release resume, world {world}")


RESHARDS = [(1, 2), (1, 3), (2, 3), (2, 1), (3, 1)]


def loaded(runs, source: int, target: int, suffix: str = "") -> dict:
    if target == 1:
        return runs["reshard_to_1"][f"loaded_w{source}{suffix}"]
    return runs[target]["fsdp"][f"loaded_w{source}{suffix}"]


@pytest.mark.parametrize("suffix", ["", "_flat"])
@pytest.mark.parametrize("source,target", RESHARDS)
def test_reshard_keeps_masters_exact_and_states_within_half_a_level(runs, source, target, suffix):
    saved = runs[source]["fsdp"]["at_save"]
    got = loaded(runs, source, target, suffix)
    for name, entry in saved.items():
        for key in ("param", "master", "step"):
            assert torch.equal(entry[key], got[name][key]), f"{name}.{key} (seed {SEED})"
        # The second moment is re-coded to the nearest level of its new group: exact where
        # the new group's step is no coarser than the saved group's (its levels are among
        # the new ones), otherwise within half a step, at most 1/16 of v's binade.
        v, v_got = entry["exp_avg_sq"].double(), got[name]["exp_avg_sq"].double()
        assert ((v_got - v).abs() <= v / 16).all(), f"{name} (seed {SEED})"
        m, m_got = entry["exp_avg"], got[name]["exp_avg"]
        bound = LEVEL * m.abs().max()
        assert (m - m_got).abs().max() <= bound, f"{name} (seed {SEED})"
    # Rows of 32 values hold whole groups of 8 at any sharding: exact there.
    assert torch.equal(saved["4.weight"]["exp_avg"], got["4.weight"]["exp_avg"])


@pytest.mark.parametrize("source,target", RESHARDS)
def test_training_continues_after_a_reshard(runs, source, target):
    if target == 1:
        continued = runs["reshard_to_1"][f"continued_w{source}"]
    else:
        continued = runs[target]["fsdp"][f"continued_w{source}"]
    straight, init = runs[source]["fsdp"]["straight"], runs[source]["fsdp"]["init"]
    # As close to the uninterrupted run as a run at the target world size from the start
    # (within a factor of 2): the reshard itself adds no error of its own size.
    native = relative_gap(straight, runs[target]["fsdp"]["straight"], init)
    assert relative_gap(straight, continued, init) < max(2 * native, 0.05)


@pytest.fixture(scope="module")
def format_gap(runs) -> float:
    """slimoptim's own gap (world size 1) to float32 torch.optim.AdamW on the same data."""
    init, one = runs[1]["fsdp"]["init"], runs[1]["fsdp"]["straight"]
    ref = torch.nn.Sequential(*copy.deepcopy(list(worker.build(0).float())))
    torch_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    for step in range(worker.STEPS):
        ref(worker.batch(step, 0, 1, torch.float32)).square().mean().backward()
        torch_opt.step()
        torch_opt.zero_grad()
    return relative_gap(one, {n: {"master": p.detach()} for n, p in ref.named_parameters()}, init)


def test_world_sizes_differ_by_little(runs, format_gap):
    """Measured in docs/distributed.md: groups restart at each shard and the stochastic
    rounding is indexed per shard, so runs differ across world sizes, by little."""
    init, one = runs[1]["fsdp"]["init"], runs[1]["fsdp"]["straight"]
    gaps = {w: relative_gap(one, runs[w]["fsdp"]["straight"], init) for w in (2, 3)}
    gaps["torch_fp32"] = format_gap
    print(f"\nrelative gap to world size 1 after {worker.STEPS} steps (seed {SEED}): {gaps}")
    # Sharding moves the result by no more than the 8-bit format itself does (its gap
    # to float32 torch.optim.AdamW), within a factor of 2; a mixed-up shard would be ~1.
    bound = max(2 * format_gap, 0.1)
    assert gaps[2] < bound and gaps[3] < bound
    assert gaps[2] > 0 and gaps[3] > 0  # not identical: documented


def test_empty_shard_holds_empty_states(runs):
    # 5.weight has 2 rows: the third of three ranks holds none, and still steps and saves.
    fsdp = runs[3]["fsdp"]
    assert_same(fsdp["straight"], fsdp["resumed"], "world size 3")
    assert fsdp["straight"]["5.weight"]["master"].shape == (2, 5)


def test_mixed_precision_policies(runs, format_gap):
    mp = runs[2]["mixed_precision"]
    init, reference = runs[2]["fsdp"]["init"], runs[2]["fsdp"]["straight"]
    for name in ("fp32_params_bf16_compute", "bf16_params_fp32_reduce"):
        assert relative_gap(reference, mp[name], init) < max(2 * format_gap, 0.1), name
    for entry in mp["fp32_params_bf16_compute"].values():
        assert entry["param"].dtype == torch.float32
        assert torch.equal(entry["param"], entry["master"])  # fp32 params: no correction


# --------------------------------------------------------------------- DDP


def test_ddp_is_bit_identical_to_averaging_the_ranks_gradients(runs):
    """DDP multiplies each rank's gradient by 1/2 (exact) and sums the two (bf16)."""
    model = worker.build(0)
    opt = worker.optimizer(model)
    for step in range(worker.STEPS):
        halves = []
        for rank in range(2):
            model(worker.batch(step, rank, 2)).float().square().mean().backward()
            halves.append([p.grad * 0.5 for p in model.parameters()])
            opt.zero_grad()
        for p, g0, g1 in zip(model.parameters(), *halves, strict=True):
            p.grad = g0 + g1
        opt.step()
        opt.zero_grad()
    ddp = runs[2]["ddp"]
    for name, value in model.state_dict().items():
        assert torch.equal(value, ddp["params"][name]), f"{name} (seed {SEED})"
    assert "FSDP2" in ddp["release_error"]


# ---------------------------------------------------- conversions, refusals


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # DCP in one process
def test_fsdp2_checkpoint_to_one_file_and_fp32_weights(runs, tmp_path):
    saved = runs[2]["fsdp"]["at_save"]
    model = worker.build(7)
    opt = worker.optimizer(model)
    sdist.load_unsharded(os.path.join(runs["workdir"], "ckpt_w2"), model, opt)
    for name, p in model.named_parameters():
        assert torch.equal(opt.master_weight(p).view(p.shape), saved[name]["master"]), name
    path = tmp_path / "one.pt"
    slimoptim.save_checkpoint(path, model, opt)
    slimoptim.save_model(model, tmp_path / "fp32.safetensors", opt, fp32=True)
    fresh = worker.build(8)
    fresh_opt = worker.optimizer(fresh)
    slimoptim.load_checkpoint(path, fresh, fresh_opt)
    worker.train(fresh, fresh_opt, range(worker.SAVE_AT, worker.STEPS), 0, 1)
    straight = runs[2]["fsdp"]["straight"]
    continued = {
        n: {"master": fresh_opt.master_weight(p).view(p.shape)} for n, p in fresh.named_parameters()
    }
    init = runs[2]["fsdp"]["init"]
    native = relative_gap(straight, runs[1]["fsdp"]["straight"], init)  # as in the reshard test
    assert relative_gap(straight, continued, init) < max(2 * native, 0.05)
    weights = safetensors.torch.load_file(tmp_path / "fp32.safetensors")
    for name, entry in saved.items():
        assert weights[name].dtype == torch.float32
        assert torch.equal(weights[name], entry["master"]), name


def test_full_state_dict_loads_into_an_unsharded_optimizer(runs):
    whole = torch.load(os.path.join(runs["workdir"], "full_w2.pt"))
    model = worker.build(9)
    opt = worker.optimizer(model)
    model.load_state_dict(whole["model"])
    opt.load_state_dict(whole["optim"])  # row form, whole tensors: the one shard is all rows
    for name, p in model.named_parameters():
        saved = runs[2]["fsdp"]["at_save"][name]
        assert torch.equal(opt.master_weight(p).view(p.shape), saved["master"]), name


def test_dtensor_states_into_an_unsharded_optimizer_are_refused(runs):
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        sharded, sharded_opt = worker.fsdp_pair(1)
        worker.train(sharded, sharded_opt, range(1), 0, 1)
        sd = sharded_opt.state_dict()
        model = worker.build(0)
        opt = worker.optimizer(model)
        worker.train(model, opt, range(1), 0, 1)
        before = copy.deepcopy(opt.state_dict())
        with pytest.raises(CheckpointError, match="load_unsharded"):
            opt.load_state_dict(sd)
        assert_same_state(before, opt.state_dict())
    finally:
        dist.destroy_process_group()


def assert_same_state(a: dict, b: dict) -> None:
    for pid, entry in a["state"].items():
        for key, value in entry.items():
            assert torch.equal(value, b["state"][pid][key])


def test_other_placements_are_refused_with_the_fix():
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        model = worker.build(0)
        fully_shard(
            model,
            mesh=init_device_mesh("cpu", (1,)),
            shard_placement_fn=lambda p: Shard(1) if p.dim() == 2 else Shard(0),
        )
        opt = worker.optimizer(model)
        worker.train(model, opt, range(1), 0, 1)
        with pytest.raises(NotImplementedError, match="shard_placement_fn"):
            opt.state_dict()
    finally:
        dist.destroy_process_group()


def test_row_form_round_trips_a_plain_optimizer_exactly():
    """The row form of an unsharded optimizer loads back bit for bit (one shard)."""
    model = worker.build(SEED % 1000)
    opt = worker.optimizer(model)
    worker.train(model, opt, range(3), 0, 1)
    with sdist.row_form(opt):
        sd = copy.deepcopy(opt.state_dict())
    assert sd["state"][0]["exp_avg_scale"].dim() == 2
    flat = copy.deepcopy(opt.state_dict())
    fresh = worker.optimizer(worker.build(0))
    fresh_params = [p for g in fresh.param_groups for p in g["params"]]
    for p, q in zip(fresh_params, [p for g in opt.param_groups for p in g["params"]], strict=True):
        p.data.copy_(q)
    fresh.load_state_dict(sd)
    assert_same_state(flat, fresh.state_dict())
