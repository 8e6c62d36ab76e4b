"""Per-element plumbing shared by every step kernel: tiles, pointer table, loads, stores.

A launch steps a whole bucket of tensors. Program ``pid`` handles one tile of
``ROWS x G`` elements (``G`` = quantization group size) of tensor
``block_tensor[pid]``, starting at element ``block_start[pid]``. Tensor
addresses come from an int64 pointer table, one row of ``N_FIELDS`` per tensor;
gradient addresses, which change every step, come from their own
array.
"""

from __future__ import annotations

import triton
import triton.language as tl

from . import formats as kf

# Rows of the pointer table (constexpr so kernels can name them; ``.value`` on the host).
PARAM = tl.constexpr(0)
CORRECTION = tl.constexpr(1)
STEP = tl.constexpr(2)
STATE0 = tl.constexpr(3)  # a state; its group scales (8-bit states) are the next row
STATE1 = tl.constexpr(5)
N_FIELDS = tl.constexpr(7)  # a tensor's addresses are one row of the table


@triton.jit
def tile(block_tensor, block_start, numels, ROWS: tl.constexpr, G: tl.constexpr):
    """(tensor index, element offsets, group indices, whole tile in bounds?, tensor numel)."""
    pid = tl.program_id(0)
    t = tl.load(block_tensor + pid)
    start = tl.load(block_start + pid)
    numel = tl.load(numels + t)
    groups = start // G + tl.arange(0, ROWS)
    offs = groups[:, None] * G + tl.arange(0, G)[None, :]
    return t, offs, groups, start + ROWS * G <= numel, numel


@triton.jit
def everywhere(x):
    """An all-true mask. Kernels run the tiles that lie wholly inside their tensor with
    it: a mask computed from the run-time numel would stop Triton from vectorising the
    loads and stores (it cannot prove the mask constant over a vector)."""
    return tl.full(x.shape, True, tl.int1)


@triton.jit
def field_ptr(table, n_tensors, field: tl.constexpr, t, dtype: tl.constexpr):
    # Every address in the table was checked to be 16-byte aligned when the table was built.
    ptr = tl.load(table + t * N_FIELDS + field).to(tl.pointer_type(dtype))
    return tl.multiple_of(ptr, 16)


@triton.jit
def scalar(scalars, N_SCALARS: tl.constexpr, row: tl.constexpr, t):
    """Per-tensor float32 scalar ``row`` (see each rule's ``scalars``): a tensor's scalars
    are contiguous, so a program's loads share one address and constant offsets."""
    return tl.load(scalars + t * N_SCALARS + row)


@triton.jit
def load_grad(
    grad_ptrs,
    t,
    offs,
    mask,
    group_mask,
    grad_scale,
    found_inf,
    GRAD: tl.constexpr,
    MAXIMIZE: tl.constexpr,
    HAS_GRAD_SCALE: tl.constexpr,
    HAS_FOUND_INF: tl.constexpr,
):
    """(float32 gradient, element ok, group ok): the reference's unscale/maximize/skip logic."""
    if GRAD == 1:
        gp = tl.multiple_of(tl.load(grad_ptrs + t).to(tl.pointer_type(tl.int16)), 16)
        g = kf.bf16_bits_to_float(tl.load(gp + offs, mask=mask, other=0))
    elif GRAD == 2:
        gp = tl.multiple_of(tl.load(grad_ptrs + t).to(tl.pointer_type(tl.float16)), 16)
        g = tl.load(gp + offs, mask=mask, other=0.0).to(tl.float32)
    else:
        gp = tl.multiple_of(tl.load(grad_ptrs + t).to(tl.pointer_type(tl.float32)), 16)
        g = tl.load(gp + offs, mask=mask, other=0.0)
    if HAS_GRAD_SCALE:
        g = tl.div_rn(g, tl.load(grad_scale))
    if MAXIMIZE:
        g = g * -1.0  # not -g: Triton's unary minus is 0 - x, which loses -0.0
    # A group with a non-finite gradient keeps its old values; found_inf skips every group.
    group_ok = tl.min(tl.where(mask, kf.is_finite(g), True).to(tl.int32), axis=1)
    if HAS_FOUND_INF:
        group_ok = group_ok * (tl.load(found_inf) == 0).to(tl.int32)
    group_ok = group_ok != 0
    ok = group_ok[:, None] & mask
    return tl.where(ok, g, 0.0), ok, group_ok & group_mask


@triton.jit
def load_master(table, n_tensors, t, offs, mask, PARAM_KIND: tl.constexpr, CODE_BITS: tl.constexpr):
    """float32 master weight: the stored parameter joined with its correction code."""
    if PARAM_KIND == 1:
        b = kf.bf16_bits_to_float(
            tl.load(field_ptr(table, n_tensors, PARAM, t, tl.int16) + offs, mask=mask, other=0)
        )
    elif PARAM_KIND == 2:
        pp = field_ptr(table, n_tensors, PARAM, t, tl.float16)
        b = tl.load(pp + offs, mask=mask, other=0.0).to(tl.float32)
    else:
        b = tl.load(field_ptr(table, n_tensors, PARAM, t, tl.float32) + offs, mask=mask, other=0.0)
    if CODE_BITS == 8:
        cp = field_ptr(table, n_tensors, CORRECTION, t, tl.int8)
        b = kf.join_master(b, tl.load(cp + offs, mask=mask, other=0).to(tl.float32), PARAM_KIND, 8)
    elif CODE_BITS == 16:
        cp = field_ptr(table, n_tensors, CORRECTION, t, tl.int16)
        b = kf.join_master(b, tl.load(cp + offs, mask=mask, other=0).to(tl.float32), PARAM_KIND, 16)
    return b


@triton.jit
def store_master(
    table, n_tensors, t, offs, mask, w, PARAM_KIND: tl.constexpr, CODE_BITS: tl.constexpr
):
    """Split ``w`` into the stored parameter and its correction code (formats.split_master)."""
    if CODE_BITS == 8:
        b, code = kf.split_master(w, PARAM_KIND, 8)
        tl.store(field_ptr(table, n_tensors, CORRECTION, t, tl.int8) + offs, code.to(tl.int8), mask)
    elif CODE_BITS == 16:
        b, code = kf.split_master(w, PARAM_KIND, 16)
        cp = field_ptr(table, n_tensors, CORRECTION, t, tl.int16)
        tl.store(cp + offs, code.to(tl.int16), mask)
    else:
        b = kf.round_to_dtype(w, PARAM_KIND)
    if PARAM_KIND == 1:
        pp = field_ptr(table, n_tensors, PARAM, t, tl.int16)
        tl.store(pp + offs, kf.float_to_bf16_bits(b), mask)
    elif PARAM_KIND == 2:
        tl.store(field_ptr(table, n_tensors, PARAM, t, tl.float16) + offs, b.to(tl.float16), mask)
    else:
        tl.store(field_ptr(table, n_tensors, PARAM, t, tl.float32) + offs, b, mask)


@triton.jit
def load_scale(table, n_tensors, field: tl.constexpr, t, groups, group_mask):
    """A bf16 group scale per row, as float32."""
    sp = field_ptr(table, n_tensors, field, t, tl.int16)
    return kf.bf16_bits_to_float(tl.load(sp + groups, mask=group_mask, other=0))


@triton.jit
def store_scale(table, n_tensors, field: tl.constexpr, t, groups, scale, group_ok):
    # Scales are exact bf16 values: their top 16 bits are the bf16 pattern.
    sp = field_ptr(table, n_tensors, field, t, tl.int16)
    tl.store(sp + groups, kf.float_to_bf16_bits(scale), group_ok)


@triton.jit
def load_momentum(table, n_tensors, field: tl.constexpr, t, offs, mask, groups, group_mask):
    """float32 signed state, decoded from its int8 codes and group scales."""
    code = tl.load(field_ptr(table, n_tensors, field, t, tl.int8) + offs, mask=mask, other=0)
    scale = load_scale(table, n_tensors, field + 1, t, groups, group_mask)
    return kf.dequantize_momentum(code, scale)


@triton.jit
def store_momentum(
    table, n_tensors, field: tl.constexpr, t, offs, mask, groups, m, ok, group_ok, step
):
    momentum_noise, _ = kf.dither(offs, step)
    code, scale = kf.quantize_momentum(m, mask, momentum_noise)
    tl.store(field_ptr(table, n_tensors, field, t, tl.int8) + offs, code, ok)
    store_scale(table, n_tensors, field + 1, t, groups, scale, group_ok)


@triton.jit
def load_variance(table, n_tensors, field: tl.constexpr, t, offs, mask, groups, group_mask):
    """(float32 second moment, its group scale per row) from uint8 codes."""
    code = tl.load(field_ptr(table, n_tensors, field, t, tl.uint8) + offs, mask=mask, other=0)
    scale = load_scale(table, n_tensors, field + 1, t, groups, group_mask)
    return kf.dequantize_variance(code, scale), scale


@triton.jit
def store_variance(
    table, n_tensors, field: tl.constexpr, t, offs, mask, groups, v, ok, group_ok, step
):
    # The same hash as store_momentum's (the compiler computes it once), other half.
    _, variance_noise = kf.dither(offs, step)
    code, scale = kf.quantize_variance(v, mask, variance_noise)
    tl.store(field_ptr(table, n_tensors, field, t, tl.uint8) + offs, code, ok)
    store_scale(table, n_tensors, field + 1, t, groups, scale, group_ok)


@triton.jit
def load_float_state(table, n_tensors, field: tl.constexpr, t, offs, mask):
    return tl.load(field_ptr(table, n_tensors, field, t, tl.float32) + offs, mask=mask, other=0.0)


@triton.jit
def store_float_state(table, n_tensors, field: tl.constexpr, t, offs, value, ok):
    tl.store(field_ptr(table, n_tensors, field, t, tl.float32) + offs, value, ok)


@triton.jit
def bump_steps_kernel(
    table, n_tensors, steps_out, found_inf, HAS_FOUND_INF: tl.constexpr, BLOCK: tl.constexpr
):
    """state['step'] += 1 (or += 0 when GradScaler found an inf), gathered into ``steps_out``."""
    t = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = t < n_tensors
    ptrs = tl.load(table + t * N_FIELDS + STEP, mask=mask, other=0).to(tl.pointer_type(tl.float32))
    step = tl.load(ptrs, mask=mask, other=0.0)
    if HAS_FOUND_INF:
        step = step + tl.where(tl.load(found_inf) != 0, 0.0, 1.0)
    else:
        step = step + 1.0
    tl.store(ptrs, step, mask)
    tl.store(steps_out + t, step, mask)
