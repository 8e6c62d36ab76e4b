"""The checks the fused step runs every step over every gradient of a plan, each in one
C call where PyTorch has one.

A gradient or parameter that no longer matches the tables a plan built (another dtype,
layout or address) must be noticed before a kernel reads through a stale pointer.
Python passes over the tensors cost ~50-70 ns per tensor and attribute; these do the
same in C++:

* ``layout_guard``: torch.compile's tensor guard (``TensorGuards``: dtype, device,
  dispatch keys, requires_grad, exact sizes and strides of each tensor);
* ``same_addresses``: ``torch._C._tensors_data_ptrs_at_indices_equal`` (CUDA builds).

Both are private PyTorch APIs: each has a Python fallback, and the guard is tried once
per process on tensors it must accept and reject before it is trusted.
"""

from __future__ import annotations

import functools
import operator

import numpy as np
import torch

from ..formats import local_tensor

_data_ptr = torch.Tensor.data_ptr
_dtype_of = operator.attrgetter("dtype")
_shape_of = operator.attrgetter("shape")
_device_of = operator.attrgetter("device")
_contiguous = torch.Tensor.is_contiguous


def grad_addresses(plan, grads: list) -> np.ndarray | None:
    """The addresses of ``grads`` (the plan's gradients, in its order), or None when a
    gradient no longer fits its bucket (None, sparse, other dtype, not contiguous,
    misaligned) or a parameter's storage moved since the plan was built. A few C-level
    calls over the params (no Python frame per param): this runs every step."""
    if plan.sharded:
        grads = [None if g is None else local_tensor(g) for g in grads]
        params = [local_tensor(p) for p in plan.grad_params]
    else:
        params = plan.grad_params
    if not _layouts_unchanged(plan, params, grads):
        return None
    # Module.to / .half() / cast_model replace p.data: the tables would point at freed
    # memory (a new layout or dtype in the same place: the layout check above).
    if not same_addresses(params, plan.param_ptrs, plan.indices):
        return None
    # The caching allocator often hands a new gradient the address of the last one.
    last = plan.found[0] if plan.found is not None else None
    ptrs = changed_addresses(grads, last, plan.indices)
    if ptrs is None:
        return plan.found[1]
    addresses = np.fromiter(ptrs, dtype=np.int64, count=len(ptrs))
    # The kernels load 16 bytes at a time; 0 is a gradient whose storage was freed.
    if (addresses & 15).any() or not addresses[plan.nonempty].all():
        return None
    plan.found = (ptrs, addresses)
    return addresses


def _layouts_unchanged(plan, params: list, grads: list) -> bool:
    """Every param and gradient a plain dense tensor of the class, dtype, shape, device and
    contiguous layout the plan was built for (a param transposed in place, or given
    another shape or dtype through ``p.data``, would be stepped against the wrong
    elements). The guard checks that in one C call; where it is missing or says no (it
    also compares strides exactly, and the thread's dispatch state: autocast, inference
    mode), the Python checks decide."""
    guard = plan.layout_guard
    if guard is not None and guard.check(*params, *grads):
        return True
    tensors = [*params, *grads]
    if not _python_checks(plan, tensors):
        return False
    if guard is not None and plan.guard_rebuilds < MAX_GUARD_REBUILDS:
        # The guard said no to tensors that fit: most likely the step now runs in another
        # dispatch state than the plan was built in. A guard built here fits it.
        plan.layout_guard = layout_guard(tensors)
        plan.guard_rebuilds += 1
    return True


MAX_GUARD_REBUILDS = 8  # per plan: a step that alternates states keeps the Python checks


def _python_checks(plan, tensors: list) -> bool:
    # Not redundant with the ``p.grad`` setter's checks: ``p.grad.data = ...`` and a
    # param's ``grad_dtype = None`` let a gradient of another dtype or size through.
    try:  # None has no dtype; a sparse tensor has no is_contiguous
        return (
            list(map(type, tensors)) == plan.types
            and list(map(_dtype_of, tensors)) == plan.dtypes
            and list(map(_shape_of, tensors)) == plan.shapes
            and list(map(_device_of, tensors)) == plan.devices
            and all(map(_contiguous, tensors))
            and all(map(plain_dense, tensors))
        )
    except (AttributeError, RuntimeError):
        return False


def plain_dense(t: torch.Tensor) -> bool:
    """Strided, with its elements at ``data_ptr()`` as the kernels read them: no tensor
    subclass that dispatches on its own (a wrapper such as DTensor reports address 0), no
    lazy negation (``_neg_view``)."""
    return (
        t.layout == torch.strided
        and type(t).__torch_dispatch__ is torch.Tensor.__torch_dispatch__
        and not t.is_neg()
    )


def layout_guard(tensors: list):
    """A guard whose ``check(*ts)`` is True only if each of ``ts`` has the dtype, device,
    sizes and strides (and dispatch keys, requires_grad) of the same place in
    ``tensors``; None where PyTorch has no working one (the caller checks in Python)."""
    if not _guard_works():
        return None
    return _tensor_guards(tensors)


def same_addresses(tensors: list, addresses: list, indices: list) -> bool:
    """``tensors[i].data_ptr() == addresses[i]`` for every i in ``indices`` (0..n-1).
    ``tensors`` must all be tensors (a layout check runs first)."""
    return changed_addresses(tensors, addresses, indices) is None


def changed_addresses(tensors: list, last: list | None, indices: list) -> list | None:
    """None if the tensors' addresses are ``last``, else their addresses (one pass over
    the tensors in Python, where the C++ comparison is missing)."""
    in_c = getattr(torch._C, "_tensors_data_ptrs_at_indices_equal", None)
    if in_c is not None and last is not None and in_c(tensors, last, indices):
        return None
    ptrs = list(map(_data_ptr, tensors))
    return None if ptrs == last else ptrs


def _tensor_guards(tensors: list):
    from torch._C._dynamo.guards import TensorGuards  # noqa: PLC0415 (private, may move)

    # A size or stride given as None would be dynamic (unchecked): every one is given.
    return TensorGuards(
        *tensors,
        dynamic_dims_sizes=[list(t.shape) for t in tensors],
        dynamic_dims_strides=[list(t.stride()) for t in tensors],
    )


@functools.cache
def _guard_works() -> bool:
    """Whether TensorGuards exists here and tells apart what the fused step must."""
    try:
        kept = torch.zeros(2, 3, dtype=torch.bfloat16)
        guard = _tensor_guards([kept])
        others = (
            kept.float(),  # another dtype
            torch.zeros(3, 2, dtype=torch.bfloat16).t(),  # same shape, transposed strides
            torch.zeros(2, 4, dtype=torch.bfloat16)[:, :3],  # same shape, a row stride of 4
            torch.zeros(3, 2, dtype=torch.bfloat16),  # another shape, same element count
            kept.to_sparse(),
            None,
        )
        return guard.check(torch.ones_like(kept)) and not any(guard.check(o) for o in others)
    except Exception:  # noqa: BLE001 (absent, renamed or changed: fall back to Python)
        return False
