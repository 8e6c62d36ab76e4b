"""Lion as a rule of the step-kernel skeleton: signed interpolated update, then the EMA."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Columns of the per-tensor float32 scalar row; 0 is the step.
LR, DECAY, BETA1, ONE_MINUS_BETA1, BETA2, ONE_MINUS_BETA2 = (tl.constexpr(i) for i in range(1, 7))


@triton.jit
def lion_update(w, g, m, _s1, _floor, k, HAS_WEIGHT_DECAY, _UNUSED1, _UNUSED2):
    """optimizers.lion.lion_update, operation for operation (its fma_rn is tl.fma);
    sign() as torch.sign."""
    if HAS_WEIGHT_DECAY:
        w = w * k[DECAY]
    direction = tl.fma(m, k[BETA1], g * k[ONE_MINUS_BETA1])
    sign = (direction > 0).to(tl.float32) - (direction < 0).to(tl.float32)
    w = tl.fma(sign, k[LR] * -1.0, w)  # sign * lr is exact: the reference's product and sum
    m = tl.fma(m, k[BETA2], g * k[ONE_MINUS_BETA2])
    return w, m, _s1


class LionRule:
    update = lion_update
    forget_column = 0  # unused: the stochastic rule reads no 1 - beta (column 0 is the step)
    momentum_levels = "square"  # formats.MOMENTUM_LEVEL_SETS
    master_rounding = "stochastic"  # optimizers/lion.py
    momentum_rounding = "stochastic"  # StateSpec.rounding of its momentum
    dither = "sequenced"  # SlimOptimizer.dither
    state_names = ("exp_avg",)
    flag_names = ("HAS_WEIGHT_DECAY",)
    group_values = ("lr", "decay", "beta1", "omb1", "beta2", "omb2")

    @staticmethod
    def flags(opt, group) -> dict:
        return {"HAS_WEIGHT_DECAY": group["weight_decay"] != 0}

    @staticmethod
    def values(group) -> list:
        lr = group["lr"]
        beta1, beta2 = group["betas"]
        return [lr, 1 - lr * group["weight_decay"], beta1, 1 - beta1, beta2, 1 - beta2]

    @staticmethod
    def scalars(hyper: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
        return torch.cat([steps.double()[:, None], hyper], dim=1).float()
