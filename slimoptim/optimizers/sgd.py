"""SGD with momentum, dampening and Nesterov on compact master weights and states."""

from __future__ import annotations

from ..ieee import fma_rn
from .base import SlimOptimizer
from .state_spec import MOMENTUM_BUFFER


def sgd_update(w, g, buf, *, lr, momentum, dampening, nesterov, weight_decay, first_step):
    """One torch.optim.SGD step on float32 tensors; ``buf`` is None without momentum.

    ``first_step`` (bool tensor) starts the buffer at the gradient, as torch does. Each
    multiply followed by an add rounds once (``fma_rn``), as the kernels' fma does.
    """
    if weight_decay != 0:
        g = fma_rn(w, weight_decay, g)
    if buf is not None:
        buf = fma_rn(buf, momentum, g * (1 - dampening)).where(~first_step, g)
        g = fma_rn(buf, momentum, g) if nesterov else buf
    return fma_rn(g, -lr, w), buf


class SGD(SlimOptimizer):
    """Drop-in ``torch.optim.SGD``; the momentum buffer is stored in 8 bits."""

    kernel_rule = "sgd"

    def __init__(
        self,
        params,
        lr=1e-3,
        momentum=0.0,
        dampening=0.0,
        weight_decay=0.0,
        nesterov=False,
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
        defaults = dict(
            lr=lr,
            momentum=momentum,
            dampening=dampening,
            weight_decay=weight_decay,
            nesterov=nesterov,
            maximize=maximize,
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

    state_specs = (MOMENTUM_BUFFER,)

    def _check_hyperparameters(self, group):
        super()._check_hyperparameters(group)
        if group["momentum"] < 0.0:
            raise ValueError(f"Invalid momentum value: {group['momentum']} (must be >= 0).")
        if group["nesterov"] and (group["momentum"] <= 0 or group["dampening"] != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")

    def _specs_for(self, group):
        # Plain SGD (momentum 0) keeps no state besides the master weight.
        return self.state_specs if group["momentum"] != 0 else ()

    def _scalars(self, group, step):
        return {"first_step": step == 1}

    def _update(self, w, g, states, group, scalars, denom_floor):
        w, buf = sgd_update(
            w,
            g,
            states.get("momentum_buffer"),
            lr=group["lr"],
            momentum=group["momentum"],
            dampening=group["dampening"],
            nesterov=group["nesterov"],
            weight_decay=group["weight_decay"],
            **scalars,
        )
        return w, ({} if buf is None else {"momentum_buffer": buf})
