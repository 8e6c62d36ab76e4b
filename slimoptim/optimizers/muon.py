"""Muon (momentum, then Newton-Schulz orthogonalisation) on compact master weights.

A Muon step is not elementwise: the momentum update of a whole matrix is
orthogonalised before it is applied. It is split into three pure functions so
that the two elementwise ones can run in fused kernels around the matmuls:

1. :func:`muon_momentum`: new momentum buffer and the matrix to orthogonalise;
2. :func:`newton_schulz`: the orthogonalisation, bf16 matmuls on the whole matrix;
3. :func:`muon_master_update`: decoupled weight decay and the step on the master.

The same steps and defaults as ``torch.optim.Muon``; the momentum buffer is
stored in 8 bits and the master weight as the bf16 param plus an int8
correction: about 4.06 bytes/param besides the gradient.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import nn

from .arguments import check_fused_devices, check_grad, compute_dtype, scalar_hyperparameters
from .base import SlimOptimizer, keeps_rule_of, local_tensor
from .state_spec import MOMENTUM_BUFFER

# Keller Jordan's quintic coefficients and step count, torch.optim.Muon's defaults.
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
NS_STEPS = 5
EPS = 1e-7
ADJUST_LR_FNS = (None, "original", "match_rms_adamw")


def muon_momentum(g, buf, *, momentum, nesterov):
    """Elementwise, float32: returns (matrix to orthogonalise, new momentum buffer).

    The buffer is an exponential average of the gradients, as in torch.optim.Muon;
    Nesterov looks ahead from the gradient towards the new buffer.
    """
    buf = buf + (g - buf) * (1 - momentum)
    update = g + (buf - g) * momentum if nesterov else buf
    return update, buf


# Run eagerly even inside torch.compile: Inductor rewrites the bf16 addmm chain with other
# roundings, and Newton-Schulz amplifies the difference (a compiled step moved 0.0065 away
# from the eager one in 3 steps), so a compiled step would stop matching the eager and
# fused ones bit for bit. (The fused path runs it eagerly anyway.)
@torch.compiler.disable
def newton_schulz(update, coefficients, steps: int, eps: float, out=None) -> torch.Tensor:
    """An approximately orthogonal matrix with ``update``'s singular vectors, in bf16.

    Quintic iterations X <- a X + (b A + c A A) X with A = X X^T, started from X
    scaled to unit Frobenius norm (so every singular value is at most 1). Run on
    the wide orientation, so A is the smaller Gram matrix. ``update`` is one matrix
    or a batch [k, rows, cols] of same-shape matrices, each orthogonalised on its
    own: one batched matmul for k small matrices takes far fewer launches (TinyLlama's
    44 key/value matrices: 20 ms one by one, 0.7 ms as one batch, timed alone on an
    H200), and gives each matrix the bits of its own matmuls there and on the CPU
    (checked by the tests). The last product is written in the update's own layout,
    into ``out`` (bf16, the update's shape) if given: a tall matrix's transposed
    product goes there directly, not through a transposing copy (~3 ms of a TinyLlama
    step on an H200).
    """
    a, b, c = coefficients
    x = update.bfloat16()
    tall = x.size(-2) > x.size(-1)
    if tall:
        x = x.mT
    x = x / _frobenius_norms(x).clamp(min=eps)
    addmm = torch.addmm if x.dim() == 2 else torch.baddbmm
    if out is None:
        out = torch.empty(update.shape, dtype=torch.bfloat16, device=update.device)
    for k in range(steps):
        gram = x @ x.mT
        polynomial = addmm(gram, gram, gram, beta=b, alpha=c)
        # A tall batch keeps the transposing copy: CPU baddbmm into a transposed out
        # rounds some shapes differently from the same product of a lone matrix.
        if k == steps - 1 and (not tall or x.dim() == 2):
            addmm(x, polynomial, x, beta=a, out=out.mT if tall else out)
            return out
        x = addmm(x, polynomial, x, beta=a)
    return out.copy_(x.mT if tall else x)  # ns_steps=0: the scaled update itself


def _frobenius_norms(x: torch.Tensor) -> torch.Tensor:
    """The norm of a matrix, or of each matrix of a batch (shaped to divide it): each
    reduced on its own, as a lone matrix is, so a batch's norms keep a lone matrix's bits."""
    if x.dim() == 2:
        return x.norm()
    return torch.stack([m.norm() for m in x])[:, None, None]


def adjusted_lr(lr, adjust_lr_fn: str | None, shape) -> float | torch.Tensor:
    """The step size of the orthogonalised update for a matrix of ``shape`` (rows, cols).

    "original" (the default) scales by sqrt(max(1, rows/cols)); "match_rms_adamw"
    by 0.2 sqrt(max(rows, cols)), which gives the update AdamW's RMS.
    """
    rows, cols = shape[:2]
    if adjust_lr_fn == "match_rms_adamw":
        factor = 0.2 * math.sqrt(max(rows, cols))
    else:
        factor = math.sqrt(max(1, rows / cols))
    if isinstance(lr, torch.Tensor):  # rounded once from float64, as a float lr's product is
        return (lr.double() * factor).float()
    return lr * factor


def muon_master_update(w, ortho, *, lr, weight_decay, lr_adjusted):
    """Elementwise, float32: decoupled weight decay at ``lr``, then the orthogonal step."""
    if weight_decay != 0:
        w = w * (1 - lr * weight_decay)
    return w - ortho.float() * lr_adjusted


class Muon(SlimOptimizer):
    """Drop-in ``torch.optim.Muon`` for 2-D params: ~2.06 bytes/param of state (24/8).

    Same arguments and defaults as ``torch.optim.Muon``, plus ``master_weight_bits``,
    ``state_bits``, ``group_size`` and ``fused`` as in :class:`slimoptim.AdamW`.

    Muon steps hidden weight matrices only: every param must be 2-D. Train
    embeddings, the output head, norms and biases with :class:`slimoptim.AdamW`;
    :func:`slimoptim.muon_param_groups` splits a model that way.

    A matrix whose gradient holds a NaN or Inf is not stepped at all (weight,
    correction, momentum and step counter keep their values): Newton-Schulz mixes
    every element, so one bad value would spoil the whole update. The check is a
    device-side select, with no host sync.

    Newton-Schulz needs whole matrices, so DTensor (FSDP2-sharded) params are
    refused. ``fused`` as in AdamW: on CUDA the two elementwise steps run in the fused
    kernels, Newton-Schulz on PyTorch bf16 matmuls between them; no host sync.
    """

    state_specs = (MOMENTUM_BUFFER,)

    def __init__(
        self,
        params,
        lr=1e-3,
        weight_decay=0.1,
        momentum=0.95,
        nesterov=True,
        ns_coefficients=NS_COEFFICIENTS,
        eps=EPS,
        ns_steps=NS_STEPS,
        adjust_lr_fn=None,
        *,
        master_weight_bits=24,
        state_bits=8,
        group_size=32,
        fused=None,
    ):
        defaults = dict(
            lr=lr,
            weight_decay=weight_decay,
            momentum=momentum,
            nesterov=nesterov,
            ns_coefficients=ns_coefficients,
            eps=eps,
            ns_steps=ns_steps,
            adjust_lr_fn=adjust_lr_fn,
        )
        super().__init__(
            params,
            defaults,
            master_weight_bits=master_weight_bits,
            state_bits=state_bits,
            group_size=group_size,
            fused=fused,
        )

    def _check_hyperparameters(self, group):
        super()._check_hyperparameters(group)
        if not 0.0 <= group["momentum"]:
            raise ValueError(f"Invalid momentum value: {group['momentum']} (must be >= 0).")
        if not 0.0 <= group["eps"]:
            raise ValueError(f"Invalid epsilon value: {group['eps']}")
        steps = group["ns_steps"]
        if not isinstance(steps, int) or isinstance(steps, bool) or not 0 <= steps < 100:
            raise ValueError(f"ns_steps must be an int in [0, 100), got {steps!r}.")
        if len(tuple(group["ns_coefficients"])) != 3:
            raise ValueError(
                f"ns_coefficients must be three floats (a, b, c), got {group['ns_coefficients']!r}."
            )
        if group["adjust_lr_fn"] not in ADJUST_LR_FNS:
            raise ValueError(
                f"Adjust learning rate function {group['adjust_lr_fn']} is not supported: "
                "adjust_lr_fn must be None, 'original' or 'match_rms_adamw'."
            )
        for p in group.get("params", ()):  # the constructor checks the defaults first
            _check_muon_param(p)

    @torch.no_grad()
    def step_params(self, items):
        """Step the given ``(param_group, param)`` pairs, one whole matrix at a time."""
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        _refuse_graph_capture(items)
        for _, p in items:  # every check before any step
            check_grad(p, p.grad)
        if self.fused:
            check_fused_devices(items)
        if self.fused is not False and items:
            items = self._step_fused(items, grad_scale, found_inf)
        for group, p in items:
            self._step_reference(p, group, grad_scale, found_inf)

    @torch.compiler.disable  # opaque to torch.compile: raw pointers and Triton launches
    def _step_fused(self, items, grad_scale, found_inf) -> list:
        """Step what the kernels can (pass A, Newton-Schulz, pass B per matrix); return the
        items left to the reference path. Bit-identical to ``_step_reference``."""
        from ..kernels import kernels_usable  # noqa: PLC0415 (Triton is optional)

        # Muon's kernels bake in its states and roundings (kernels/muon.py): a subclass
        # that changes them steps by its reference path.
        if not kernels_usable(self, items) or not keeps_rule_of(type(self), Muon):
            return items
        from ..kernels import muon as kernels  # noqa: PLC0415

        fused, reference = kernels.split_fusable(self, items)
        if not fused:
            return reference
        plan = kernels.plan_for(self, fused)
        ok = matrices_ok([p.grad for _, p in fused], found_inf)
        plan.begin_step([_kernel_values(group, p) for group, p in fused], ok)
        settings = []
        for batch in plan.batches:  # same-shape matrices of one group
            group = fused[batch[0]][0]
            ns = (tuple(group["ns_coefficients"]), group["ns_steps"], group["eps"])
            settings.append((*ns, bool(group["nesterov"]), bool(group["weight_decay"] != 0)))
        plan.run(newton_schulz, settings, grad_scale)
        return reference

    def _step_reference(self, p, group, grad_scale, found_inf) -> None:
        state = self._ensure_state(p, group)
        group = scalar_hyperparameters(group)
        grad = local_tensor(p.grad).detach()
        ok = matrices_ok([grad], found_inf)[0]
        state["step"] += ok.to(torch.float32)  # a skipped matrix keeps its step count
        g = grad.reshape(-1).to(compute_dtype(p))
        if grad_scale is not None:
            g = g / grad_scale.to(g.device)
        g = torch.where(ok, g, 0.0)

        w = self.master_weight(p, group).reshape(-1)
        before = self._load_states(state, group, w.numel())
        update, buf = muon_momentum(
            g, before["momentum_buffer"], momentum=group["momentum"], nesterov=group["nesterov"]
        )
        ortho = newton_schulz(
            update.view(p.shape), group["ns_coefficients"], group["ns_steps"], group["eps"]
        )
        new_w = muon_master_update(
            w,
            ortho.reshape(-1),
            lr=group["lr"],
            weight_decay=group["weight_decay"],
            lr_adjusted=adjusted_lr(group["lr"], group["adjust_lr_fn"], p.shape),
        )
        noise = self._dither(p, state, group, w.numel())
        self._store_weight(p, state, group, torch.where(ok, new_w, w), noise)
        self._store_states(state, group, {"momentum_buffer": buf}, before, ok, ok, noise)


@torch.compiler.disable  # asks the CUDA stream, at every call: nothing to trace
def _refuse_graph_capture(items) -> None:
    """A Muon step is not capturable: the fused path uploads each step's values (gradient
    addresses, lr, momentum, decay per matrix) from the host, and the reference path takes
    float hyper-parameters as constants, so a graph replay would step with the values of
    the capture, whatever a scheduler set since."""
    if any(p.is_cuda for _, p in items) and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(
            "slimoptim.Muon: step() cannot be captured in a CUDA graph (a replay would reuse "
            "the lr, momentum and weight decay of the capture). Capture the forward and "
            "backward only and call the Muon step eagerly after each replay."
        )


def _kernel_values(group: dict, p: torch.Tensor) -> list:
    """The per-matrix values of the fused passes, from the same expressions the reference
    evaluates (so each rounds to float32 where the reference's does)."""
    group = scalar_hyperparameters(group)
    lr, momentum = group["lr"], group["momentum"]
    return [
        1 - momentum,
        momentum,
        1 - lr * group["weight_decay"],
        adjusted_lr(lr, group["adjust_lr_fn"], p.shape),
    ]


def matrices_ok(grads: list[torch.Tensor], found_inf: torch.Tensor | None) -> torch.Tensor:
    """Per matrix, True (device bools [n]) when it steps: its gradient, as given, holds no
    NaN or Inf (see the Muon docstring) and GradScaler found no Inf anywhere."""
    # The max-norm is NaN or Inf exactly when an element is: one multi-tensor reduction
    # over all the gradients, where isfinite().all() costs three passes per matrix.
    norms = torch._foreach_norm(grads, ord=math.inf)
    if len({n.dtype for n in norms}) > 1:  # mixed gradient dtypes: stack needs one
        norms = [n.float() for n in norms]
    ok = torch.isfinite(torch.stack(norms))
    if found_inf is not None:
        ok = ok & (found_inf.to(ok.device) == 0).reshape(())
    return ok


def _check_muon_param(p: torch.Tensor) -> None:
    if hasattr(p, "to_local"):
        raise TypeError(
            f"Muon cannot step a DTensor (FSDP2-sharded) parameter of shape {tuple(p.shape)}: "
            "Newton-Schulz needs the whole matrix on one rank. Leave the Muon matrices out of "
            "fully_shard (or use DDP for them), or train sharded params with slimoptim.AdamW."
        )
    if p.dim() != 2:
        raise ValueError(
            "Muon only supports 2D parameters whereas we found a parameter with size: "
            f"{tuple(p.shape)}. Train biases, norms, embeddings and the output head with "
            "slimoptim.AdamW: slimoptim.muon_param_groups(model) splits a model that way."
        )


class MuonParams(NamedTuple):
    """A model's parameters split for Muon: hidden matrices, and everything else."""

    muon: list[nn.Parameter]
    adamw: list[nn.Parameter]


DEFAULT_HEAD_NAMES = ("lm_head", "head", "output", "classifier", "score")


def muon_param_groups(model: nn.Module, exclude=DEFAULT_HEAD_NAMES) -> MuonParams:
    """Split ``model``'s trainable params: 2-D hidden matrices for Muon, the rest for AdamW.

    AdamW gets every param that is not 2-D (biases, norms, convolution kernels),
    the weights of ``nn.Embedding`` modules, and the params of modules named in
    ``exclude`` (a module's own name, e.g. ``"lm_head"``, or its full dotted name):
    the output head, whose update should not be orthogonalised. A weight shared by
    an embedding and a head (tied) goes to AdamW once.

    Example::

        split = slimoptim.muon_param_groups(model)
        muon = slimoptim.Muon(split.muon, lr=0.02)
        adamw = slimoptim.AdamW(split.adamw, lr=3e-4, weight_decay=0.01)
    """
    names = set(exclude)
    to_adamw = set()
    for name, module in model.named_modules():
        if isinstance(module, nn.Embedding) or name in names or name.rsplit(".", 1)[-1] in names:
            to_adamw.update(id(p) for p in module.parameters())
    muon, adamw = [], []
    for p in model.parameters():  # each shared param once
        if not p.requires_grad:
            continue
        hidden = p.dim() == 2 and id(p) not in to_adamw
        (muon if hidden else adamw).append(p)
    return MuonParams(muon, adamw)
