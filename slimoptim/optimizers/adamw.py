"""AdamW and Adam on slimoptim's compact master weights and 8-bit states."""

from __future__ import annotations

import torch

from ..ieee import fma_rn, sqrt_rn
from .arguments import check_betas
from .base import SlimOptimizer
from .state_spec import StateSpec


def adam_scalars(lr, beta1: float, beta2: float, step: torch.Tensor) -> dict[str, torch.Tensor]:
    """Bias-corrected step size and 1/sqrt of the second bias correction, from a device step."""
    step = step.double()
    bias_correction1 = 1 - torch.pow(beta1, step)
    bias_correction2 = 1 - torch.pow(beta2, step)
    lr = torch.as_tensor(lr, dtype=torch.float64, device=step.device)
    return {
        "step_size": (lr / bias_correction1).float(),
        "inv_bias_correction2_sqrt": (1 / bias_correction2.sqrt()).float(),
    }


def adam_update(
    w,
    g,
    exp_avg,
    exp_avg_sq,
    *,
    lr,
    beta1,
    beta2,
    eps,
    weight_decay,
    decoupled,
    step_size,
    inv_bias_correction2_sqrt,
    denom_floor=None,
):
    """One Adam(W) step on float32 tensors, in torch.optim's order of operations.

    Only two operations per element are IEEE divisions or roots (sqrt(v) and
    m / denom); the bias correction of v is a multiplication by its reciprocal. Each
    multiply followed by an add rounds once (``fma_rn``), as the kernels' fma does.

    ``denom_floor`` (per element, or None) bounds sqrt(v) from below where the
    8-bit second moment cannot resolve it, so m / sqrt(v) stays bounded.
    """
    if weight_decay != 0:
        if decoupled:
            w = w * (1 - lr * weight_decay)
        else:
            g = fma_rn(w, weight_decay, g)
    exp_avg = fma_rn(g - exp_avg, 1 - beta1, exp_avg)
    exp_avg_sq = fma_rn(exp_avg_sq, beta2, g * g * (1 - beta2))
    root = sqrt_rn(exp_avg_sq)  # correctly rounded, as the kernel's
    if denom_floor is not None:
        root = torch.maximum(root, denom_floor)
    denom = fma_rn(root, inv_bias_correction2_sqrt, eps)
    w = fma_rn(-step_size, exp_avg / denom, w)
    return w, exp_avg, exp_avg_sq


class AdamW(SlimOptimizer):
    """Drop-in ``torch.optim.AdamW`` holding ~3.1 bytes/param of state (24-bit master).

    Extra arguments: ``master_weight_bits`` (24, 32 or None), ``state_bits`` (8 or
    32), ``group_size`` (values per quantization scale), ``fused`` (None picks
    the Triton kernel on CUDA). torch's ``foreach``, ``capturable`` and
    ``differentiable`` are accepted at their neutral values (None/False).
    """

    kernel_rule = "adamw"

    state_specs = (
        StateSpec("exp_avg", signed=True, beta=lambda group: group["betas"][0]),
        StateSpec("exp_avg_sq", signed=False),
    )
    decoupled = True

    def __init__(
        self,
        params,
        lr=1e-3,
        betas=(0.9, 0.999),
        eps=1e-8,
        weight_decay=None,
        amsgrad=False,
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
        if weight_decay is None:
            weight_decay = 1e-2 if self.decoupled else 0.0
        defaults = dict(
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            maximize=maximize,
            amsgrad=amsgrad,
        )
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
        if group.get("amsgrad"):
            raise ValueError(
                "amsgrad=True is not supported: its running max of v would need a third "
                "full state. Use amsgrad=False or torch.optim for this parameter group."
            )
        if not 0.0 <= group["eps"]:
            raise ValueError(f"Invalid epsilon value: {group['eps']} (must be >= 0).")
        check_betas(group["betas"], upper_open=True)

    def _scalars(self, group, step):
        return adam_scalars(group["lr"], *group["betas"], step)

    def _update(self, w, g, states, group, scalars, denom_floor):
        beta1, beta2 = group["betas"]
        w, m, v = adam_update(
            w,
            g,
            states["exp_avg"],
            states["exp_avg_sq"],
            lr=group["lr"],
            beta1=beta1,
            beta2=beta2,
            eps=group["eps"],
            weight_decay=group["weight_decay"],
            decoupled=self.decoupled,
            denom_floor=denom_floor,
            **scalars,
        )
        return w, {"exp_avg": m, "exp_avg_sq": v}


class Adam(AdamW):
    """Drop-in ``torch.optim.Adam``: weight decay is L2, added to the gradient."""

    decoupled = False
