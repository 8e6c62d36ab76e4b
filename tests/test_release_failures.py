"""Gradient release after a backward that raised: consistent, and training goes on.

A model with a switch that makes its backward raise half-way (after the layers
near the loss got their gradients, before the first layer did). Each test trains
one copy through failures and compares it bit for bit with a copy that never saw
the failing batch (or, where some params were released before the error, with
plain ``step()`` on exactly those params' gradients).
"""

from __future__ import annotations

import copy
import random
import warnings

import pytest
import torch
from torch import nn

import slimoptim

DIM = 16


class FailingBackward(torch.autograd.Function):
    """Identity whose backward raises: a bad batch, an OOM, a bug in a custom op."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError("bad batch")


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.first = nn.Linear(DIM, DIM)
        self.middle = nn.Linear(DIM, DIM)
        self.last = nn.Linear(DIM, 1)

    def forward(self, x, fail=False):
        h = torch.tanh(self.first(x))
        if fail:  # raises after middle and last have their gradients, before first does
            h = FailingBackward.apply(h)
        return self.last(torch.tanh(self.middle(h))).float().pow(2).mean()


OPTIMIZERS = {
    "AdamW": lambda ps: slimoptim.AdamW(ps, lr=1e-2, weight_decay=0.1),
    "SGD": lambda ps: slimoptim.SGD(ps, lr=1e-2, momentum=0.9),
    "Lion": lambda ps: slimoptim.Lion(ps, lr=1e-3, weight_decay=0.1),
}


def make_pair(name: str, seed: int, **release_kwargs):
    torch.manual_seed(seed)
    model = slimoptim.cast_model(Net(), torch.bfloat16)
    twin = copy.deepcopy(model)
    opts = [OPTIMIZERS[name](m.parameters()) for m in (model, twin)]
    handles = [
        slimoptim.enable_gradient_release(m, o, **release_kwargs)
        for m, o in zip((model, twin), opts, strict=True)
    ]
    return (model, opts[0], handles[0]), (twin, opts[1], handles[1])


def batches(seed: int, n: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(8, DIM, generator=gen).to(torch.bfloat16) for _ in range(n)]


def assert_same(model_a, opt_a, model_b, opt_b, context: str) -> None:
    for (name, a), b in zip(model_a.named_parameters(), model_b.parameters(), strict=True):
        assert torch.equal(a, b), f"{name} differs ({context})"
    state_a, state_b = opt_a.state_dict()["state"], opt_b.state_dict()["state"]
    assert state_a.keys() == state_b.keys(), context
    for key, entry in state_a.items():
        for name, value in entry.items():
            assert torch.equal(value, state_b[key][name]), f"state {key}.{name} ({context})"


def quietly(fn, *args):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # step()/zero_grad() are no-ops that warn once
        return fn(*args)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_a_loop_skipping_failed_backwards_trains_as_if_the_batch_never_came(name):
    """Issue case (b): `try: loss.backward() except: continue`, no step()/zero_grad()."""
    seed = random.randrange(2**31)
    (model, opt, handle), (twin, twin_opt, _) = make_pair(name, seed)
    data = batches(seed, 5)
    for i, x in enumerate(data):
        for fail in (True, False) if i in (1, 3) else (False,):
            try:
                model(x, fail).backward()
            except RuntimeError:
                assert fail
                continue
        twin(x).backward()
    assert all(p.grad is None for p in model.parameters())
    assert not handle._backward_open
    assert_same(model, opt, twin, twin_opt, f"seed {seed}")


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_step_and_zero_grad_after_a_failed_backward_drop_its_partial_grads(name):
    """Issue case (a): with the default bucket the failed backward's gradients were queued;
    step() then zero_grad() must drop them, not keep them for the next backward."""
    seed = random.randrange(2**31)
    (model, opt, _), (twin, twin_opt, _) = make_pair(name, seed)
    good, bad = batches(seed, 2)
    with pytest.raises(RuntimeError, match="bad batch"):
        model(bad, fail=True).backward()
    # The engine dropped the failed backward: its gradients (queued in the default bucket,
    # not stepped) are gone already; step() and zero_grad() find nothing left to do.
    assert all(p.grad is None for p in model.parameters())
    quietly(opt.step)
    quietly(opt.zero_grad)
    assert all(p.grad is None for p in model.parameters())
    assert not opt.state  # nothing was stepped with the failed batch
    model(good).backward()
    twin(good).backward()
    assert_same(model, opt, twin, twin_opt, f"seed {seed}")


def test_a_failure_during_accumulation_restarts_the_window():
    """Earlier micro-batches' gradients share .grad with the failed one's: all are dropped,
    and the next backward starts a new window of accumulation_steps."""
    seed = random.randrange(2**31)
    (model, opt, handle), (twin, twin_opt, _) = make_pair("AdamW", seed, accumulation_steps=2)
    b0, b1, b2, b3, b4, b5 = batches(seed, 6)
    for x in (b0, b1, b2):
        model(x).backward()
    with pytest.raises(RuntimeError, match="bad batch"):
        model(b3, fail=True).backward()
    for x in (b4, b5):
        model(x).backward()
    for x in (b0, b1, b4, b5):
        twin(x).backward()
    assert handle.accumulating and handle._microbatch == 0  # b4, b5 closed a window
    assert_same(model, opt, twin, twin_opt, f"seed {seed}")


def test_params_released_before_the_error_stay_stepped_and_training_goes_on():
    """bucket_bytes=0 steps `last` and `middle` before the error reaches `first`: those
    keep their step (it cannot be undone), `first` is not stepped, and the next backward
    works. The same as plain step() on only the released params' gradients."""
    seed = random.randrange(2**31)
    torch.manual_seed(seed)
    model = slimoptim.cast_model(Net(), torch.bfloat16)
    ref = copy.deepcopy(model)
    opt, ref_opt = slimoptim.AdamW(model.parameters()), slimoptim.AdamW(ref.parameters())
    slimoptim.enable_gradient_release(model, opt, bucket_bytes=0)
    x0, bad, x2 = batches(seed, 3)
    for x in (x0, bad, x2):
        try:
            model(x, fail=x is bad).backward()
        except RuntimeError:
            pass
        ref_opt.zero_grad()
        ref(x).backward()
        if x is bad:  # the error stopped backward before `first`'s gradient was complete
            ref.first.weight.grad = ref.first.bias.grad = None
        ref_opt.step()
    steps = {name: opt.state[p]["step"].item() for name, p in model.named_parameters()}
    assert steps == {
        "first.weight": 2,
        "first.bias": 2,
        "middle.weight": 3,
        "middle.bias": 3,
        "last.weight": 3,
        "last.bias": 3,
    }
    assert_same(model, opt, ref, ref_opt, f"seed {seed}")
