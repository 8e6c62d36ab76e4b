"""Fused AdamW / Adam step: rebuild master, update, re-split, requantize, in one pass."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import common as cm
from . import formats as kf

# Rows of the per-tensor float32 scalar table (see ``scalars``).
STEP, DECAY, WEIGHT_DECAY, ONE_MINUS_BETA1, BETA2, ONE_MINUS_BETA2, EPS, STEP_SIZE, INV_BC2_SQRT = (
    tl.constexpr(i) for i in range(9)
)
N_SCALARS = tl.constexpr(9)


@triton.jit
def _adamw_tile(
    table,
    grad_ptrs,
    n_tensors,
    scalars,
    t,
    offs,
    mask,
    groups,
    group_mask,
    grad_scale,
    found_inf,
    PARAM_KIND: tl.constexpr,
    GRAD_KIND: tl.constexpr,
    CODE_BITS: tl.constexpr,
    STATE_BITS: tl.constexpr,
    G: tl.constexpr,
    ROWS: tl.constexpr,
    MAXIMIZE: tl.constexpr,
    HAS_GRAD_SCALE: tl.constexpr,
    HAS_FOUND_INF: tl.constexpr,
    DECOUPLED: tl.constexpr,
    HAS_WEIGHT_DECAY: tl.constexpr,
):
    g, ok, group_ok = cm.load_grad(
        grad_ptrs, t, offs, mask, group_mask, grad_scale, found_inf,
        GRAD_KIND, MAXIMIZE, HAS_GRAD_SCALE, HAS_FOUND_INF,
    )  # fmt: skip
    w0 = cm.load_master(table, n_tensors, t, offs, mask, PARAM_KIND, CODE_BITS)
    if STATE_BITS == 8:
        m = cm.load_momentum(table, n_tensors, cm.STATE0, t, offs, mask, groups, group_mask)
        v, v_scale = cm.load_variance(
            table, n_tensors, cm.STATE1, t, offs, mask, groups, group_mask
        )
    else:
        m = cm.load_float_state(table, n_tensors, cm.STATE0, t, offs, mask)
        v = cm.load_float_state(table, n_tensors, cm.STATE1, t, offs, mask)

    # adam_update, operation for operation.
    w = w0
    if HAS_WEIGHT_DECAY:
        if DECOUPLED:
            w = w * cm.scalar(scalars, N_SCALARS, DECAY, t)
        else:
            g = g + w * cm.scalar(scalars, N_SCALARS, WEIGHT_DECAY, t)
    m = m + (g - m) * cm.scalar(scalars, N_SCALARS, ONE_MINUS_BETA1, t)
    v = v * cm.scalar(scalars, N_SCALARS, BETA2, t) + g * g * cm.scalar(
        scalars, N_SCALARS, ONE_MINUS_BETA2, t
    )
    root = tl.sqrt_rn(v)
    if STATE_BITS == 8:
        floor = kf.variance_floor(v_scale)[:, None]
        root = tl.maximum(root, floor, propagate_nan=tl.PropagateNan.ALL)
    denom = root * cm.scalar(scalars, N_SCALARS, INV_BC2_SQRT, t) + cm.scalar(
        scalars, N_SCALARS, EPS, t
    )
    w = w - cm.scalar(scalars, N_SCALARS, STEP_SIZE, t) * tl.div_rn(m, denom)
    w = tl.where(ok, w, w0)

    cm.store_master(table, n_tensors, t, offs, mask, w, PARAM_KIND, CODE_BITS)
    if STATE_BITS == 8:
        step = cm.scalar(scalars, N_SCALARS, STEP, t)
        cm.store_momentum(table, n_tensors, cm.STATE0, t, offs, mask, groups, m, ok, group_ok, step)
        cm.store_variance(table, n_tensors, cm.STATE1, t, offs, mask, groups, v, ok, group_ok, step)
    else:
        cm.store_float_state(table, n_tensors, cm.STATE0, t, offs, m, ok)
        cm.store_float_state(table, n_tensors, cm.STATE1, t, offs, v, ok)


@triton.jit
def adamw_step_kernel(
    table,
    grad_ptrs,
    n_tensors,
    numels,
    block_tensor,
    block_start,
    scalars,
    grad_scale,
    found_inf,
    PARAM_KIND: tl.constexpr,
    GRAD_KIND: tl.constexpr,
    CODE_BITS: tl.constexpr,
    STATE_BITS: tl.constexpr,
    G: tl.constexpr,
    ROWS: tl.constexpr,
    MAXIMIZE: tl.constexpr,
    HAS_GRAD_SCALE: tl.constexpr,
    HAS_FOUND_INF: tl.constexpr,
    DECOUPLED: tl.constexpr,
    HAS_WEIGHT_DECAY: tl.constexpr,
):
    t, offs, groups, full, numel = cm.tile(block_tensor, block_start, numels, ROWS, G)
    if full:
        _adamw_tile(
            table,
            grad_ptrs,
            n_tensors,
            scalars,
            t,
            offs,
            cm.everywhere(offs),
            groups,
            cm.everywhere(groups),
            grad_scale,
            found_inf,
            PARAM_KIND,
            GRAD_KIND,
            CODE_BITS,
            STATE_BITS,
            G,
            ROWS,
            MAXIMIZE,
            HAS_GRAD_SCALE,
            HAS_FOUND_INF,
            DECOUPLED,
            HAS_WEIGHT_DECAY,
        )
    else:
        _adamw_tile(
            table,
            grad_ptrs,
            n_tensors,
            scalars,
            t,
            offs,
            offs < numel,
            groups,
            groups * G < numel,
            grad_scale,
            found_inf,
            PARAM_KIND,
            GRAD_KIND,
            CODE_BITS,
            STATE_BITS,
            G,
            ROWS,
            MAXIMIZE,
            HAS_GRAD_SCALE,
            HAS_FOUND_INF,
            DECOUPLED,
            HAS_WEIGHT_DECAY,
        )


class AdamWRule:
    """Host side of the AdamW/Adam kernel: flags, per-group values, per-tensor scalars."""

    kernel = adamw_step_kernel
    state_names = ("exp_avg", "exp_avg_sq")
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
        """float32 [n, 9] table from float64 per-tensor values [n, 8] and float32 steps [n]."""
        lr, beta1, beta2, eps, wd, decay, omb1, omb2 = hyper.unbind(1)
        step = steps.double()
        # adam_scalars, vectorised over tensors.
        bias_correction1 = 1 - torch.pow(beta1, step)
        bias_correction2 = 1 - torch.pow(beta2, step)
        step_size = lr / bias_correction1
        inv_bc2_sqrt = 1 / bias_correction2.sqrt()
        rows = [steps.double(), decay, wd, omb1, beta2, omb2, eps, step_size, inv_bc2_sqrt]
        return torch.stack(rows, dim=1).float()  # [n, 9]: one row per tensor
