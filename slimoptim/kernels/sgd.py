"""Fused SGD step (momentum, dampening, Nesterov, L2 decay) on compact weights and states."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import common as cm

# Rows of the per-tensor float32 scalar table.
STEP, LR, MOMENTUM, ONE_MINUS_DAMPENING, WEIGHT_DECAY, FIRST_STEP = (
    tl.constexpr(i) for i in range(6)
)
N_SCALARS = tl.constexpr(6)


@triton.jit
def _sgd_tile(
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
    HAS_MOMENTUM: tl.constexpr,
    NESTEROV: tl.constexpr,
    HAS_WEIGHT_DECAY: tl.constexpr,
):
    g, ok, group_ok = cm.load_grad(
        grad_ptrs, t, offs, mask, group_mask, grad_scale, found_inf,
        GRAD_KIND, MAXIMIZE, HAS_GRAD_SCALE, HAS_FOUND_INF,
    )  # fmt: skip
    w0 = cm.load_master(table, n_tensors, t, offs, mask, PARAM_KIND, CODE_BITS)

    # sgd_update, operation for operation.
    if HAS_WEIGHT_DECAY:
        g = g + w0 * cm.scalar(scalars, N_SCALARS, WEIGHT_DECAY, t)
    if HAS_MOMENTUM:
        if STATE_BITS == 8:
            buf = cm.load_momentum(table, n_tensors, cm.STATE0, t, offs, mask, groups, group_mask)
        else:
            buf = cm.load_float_state(table, n_tensors, cm.STATE0, t, offs, mask)
        momentum = cm.scalar(scalars, N_SCALARS, MOMENTUM, t)
        buf = buf * momentum + g * cm.scalar(scalars, N_SCALARS, ONE_MINUS_DAMPENING, t)
        buf = tl.where(cm.scalar(scalars, N_SCALARS, FIRST_STEP, t) != 0, g, buf)
        if NESTEROV:
            g = g + buf * momentum
        else:
            g = buf
    w = w0 - g * cm.scalar(scalars, N_SCALARS, LR, t)
    w = tl.where(ok, w, w0)

    cm.store_master(table, n_tensors, t, offs, mask, w, PARAM_KIND, CODE_BITS)
    if HAS_MOMENTUM:
        if STATE_BITS == 8:
            step = cm.scalar(scalars, N_SCALARS, STEP, t)
            cm.store_momentum(
                table, n_tensors, cm.STATE0, t, offs, mask, groups, buf, ok, group_ok, step
            )
        else:
            cm.store_float_state(table, n_tensors, cm.STATE0, t, offs, buf, ok)


@triton.jit
def sgd_step_kernel(
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
    HAS_MOMENTUM: tl.constexpr,
    NESTEROV: tl.constexpr,
    HAS_WEIGHT_DECAY: tl.constexpr,
):
    t, offs, groups, full, numel = cm.tile(block_tensor, block_start, numels, ROWS, G)
    if full:
        _sgd_tile(
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
            HAS_MOMENTUM,
            NESTEROV,
            HAS_WEIGHT_DECAY,
        )
    else:
        _sgd_tile(
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
            HAS_MOMENTUM,
            NESTEROV,
            HAS_WEIGHT_DECAY,
        )


class SGDRule:
    kernel = sgd_step_kernel
    state_names = ("momentum_buffer",)
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
