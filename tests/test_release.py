"""Gradient release: bit-identical to step() after a full backward, its hooks and buckets.

Every test trains two copies of the same model on the same fresh random
batches, one with ``optimizer.step()`` and one with gradient release, and
compares parameters and optimizer states bit for bit. Seeds are drawn per run
and shown in failure messages (tests/release_common.py). Schedulers, clipping,
accumulation, FSDP2, checkpointing and misuse: tests/test_release_usage.py.
"""

import random
import warnings

import pytest
import torch
from release_common import (
    MODES,
    OPTIMIZERS,
    adamw_pair,
    assert_same,
    batch,
    make_models,
    new_seed,
    reference_step,
    released_buckets,
)

import slimoptim


@pytest.mark.parametrize("name,kwargs", OPTIMIZERS)
@pytest.mark.parametrize("master_weight_bits,state_bits,dtype", MODES)
def test_release_is_bit_identical_to_step(name, kwargs, master_weight_bits, state_bits, dtype):
    seed = new_seed()
    ref_model, model = make_models(dtype, seed)
    mode = dict(master_weight_bits=master_weight_bits, state_bits=state_bits, group_size=8)
    ref_opt = getattr(slimoptim, name)(ref_model.parameters(), **kwargs, **mode)
    opt = getattr(slimoptim, name)(model.parameters(), **kwargs, **mode)
    # Bucket sizes from per tensor to one bucket for everything, varied across cases.
    bucket_bytes = random.choice([0, 600, 4000, 2**20])
    handle = slimoptim.enable_gradient_release(model, opt, bucket_bytes=bucket_bytes)
    gen = torch.Generator().manual_seed(seed)
    for step in range(3):
        tokens, targets = batch(gen)
        use_sometimes = step != 1  # `sometimes` gets no gradient in step 1
        reference_step(ref_opt, ref_model(tokens, targets, use_sometimes))
        model(tokens, targets, use_sometimes).backward()
        assert all(p.grad is None for p in model.parameters())
        assert_same(ref_model, ref_opt, model, opt, f"seed {seed}, bucket {bucket_bytes}")
    assert model.frozen.weight not in opt.state, "frozen params must get no state"
    handle.remove()


def test_hooks_only_trainable_params_once_and_frees_grads_during_backward():
    _, _, _, model, opt = adamw_pair()
    handle = slimoptim.enable_gradient_release(model, opt, bucket_bytes=0)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(handle._hooks) == len(trainable)  # tied embedding once, frozen layer not at all
    held_at_each_step = []
    step_params = opt.step_params

    def recording_step_params(items):
        held_at_each_step.append(sum(p.grad is not None for p in trainable))
        step_params(items)

    opt.step_params = recording_step_params
    tokens, targets = batch(torch.Generator().manual_seed(new_seed()))
    model(tokens, targets).backward()
    # One tensor per step with bucket_bytes=0, and gradients never all held at once.
    assert len(held_at_each_step) == len(trainable)
    assert max(held_at_each_step) < len(trainable)
    assert all(p.grad is None for p in trainable)


def test_buckets_fill_to_bucket_bytes_in_ready_order():
    _, _, _, model, opt = adamw_pair(dtype=torch.float32)
    _, buckets, handle = released_buckets(model, opt, bucket_bytes=1500)
    assert len(buckets) > 1
    assert all(nbytes >= 1500 for nbytes in buckets[:-1])  # the last one is the rest
    assert handle.max_bucket_bytes == max(buckets)


@pytest.mark.skipif(not hasattr(torch.Tensor, "grad_dtype"), reason="needs Tensor.grad_dtype")
def test_buckets_count_the_gradients_own_bytes():
    """A gradient can have another dtype than its param (grad_dtype): buckets and
    max_bucket_bytes count what the gradients hold."""
    _, _, _, model, opt = adamw_pair(dtype=torch.bfloat16)
    for p in model.parameters():
        p.grad_dtype = torch.float32
    dtypes, buckets, handle = released_buckets(model, opt, bucket_bytes=1500)
    assert dtypes == {torch.float32}
    assert len(buckets) > 1
    assert all(nbytes >= 1500 for nbytes in buckets[:-1])
    largest = max(4 * p.numel() for p in model.parameters())  # a float32 gradient
    assert all(nbytes < 1500 + 2 * largest for nbytes in buckets)
    assert handle.max_bucket_bytes == max(buckets)


def test_step_and_zero_grad_are_noops_that_warn_once_and_remove_restores_them():
    seed, ref_model, ref_opt, model, opt = adamw_pair()
    handle = slimoptim.enable_gradient_release(model, opt)
    gen = torch.Generator().manual_seed(seed)
    for step in range(3):
        tokens, targets = batch(gen)
        reference_step(ref_opt, ref_model(tokens, targets))
        model(tokens, targets).backward()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert opt.step() is None
            opt.zero_grad()
        assert len(caught) == (2 if step == 0 else 0), [str(w.message) for w in caught]
    handle.remove()
    assert "step" not in opt.__dict__ and "zero_grad" not in opt.__dict__
    # Normal training again: grads stay after backward until step().
    tokens, targets = batch(gen)
    for m, o in ((ref_model, ref_opt), (model, opt)):
        m(tokens, targets).backward()
        assert m.hidden.weight.grad is not None
        o.step()
        o.zero_grad()
    assert_same(ref_model, ref_opt, model, opt, f"seed {seed}")


def test_first_step_warnings_name_the_noops():
    _, _, _, model, opt = adamw_pair()
    slimoptim.enable_gradient_release(model, opt)
    with pytest.warns(UserWarning, match=r"step\(\) does nothing while gradient release"):
        opt.step()
    with pytest.warns(UserWarning, match=r"zero_grad\(\) does nothing"):
        opt.zero_grad()


def test_step_with_closure_returns_the_loss_and_steps_in_its_backward():
    seed, ref_model, ref_opt, model, opt = adamw_pair()
    slimoptim.enable_gradient_release(model, opt)
    tokens, targets = batch(torch.Generator().manual_seed(seed))

    def closure():
        loss = model(tokens, targets)
        loss.backward()
        return loss

    ref_loss = ref_model(tokens, targets)
    ref_loss.backward()
    ref_opt.step()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loss = opt.step(closure)
    assert torch.equal(loss, ref_loss)
    assert_same(ref_model, ref_opt, model, opt, f"seed {seed}")
