"""SGD (momentum, dampening, Nesterov, L2 decay) as a rule of the step-kernel skeleton."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Columns of the per-tensor float32 scalar row; 0 is the step.
LR, MOMENTUM, ONE_MINUS_DAMPENING, WEIGHT_DECAY, FIRST_STEP, ONE_MINUS_MOMENTUM = (
    tl.constexpr(i) for i in range(1, 7)
)


@triton.jit
def sgd_update(w, g, buf, _s1, _floor, k, HAS_MOMENTUM, NESTEROV, HAS_WEIGHT_DECAY):
    """optimizers.sgd.sgd_update, operation for operation (its fma_rn is tl.fma)."""
    if HAS_WEIGHT_DECAY:
        g = tl.fma(w, k[WEIGHT_DECAY], g)
    if HAS_MOMENTUM:
        buf = tl.fma(buf, k[MOMENTUM], g * k[ONE_MINUS_DAMPENING])
        buf = tl.where(k[FIRST_STEP] != 0, g, buf)
        if NESTEROV:
            g = tl.fma(buf, k[MOMENTUM], g)
        else:
            g = buf
    return tl.fma(g, k[LR] * -1.0, w), buf, _s1  # k * -1.0 keeps -0.0


class SGDRule:
    update = sgd_update
    forget_column = ONE_MINUS_MOMENTUM.value  # 1 - beta of the signed state
    momentum_levels = "linear_square"  # formats.MOMENTUM_LEVEL_SETS
    master_rounding = "nearest"  # SlimOptimizer.master_rounding
    momentum_rounding = "decay"  # StateSpec.rounding of its momentum
    dither = "hashed"  # SlimOptimizer.dither
    state_names = ("momentum_buffer",)
    flag_names = ("HAS_MOMENTUM", "NESTEROV", "HAS_WEIGHT_DECAY")
    group_values = ("lr", "momentum", "omd", "weight_decay", "omm")

    @staticmethod
    def flags(opt, group) -> dict:
        return {
            "HAS_MOMENTUM": group["momentum"] != 0,
            "NESTEROV": bool(group["nesterov"]),
            "HAS_WEIGHT_DECAY": group["weight_decay"] != 0,
        }

    @staticmethod
    def values(group) -> list:
        momentum = group["momentum"]
        return [group["lr"], momentum, 1 - group["dampening"], group["weight_decay"], 1 - momentum]

    @staticmethod
    def scalars(hyper: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
        lr, momentum, omd, wd, omm = hyper.unbind(1)
        first_step = (steps == 1).double()
        rows = [steps.double(), lr, momentum, omd, wd, first_step, omm]
        return torch.stack(rows, dim=1).float()
