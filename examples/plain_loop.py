"""slimoptim in a plain PyTorch training loop (runs in seconds on a CPU).

The two changes from a torch.optim loop: cast the model to bf16 with
``slimoptim.cast_model`` (the optimizer keeps the extra master-weight bits) and
construct ``slimoptim.AdamW`` instead of ``torch.optim.AdamW``. Everything
else (schedulers, clipping, zero_grad, state_dict) stays as it was.
"""

import torch
from torch import nn

import slimoptim


def main(steps: int = 200) -> None:
    torch.manual_seed(0)
    # Learn y = sin(x) sums from noisy 16-dim inputs with a small MLP.
    inputs = torch.randn(1024, 16)
    targets = inputs.sin().sum(dim=1, keepdim=True)

    model = nn.Sequential(nn.Linear(16, 128), nn.GELU(), nn.Linear(128, 1))
    slimoptim.cast_model(model, torch.bfloat16)
    optimizer = slimoptim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)

    first = None
    for step in range(steps):
        batch = torch.randint(0, len(inputs), (64,))
        prediction = model(inputs[batch].bfloat16()).float()
        loss = nn.functional.mse_loss(prediction, targets[batch])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step()
        first = loss.item() if first is None else first
        if step % 50 == 0 or step == steps - 1:
            print(f"step {step:4d}  loss {loss.item():.4f}")

    report = slimoptim.memory_report(optimizer)
    print(f"optimizer state: {report['optimizer_bytes_per_param']:.2f} bytes/param")
    if not loss.item() < 0.5 * first:
        raise SystemExit(f"loss did not fall: {first:.4f} -> {loss.item():.4f}")


if __name__ == "__main__":
    main()
