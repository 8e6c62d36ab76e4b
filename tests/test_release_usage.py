"""Gradient release with the rest of a training loop (schedulers, accumulation,
clipping, GradScaler, DDP, FSDP2, activation checkpointing, state loading) and the
uses it refuses. Same method as tests/test_release.py: two copies, compared bit for bit.
"""

import copy
import warnings

import pytest
import torch
from release_common import (
    BATCH,
    DIM,
    OPTIMIZERS,
    adamw_pair,
    assert_same,
    batch,
    make_models,
    new_seed,
    reference_step,
)
from torch import nn

import slimoptim


@pytest.mark.parametrize("scheduler_first", [True, False])
def test_lr_scheduler_drives_the_released_steps(scheduler_first):
    seed, ref_model, ref_opt, model, opt = adamw_pair()
    ref_sched = torch.optim.lr_scheduler.LambdaLR(ref_opt, lambda s: 1.0 / (1 + s))
    if scheduler_first:
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
        handle = slimoptim.enable_gradient_release(model, opt)
    else:
        handle = slimoptim.enable_gradient_release(model, opt)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    gen = torch.Generator().manual_seed(seed)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(4):
            tokens, targets = batch(gen)
            reference_step(ref_opt, ref_model(tokens, targets))
            ref_sched.step()
            model(tokens, targets).backward()
            opt.step()
            sched.step()
    assert not [w for w in caught if "lr_scheduler" in str(w.message)]
    assert opt.param_groups[0]["lr"] == ref_opt.param_groups[0]["lr"] < 1e-2 / 3
    assert_same(ref_model, ref_opt, model, opt, f"seed {seed}")
    handle.remove()
    assert "zero_grad" not in opt.__dict__


@pytest.mark.parametrize("name,kwargs", [OPTIMIZERS[0], OPTIMIZERS[3]])
def test_accumulation_steps_release_on_the_last_microbatch(name, kwargs):
    seed = new_seed()
    ref_model, model = make_models(torch.bfloat16, seed)
    ref_opt = getattr(slimoptim, name)(ref_model.parameters(), **kwargs)
    opt = getattr(slimoptim, name)(model.parameters(), **kwargs)
    handle = slimoptim.enable_gradient_release(model, opt, accumulation_steps=3, bucket_bytes=0)
    gen = torch.Generator().manual_seed(seed)
    for step in range(3):
        for micro in range(3):
            tokens, targets = batch(gen)
            # `sometimes` gets a gradient in the first microbatch of step 1 only, so its
            # hook does not fire when releasing: the end-of-backward sweep must step it.
            use_sometimes = step != 1 or micro == 0
            ref_model(tokens, targets, use_sometimes).backward()
            before = model.hidden.weight.clone()
            model(tokens, targets, use_sometimes).backward()
            if micro < 2:
                assert handle.accumulating == (micro < 1)
                assert model.hidden.weight.grad is not None
                assert torch.equal(model.hidden.weight, before)
        ref_opt.step()
        ref_opt.zero_grad()
        assert all(p.grad is None for p in model.parameters())
        assert_same(ref_model, ref_opt, model, opt, f"seed {seed}, step {step}")


def test_per_tensor_clipping_equals_clipping_each_param_before_step():
    seed, ref_model, ref_opt, model, opt = adamw_pair(dtype=torch.float32)
    max_norm = 0.05
    slimoptim.enable_gradient_release(model, opt, clip_grad_norm_per_tensor=max_norm)
    unclipped_model = copy.deepcopy(ref_model)
    unclipped_opt = slimoptim.AdamW(unclipped_model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(3):
        tokens, targets = batch(gen)
        ref_model(tokens, targets).backward()
        for p in ref_model.parameters():
            if p.grad is not None:
                torch.nn.utils.clip_grad_norm_([p], max_norm)
        ref_opt.step()
        ref_opt.zero_grad()
        unclipped_model(tokens, targets).backward()
        unclipped_opt.step()
        unclipped_opt.zero_grad()
        model(tokens, targets).backward()
    assert_same(ref_model, ref_opt, model, opt, f"seed {seed}")
    # Clipping took effect (AdamW's v differs even where the direction barely does).
    assert not torch.equal(
        opt.state[model.hidden.weight]["exp_avg_sq"],
        unclipped_opt.state[unclipped_model.hidden.weight]["exp_avg_sq"],
    )


def test_global_norm_clipping_after_release_sees_no_gradients():
    """Documented limit: grads are freed in backward, so clip_grad_norm_ finds nothing."""
    _, _, _, model, opt = adamw_pair()
    slimoptim.enable_gradient_release(model, opt)
    tokens, targets = batch(torch.Generator().manual_seed(new_seed()))
    model(tokens, targets).backward()
    assert torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0).item() == 0.0


def test_grad_scaler_step_raises_a_clear_error():
    _, _, _, model, opt = adamw_pair(dtype=torch.float32)
    slimoptim.enable_gradient_release(model, opt)
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
    tokens, targets = batch(torch.Generator().manual_seed(new_seed()))
    scaler.scale(model(tokens, targets)).backward()
    with pytest.raises(RuntimeError, match="GradScaler"):
        scaler.step(opt)


def test_ddp_is_rejected_with_a_suggestion():
    import torch.distributed as dist

    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        model = nn.parallel.DistributedDataParallel(nn.Linear(4, 4))
        opt = slimoptim.AdamW(model.parameters())
        with pytest.raises(ValueError, match="FSDP2"):
            slimoptim.enable_gradient_release(model, opt)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_fsdp2_single_rank_is_bit_identical(device):
    """FSDP2 runs the hooks of its sharded (DTensor) params after the reduce-scatter."""
    import torch.distributed as dist

    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    if device == "cuda" and not (torch.cuda.is_available() and dist.is_nccl_available()):
        pytest.skip("needs CUDA and NCCL")
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    seed = new_seed()
    torch.manual_seed(seed)
    layers = (nn.Linear(DIM, 2 * DIM), nn.GELU(), nn.Linear(2 * DIM, DIM))
    ref_model = slimoptim.cast_model(nn.Sequential(*layers), torch.bfloat16).to(device)
    model = copy.deepcopy(ref_model)
    backend = "nccl" if device == "cuda" else "gloo"
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    try:
        # An explicit mesh: by default fully_shard picks CUDA where there is one, and the
        # reference would then be on another device than the sharded model.
        mesh = init_device_mesh(device, (1,))
        fully_shard(model[0], mesh=mesh)
        fully_shard(model[2], mesh=mesh)
        fully_shard(model, mesh=mesh)
        ref_opt = slimoptim.AdamW(ref_model.parameters(), lr=1e-2)
        opt = slimoptim.AdamW(model.parameters(), lr=1e-2)
        slimoptim.enable_gradient_release(model, opt, bucket_bytes=0)
        gen = torch.Generator().manual_seed(seed)
        for _ in range(3):
            x = torch.randn(BATCH, DIM, generator=gen).bfloat16().to(device)
            reference_step(ref_opt, ref_model(x).float().square().mean())
            model(x).float().square().mean().backward()
            assert all(p.grad is None for p in model.parameters())
        for a, b in zip(ref_model.parameters(), model.parameters(), strict=True):
            assert b.to_local().device == a.device
            assert torch.equal(a, b.full_tensor()), f"seed {seed}"
    finally:
        dist.destroy_process_group()


def test_reentrant_checkpoint_sharing_a_param_raises():
    layer = nn.Linear(DIM, DIM)
    opt = slimoptim.AdamW(layer.parameters())
    slimoptim.enable_gradient_release(layer, opt, bucket_bytes=0)
    x = torch.randn(BATCH, DIM, requires_grad=True)
    inner = torch.utils.checkpoint.checkpoint(layer, x, use_reentrant=True)
    with pytest.raises(RuntimeError, match="use_reentrant=False"):
        layer(inner).sum().backward()


def test_non_reentrant_checkpoint_is_bit_identical():
    seed, ref_model, ref_opt, model, opt = adamw_pair()
    slimoptim.enable_gradient_release(model, opt, bucket_bytes=0)
    tokens, targets = batch(torch.Generator().manual_seed(seed))
    ref_model(tokens, targets).backward()
    ref_opt.step()
    loss = torch.utils.checkpoint.checkpoint(model, tokens, targets, use_reentrant=False)
    loss.backward()
    assert_same(ref_model, ref_opt, model, opt, f"seed {seed}")


def test_invalid_uses_are_rejected():
    model = nn.Linear(3, 3)
    with pytest.raises(TypeError, match="slimoptim optimizer"):
        slimoptim.enable_gradient_release(model, torch.optim.AdamW(model.parameters()))
    opt = slimoptim.AdamW(model.parameters())
    for bad in (
        dict(accumulation_steps=0),
        dict(bucket_bytes=-1),
        dict(clip_grad_norm_per_tensor=0),
    ):
        with pytest.raises(ValueError):
            slimoptim.enable_gradient_release(model, opt, **bad)
    handle = slimoptim.enable_gradient_release(model, opt)
    with pytest.raises(RuntimeError, match="already enabled"):
        slimoptim.enable_gradient_release(model, opt)
    handle.remove()
    slimoptim.enable_gradient_release(model, opt).remove()


def test_params_outside_the_optimizer_keep_their_grads():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    opt = slimoptim.AdamW(model[1].parameters())
    slimoptim.enable_gradient_release(model, opt)
    model(torch.randn(2, 4)).sum().backward()
    assert model[0].weight.grad is not None and model[1].weight.grad is None
    assert model[0].weight not in opt.state and model[1].weight in opt.state


def test_zero_grad_after_a_failed_backward_drops_partial_grads():
    seed, ref_model, ref_opt, model, opt = adamw_pair()
    handle = slimoptim.enable_gradient_release(model, opt, bucket_bytes=0)

    def fail(*_):
        raise RuntimeError("boom")

    hook = model.hidden.register_full_backward_hook(fail)
    tokens, targets = batch(torch.Generator().manual_seed(seed))
    with pytest.raises(RuntimeError, match="boom"):
        model(tokens, targets).backward()
    hook.remove()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())
    # The next backward releases again (its end-of-backward flush is queued).
    model(tokens, targets).backward()
    assert all(p.grad is None for p in model.parameters())
    assert not handle._backward_open


@pytest.mark.parametrize("name,kwargs", [OPTIMIZERS[0], OPTIMIZERS[3], OPTIMIZERS[4]])
def test_release_through_the_fused_kernels_is_bit_identical(name, kwargs):
    """Buckets go through step_params' multi-tensor kernels (the Triton interpreter on CPU)."""
    pytest.importorskip("triton", reason="the fused kernels need Triton")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    seed = new_seed()
    ref_model, model = (m.to(device) for m in make_models(torch.bfloat16, seed))
    ref_opt = getattr(slimoptim, name)(ref_model.parameters(), fused=True, group_size=32, **kwargs)
    opt = getattr(slimoptim, name)(model.parameters(), fused=True, group_size=32, **kwargs)
    slimoptim.enable_gradient_release(model, opt, bucket_bytes=600)
    gen = torch.Generator().manual_seed(seed)
    for step in range(3):
        tokens, targets = (t.to(device) for t in batch(gen))
        reference_step(ref_opt, ref_model(tokens, targets, step != 1))
        model(tokens, targets, step != 1).backward()
        assert_same(ref_model, ref_opt, model, opt, f"seed {seed}, step {step}")


def test_load_state_dict_while_active_uses_the_new_groups():
    seed, ref_model, ref_opt, model, opt = adamw_pair()
    slimoptim.enable_gradient_release(model, opt, bucket_bytes=0)
    gen = torch.Generator().manual_seed(seed)
    for step in range(4):
        if step == 2:  # a resume through load_state_dict, then a new lr
            for o in (ref_opt, opt):
                o.load_state_dict(copy.deepcopy(o.state_dict()))
                o.param_groups[0]["lr"] = 3e-2
        tokens, targets = batch(gen)
        reference_step(ref_opt, ref_model(tokens, targets))
        model(tokens, targets).backward()
        assert_same(ref_model, ref_opt, model, opt, f"seed {seed}, step {step}")


def test_params_added_after_enable_are_stepped_at_the_end_of_backward():
    seed, ref_model, ref_opt, model, opt = adamw_pair()
    for m, o in ((ref_model, ref_opt), (model, opt)):
        group = o.param_groups[0]
        group["params"] = [p for p in group["params"] if p is not m.sometimes.weight]
    slimoptim.enable_gradient_release(model, opt)
    for m, o in ((ref_model, ref_opt), (model, opt)):
        o.add_param_group({"params": [m.sometimes.weight], "lr": 5e-2})
    gen = torch.Generator().manual_seed(seed)
    for step in range(2):
        tokens, targets = batch(gen)
        reference_step(ref_opt, ref_model(tokens, targets))
        model(tokens, targets).backward()
        assert model.sometimes.weight.grad is None  # no hook, but the end-of-backward sweep
        assert_same(ref_model, ref_opt, model, opt, f"seed {seed}, step {step}")


def test_dcp_resume_into_an_optimizer_under_release_is_bit_identical(tmp_path):
    """DCP's get/set_optimizer_state_dict build a missing state with one lr-0 step on zero
    gradients, then zero_grad(): under release that step creates the state (it used to do
    nothing, and the load kept no state at all) and the zero gradients are freed."""
    dcp = pytest.importorskip("torch.distributed.checkpoint")
    from torch.distributed.checkpoint import state_dict as dsd  # noqa: PLC0415

    seed, ref_model, ref_opt, _, _ = adamw_pair(weight_decay=0.1)
    data = torch.Generator().manual_seed(seed)
    batches = [batch(data) for _ in range(6)]

    def plain_step(tokens, targets):
        reference_step(ref_opt, ref_model(tokens, targets))

    for b in batches[:3]:
        plain_step(*b)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "no process group: running without one"
        saved = {"model": ref_model.state_dict(), "optim": dsd.get_optimizer_state_dict(
            ref_model, ref_opt)}  # fmt: skip
        dcp.save(saved, checkpoint_id=tmp_path)
        model, _ = make_models(torch.bfloat16, seed + 1)
        opt = slimoptim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
        slimoptim.enable_gradient_release(model, opt)
        template = {"model": model.state_dict(), "optim": dsd.get_optimizer_state_dict(model, opt)}
        dcp.load(template, checkpoint_id=tmp_path)
        model.load_state_dict(template["model"])
        dsd.set_optimizer_state_dict(model, opt, template["optim"])
    assert all(p.grad is None for p in model.parameters())
    assert len(opt.state) == len(ref_opt.state) > 0
    assert [g["lr"] for g in opt.param_groups] == [g["lr"] for g in ref_opt.param_groups]
    for b in batches[3:]:
        plain_step(*b)
        model(*b).backward()  # release steps each param during backward
    assert_same(ref_model, ref_opt, model, opt, "after the DCP resume under release")
