"""FSDP2 over NCCL, one process per GPU, for tests/test_fsdp2_cuda.py.

Run as ``python tests/nccl_worker.py RANK WORLD WORKDIR`` by the test. Each rank trains
the same model three times from the same weights on the same batches: with
``optimizer.step()``, with gradient release stepping every shard inside FSDP2's
post-accumulate-grad hooks (``bucket_bytes=0``), and with buckets of about a block and a
half (some stepped in the hooks, the rest at the end of backward). It writes what it
compared to ``WORKDIR/rank<RANK>.json``.

Where the release runs: FSDP2's ``foreach_reduce`` (torch/distributed/fsdp/_fully_shard/
_fsdp_collectives.py) assigns each sharded gradient and calls the param's
post-accumulate-grad hooks inside ``with device_handle.stream(post_reduce_stream)``, the
reduce-scatter stream, after the reduce-scatter; it records ``post_reduce_event`` after
the hooks return, and the end of backward makes the caller's stream wait on that event
(``FSDPParamGroup.finalize_backward``). A delay hook registered before release's own
spins that stream first, so the step's kernels run late: a reader that did not wait for
them (the next forward's all-gather, the end-of-backward step) would see stale values.
"""

from __future__ import annotations

import json
import os
import sys
import warnings

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import slimoptim  # noqa: E402
from slimoptim.optimizers.base import local_tensor  # noqa: E402

VOCAB, WIDTH, LAYERS, CONTEXT, BATCH = 256, 512, 4, 64, 8  # BATCH per rank
STEPS = 5  # eager on the first, CUDA-graph capture on the second, replays after
DELAY_CYCLES = 2_000_000  # about a millisecond per hook call
BLOCK_GRAD_BYTES = (2 * WIDTH + 2 * 4 * WIDTH * WIDTH + 5 * WIDTH) * 2  # bf16, unsharded


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(WIDTH)
        self.up = nn.Linear(WIDTH, 4 * WIDTH)
        self.down = nn.Linear(4 * WIDTH, WIDTH)

    def forward(self, x):
        return x + self.down(F.gelu(self.up(self.norm(x))))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, WIDTH)
        self.blocks = nn.ModuleList(Block() for _ in range(LAYERS))
        self.norm = nn.LayerNorm(WIDTH)
        self.head = nn.Linear(WIDTH, VOCAB)

    def forward(self, tokens):
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def build(mesh) -> Net:
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = slimoptim.cast_model(Net(), torch.bfloat16).cuda()
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def batch(step: int, rank: int, world: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(100 + step)
    tokens = torch.randint(VOCAB, (BATCH * world, CONTEXT + 1), generator=gen)
    return tokens[rank * BATCH : (rank + 1) * BATCH].cuda()


def delay_each_hook(model) -> None:
    """Spin the hook's current stream (FSDP2's reduce-scatter stream) before release steps."""
    for p in model.parameters():
        p.register_post_accumulate_grad_hook(lambda _: torch.cuda._sleep(DELAY_CYCLES))


def count_streams(opt) -> dict:
    """Counts of step_params calls by stream: FSDP2's side stream (hooks) or the default."""
    counts = {"side_stream": 0, "default_stream": 0}
    step_params = opt.step_params

    def counting(items):
        side = torch.cuda.current_stream() != torch.cuda.default_stream()
        counts["side_stream" if side else "default_stream"] += 1
        return step_params(items)

    opt.step_params = counting
    return counts


def run(mesh, rank: int, world: int, bucket_bytes: int | None) -> dict:
    """Train STEPS steps; bucket_bytes None trains with step()."""
    model = build(mesh)
    opt = slimoptim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    counts = count_streams(opt)
    if bucket_bytes is not None:
        delay_each_hook(model)
        slimoptim.enable_gradient_release(model, opt, bucket_bytes=bucket_bytes)
    losses = []
    for step in range(STEPS):
        tokens = batch(step, rank, world)
        logits = model(tokens[:, :-1])
        loss = F.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()
        if bucket_bytes is None:
            opt.step()
            opt.zero_grad()
        losses.append(loss.item())
    torch.cuda.synchronize()
    tensors = {}
    for name, p in model.named_parameters():
        tensors[name] = local_tensor(p).detach().clone()
        for key, value in opt.state[p].items():
            tensors[f"{name}.{key}"] = local_tensor(value).clone()
    return {"losses": losses, "tensors": tensors, "counts": counts}


def compare(reference: dict, other: dict) -> dict:
    ours, theirs = reference["tensors"], other["tensors"]
    return {
        "same_losses": reference["losses"] == other["losses"],
        "losses": other["losses"],
        "differing": [n for n in ours if not torch.equal(ours[n], theirs[n])],
        "compared": len(ours),
        "counts": other["counts"],
    }


def main(rank: int, world: int, workdir: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    torch.cuda.set_device(rank)
    torch.use_deterministic_algorithms(True, warn_only=True)
    store = dist.FileStore(os.path.join(workdir, "store"), world)
    dist.init_process_group("nccl", store=store, rank=rank, world_size=world)
    mesh = init_device_mesh("cuda", (world,))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        reference = run(mesh, rank, world, None)
        out = {"step_losses": reference["losses"], "step_counts": reference["counts"]}
        for name, bucket_bytes in (("hooks", 0), ("buckets", 3 * BLOCK_GRAD_BYTES // 4)):
            out[name] = compare(reference, run(mesh, rank, world, bucket_bytes))
    out["nondeterministic"] = sorted(
        {str(w.message)[:200] for w in caught if "determinis" in str(w.message)}
    )
    with open(os.path.join(workdir, f"rank{rank}.json"), "w") as f:
        json.dump(out, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
