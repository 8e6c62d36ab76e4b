"""Shared pieces of the gradient-release tests: a tiny model whose params exercise every
case (tied, frozen, sometimes unused), fresh seeds, and a bit-for-bit comparison."""

import copy
import itertools
import random

import torch
import torch.nn.functional as F
from torch import nn

import slimoptim

VOCAB, DIM, SEQ, BATCH = 37, 24, 5, 3


class TinyLM(nn.Module):
    """Tied embedding/output, a frozen layer, and a layer used only on some steps."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        self.hidden = nn.Linear(DIM, DIM)
        self.frozen = nn.Linear(DIM, DIM)
        self.frozen.requires_grad_(False)
        self.sometimes = nn.Linear(DIM, DIM)
        self.norm = nn.LayerNorm(DIM)

    def forward(self, tokens, targets, use_sometimes=True):
        x = self.embed(tokens)
        x = torch.tanh(self.hidden(x)) + self.frozen(x)
        if use_sometimes:
            x = x + self.sometimes(x)
        logits = self.norm(x) @ self.embed.weight.T  # the embedding is used twice
        return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


def make_models(dtype, seed):
    torch.manual_seed(seed)
    model = slimoptim.cast_model(TinyLM(), dtype)
    return model, copy.deepcopy(model)


def batch(gen):
    tokens = torch.randint(VOCAB, (BATCH, SEQ), generator=gen)
    return tokens, torch.randint(VOCAB, (BATCH, SEQ), generator=gen)


def reference_step(opt, loss) -> None:
    """The reference's plain step: backward of ``loss``, ``step()``, ``zero_grad()``."""
    loss.backward()
    opt.step()
    opt.zero_grad()


def assert_same(model_a, opt_a, model_b, opt_b, context):
    for (name, a), b in zip(model_a.named_parameters(), model_b.parameters(), strict=True):
        assert a.dtype == b.dtype and torch.equal(a, b), f"{name} differs ({context})"
    state_a, state_b = opt_a.state_dict()["state"], opt_b.state_dict()["state"]
    assert state_a.keys() == state_b.keys(), context
    for key in state_a:
        for name in state_a[key]:
            assert torch.equal(state_a[key][name], state_b[key][name]), f"{key}.{name} {context}"


def new_seed():
    return random.randrange(2**31)


OPTIMIZERS = [
    ("AdamW", dict(lr=1e-2, weight_decay=0.1)),
    ("Adam", dict(lr=1e-2, weight_decay=0.05)),
    ("SGD", dict(lr=1e-1, momentum=0.9, dampening=0.1, weight_decay=0.01)),
    ("SGD", dict(lr=1e-1, momentum=0.9, nesterov=True)),
    ("Lion", dict(lr=1e-3, weight_decay=0.1)),
]
MODES = list(itertools.product((24, 32, None), (8, 32), (torch.bfloat16, torch.float32)))


def adamw_pair(dtype=torch.bfloat16, **kwargs):
    seed = new_seed()
    ref_model, model = make_models(dtype, seed)
    ref_opt = slimoptim.AdamW(ref_model.parameters(), lr=1e-2, **kwargs)
    opt = slimoptim.AdamW(model.parameters(), lr=1e-2, **kwargs)
    return seed, ref_model, ref_opt, model, opt


def released_buckets(model, opt, bucket_bytes: int) -> tuple[set, list[int], object]:
    """Release with ``bucket_bytes`` through one backward: the gradient dtypes and the
    gradient bytes of every bucket stepped, and the handle."""
    handle = slimoptim.enable_gradient_release(model, opt, bucket_bytes=bucket_bytes)
    dtypes, buckets = set(), []
    step_params = opt.step_params

    def recording_step_params(items):
        dtypes.update(p.grad.dtype for _, p in items)
        buckets.append(sum(p.grad.numel() * p.grad.element_size() for _, p in items))
        step_params(items)

    opt.step_params = recording_step_params
    tokens, targets = batch(torch.Generator().manual_seed(new_seed()))
    model(tokens, targets).backward()
    return dtypes, buckets, handle
