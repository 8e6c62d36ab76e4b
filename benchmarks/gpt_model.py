"""The GPT-2-layout model of the release and end-to-end benchmarks, at a few named shapes."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


@dataclass
class GPTShape:
    n_layer: int
    n_embd: int
    n_head: int
    vocab: int = 50257
    context: int = 1024


SHAPES = {
    "gpt2-medium": GPTShape(24, 1024, 16),
    "gpt2-small": GPTShape(12, 768, 12),
    "tiny": GPTShape(2, 64, 4, vocab=256, context=32),
}


class Block(nn.Module):
    def __init__(self, shape: GPTShape):
        super().__init__()
        d = shape.n_embd
        self.n_head = shape.n_head
        self.ln_1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ln_2 = nn.LayerNorm(d)
        self.fc = nn.Linear(d, 4 * d)
        self.fc_proj = nn.Linear(4 * d, d)

    def forward(self, x):
        batch, seq, d = x.shape
        q, k, v = self.qkv(self.ln_1(x)).split(d, dim=2)
        q, k, v = (t.view(batch, seq, self.n_head, -1).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(batch, seq, d))
        return x + self.fc_proj(F.gelu(self.fc(self.ln_2(x)), approximate="tanh"))


class GPT(nn.Module):
    """GPT-2 layout (pre-norm blocks, learned positions, output tied to the embedding)."""

    def __init__(self, shape: GPTShape, activation_checkpointing: bool = False):
        super().__init__()
        self.wte = nn.Embedding(shape.vocab, shape.n_embd)
        self.wpe = nn.Embedding(shape.context, shape.n_embd)
        self.blocks = nn.ModuleList(Block(shape) for _ in range(shape.n_layer))
        self.ln_f = nn.LayerNorm(shape.n_embd)
        self.activation_checkpointing = activation_checkpointing
        for name, p in self.named_parameters():
            if p.dim() == 2:
                std = 0.02 / math.sqrt(2 * shape.n_layer) if name.endswith("proj.weight") else 0.02
                nn.init.normal_(p, std=std)

    def forward(self, tokens, targets):
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.wte(tokens) + self.wpe(positions)
        for block in self.blocks:
            if self.activation_checkpointing:
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        logits = self.ln_f(x) @ self.wte.weight.T
        return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
