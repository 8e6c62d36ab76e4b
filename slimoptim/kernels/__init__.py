"""Fused Triton step kernels (optional: Triton is imported only when a step needs it).

``fused_step`` is what :meth:`SlimOptimizer.step_params` calls; see docs/kernels.md.
"""

from __future__ import annotations

import functools
import warnings

import torch


@functools.cache
def triton_available() -> bool:
    try:
        import triton  # noqa: F401, PLC0415
    except ImportError:
        return False
    return True


@torch.compiler.disable  # opaque to torch.compile: raw pointers and Triton launches
def fused_step(opt, items, grad_scale, found_inf, grads=None) -> list:
    """Step what the kernels can step; return the (group, param) items left to the reference.

    ``grads``: the items' gradients, when the caller has just read them (None: read here).

    ``opt.fused``: None uses the kernels for CUDA params when Triton imports; True
    forces them (CPU params only under TRITON_INTERPRET=1, else an error); False
    never calls this.
    """
    if not items or not kernels_usable(opt, items):
        return items
    from .dispatch import step_fused  # noqa: PLC0415

    return step_fused(opt, items, grad_scale, found_inf, grads)


def kernels_usable(opt, items) -> bool:
    """True when Triton imports. Otherwise ``fused=True`` is an error, and CUDA params get a
    warning that they take the slower reference path."""
    if triton_available():
        return True
    if opt.fused:
        raise RuntimeError(
            "fused=True needs Triton (pip install 'slimoptim[triton]', Linux only); "
            "use fused=None or fused=False for the pure-PyTorch path."
        )
    if items[0][1].is_cuda:
        warnings.warn(
            "slimoptim: Triton is not installed, so CUDA params are stepped by the slower "
            "pure-PyTorch reference path (pip install 'slimoptim[triton]').",
            stacklevel=4,
        )
    return False


def refresh_hyperparameters(opt) -> None:
    """Upload the param groups' hyper-parameters for a CUDA-graph replay (docs/kernels.md)."""
    if triton_available():
        from .dispatch import refresh_hyperparameters as refresh  # noqa: PLC0415

        refresh(opt)


# Where the kernels cache their plans on an optimizer (dispatch.py, muon.py), and where
# dispatch.py keeps, for the optimizer's lifetime, the plans a user's CUDA graph captured.
PLAN_CACHES = ("_slimoptim_plans", "_slimoptim_muon_plans")
USER_CAPTURED = "_slimoptim_user_captured"


def _plans(opt):
    """Every plan the optimizer holds, once."""
    plans = {}
    for key in (*PLAN_CACHES, USER_CAPTURED):
        plans.update((id(plan), plan) for plan in opt.__dict__.get(key, {}).values())
    return plans.values()


def drop_plans(opt) -> None:
    """Forget the cached plans (a load replaced the state they point into): the state they
    held is freed now rather than when the next step rebuilds them. Their CUDA graphs go
    with them (kernels/launch.py keeps any freed during a capture until it ends). Plans a
    user's CUDA graph of ``step()`` captured stay alive: that graph reads their tables."""
    for key in PLAN_CACHES:
        opt.__dict__.get(key, {}).clear()
    if opt.__dict__.get(USER_CAPTURED):
        warnings.warn(
            "slimoptim: the optimizer's state was loaded after step() was captured in a CUDA "
            "graph; that graph still steps the state from before the load (kept alive for "
            "it). Run one eager step() and capture again.",
            stacklevel=5,  # drop_plans < state_io.apply < load_into < load_state_dict
        )


def replaced_state(opt) -> list[torch.Tensor]:
    """State tensors replaced in ``opt.state`` that cached plans still hold: a plan keeps
    the state dicts it was built for (its tables point into them) until its params step
    again and it is rebuilt. (``load_state_dict`` drops the plans: nothing is held then.)"""
    return [
        t
        for plan in _plans(opt)
        for p, state in plan.param_states()
        if opt.state.get(p) is not state
        for t in state.values()
        if isinstance(t, torch.Tensor)
    ]


def device_tables(opt) -> list[torch.Tensor]:
    """Every tensor the fused step keeps beside ``opt.state`` (pointer tables, chunk maps,
    upload buffers, Muon's scratch), once per plan: views and shared buffers repeat."""
    return [t for plan in _plans(opt) for t in plan.device_tables()]
