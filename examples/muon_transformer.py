"""Muon for the hidden matrices, AdamW for the rest: the usual recipe (runs in seconds on a CPU).

Muon orthogonalises each update of a 2-D weight matrix, which suits the hidden
layers of a transformer; embeddings, the output head, norms and biases are
trained with AdamW. ``slimoptim.muon_param_groups(model)`` makes that split; both
optimizers are slimoptim's, so the whole model trains on bf16 weights with
24-bit masters and 8-bit states. Each optimizer gets its own scheduler, and
``step()`` / ``zero_grad()`` are called on both.
"""

import torch
from torch import nn

import slimoptim

VOCAB, DIM, CONTEXT = 64, 64, 16


class TinyLM(nn.Module):
    """One pre-norm attention + MLP block over a short context; the head is tied."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        nn.init.normal_(self.embed.weight, std=DIM**-0.5)  # tied: keeps the first logits small
        self.position = nn.Parameter(torch.zeros(CONTEXT, DIM))  # 2-D, but not a hidden map
        self.norm1, self.norm2, self.norm_out = (nn.LayerNorm(DIM) for _ in range(3))
        self.attn = nn.MultiheadAttention(DIM, num_heads=4, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(DIM, 4 * DIM), nn.GELU(), nn.Linear(4 * DIM, DIM))
        self.lm_head = nn.Linear(DIM, VOCAB, bias=False)
        self.lm_head.weight = self.embed.weight

    def forward(self, tokens):
        x = self.embed(tokens) + self.position[: tokens.size(1)]
        h = self.norm1(x)
        mask = nn.Transformer.generate_square_subsequent_mask(tokens.size(1), dtype=x.dtype)
        x = x + self.attn(h, h, h, attn_mask=mask, need_weights=False)[0]
        x = x + self.mlp(self.norm2(x))
        return self.lm_head(self.norm_out(x))


def batches(steps: int, batch: int = 32):
    """Sequences that count up modulo VOCAB from a random start: learnable in a few steps."""
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        start = torch.randint(0, VOCAB, (batch, 1), generator=gen)
        seq = (start + torch.arange(CONTEXT + 1)) % VOCAB
        yield seq[:, :-1], seq[:, 1:]


def main(steps: int = 100) -> None:
    torch.manual_seed(0)
    model = slimoptim.cast_model(TinyLM(), torch.bfloat16)
    split = slimoptim.muon_param_groups(model)
    # The attention's in_proj is one (3*DIM, DIM) matrix: Muon orthogonalises q, k and v
    # together. The learned position table is 2-D too; keep it with AdamW like the embedding.
    split.muon.remove(model.position)
    split.adamw.append(model.position)
    muon = slimoptim.Muon(split.muon, lr=0.02, weight_decay=0.01)
    adamw = slimoptim.AdamW(split.adamw, lr=3e-3, weight_decay=0.0)
    optimizers = [muon, adamw]
    schedulers = [torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=steps) for o in optimizers]

    first = None
    for step, (tokens, targets) in enumerate(batches(steps)):
        logits = model(tokens)
        loss = nn.functional.cross_entropy(logits.float().reshape(-1, VOCAB), targets.reshape(-1))
        loss.backward()
        for optimizer, scheduler in zip(optimizers, schedulers, strict=True):
            optimizer.step()
            optimizer.zero_grad()
            scheduler.step()
        first = loss.item() if first is None else first
        if step % 50 == 0 or step == steps - 1:
            print(f"step {step:4d}  loss {loss.item():.4f}")

    for name, optimizer in (("Muon", muon), ("AdamW", adamw)):
        report = slimoptim.memory_report(optimizer)
        print(
            f"{name} optimizer state: {report['optimizer_bytes_per_param']:.2f} bytes/param "
            f"over {report['num_params']:,} params"
        )
    if not loss.item() < 0.25 * first:
        raise SystemExit(f"loss did not fall: {first:.4f} -> {loss.item():.4f}")


if __name__ == "__main__":
    main()
