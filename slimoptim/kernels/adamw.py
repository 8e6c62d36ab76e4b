"""AdamW / Adam as a rule of the step-kernel skeleton (kernels/common.py)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Columns of the per-tensor float32 scalar row (see ``AdamWRule.scalars``); 0 is the step.
DECAY, WEIGHT_DECAY, ONE_MINUS_BETA1, BETA2, ONE_MINUS_BETA2, EPS, STEP_SIZE, INV_BC2_SQRT = (
    tl.constexpr(i) for i in range(1, 9)
)


@triton.jit
def adamw_update(w, g, m, v, floor, k, DECOUPLED, HAS_WEIGHT_DECAY, _UNUSED):
    """optimizers.adamw.adam_update, operation for operation (its fma_rn is tl.fma)."""
    if HAS_WEIGHT_DECAY:
        if DECOUPLED:
            w = w * k[DECAY]
        else:
            g = tl.fma(w, k[WEIGHT_DECAY], g)
    m = tl.fma(g - m, k[ONE_MINUS_BETA1], m)
    v = tl.fma(v, k[BETA2], g * g * k[ONE_MINUS_BETA2])
    root = tl.maximum(tl.sqrt_rn(v), floor, propagate_nan=tl.PropagateNan.ALL)
    denom = tl.fma(root, k[INV_BC2_SQRT], k[EPS])
    # k * -1.0, not -k: Triton's unary minus is 0 - x, which loses -0.0
    w = tl.fma(k[STEP_SIZE] * -1.0, tl.div_rn(m, denom), w)
    return w, m, v


class AdamWRule:
    """Host side of the AdamW/Adam rule: flags, per-group values, per-tensor scalars."""

    update = adamw_update
    forget_column = ONE_MINUS_BETA1.value  # 1 - beta of the signed state
    momentum_levels = "square"  # formats.MOMENTUM_LEVEL_SETS
    master_rounding = "nearest"  # SlimOptimizer.master_rounding
    momentum_rounding = "decay"  # StateSpec.rounding of its momentum
    dither = "hashed"  # SlimOptimizer.dither
    state_names = ("exp_avg", "exp_avg_sq")
    flag_names = ("DECOUPLED", "HAS_WEIGHT_DECAY")
    # Values read from each param group at every step (float, or tensor for a tensor lr).
    group_values = ("lr", "beta1", "beta2", "eps", "weight_decay", "decay", "omb1", "omb2")

    @staticmethod
    def flags(opt, group) -> dict:
        return {
            "DECOUPLED": bool(opt.decoupled),
            "HAS_WEIGHT_DECAY": group["weight_decay"] != 0,
        }

    @staticmethod
    def values(group) -> list:
        lr, wd = group["lr"], group["weight_decay"]
        beta1, beta2 = group["betas"]
        # The same Python/torch expressions as adam_update evaluates, so a float
        # hyper-parameter rounds to float32 exactly where the reference's does.
        return [lr, beta1, beta2, group["eps"], wd, 1 - lr * wd, 1 - beta1, 1 - beta2]

    @staticmethod
    def scalars(hyper: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
        """float32 [n, 9] rows from float64 per-tensor values [n, 8] and float32 steps [n]."""
        lr, beta1, beta2, eps, wd, decay, omb1, omb2 = hyper.unbind(1)
        step = steps.double()
        # adam_scalars, vectorised over tensors.
        bias_correction1 = 1 - torch.pow(beta1, step)
        bias_correction2 = 1 - torch.pow(beta2, step)
        step_size = lr / bias_correction1
        inv_bc2_sqrt = 1 / bias_correction2.sqrt()
        rows = [step, decay, wd, omb1, beta2, omb2, eps, step_size, inv_bc2_sqrt]
        return torch.stack(rows, dim=1).float()
