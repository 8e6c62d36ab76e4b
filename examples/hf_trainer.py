"""slimoptim with the Hugging Face ``Trainer`` (runs in seconds on a CPU, no downloads).

A tiny GPT-2 is built from a config written here and randomly initialised, cast
to bf16, and trained on synthetic counting sequences (each token is the
previous one plus one). The optimizer and scheduler are
handed to ``Trainer`` through ``optimizers=(optimizer, scheduler)``, which makes
Trainer use them instead of creating its own torch AdamW.
"""

import tempfile

import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

import slimoptim

VOCAB, LENGTH = 64, 32


class CountingDataset(torch.utils.data.Dataset):
    """start, start + 1, start + 2, ... (mod VOCAB) from random starts."""

    def __init__(self, size: int = 512):
        starts = torch.randint(0, VOCAB, (size, 1), generator=torch.Generator().manual_seed(0))
        self.tokens = (starts + torch.arange(LENGTH)) % VOCAB

    def __len__(self):
        return len(self.tokens)

    def __getitem__(self, i):
        return {"input_ids": self.tokens[i], "labels": self.tokens[i]}


def main(steps: int = 40) -> None:
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=VOCAB,
        n_positions=LENGTH,
        n_embd=64,
        n_layer=2,
        n_head=4,
        bos_token_id=0,
        eos_token_id=0,
    )
    model = slimoptim.cast_model(GPT2LMHeadModel(config), torch.bfloat16)
    optimizer = slimoptim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1 - s / steps)

    with tempfile.TemporaryDirectory() as output_dir:
        args = TrainingArguments(
            output_dir=output_dir,
            max_steps=steps,
            per_device_train_batch_size=16,
            logging_steps=10,
            save_strategy="no",
            report_to="none",
            use_cpu=True,
            disable_tqdm=True,
        )
        trainer = Trainer(
            model=model,
            args=args,
            train_dataset=CountingDataset(),
            optimizers=(optimizer, scheduler),
        )
        trainer.train()

    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    print("logged training losses:", " ".join(f"{x:.3f}" for x in losses))
    # Trainer (through accelerate) wraps our optimizer; it must not have made its own.
    assert optimizer in (trainer.optimizer, getattr(trainer.optimizer, "optimizer", None))
    report = slimoptim.memory_report(optimizer)
    print(f"optimizer state: {report['optimizer_bytes_per_param']:.2f} bytes/param")
    if not losses[-1] < 0.5 * losses[0]:
        raise SystemExit(f"loss did not fall: {losses[0]:.3f} -> {losses[-1]:.3f}")


if __name__ == "__main__":
    main()
