"""SGD (momentum, dampening, Nesterov, L2 decay) as a rule of the step-kernel skeleton."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Columns of the per-tensor float32 scalar row; 0 is the step.
LR, MOMENTUM, ONE_MINUS_DAMPENING, WEIGHT_DECAY, FIRST_STEP = (tl.constexpr(i) for i in range(1, 6))


@triton.jit
def sgd_update(w, g, buf, _s1, _floor, k, HAS_MOMENTUM, NESTEROV, HAS_WEIGHT_DECAY):
    """optimizers.sgd.sgd_update, operation for operation."""
    if HAS_WEIGHT_DECAY:
        g = g + w * k[WEIGHT_DECAY]
    if HAS_MOMENTUM:
        buf = buf * k[MOMENTUM] + g * k[ONE_MINUS_DAMPENING]
        buf = tl.where(k[FIRST_STEP] != 0, g, buf)
        if NESTEROV:
            g = g + buf * k[MOMENTUM]
        else:
            g = buf
    return w - g * k[LR], buf, _s1


class SGDRule:
    update = sgd_update
    state_names = ("momentum_buffer",)
    flag_names = ("HAS_MOMENTUM", "NESTEROV", "HAS_WEIGHT_DECAY")
    group_values = ("lr", "momentum", "omd", "weight_decay")

    @staticmethod
    def flags(opt, group) -> dict:
        return {
            "HAS_MOMENTUM": group["momentum"] != 0,
            "NESTEROV": bool(group["nesterov"]),
            "HAS_WEIGHT_DECAY": group["weight_decay"] != 0,
        }

    @staticmethod
    def values(group) -> list:
        return [group["lr"], group["momentum"], 1 - group["dampening"], group["weight_decay"]]

    @staticmethod
    def scalars(hyper: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
        lr, momentum, omd, wd = hyper.unbind(1)
        first_step = (steps == 1).double()
        return torch.stack([steps.double(), lr, momentum, omd, wd, first_step], dim=1).float()
