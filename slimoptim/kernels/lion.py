"""Fused Lion step: signed interpolated update, then the momentum EMA, in one pass."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import common as cm

# Rows of the per-tensor float32 scalar table.
STEP, LR, DECAY, BETA1, ONE_MINUS_BETA1, BETA2, ONE_MINUS_BETA2 = (
    tl.constexpr(i) for i in range(7)
)
N_SCALARS = tl.constexpr(7)


@triton.jit
def _lion_tile(
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
    HAS_WEIGHT_DECAY: tl.constexpr,
):
    g, ok, group_ok = cm.load_grad(
        grad_ptrs, t, offs, mask, group_mask, grad_scale, found_inf,
        GRAD_KIND, MAXIMIZE, HAS_GRAD_SCALE, HAS_FOUND_INF,
    )  # fmt: skip
    w0 = cm.load_master(table, n_tensors, t, offs, mask, PARAM_KIND, CODE_BITS)
    if STATE_BITS == 8:
        m = cm.load_momentum(table, n_tensors, cm.STATE0, t, offs, mask, groups, group_mask)
    else:
        m = cm.load_float_state(table, n_tensors, cm.STATE0, t, offs, mask)

    # lion_update, operation for operation; sign() as torch.sign (0 for 0 and NaN).
    w = w0
    if HAS_WEIGHT_DECAY:
        w = w * cm.scalar(scalars, N_SCALARS, DECAY, t)
    direction = m * cm.scalar(scalars, N_SCALARS, BETA1, t) + g * cm.scalar(
        scalars, N_SCALARS, ONE_MINUS_BETA1, t
    )
    sign = (direction > 0).to(tl.float32) - (direction < 0).to(tl.float32)
    w = w - sign * cm.scalar(scalars, N_SCALARS, LR, t)
    m = m * cm.scalar(scalars, N_SCALARS, BETA2, t) + g * cm.scalar(
        scalars, N_SCALARS, ONE_MINUS_BETA2, t
    )
    w = tl.where(ok, w, w0)

    cm.store_master(table, n_tensors, t, offs, mask, w, PARAM_KIND, CODE_BITS)
    if STATE_BITS == 8:
        step = cm.scalar(scalars, N_SCALARS, STEP, t)
        cm.store_momentum(table, n_tensors, cm.STATE0, t, offs, mask, groups, m, ok, group_ok, step)
    else:
        cm.store_float_state(table, n_tensors, cm.STATE0, t, offs, m, ok)


@triton.jit
def lion_step_kernel(
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
    HAS_WEIGHT_DECAY: tl.constexpr,
):
    t, offs, groups, full, numel = cm.tile(block_tensor, block_start, numels, ROWS, G)
    if full:
        _lion_tile(
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
            HAS_WEIGHT_DECAY,
        )
    else:
        _lion_tile(
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
            HAS_WEIGHT_DECAY,
        )


class LionRule:
    kernel = lion_step_kernel
    state_names = ("exp_avg",)
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
