"""A small GPT-style byte-level language model for ``slimoptim demo``.

Pre-LayerNorm transformer blocks, learned positions and an output layer tied
to the byte embedding: the usual GPT-2 shape, scaled down to train on a CPU.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

VOCAB_SIZE = 256  # bytes


@dataclass(frozen=True)
class ModelSize:
    """Shape of the demo model and the batch it trains on."""

    layers: int
    width: int
    heads: int
    context: int
    batch: int

    def as_dict(self) -> dict:
        return asdict(self)


# tiny: tests; small: the default, under three minutes for two runs on a 2-core CPU;
# medium: a GPU (``--device cuda --size medium``).
SIZES = {
    "tiny": ModelSize(layers=2, width=64, heads=4, context=64, batch=8),
    "small": ModelSize(layers=4, width=128, heads=4, context=128, batch=16),
    "medium": ModelSize(layers=8, width=512, heads=8, context=512, batch=32),
}


def _as(t: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor | None:
    return None if t is None else t.to(x.dtype)


class Linear(nn.Linear):
    """nn.Linear that computes in its input's dtype. bf16 weights can then run float32
    matmuls (much faster on CPUs without bf16 instructions) while the weights and their
    gradients stay bf16: the cast is part of the graph. A no-op when the dtypes agree."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, _as(self.weight, x), _as(self.bias, x))


class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm that computes in its input's dtype (see Linear)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = _as(self.weight, x), _as(self.bias, x)
        return F.layer_norm(x, self.normalized_shape, weight, bias, self.eps)


class Block(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.attn_norm = LayerNorm(width)
        self.qkv = Linear(width, 3 * width)
        self.attn_out = Linear(width, width)
        self.mlp_norm = LayerNorm(width)
        self.mlp_in = Linear(width, 4 * width)
        self.mlp_out = Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        q, k, v = self.qkv(self.attn_norm(x)).split(width, dim=-1)
        q, k, v = (t.view(batch, length, self.heads, -1).transpose(1, 2) for t in (q, k, v))
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.attn_out(attn.transpose(1, 2).reshape(batch, length, width))
        return x + self.mlp_out(F.gelu(self.mlp_in(self.mlp_norm(x)), approximate="tanh"))


class ByteGPT(nn.Module):
    def __init__(self, size: ModelSize, compute_dtype: torch.dtype | None = None):
        super().__init__()
        self.size = size
        self.compute_dtype = compute_dtype  # None: the weights' dtype
        self.embed = nn.Embedding(VOCAB_SIZE, size.width)
        self.position = nn.Embedding(size.context, size.width)
        self.blocks = nn.ModuleList(Block(size.width, size.heads) for _ in range(size.layers))
        self.final_norm = LayerNorm(size.width)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # GPT-2 initialisation: N(0, 0.02), residual projections scaled by depth.
        residual_std = 0.02 / math.sqrt(2 * self.size.layers)
        for name, p in self.named_parameters():
            if p.dim() < 2:
                nn.init.zeros_(p) if name.endswith("bias") else nn.init.ones_(p)
            else:
                std = residual_std if name.endswith(("attn_out.weight", "mlp_out.weight")) else 0.02
                nn.init.normal_(p, std=std)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits (batch, length, 256) for byte ``tokens`` (batch, length)."""
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        dtype = self.compute_dtype or self.embed.weight.dtype
        x = self.embed(tokens).to(dtype) + self.position(positions).to(dtype)
        for block in self.blocks:
            x = block(x)
        # The output layer reuses the byte embedding (weight tying, as in GPT-2).
        x = self.final_norm(x)
        return F.linear(x, _as(self.embed.weight, x))

    def loss(self, tokens: torch.Tensor) -> torch.Tensor:
        """Mean next-byte cross-entropy (nats) over ``tokens`` (batch, context + 1)."""
        logits = self(tokens[:, :-1])
        return F.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten())
