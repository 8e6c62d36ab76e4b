"""slimoptim with Hugging Face Accelerate and FSDP2, checkpointed with save_state/load_state.

On GPUs, launch it with one process per GPU (``accelerate launch --num_processes N
examples/accelerate_fsdp2.py`` or ``torchrun --nproc-per-node N ...``, also for N = 1):
Accelerate shards the model with FSDP2 (``fsdp_version=2``) and slimoptim steps each
rank's shard; ``save_state``/``load_state`` go through ``torch.distributed.checkpoint``
and resume bit for bit (the script checks). Accelerate shards only when launched so and
only on accelerators: under plain ``python``, or on a CPU, the script trains unsharded.

The changes from a torch.optim script: cast the model to bf16 with ``slimoptim.cast_model``
and build ``slimoptim.AdamW`` before ``accelerator.prepare`` (Accelerate swaps in the
sharded parameters).
"""

import shutil
import tempfile

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import FullyShardedDataParallelPlugin, broadcast_object_list

import slimoptim
from slimoptim.demo_model import ByteGPT, ModelSize

SIZE = ModelSize(layers=2, width=64, heads=4, context=32, batch=8)


def batch(step: int, device) -> torch.Tensor:
    """16 distinct bytes that repeat with a period of 8: quick to learn, then to copy."""
    gen = torch.Generator().manual_seed(step)
    period = torch.randint(0, 16, (SIZE.batch, 8), generator=gen)
    return period.repeat(1, SIZE.context // 8 + 1)[:, : SIZE.context + 1].to(device)


def train(accelerator, model, optimizer, steps) -> float:
    for step in steps:
        tokens = batch(step, accelerator.device)
        logits = model(tokens[:, :-1])  # through forward, where the FSDP2/DDP hooks are
        loss = F.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten())
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
    return loss.item()


def local_params(model) -> list[torch.Tensor]:
    return [getattr(p, "_local_tensor", p).detach().clone() for p in model.parameters()]


def main(steps: int = 40) -> None:
    sharded = torch.cuda.is_available()
    plugin = None
    if sharded:
        plugin = FullyShardedDataParallelPlugin(
            fsdp_version=2,
            auto_wrap_policy="transformer_based_wrap",
            transformer_cls_names_to_wrap=["Block"],
            state_dict_type="SHARDED_STATE_DICT",
        )
    accelerator = Accelerator(fsdp_plugin=plugin)
    torch.manual_seed(0)
    model = slimoptim.cast_model(ByteGPT(SIZE), torch.bfloat16)
    optimizer = slimoptim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    model, optimizer = accelerator.prepare(model, optimizer)
    accelerator.print(f"distributed type: {accelerator.distributed_type}")

    first = train(accelerator, model, optimizer, range(1))
    # One directory for all ranks: DCP writes every rank's shard into it.
    directory = [tempfile.mkdtemp() if accelerator.is_main_process else None]
    directory = broadcast_object_list(directory)[0]
    accelerator.save_state(directory)
    loss = train(accelerator, model, optimizer, range(1, steps))
    straight = local_params(model)
    accelerator.load_state(directory)  # back to step 1, then the same steps again
    train(accelerator, model, optimizer, range(1, steps))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shutil.rmtree(directory, ignore_errors=True)
    resumed = all(torch.equal(a, b) for a, b in zip(straight, local_params(model), strict=True))
    accelerator.print(f"loss {first:.3f} -> {loss:.3f}; resume bit-identical: {resumed}")
    report = slimoptim.memory_report(optimizer.optimizer)
    accelerator.print(f"optimizer state: {report['optimizer_bytes_per_param']:.2f} bytes/param")
    accelerator.end_training()  # destroys the process group: a clean NCCL teardown
    if not resumed:
        raise SystemExit("load_state did not resume bit for bit")
    # It starts near uniform over 256 bytes (5.5 nats); uniform over the 16 it uses is 2.8.
    if not loss < 0.6 * first:
        raise SystemExit(f"loss did not fall: {first:.4f} -> {loss:.4f}")


if __name__ == "__main__":
    main()
