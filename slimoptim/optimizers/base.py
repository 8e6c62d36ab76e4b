"""Shared machinery of slimoptim's optimizers: options, state layout, step loop.

A subclass declares its states and supplies ``_update``, a pure function on
float32 tensors; this class rebuilds the master weight and the states from
their compact storage, calls the update, and stores the results back.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable

import torch

from .. import formats, ieee
from ..distributed import to_row_form
from ..formats import correction_bits, local_tensor  # noqa: F401 (re-exported: checkpoint, release, tests)
from ..state_io import load_into, with_header
from .arguments import (
    NEUTRAL_KEYWORDS,
    check_fused_devices,
    check_grad,
    check_modes,
    check_neutral_keywords,
    check_params,
    compute_dtype,
    scalar_hyperparameters,
)
from .state_spec import StateSpec, check_roundings
from .stepped import items_and_grads

# What a kernel rule bakes in: a subclass that changes any of these (the update math, its
# scalars, the states and how their codes round) steps through its own reference code.
_RULE_METHODS = ("_update", "_scalars", "_specs_for", "state_specs", "master_rounding", "dither")


def keeps_rule_of(cls: type, owner: type) -> bool:
    """Whether ``cls`` keeps everything ``owner``'s kernels bake in (_RULE_METHODS)."""
    return all(getattr(cls, m) is getattr(owner, m) for m in _RULE_METHODS)


@functools.cache
def _kernel_rule_of(cls: type) -> str | None:
    for owner in cls.__mro__:
        if "kernel_rule" in vars(owner):
            return owner.kernel_rule if keeps_rule_of(cls, owner) else None
    return None


class SlimOptimizer(torch.optim.Optimizer):
    """Base class: compact master weights and states around a pure update rule."""

    # Subclasses set these: their states, and the name of their fused-kernel rule
    # (slimoptim.kernels.dispatch.RULES) when one mirrors ``_update`` bit for bit.
    state_specs: tuple[StateSpec, ...] = ()
    kernel_rule: str | None = None
    # How a 24-bit master's correction code rounds: "nearest", or "stochastic" where the
    # update rule's steps are often under half a code unit (formats.split_master). The
    # stochastic one takes the dither's second half, so only rules with one state use it.
    master_rounding = "nearest"
    # The stochastic roundings' noise (formats.dither): "hashed" (independent at every
    # step) or "sequenced" (a Weyl sequence per element: errors cancel over steps).
    dither = "hashed"
    # GradScaler hands us grad_scale and found_inf instead of unscaling fp16 grads.
    _step_supports_amp_scaling = True

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        check_roundings(cls)

    def __init__(
        self,
        params: Iterable,
        defaults: dict,
        *,
        master_weight_bits,
        state_bits,
        group_size,
        fused,
        **implementation,
    ):
        unknown = set(implementation) - set(NEUTRAL_KEYWORDS)
        if unknown:
            raise TypeError(
                f"{type(self).__name__}() got unexpected keyword arguments {sorted(unknown)}"
            )
        check_neutral_keywords("constructor argument", implementation)
        defaults = dict(
            defaults,
            master_weight_bits=master_weight_bits,
            state_bits=state_bits,
            group_size=group_size,
        )
        # As torch.optim: hyper-parameters are checked before params are read, so a bad
        # value is reported as such whatever ``params`` is.
        check_modes(defaults)
        self._check_hyperparameters(defaults)
        if fused not in (None, True, False):
            raise ValueError(f"fused must be None, True or False, got {fused!r}.")
        self.fused = fused
        super().__init__(params, defaults)

    def __getstate__(self) -> dict:
        # torch keeps only defaults, state and param_groups; a copy must also step.
        return {**super().__getstate__(), "fused": self.fused}

    def __setstate__(self, state: dict) -> None:
        state = dict(state)
        fused = state.pop("fused", None)  # pickles from before fused was kept
        had_differentiable = "differentiable" in state.get("defaults", {})
        super().__setstate__(state)
        if not had_differentiable:  # torch's __setstate__ adds it; it is no group key here
            self.defaults.pop("differentiable", None)
        self.fused = fused

    def add_param_group(self, param_group: dict) -> None:
        if isinstance(param_group, dict):
            check_neutral_keywords("in a parameter group", param_group)
            param_group = {k: v for k, v in param_group.items() if k not in NEUTRAL_KEYWORDS}
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            check_modes(group)
            check_params(group)
            self._check_hyperparameters(group)
        except (ValueError, TypeError):
            self.param_groups.pop()
            raise

    def _check_hyperparameters(self, group: dict) -> None:
        """Raise ValueError for invalid hyper-parameters (subclasses extend).

        The messages start as torch.optim's do, so a search for either finds both.
        """
        lr = group["lr"]
        if isinstance(lr, torch.Tensor) and lr.numel() != 1:
            raise ValueError(
                f"Tensor lr must be 1-element, got shape {tuple(lr.shape)}: pass a float or "
                "a one-element tensor (its shape may be () or [1], [1, 1], ...)."
            )
        if not 0.0 <= lr:
            raise ValueError(f"Invalid learning rate: {lr} (lr must be >= 0).")
        if not 0.0 <= group["weight_decay"]:
            raise ValueError(f"Invalid weight_decay value: {group['weight_decay']} (must be >= 0).")

    def kernel_rule_name(self) -> str | None:
        """The fused-kernel rule that reproduces this optimizer's math, or None.

        A subclass that overrides the math (``_update``, ``_scalars``, ``_specs_for``)
        of the class that declared the rule runs its own reference code instead.
        """
        return _kernel_rule_of(type(self))

    # ------------------------------------------------------------ state layout

    def _specs_for(self, group: dict) -> tuple[StateSpec, ...]:
        return self.state_specs

    def _ensure_state(self, p: torch.Tensor, group: dict) -> dict:
        """The state of ``p``, with any missing tensor created at zero (lazily, as torch does)."""
        device = local_tensor(p).device
        state = self.state[p]
        for name, (dtype, shape) in self._expected_state(p, group).items():
            if name not in state:
                state[name] = torch.zeros(shape, dtype=dtype, device=device)
        return state

    def master_weight(self, p: torch.Tensor, group: dict | None = None) -> torch.Tensor:
        """The master value of parameter ``p`` (its local shard for a DTensor): float32,
        or the float64 param itself."""
        local = local_tensor(p)
        group = self._group_of(p) if group is None else group
        state = self.state.get(p, {})
        flat = local.detach().reshape(-1).to(compute_dtype(p))
        if "correction" not in state:
            return flat.view(local.shape)
        bits = correction_bits(p, group["master_weight_bits"])
        return formats.join_master(flat, state["correction"], p.dtype, bits).view(local.shape)

    def _group_of(self, p: torch.Tensor) -> dict:
        for group in self.param_groups:
            if any(q is p for q in group["params"]):
                return group
        raise KeyError("this parameter is not managed by the optimizer")

    def _load_states(self, state: dict, group: dict, numel: int) -> dict[str, torch.Tensor]:
        values = {}
        for spec in self._specs_for(group):
            if group["state_bits"] == 32:
                values[spec.name] = state[spec.name]
                continue
            code, scale = state[spec.name], state[spec.scale_name]
            if spec.signed:
                values[spec.name] = formats.dequantize_momentum(
                    code, scale, group["group_size"], spec.levels
                )
            else:
                values[spec.name] = formats.dequantize_variance(code, scale, group["group_size"])
        return values

    def _store_states(
        self,
        state: dict,
        group: dict,
        values: dict,
        previous: dict,
        ok: torch.Tensor,
        ok_groups: torch.Tensor,
        noise: tuple | None,
    ) -> None:
        """Code ``values`` into ``state`` where ``ok``; ``previous``: the decoded states
        before the step (a signed state rounded by the movement rule compares with it);
        ``noise``: this step's dither (:meth:`_dither`)."""
        size = group["group_size"]
        for spec in self._specs_for(group):
            new = values[spec.name]
            if group["state_bits"] == 32:
                state[spec.name].copy_(torch.where(ok, new, state[spec.name]))
                continue
            if spec.by_movement:
                before = previous[spec.name]
                code, scale = formats.quantize_momentum(
                    new, size, noise[0], forget=None, levels=spec.levels, previous=before
                )
            elif spec.signed:
                forget = spec.forget(group)
                code, scale = formats.quantize_momentum(new, size, noise[0], forget, spec.levels)
            else:
                code, scale = formats.quantize_variance(new, size, noise[1])
            state[spec.name].copy_(torch.where(ok, code, state[spec.name]))
            scale_name = spec.scale_name
            state[scale_name].copy_(torch.where(ok_groups, scale, state[scale_name]))

    # -------------------------------------------------------------- the step

    def _update(self, w, g, states, group, scalars, denom_floor):
        """Pure update rule on float32 tensors: returns (new_w, new_states)."""
        raise NotImplementedError

    def _scalars(self, group: dict, step: torch.Tensor) -> dict:
        """Per-step scalars derived from the group and the step counter (tensors, no sync)."""
        return {}

    def _params_with_grads(self) -> tuple:
        """(group, param) of every param with a gradient, a param listed twice once."""
        return items_and_grads(self)[0]

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        items, grads = items_and_grads(self)
        if self._step_params_is_ours():
            self._step_params(items, grads)  # the gradients just read: no second pass
        else:
            self.step_params(items)  # a subclass's or a wrapper's: it may change the grads
        return loss

    def _step_params_is_ours(self) -> bool:
        # Against the function as defined here: a wrapper patched onto the class (or this
        # base class) or the instance may replace the gradients, so it must run.
        return type(self).step_params is _STEP_PARAMS and "step_params" not in self.__dict__

    @torch.no_grad()
    def step_params(self, items: list[tuple[dict, torch.Tensor]]) -> None:
        """Step the given ``(param_group, param)`` pairs; every param must have a grad.

        ``step()`` calls this with every param that has a gradient; gradient
        release calls it with the params whose gradients are ready.
        """
        self._step_params(items, None)

    def _step_params(self, items, grads: list | None) -> None:
        """``step_params``; ``grads``: the items' gradients when the caller has just read
        them (step()), None to read them here."""
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        if self.fused:
            check_fused_devices(items)
        if self.fused is not False:
            from ..kernels import fused_step  # noqa: PLC0415 (Triton is optional)

            # The Triton kernels step what they can (checking the gradients they take);
            # the rest is left to the reference.
            items = fused_step(self, items, grad_scale, found_inf, grads)
        self.check_grads(items)  # every check before any reference step
        for group, p in items:
            self._step_reference(p, group, grad_scale, found_inf)

    @staticmethod
    def check_grads(items) -> None:
        """Raise for a gradient the optimizer cannot take (sparse, complex, misshapen)."""
        for _, p in items:
            check_grad(p, p.grad)

    def _step_reference(self, p, group, grad_scale, found_inf) -> None:
        state = self._ensure_state(p, group)
        group = scalar_hyperparameters(group)
        local, grad = local_tensor(p), local_tensor(p.grad)
        numel, size = local.numel(), group["group_size"]
        g = grad.detach().reshape(-1).to(compute_dtype(p))
        if grad_scale is not None:
            g = g / grad_scale.to(g.device)
        if group.get("maximize", False):
            g = -g
        # A group of `group_size` elements whose gradient is not finite is left as
        # it was; every other group steps. GradScaler's found_inf skips them all.
        ok_groups = formats.group_view(torch.isfinite(g), size, fill=True).all(dim=1)
        if found_inf is None:
            state["step"] += 1
        else:
            skip = (found_inf.to(g.device) != 0).reshape(())
            ok_groups = ok_groups & ~skip
            state["step"] += (~skip).to(torch.float32)
        ok = formats.per_element(ok_groups, size, numel)
        g = torch.where(ok, g, 0.0)

        w = self.master_weight(p, group).reshape(-1)
        states = self._load_states(state, group, numel)
        floor = None
        if group["state_bits"] == 8 and "exp_avg_sq" in state:
            floor = formats.variance_floor(state["exp_avg_sq_scale"], size, numel)
        new_w, new_states = self._update(
            w, g, states, group, self._scalars(group, state["step"]), floor
        )
        if w.dtype == torch.float64:  # states stay float32 / 8-bit for float64 params
            new_states = {k: v.float() for k, v in new_states.items()}
        new_w = torch.where(ok, new_w, w)
        noise = self._dither(p, state, group, numel)
        self._store_weight(p, state, group, new_w, noise)
        self._store_states(state, group, new_states, states, ok, ok_groups, noise)

    def _dither(self, p, state, group, numel: int) -> tuple | None:
        """This step's (first, second) dither of ``p``'s elements (formats.dither) where
        an 8-bit state code or a stochastically rounded master takes it, else None."""
        coded_states = group["state_bits"] == 8 and self._specs_for(group)
        bits = correction_bits(p, group["master_weight_bits"])
        if coded_states or self._dithers_master(bits):
            device, sequenced = local_tensor(p).device, self.dither == "sequenced"
            return formats.dither(numel, state["step"], device, sequenced)
        return None

    def _dithers_master(self, code_bits: int | None) -> bool:
        return self.master_rounding == "stochastic" and code_bits == 8

    def _store_weight(self, p, state, group, w: torch.Tensor, noise: tuple | None) -> None:
        local = local_tensor(p)
        bits = correction_bits(p, group["master_weight_bits"])
        if bits is None:
            b = ieee.round_to_dtype(w, p.dtype)
        else:
            dither = noise[1] if self._dithers_master(bits) else None
            b, code = formats.split_master(w, p.dtype, bits, dither)
            state["correction"].copy_(code)
        local.detach().copy_(ieee.as_low_precision(b, p.dtype).view(local.shape))

    # ------------------------------------------------------------ state dict

    def state_dict(self) -> dict:
        """torch's state_dict (native compact tensors) plus a ``slimoptim`` header."""
        # DTensor (FSDP2) states go out in a sharding-independent form DCP can reshard.
        return to_row_form(self, with_header(self, super().state_dict()))

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a state_dict of this optimizer type and mode, exactly, without casts.

        Everything is checked before anything changes: a failed load leaves the
        optimizer as it was.
        """
        # torch.optim's load_state_dict hooks run as they would for any optimizer.
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            state_dict = pre_hook(self, state_dict) or state_dict
        load_into(self, state_dict)
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    def _expected_state(self, p: torch.Tensor, group: dict) -> dict[str, tuple]:
        """(dtype, shape) of every state tensor ``p`` holds once stepped."""
        numel = local_tensor(p).numel()
        out = {"step": (torch.float32, ())}
        bits = correction_bits(p, group["master_weight_bits"])
        if bits is not None:
            out["correction"] = (formats.CODE_DTYPES[bits], (numel,))
        for spec in self._specs_for(group):
            if group["state_bits"] == 32:
                out[spec.name] = (torch.float32, (numel,))
            else:
                out[spec.name] = (torch.int8 if spec.signed else torch.uint8, (numel,))
                out[spec.scale_name] = (
                    torch.bfloat16,
                    (formats.num_groups(numel, group["group_size"]),),
                )
        return out

    def __repr__(self) -> str:
        # torch's repr starts "AdamW (", the same as torch.optim.AdamW's: name the library
        # and the mode, e.g. "slimoptim.AdamW (master 24-bit, states 8-bit) (".
        def bits(key: str) -> str:
            values = dict.fromkeys(g[key] for g in self.param_groups) or [self.defaults[key]]
            return "/".join("none" if v is None else f"{v}-bit" for v in values)

        name = type(self).__name__
        listing = super().__repr__().removeprefix(name)
        mode = f"master {bits('master_weight_bits')}, states {bits('state_bits')}"
        return f"slimoptim.{name} ({mode}){listing}"


# step_params as this module defines it (step() compares the class's with it).
_STEP_PARAMS = SlimOptimizer.step_params
