"""slimoptim with the Hugging Face ``Trainer`` (runs in seconds on a CPU, no downloads).

A tiny GPT-2 is built from a config written here and randomly initialised, cast
to bf16, and trained on synthetic counting sequences (each token is the
previous one plus one). ``Trainer`` gets the optimizer *class* and its
arguments through ``optimizer_cls_and_kwargs``: it then builds the parameter
groups itself, as it does for its own AdamW (weight decay on matrices, none on
biases and LayerNorm weights: ``Trainer.get_decay_parameter_names``), and its
own learning-rate schedule from ``TrainingArguments``. (Passing a ready
optimizer with ``optimizers=(optimizer, scheduler)`` also works, but then the
grouping is yours to write.)
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


def check_grouping(trainer: Trainer, optimizer: slimoptim.AdamW) -> None:
    """Trainer's own grouping: decay on its decay parameters only, and none elsewhere."""
    names = {id(p): n for n, p in trainer.model.named_parameters()}
    decay_names = set(trainer.get_decay_parameter_names(trainer.model))
    no_decay = [
        names[id(p)]
        for g in optimizer.param_groups
        if g["weight_decay"] == 0.0
        for p in g["params"]
    ]
    decay = [
        names[id(p)] for g in optimizer.param_groups if g["weight_decay"] > 0.0 for p in g["params"]
    ]
    grouped_as_trainer = set(decay) <= decay_names and not decay_names & set(no_decay)
    if not grouped_as_trainer or not all(".bias" in n or ".ln_" in n for n in no_decay):
        raise SystemExit(f"unexpected parameter groups: decay {decay}, no decay {no_decay}")
    print(f"weight decay on {len(decay)} tensors, none on {len(no_decay)} (biases and norms)")


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

    with tempfile.TemporaryDirectory() as output_dir:
        args = TrainingArguments(
            output_dir=output_dir,
            max_steps=steps,
            per_device_train_batch_size=16,
            learning_rate=3e-3,
            weight_decay=0.01,
            lr_scheduler_type="linear",
            logging_steps=10,
            save_strategy="no",
            report_to="none",
            use_cpu=True,
            disable_tqdm=True,
        )
        # The learning rate, betas and eps as Trainer would give its own AdamW.
        adamw_arguments = {
            "lr": args.learning_rate,
            "betas": (args.adam_beta1, args.adam_beta2),
            "eps": args.adam_epsilon,
        }
        trainer = Trainer(
            model=model,
            args=args,
            train_dataset=CountingDataset(),
            optimizer_cls_and_kwargs=(slimoptim.AdamW, adamw_arguments),
        )
        trainer.train()

    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    print("logged training losses:", " ".join(f"{x:.3f}" for x in losses))
    # Trainer (through accelerate) may wrap the optimizer it made: unwrap it.
    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    if not isinstance(optimizer, slimoptim.AdamW):
        raise SystemExit(f"Trainer made a {type(optimizer).__name__}, not slimoptim.AdamW")
    check_grouping(trainer, optimizer)
    report = slimoptim.memory_report(optimizer)
    print(f"optimizer state: {report['optimizer_bytes_per_param']:.2f} bytes/param")
    if not losses[-1] < 0.5 * losses[0]:
        raise SystemExit(f"loss did not fall: {losses[0]:.3f} -> {losses[-1]:.3f}")


if __name__ == "__main__":
    main()
