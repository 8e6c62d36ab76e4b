"""torch.optim's argument conventions, as slimoptim's optimizers apply them.

Which implementation keywords are neutral, how tensor hyper-parameters are read, the
rules for ``betas``, torch's wording for ``fused=True`` on an unsupported device, the
dtype a parameter steps in, and the checks of modes, params and gradients.
"""

from __future__ import annotations

import os

import torch

# torch.optim's implementation keywords, accepted at the value that changes nothing here,
# and why any other value is refused.
NEUTRAL_KEYWORDS = {"foreach": (None, False), "capturable": (False,), "differentiable": (False,)}
_WHY_NOT = {
    "foreach": "slimoptim has one implementation, chosen by fused= (Triton kernels on CUDA)",
    "capturable": "the fused CUDA step can be captured in a CUDA graph without it "
    "(docs/kernels.md)",
    "differentiable": "the step runs under no_grad on compact storage",
}


def compute_dtype(param: torch.Tensor) -> torch.dtype:
    """float64 params are their own master and step in float64; all others in float32."""
    return torch.float64 if param.dtype == torch.float64 else torch.float32


def to_scalar(value):
    """A 1-element tensor hyper-parameter as a 0-d tensor (as torch.optim reads it), so
    ``lr=torch.tensor([[1e-3]])`` cannot broadcast a flat parameter to 2-d."""
    if isinstance(value, torch.Tensor) and value.dim() != 0:
        return value.reshape(())
    if isinstance(value, tuple) and any(isinstance(v, torch.Tensor) for v in value):
        return tuple(to_scalar(v) for v in value)
    return value


def scalar_hyperparameters(group: dict) -> dict:
    """``group`` itself, or a copy whose tensor hyper-parameters are 0-d."""
    fixed = {}
    for key, value in group.items():
        if key != "params" and isinstance(value, torch.Tensor | tuple):
            scalar = to_scalar(value)
            if scalar is not value:
                fixed[key] = scalar
    return {**group, **fixed} if fixed else group


def check_neutral_keywords(where: str, values: dict) -> None:
    """Refuse torch.optim's implementation keywords where they would ask for something."""
    for name, neutral in NEUTRAL_KEYWORDS.items():
        if name in values and not any(values[name] is v for v in neutral):
            allowed = " or ".join(repr(v) for v in neutral)
            raise ValueError(
                f"{name}={values[name]!r} ({where}) is not supported: {_WHY_NOT[name]}. "
                f"Pass {name}={allowed} or leave it out."
            )


def check_betas(betas, upper_open: bool) -> None:
    """torch.optim's rules for ``betas``: two numbers in [0, 1) (Lion: [0, 1]), both
    Python numbers or both one-element tensors."""
    if not (isinstance(betas, tuple | list) and len(betas) == 2):
        raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}.")
    tensors = [isinstance(b, torch.Tensor) for b in betas]
    if tensors[0] != tensors[1]:
        raise ValueError(
            f"betas must be either both floats or both Tensors, got {betas!r}: pass two "
            "numbers or two one-element tensors."
        )
    for i, beta in enumerate(betas):
        if tensors[i] and beta.numel() != 1:
            raise ValueError(f"Tensor betas[{i}] must be 1-element, got shape {tuple(beta.shape)}.")
        in_range = 0.0 <= beta < 1.0 if upper_open else 0.0 <= beta <= 1.0
        if not in_range:
            bound = "[0, 1)" if upper_open else "[0, 1]"
            raise ValueError(f"Invalid beta parameter at index {i}: {beta} (must be in {bound}).")


def check_fused_devices(items) -> None:
    """torch.optim's wording (searchable), then what slimoptim supports."""
    if all(p.is_cuda for _, p in items):
        return
    devices = ["cuda", "cpu"] if os.environ.get("TRITON_INTERPRET") == "1" else ["cuda"]
    for _, p in items:
        if p.device.type not in devices:
            raise RuntimeError(
                "`fused=True` requires all the params to be floating point Tensors of "
                f"supported devices: {devices} but {p.dtype} and {p.device.type}. "
                "slimoptim's fused step is a Triton kernel for CUDA (on the CPU only under "
                "TRITON_INTERPRET=1); use fused=None to pick it on CUDA and the reference "
                "path elsewhere."
            )


MASTER_WEIGHT_BITS = (24, 32, None)
STATE_BITS = (8, 32)
LOW_PRECISION = (torch.bfloat16, torch.float16)
PARAM_DTYPES = (torch.float32, torch.float64, *LOW_PRECISION)


def check_modes(group: dict) -> None:
    if group["master_weight_bits"] not in MASTER_WEIGHT_BITS:
        raise ValueError(
            f"master_weight_bits must be 24, 32 or None, got {group['master_weight_bits']!r}: "
            "24 keeps an int8 correction, 32 an int16 one, None keeps none."
        )
    if group["state_bits"] not in STATE_BITS:
        raise ValueError(
            f"state_bits must be 8 or 32, got {group['state_bits']!r}: 8 stores companded "
            "8-bit states with group scales, 32 stores float32 states."
        )
    size = group["group_size"]
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise ValueError(f"group_size must be a positive int, got {size!r}.")


def check_params(group: dict) -> None:
    for p in group["params"]:
        if not (p.is_floating_point() and p.dtype in PARAM_DTYPES):
            raise TypeError(
                f"slimoptim optimizers step float32, float64, bfloat16 or float16 parameters; "
                f"got a {p.dtype} parameter of shape {tuple(p.shape)}. Cast it "
                "(slimoptim.cast_model) or leave it out of the optimizer."
            )


def check_grad(p: torch.Tensor, grad: torch.Tensor) -> None:
    if grad.is_sparse:
        raise TypeError(
            f"slimoptim does not support sparse gradients (parameter of shape {tuple(p.shape)}); "
            "use dense embeddings (sparse=False) or torch.optim.SparseAdam for that parameter."
        )
    if grad.is_complex() or p.is_complex():
        raise TypeError(
            f"slimoptim does not support complex parameters or gradients (shape {tuple(p.shape)}); "
            "view them as real with torch.view_as_real."
        )
    if grad.shape != p.shape:
        raise ValueError(
            f"gradient of shape {tuple(grad.shape)} does not match its parameter {tuple(p.shape)}."
        )
