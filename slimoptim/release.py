"""Gradient release: step each parameter during backward and free its gradient at once.

``enable_gradient_release(model, optimizer)`` registers a post-accumulate-grad
hook on every trainable parameter. When a parameter's gradient is complete the
hook queues it in a bucket; once the bucket holds ``bucket_bytes`` of
gradients it is stepped with ``optimizer.step_params`` (one multi-tensor launch
per bucket with the fused kernels) and its gradients are freed. At the end of
backward a callback steps what is left: the last partial bucket and any
optimizer parameter that holds a gradient but got no hook call (an unhooked
parameter, or one whose gradient came from an earlier microbatch only). So a
training step never holds all gradients, and the result is bit-identical to
``optimizer.step()`` after a full backward: each parameter's update depends
only on its own gradient and state, whatever the order and grouping.

Streams: the kernels go to the stream current where the step runs. Under FSDP2 the
hooks run inside ``foreach_reduce``, on its reduce-scatter stream after the
reduce-scatter (the sharded gradient is ready there), and FSDP2 records the event that
the end of backward makes the caller's stream wait on only after the hooks returned; so
the end-of-backward sweep (on the caller's stream) and the next forward's all-gather
come after the released steps, and freed gradients go back to the stream that made them.
"""

from __future__ import annotations

import threading
import warnings
import weakref
from collections.abc import Iterable

import torch
from torch import nn

from .optimizers.arguments import check_grad
from .optimizers.base import SlimOptimizer, local_tensor

DEFAULT_BUCKET_BYTES = 32 * 2**20


def _grad_nbytes(p: torch.Tensor) -> int:
    grad = local_tensor(p.grad)  # this rank's shard under FSDP2
    return grad.numel() * grad.element_size()


def _reject_data_parallel_wrappers(model: nn.Module) -> None:
    """DDP and FSDP1 reduce gradients after the hooks fire: releasing would step unreduced grads."""
    if not torch.distributed.is_available():
        return
    from torch.distributed.fsdp import FullyShardedDataParallel  # noqa: PLC0415
    from torch.nn.parallel import DistributedDataParallel  # noqa: PLC0415

    for module in model.modules():
        if isinstance(module, (DistributedDataParallel, FullyShardedDataParallel)):
            raise ValueError(
                f"gradient release cannot be used with {type(module).__name__}: its gradient "
                "hooks fire before the gradients are all-reduced, so each rank would step with "
                "its local gradient. Shard the model with FSDP2 (torch.distributed.fsdp."
                "fully_shard), whose sharded parameters run the hooks after the reduce-scatter, "
                "or train without gradient release."
            )


class GradientRelease:
    """The handle returned by :func:`enable_gradient_release`; ``remove()`` undoes it."""

    def __init__(
        self,
        params: list[nn.Parameter],
        optimizer: SlimOptimizer,
        bucket_bytes: int,
        accumulation_steps: int,
        clip_grad_norm_per_tensor: float | None,
    ):
        self.optimizer = optimizer
        self.bucket_bytes = bucket_bytes
        self.accumulation_steps = accumulation_steps
        self.clip_grad_norm_per_tensor = clip_grad_norm_per_tensor
        # Largest gradient bytes stepped at once (a full bucket or the end-of-backward sweep):
        # what release holds in gradients at most, besides gradients still being accumulated.
        self.max_bucket_bytes = 0
        self._microbatch = 0  # backward passes seen since the last release
        self._backward_open = False  # an end-of-backward callback is queued
        self._backward_end: weakref.ref | None = None  # that callback, alive while queued
        self._pending: list[tuple[dict, torch.Tensor]] = []
        self._pending_bytes = 0
        self._released_this_backward: set[int] = set()
        self._group_of: dict[int, dict] = {}
        # Hooks of CPU and GPU params run on different threads; re-entrant for the clean-up
        # of a failed backward, which runs wherever the engine frees it.
        self._lock = threading.RLock()
        self._warned: set[str] = set()
        self._init_grads = False  # a DCP state initialisation left gradients to free
        self._hooks = [p.register_post_accumulate_grad_hook(self._on_grad_ready) for p in params]
        self._saved_methods = {name: optimizer.__dict__.get(name) for name in ("step", "zero_grad")}
        optimizer.step = _make_noop_step(self)
        optimizer.zero_grad = _make_noop_zero_grad(self)
        optimizer._slimoptim_gradient_release = self
        self.active = True

    # ------------------------------------------------------------- public

    @property
    def accumulating(self) -> bool:
        """True while backward passes only accumulate gradients (not the last microbatch)."""
        return self._microbatch < self.accumulation_steps - 1

    def remove(self) -> None:
        """Remove the hooks and give ``step()``/``zero_grad()`` back to the optimizer.

        Gradients accumulated so far (mid-accumulation) stay on the parameters,
        so a plain ``optimizer.step()`` can take over.
        """
        if not self.active:
            return
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        for name, saved in self._saved_methods.items():
            if saved is None:
                self.optimizer.__dict__.pop(name, None)
            else:
                setattr(self.optimizer, name, saved)
        self.optimizer.__dict__.pop("_slimoptim_gradient_release", None)
        self._pending.clear()
        self._pending_bytes = 0
        self.active = False

    def __enter__(self) -> GradientRelease:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    # -------------------------------------------------------------- hooks

    def _on_grad_ready(self, p: torch.Tensor) -> None:
        with self._lock:
            if not self._backward_open:
                self._open_backward()
            if self.accumulating or p.grad is None:
                return
            group = self._group_of.get(id(p))
            if group is None:  # left the optimizer since enable: not ours to step
                return
            if id(p) in self._released_this_backward:
                raise RuntimeError(
                    "gradient release: a parameter's gradient was accumulated twice in one "
                    "backward (it was already stepped with the first part). This happens with "
                    "reentrant activation checkpointing (use_reentrant=True) when a parameter is "
                    "used both inside and outside a checkpointed block; use "
                    "torch.utils.checkpoint with use_reentrant=False."
                )
            self._released_this_backward.add(id(p))
            self._pending.append((group, p))
            # The gradient's own bytes: its dtype can differ from the param's (grad_dtype).
            self._pending_bytes += _grad_nbytes(p)
            if self._pending_bytes >= self.bucket_bytes:
                self._step_and_free(self._pending, self._pending_bytes)
                self._pending = []
                self._pending_bytes = 0

    def _open_backward(self) -> None:
        """First hook of a backward pass: queue the end-of-backward flush."""
        # Queued on the running backward, so it runs once that backward has finished. The
        # engine holds the only reference: if the backward raises, the callback is freed
        # unrun when the engine drops the failed backward, before the caller sees the error,
        # and the weak reference's callback discards what that backward left.
        callback = _BackwardEnd(self)
        torch.autograd.Variable._execution_engine.queue_callback(callback)
        self._backward_end = weakref.ref(callback, self._on_backward_end_freed)
        self._backward_open = True
        self._released_this_backward.clear()
        # Rebuilt every backward: load_state_dict and add_param_group replace groups.
        self._group_of = {id(p): g for g in self.optimizer.param_groups for p in g["params"]}

    def _on_backward_end_freed(self, ref: weakref.ref) -> None:
        """The engine freed our end-of-backward callback: after running it, or unrun
        because its backward raised. Runs inside the engine's clean-up: must not raise."""
        with self._lock:
            if self._backward_open and ref is self._backward_end:
                try:
                    self._discard_failed_backward()
                except Exception as error:  # left for step()/zero_grad() to retry
                    warnings.warn(f"gradient release: clean-up failed: {error}", stacklevel=1)

    def _on_backward_end(self) -> None:
        with self._lock:
            self._backward_open = False
            releasing = not self.accumulating
            self._microbatch = (self._microbatch + 1) % self.accumulation_steps
            if not releasing:
                return
            self._pending = []
            self._pending_bytes = 0
            # Every optimizer param still holding a gradient: the last partial bucket, plus
            # params without a hook call this backward. step() would have stepped them too.
            items = self.optimizer._params_with_grads()
            self._step_and_free(items, sum(_grad_nbytes(p) for _, p in items))

    def _step_and_free(self, items: list[tuple[dict, torch.Tensor]], nbytes: int) -> None:
        """Step ``items`` (their gradients hold ``nbytes``) and free their gradients."""
        if not items:
            return
        self._check_no_grad_scaler()
        self.max_bucket_bytes = max(self.max_bucket_bytes, nbytes)
        if self.clip_grad_norm_per_tensor is not None:
            for _, p in items:  # every check before any gradient is clipped in place
                check_grad(p, p.grad)
            for _, p in items:
                torch.nn.utils.clip_grad_norm_([p], self.clip_grad_norm_per_tensor)
        self.optimizer.step_params(items)  # checks every gradient before stepping any
        for _, p in items:
            p.grad = None

    def _check_no_grad_scaler(self) -> None:
        if "grad_scale" in self.optimizer.__dict__ or "found_inf" in self.optimizer.__dict__:
            raise RuntimeError(
                "gradient release cannot be used with torch.amp.GradScaler: the scaler decides "
                "whether to skip a step (found_inf) only after the whole backward, but release "
                "steps each parameter during backward, with still-scaled gradients. Train in "
                "bfloat16 (no scaler needed) or call handle.remove() and use optimizer.step()."
            )

    def _recover_from_failed_backward(self) -> None:
        """Called from step()/zero_grad(), which run between backward passes: a backward
        still marked open there raised before its end-of-backward callback (normally
        discarded already, by _on_backward_end_freed)."""
        if self._backward_open:
            self._discard_failed_backward()

    def _discard_failed_backward(self) -> None:
        """Forget a backward that raised: drop the gradients it left, never step them.

        The params released before the error were stepped (that cannot be undone);
        every other optimizer param's gradient is dropped, as zero_grad() would:
        the ones the failed backward queued or half-accumulated, and with
        accumulation the micro-batches before it, which are mixed into the same
        ``.grad`` (the accumulation count restarts). So a loop that skips a batch
        whose backward raised trains on as if it had never seen it, as long as
        nothing was released before the error.
        """
        self._backward_open = False
        self._backward_end = None
        self._pending = []
        self._pending_bytes = 0
        self._microbatch = 0
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                p.grad = None

    def _initialises_state(self) -> bool:
        """Whether this ``step()`` is torch.distributed.checkpoint building a missing state
        (``_init_optim_state``: every param given a zero gradient, every lr set to 0, one
        step, then ``zero_grad()``): an optimizer without state, no backward under way."""
        opt = self.optimizer
        if opt.state or self._backward_open or self._microbatch:
            return False
        params = [p for group in opt.param_groups for p in group["params"] if p.requires_grad]
        zero_lr = all(float(group.get("lr", 1)) == 0 for group in opt.param_groups)
        return bool(params) and zero_lr and all(p.grad is not None for p in params)

    def _own(self, name: str):
        """The optimizer's own ``step``/``zero_grad``, as before release replaced them."""
        saved = self._saved_methods[name]  # None: the class's method
        return saved or getattr(type(self.optimizer), name).__get__(self.optimizer)

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, stacklevel=3)


class _BackwardEnd:
    """The end-of-backward callback; its lifetime says whether its backward still runs."""

    def __init__(self, handle: GradientRelease):
        self.handle = handle

    def __call__(self) -> None:
        self.handle._on_backward_end()


def _make_noop_step(handle: GradientRelease):
    optimizer = handle.optimizer

    def step(closure=None):
        # GradScaler.step sets these right before calling step(): too late, say so.
        handle._check_no_grad_scaler()
        handle._recover_from_failed_backward()
        if handle._initialises_state():
            # DCP's get/set_optimizer_state_dict need the state's tensors to load into:
            # its lr-0 step with zero gradients changes no weight. The zero_grad() that
            # follows frees those gradients (release would otherwise keep them).
            handle._init_grads = True
            return handle._own("step")(closure)
        optimizer._opt_called = True  # LR schedulers check that step() ran before theirs
        handle._warn_once(
            "step",
            "optimizer.step() does nothing while gradient release is active: parameters are "
            "stepped during backward. (Warned once.)",
        )
        if closure is None:
            return None
        # The closure's backward steps the parameters; return its loss as step(closure) does.
        with torch.enable_grad():
            return closure()

    # LR schedulers wrap optimizer.step to set _opt_called, and warn on their first step()
    # if it lacks this mark; we set _opt_called ourselves, so mark it as already wrapped.
    step._wrapped_by_lr_sched = True
    return step


def _make_noop_zero_grad(handle: GradientRelease):
    def zero_grad(set_to_none: bool = True):
        handle._recover_from_failed_backward()
        if handle._init_grads:  # the zero gradients of a state initialisation (step above)
            handle._init_grads = False
            return handle._own("zero_grad")(set_to_none)
        handle._warn_once(
            "zero_grad",
            "optimizer.zero_grad() does nothing while gradient release is active: gradients are "
            "freed as soon as their parameter is stepped. (Warned once.)",
        )

    return zero_grad


def enable_gradient_release(
    model_or_params: nn.Module | Iterable[torch.Tensor],
    optimizer: SlimOptimizer,
    *,
    bucket_bytes: int = DEFAULT_BUCKET_BYTES,
    accumulation_steps: int = 1,
    clip_grad_norm_per_tensor: float | None = None,
) -> GradientRelease:
    """Step ``optimizer``'s parameters during backward and free each gradient once stepped.

    Args:
        model_or_params: the model (or its parameters) whose trainable parameters get a
            hook. Parameters not in ``optimizer`` are left alone; optimizer parameters not
            given here are still stepped, at the end of backward.
        optimizer: a slimoptim optimizer. While release is active its ``step()`` and
            ``zero_grad()`` do nothing (they warn once); LR schedulers keep working.
        bucket_bytes: gradients are stepped in buckets of about this many bytes, in the
            order they become ready; 0 steps each tensor on its own.
        accumulation_steps: with N > 1, the first N-1 backward passes only accumulate
            gradients (as without release); the Nth steps and frees them.
        clip_grad_norm_per_tensor: if set, each gradient is clipped on its own, as by
            ``torch.nn.utils.clip_grad_norm_([p], max_norm)``, before its step. This is not
            global-norm clipping, which needs every gradient at once.

    Returns:
        A :class:`GradientRelease` handle; ``handle.remove()`` restores normal training.
    """
    if not isinstance(optimizer, SlimOptimizer):
        raise TypeError(
            f"gradient release needs a slimoptim optimizer (it steps parameter subsets with "
            f"step_params), got {type(optimizer).__name__}."
        )
    if getattr(optimizer, "_slimoptim_gradient_release", None) is not None:
        raise RuntimeError(
            "gradient release is already enabled on this optimizer; remove() the first handle."
        )
    if not isinstance(bucket_bytes, int) or isinstance(bucket_bytes, bool) or bucket_bytes < 0:
        raise ValueError(f"bucket_bytes must be a non-negative int, got {bucket_bytes!r}.")
    if (
        not isinstance(accumulation_steps, int)
        or isinstance(accumulation_steps, bool)
        or accumulation_steps < 1
    ):
        raise ValueError(f"accumulation_steps must be a positive int, got {accumulation_steps!r}.")
    if clip_grad_norm_per_tensor is not None and not clip_grad_norm_per_tensor > 0:
        raise ValueError(
            "clip_grad_norm_per_tensor must be positive or None, "
            f"got {clip_grad_norm_per_tensor!r}."
        )
    if isinstance(model_or_params, nn.Module):
        _reject_data_parallel_wrappers(model_or_params)
        given = list(model_or_params.parameters())
    else:
        given = list(model_or_params)
    in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
    seen: set[int] = set()
    params = []
    for p in given:
        # Frozen params get no hook (and so no state); tied params are hooked once.
        if id(p) in seen or id(p) not in in_optimizer or not p.requires_grad:
            continue
        seen.add(id(p))
        params.append(p)
    if any(p.dtype == torch.float16 for p in params):
        warnings.warn(
            "gradient release with float16 parameters: fp16 training normally needs "
            "torch.amp.GradScaler, which gradient release cannot support (see "
            "docs/gradient_release.md). Prefer bfloat16.",
            stacklevel=2,
        )
    return GradientRelease(
        params, optimizer, bucket_bytes, accumulation_steps, clip_grad_norm_per_tensor
    )
