"""Shared pieces of the Muon tests: seeds, tolerance helper, a tiny model and its task."""

import random

import torch
from torch import nn

from slimoptim.optimizers import muon as muon_module

SHAPES = [(48, 32), (24, 72)]  # tall and wide: both lr adjustments and the transpose
EXACT = dict(master_weight_bits=32, state_bits=32)


def new_seed() -> int:
    return random.randrange(2**31)


def rel(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


class TinyNet(nn.Module):
    """Embedding, two hidden matrices with biases, a norm and a head: the usual split."""

    def __init__(self, vocab=32, dim=32):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.fc1 = nn.Linear(dim, 2 * dim)
        self.fc2 = nn.Linear(2 * dim, dim)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)

    def forward(self, tokens):
        x = self.embed(tokens)
        x = x + self.fc2(torch.tanh(self.fc1(x)))
        return self.head(self.norm(x))


def teacher_batches(seed, steps, vocab=32):
    gen = torch.Generator().manual_seed(seed)
    table = torch.randint(0, vocab, (vocab,), generator=gen)  # next token = table[token]
    for _ in range(steps):
        tokens = torch.randint(0, vocab, (64,), generator=gen)
        yield tokens, table[tokens]


def torch_rounding(monkeypatch):
    """Swap the two elementwise functions for forms that round as torch.optim.Muon's ops.

    torch's CPU lerp and add(alpha=) use fused multiply-adds in their vectorised loops
    (one rounding where slimoptim's reference rounds twice). Everything else, the
    Newton-Schulz iteration included, is the module's own code.
    """

    def momentum(g, buf, *, momentum, nesterov):
        buf = torch.lerp(buf, g, 1 - momentum)
        return (torch.lerp(g, buf, momentum) if nesterov else buf), buf

    def master(w, ortho, *, lr, weight_decay, lr_adjusted):
        return torch.add(w * (1 - lr * weight_decay), ortho.float(), alpha=-lr_adjusted)

    monkeypatch.setattr(muon_module, "muon_momentum", momentum)
    monkeypatch.setattr(muon_module, "muon_master_update", master)
