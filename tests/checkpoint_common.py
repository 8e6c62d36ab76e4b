"""Shared pieces of the checkpoint tests: small models of odd sizes, their optimizers with a
scheduler that moves betas and momentum too, training, and exact comparisons."""

import random

import torch
from torch import nn

import slimoptim

OPTIMIZERS = {
    "AdamW": lambda ps, **mode: slimoptim.AdamW(ps, lr=2e-2, weight_decay=0.1, **mode),
    "Adam": lambda ps, **mode: slimoptim.Adam(ps, lr=2e-2, weight_decay=0.01, **mode),
    "SGD": lambda ps, **mode: slimoptim.SGD(ps, lr=2e-2, momentum=0.9, weight_decay=0.01, **mode),
    "SGD-nesterov": lambda ps, **mode: slimoptim.SGD(
        ps, lr=2e-2, momentum=0.9, nesterov=True, **mode
    ),
    "Lion": lambda ps, **mode: slimoptim.Lion(ps, lr=2e-3, weight_decay=0.1, **mode),
}


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
