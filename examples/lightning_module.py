"""slimoptim in a PyTorch Lightning module (runs in seconds on a CPU).

``configure_optimizers`` returns a slimoptim optimizer and its scheduler like
any torch optimizer; the model is cast to bf16 once, before training. Lightning
calls ``optimizer.step(closure)``, which slimoptim supports.
"""

import lightning as L
import torch
from torch import nn

import slimoptim


class Regression(L.LightningModule):
    def __init__(self, steps: int):
        super().__init__()
        self.steps = steps
        self.net = nn.Sequential(nn.Linear(16, 128), nn.GELU(), nn.Linear(128, 1))
        slimoptim.cast_model(self.net, torch.bfloat16)
        self.losses: list[float] = []

    def training_step(self, batch, batch_index):
        inputs, targets = batch
        loss = nn.functional.mse_loss(self.net(inputs.bfloat16()).float(), targets)
        self.losses.append(loss.item())
        return loss

    def configure_optimizers(self):
        optimizer = slimoptim.AdamW(self.parameters(), lr=3e-3, weight_decay=0.01)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=self.steps)
        schedule = {"scheduler": scheduler, "interval": "step"}  # step the LR every batch
        return {"optimizer": optimizer, "lr_scheduler": schedule}


def main(steps: int = 150) -> None:
    L.seed_everything(0, verbose=False)
    inputs = torch.randn(1024, 16)
    targets = inputs.sin().sum(dim=1, keepdim=True)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(inputs, targets), batch_size=64, shuffle=True
    )
    module = Regression(steps)
    trainer = L.Trainer(
        max_steps=steps,
        accelerator="cpu",
        devices=1,
        gradient_clip_val=1.0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, loader)

    first, last = sum(module.losses[:10]) / 10, sum(module.losses[-10:]) / 10
    print(f"mean loss of the first / last 10 steps: {first:.4f} / {last:.4f}")
    report = slimoptim.memory_report(trainer.optimizers[0])
    print(f"optimizer state: {report['optimizer_bytes_per_param']:.2f} bytes/param")
    if not last < 0.5 * first:
        raise SystemExit(f"loss did not fall: {first:.4f} -> {last:.4f}")


if __name__ == "__main__":
    main()
