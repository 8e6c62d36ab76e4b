"""SGD (momentum, dampening, Nesterov, L2 decay) as a rule of the step-kernel skeleton."""

from __future__ import annotations

import triton
import triton.language as tl

# Columns of the per-tensor float32 scalars (``sgd_scalars``); 0 is the step.
LR, MOMENTUM, ONE_MINUS_DAMPENING, WEIGHT_DECAY, FIRST_STEP, ONE_MINUS_MOMENTUM = (
    tl.constexpr(i) for i in range(1, 7)
)


@triton.jit
def sgd_scalars(values, step, _powers):
    """Scalars from the group's float64 values (lr, momentum, 1 - dampening, weight_decay,
    1 - momentum) and the float64 step; FIRST_STEP is 1 at step 1, else 0."""
    f32 = tl.float32
    return (
        step.to(f32), tl.load(values).to(f32), tl.load(values + 1).to(f32),
        tl.load(values + 2).to(f32), tl.load(values + 3).to(f32), (step == 1).to(f32),
        tl.load(values + 4).to(f32),
    )  # fmt: skip


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
    scalars = sgd_scalars
    powered = None  # no value is raised to the step

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
