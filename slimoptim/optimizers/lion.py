"""Lion (Chen et al., 2023) on compact master weights and an 8-bit momentum."""

from __future__ import annotations

import torch

from ..ieee import fma_rn
from .arguments import check_betas
from .base import SlimOptimizer
from .state_spec import StateSpec


def lion_update(w, g, exp_avg, *, lr, beta1, beta2, weight_decay):
    """One Lion step on float32 tensors: signed interpolated update, then the EMA; each
    multiply followed by an add rounds once (``fma_rn``), as the kernels' fma does."""
    if weight_decay != 0:
        w = w * (1 - lr * weight_decay)
    direction = fma_rn(exp_avg, beta1, g * (1 - beta1))
    w = w - torch.sign(direction) * lr  # an exact product: the kernel's fma rounds alike
    exp_avg = fma_rn(exp_avg, beta2, g * (1 - beta2))
    return w, exp_avg


class Lion(SlimOptimizer):
    """Lion with decoupled weight decay; ``betas=(0.9, 0.99)`` as in the paper."""

    kernel_rule = "lion"

    # Both codes round stochastically with a sequenced dither (formats.dither). The
    # momentum (beta2 0.99) moves by ~1 % of itself per step: rounded to nearest it stops
    # short of its average; dithered independently at every step, its errors add up to
    # ~7x one rounding's (1 / sqrt(1 - beta2**2)); a Weyl sequence per element makes
    # successive errors cancel (docs/formats.md). The master moves by exactly lr per step:
    # for |w| >= ~0.5 (LayerNorm gains) late in a schedule that is a few code units or
    # less of a 24-bit master, which nearest rounding gets wrong the same way every step.
    state_specs = (StateSpec("exp_avg", signed=True, rounding="stochastic"),)
    master_rounding = "stochastic"
    dither = "sequenced"

    def __init__(
        self,
        params,
        lr=1e-4,
        betas=(0.9, 0.99),
        weight_decay=0.0,
        *,
        maximize=False,
        master_weight_bits=24,
        state_bits=8,
        group_size=32,
        fused=None,
        foreach=None,
        capturable=False,
        differentiable=False,
    ):
        defaults = dict(lr=lr, betas=betas, weight_decay=weight_decay, maximize=maximize)
        super().__init__(
            params,
            defaults,
            master_weight_bits=master_weight_bits,
            state_bits=state_bits,
            group_size=group_size,
            fused=fused,
            foreach=foreach,
            capturable=capturable,
            differentiable=differentiable,
        )

    def _check_hyperparameters(self, group):
        super()._check_hyperparameters(group)
        check_betas(group["betas"], upper_open=False)

    def _update(self, w, g, states, group, scalars, denom_floor):
        beta1, beta2 = group["betas"]
        w, m = lion_update(
            w,
            g,
            states["exp_avg"],
            lr=group["lr"],
            beta1=beta1,
            beta2=beta2,
            weight_decay=group["weight_decay"],
        )
        return w, {"exp_avg": m}
