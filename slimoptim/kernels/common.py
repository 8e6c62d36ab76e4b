"""The step-kernel skeleton shared by every update rule: load -> rule -> store.

A launch steps a whole bucket of tensors. Program ``pid`` steps one chunk of
tensor ``chunk_tensor[pid]`` starting at element ``chunk_start[pid]``: up to
``TILES`` tiles of ``ROWS x G`` elements (``G`` = quantization group size, one
group per row), so a program's setup (pointer and scalar loads) is paid once
per chunk. Tensor addresses come from an int64 pointer table, one row of
``N_FIELDS`` per tensor; gradient addresses, which change every step, come
from their own array. Per-tensor float32 scalars are rows of ``MAX_SCALARS``;
column 0 is the step counter (it keys the stochastic-rounding dither).

An update rule is a ``@triton.jit`` function passed as the ``RULE`` constexpr:
``RULE(w, g, s0, s1, floor, k, FLAG0, FLAG1, FLAG2) -> (w, s0, s1)`` on float32
tiles, where ``s0``/``s1`` are the decoded states (``N_STATES`` of them: a
signed momentum-like state, then a non-negative second moment), ``floor`` the
bound on sqrt(s1) of 8-bit second moments (0 otherwise), ``k`` the tensor's
scalar row as a tuple, and the flags the rule's compile-time options. The signed
state's 8-bit code rounds by the rule's ``ROUNDING`` (index in StateSpec.ROUNDINGS,
formats.quantize_momentum): the decay rule reads its 1 - beta from column ``FORGET``
of ``k``; the movement rule compares with the state before the step; the stochastic
one dithers every value. ``LEVELS`` picks the code's level set
(formats.MOMENTUM_LEVEL_SETS); ``SEQUENCED`` the dither (formats.dither), and
``MASTER_DITHER`` rounds the 24-bit master's code with its second half.
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
MAX_SCALARS = tl.constexpr(9)  # per-tensor scalar row; column 0 is the step counter


@triton.jit
def everywhere(x):
    """An all-true mask. Kernels run the tiles that lie wholly inside their tensor with
    it: a mask computed from the run-time numel would stop Triton from vectorising the
    loads and stores (it cannot prove the mask constant over a vector)."""
    return tl.full(x.shape, True, tl.int1)


@triton.jit
def field_ptr(table, t, field: tl.constexpr, dtype: tl.constexpr):
    # Every address in the table was checked to be 16-byte aligned when the table was built.
    ptr = tl.load(table + t * N_FIELDS + field).to(tl.pointer_type(dtype))
    return tl.multiple_of(ptr, 16)


@triton.jit
def typed_ptr(address, KIND: tl.constexpr):
    """A float32/bf16/fp16 tensor's address as a pointer; bf16 is read as int16 bits."""
    if KIND == 1:
        ptr = address.to(tl.pointer_type(tl.int16))
    elif KIND == 2:
        ptr = address.to(tl.pointer_type(tl.float16))
    else:
        ptr = address.to(tl.pointer_type(tl.float32))
    return tl.multiple_of(ptr, 16)  # every address was checked to be 16-byte aligned


@triton.jit
def widen(x, KIND: tl.constexpr):
    """float32 values of loaded float32/bf16/fp16 values (bf16 as its bits: exact)."""
    if KIND == 1:
        return kf.bf16_bits_to_float(x)
    else:
        return x.to(tl.float32)


@triton.jit
def load_tile(
    pp, cp, gp, s0p, s0sp, s1p, s1sp, offs, mask, groups, group_mask,
    N_STATES: tl.constexpr, CODE_BITS: tl.constexpr, STATE_BITS: tl.constexpr,
):  # fmt: skip
    """Everything a tile reads, as stored (bf16 as bits, codes as integers)."""
    g = tl.load(gp + offs, mask=mask, other=0)
    b = tl.load(pp + offs, mask=mask, other=0)
    code = 0
    if CODE_BITS != 0:
        code = tl.load(cp + offs, mask=mask, other=0)
    s0 = 0
    s0_scale = 0
    s1 = 0
    s1_scale = 0
    if N_STATES >= 1:
        s0 = tl.load(s0p + offs, mask=mask, other=0)
        if STATE_BITS == 8:
            s0_scale = tl.load(s0sp + groups, mask=group_mask, other=0)
    if N_STATES >= 2:
        s1 = tl.load(s1p + offs, mask=mask, other=0)
        if STATE_BITS == 8:
            s1_scale = tl.load(s1sp + groups, mask=group_mask, other=0)
    return g, b, code, s0, s0_scale, s1, s1_scale


@triton.jit
def decode_grad(
    g, mask, group_mask, grad_scale, found_inf,
    GRAD: tl.constexpr, MAXIMIZE: tl.constexpr,
    HAS_GRAD_SCALE: tl.constexpr, HAS_FOUND_INF: tl.constexpr,
):  # fmt: skip
    """(float32 gradient, element ok, group ok): the reference's unscale/maximize/skip logic."""
    g = widen(g, GRAD)
    if HAS_GRAD_SCALE:
        g = tl.div_rn(g, tl.load(grad_scale))
    if MAXIMIZE:
        g = g * -1.0  # not -g: Triton's unary minus is 0 - x, which loses -0.0
    # A group with a non-finite gradient keeps its old values; found_inf skips every group.
    # One integer max per row of |g|'s bits finds them: inf's bits are above every finite
    # value's, NaN's above inf's (a float max would drop NaN). found_inf: nothing is < 0.
    largest = tl.max(tl.where(mask, kf.as_bits(tl.abs(g)), 0), axis=1)
    limit = kf.INF_BITS
    if HAS_FOUND_INF:
        limit = tl.where(tl.load(found_inf) == 0, kf.INF_BITS, 0)
    group_ok = largest < limit
    ok = group_ok[:, None] & mask
    # A group that is not ok stores nothing from its gradient (its master stays w0, its
    # states and scales are not written, every reduction is per group): g stays as read.
    return g, ok, group_ok & group_mask


@triton.jit
def decode_master(b, code, PARAM_KIND: tl.constexpr, CODE_BITS: tl.constexpr):
    """float32 master weight: the stored parameter joined with its correction code."""
    b = widen(b, PARAM_KIND)
    if CODE_BITS != 0:
        b = kf.join_master(b, code, PARAM_KIND, CODE_BITS)
    return b


@triton.jit
def store_master(
    pp, cp, offs, mask, w, noise,
    PARAM_KIND: tl.constexpr, CODE_BITS: tl.constexpr, HW_ROUND: tl.constexpr,
    DITHERED: tl.constexpr,
):  # fmt: skip
    """Split ``w`` into the stored parameter and its correction code (formats.split_master)."""
    if CODE_BITS != 0:
        b, code = kf.split_master(w, noise, PARAM_KIND, CODE_BITS, HW_ROUND, DITHERED)
        if CODE_BITS == 8:
            tl.store(cp + offs, code.to(tl.int8), mask)
        else:
            tl.store(cp + offs, code.to(tl.int16), mask)
    else:
        b = kf.round_to_dtype(w, PARAM_KIND, HW_ROUND)
    if PARAM_KIND == 1:
        tl.store(pp + offs, kf.bf16_bits(b), mask)
    elif PARAM_KIND == 2:
        b16 = b.to(tl.float16)
        if not HW_ROUND:  # the GPU's convert makes every NaN 0x7FFF; the interpreter keeps its sign
            nan16 = tl.full(b.shape, kf.FP16_NAN, tl.int16).to(tl.float16, bitcast=True)
            b16 = tl.where(b != b, nan16, b16)
        tl.store(pp + offs, b16, mask)
    else:
        tl.store(pp + offs, b, mask)


@triton.jit
def decode_state(x, scale, SIGNED: tl.constexpr, BITS: tl.constexpr, LEVELS: tl.constexpr):
    """(float32 state, its float32 group scale per row) from its codes and bf16 scale bits,
    or float32 storage."""
    if BITS == 32:
        x = x.to(tl.float32)
        scale = 0.0
    else:
        scale = kf.bf16_bits_to_float(scale)
        if SIGNED:
            x = kf.dequantize_momentum(x, scale, LEVELS)
        else:
            x = kf.dequantize_variance(x, scale)
    return x, scale


@triton.jit
def store_state(
    sp, scp, offs, mask, groups, x, ok, group_ok, noise, forget, previous,
    SIGNED: tl.constexpr, BITS: tl.constexpr, LEVELS: tl.constexpr, ROUNDING: tl.constexpr,
):  # fmt: skip
    if BITS == 32:
        tl.store(sp + offs, x, ok)
    else:
        if SIGNED:
            code, scale = kf.quantize_momentum(x, mask, noise, forget, previous, LEVELS, ROUNDING)
        else:
            code, scale = kf.quantize_variance(x, mask, noise)
        tl.store(sp + offs, code, ok)
        # Scales are exact bf16 values: their top 16 bits are the bf16 pattern.
        tl.store(scp + groups, kf.float_to_bf16_bits(scale), group_ok)


@triton.jit
def _step_tile(
    pp, cp, gp, s0p, s0sp, s1p, s1sp, k, first, local, mask, groups, group_mask, grad_scale,
    found_inf,
    RULE: tl.constexpr, N_STATES: tl.constexpr, FORGET: tl.constexpr, LEVELS: tl.constexpr,
    FLAG0: tl.constexpr, FLAG1: tl.constexpr, FLAG2: tl.constexpr,
    PARAM_KIND: tl.constexpr, GRAD_KIND: tl.constexpr, CODE_BITS: tl.constexpr,
    STATE_BITS: tl.constexpr, MAXIMIZE: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr,
    HAS_FOUND_INF: tl.constexpr, HW_ROUND: tl.constexpr, MASTER_DITHER: tl.constexpr,
    ROUNDING: tl.constexpr, SEQUENCED: tl.constexpr,
):  # fmt: skip
    offs = first + local
    g, b, code, s0, s0_scale, s1, s1_scale = load_tile(
        pp, cp, gp, s0p, s0sp, s1p, s1sp, offs, mask, groups, group_mask,
        N_STATES, CODE_BITS, STATE_BITS,
    )  # fmt: skip
    g, ok, group_ok = decode_grad(
        g, mask, group_mask, grad_scale, found_inf,
        GRAD_KIND, MAXIMIZE, HAS_GRAD_SCALE, HAS_FOUND_INF,
    )  # fmt: skip
    w0 = decode_master(b, code, PARAM_KIND, CODE_BITS)
    floor = 0.0
    if N_STATES >= 1:
        s0, _ = decode_state(s0, s0_scale, True, STATE_BITS, LEVELS)
    else:
        s0 = 0.0
    if N_STATES >= 2:
        s1, s1_scale = decode_state(s1, s1_scale, False, STATE_BITS, LEVELS)
        if STATE_BITS == 8:
            floor = kf.variance_floor(s1_scale)[:, None]
    else:
        s1 = 0.0

    s0_before = s0
    w, s0, s1 = RULE(w0, g, s0, s1, floor, k, FLAG0, FLAG1, FLAG2)
    w = tl.where(ok, w, w0)

    noise0 = 0.0
    noise1 = 0
    if (N_STATES >= 1 and STATE_BITS == 8) or MASTER_DITHER:
        noise0, noise1 = kf.dither(first, local, k[0], SEQUENCED)
    store_master(pp, cp, offs, mask, w, noise1, PARAM_KIND, CODE_BITS, HW_ROUND, MASTER_DITHER)
    if N_STATES >= 1:
        forget = k[FORGET]
        store_state(
            s0p, s0sp, offs, mask, groups, s0, ok, group_ok, noise0, forget, s0_before, True,
            STATE_BITS, LEVELS, ROUNDING,
        )  # fmt: skip
        if N_STATES >= 2:
            store_state(
                s1p, s1sp, offs, mask, groups, s1, ok, group_ok, noise1, 0.0, 0.0,
                False, STATE_BITS, LEVELS, False,
            )  # fmt: skip


@triton.jit
def step_kernel(
    table, grad_ptrs, numels, chunk_tensor, chunk_start, scalars, grad_scale, found_inf,
    RULE: tl.constexpr, N_STATES: tl.constexpr, FORGET: tl.constexpr, LEVELS: tl.constexpr,
    FLAG0: tl.constexpr, FLAG1: tl.constexpr, FLAG2: tl.constexpr,
    PARAM_KIND: tl.constexpr, GRAD_KIND: tl.constexpr, CODE_BITS: tl.constexpr,
    STATE_BITS: tl.constexpr, G: tl.constexpr, ROWS: tl.constexpr, TILES: tl.constexpr,
    MAXIMIZE: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr, HAS_FOUND_INF: tl.constexpr,
    HW_ROUND: tl.constexpr, MASTER_DITHER: tl.constexpr, ROUNDING: tl.constexpr,
    SEQUENCED: tl.constexpr,
):  # fmt: skip
    """Step one chunk (up to TILES tiles) of one tensor of the bucket with ``RULE``."""
    pid = tl.program_id(0)
    t = tl.load(chunk_tensor + pid)
    start = tl.load(chunk_start + pid)
    numel = tl.load(numels + t)
    # Setup once per chunk: typed addresses and the tensor's scalar row.
    pp = typed_ptr(tl.load(table + t * N_FIELDS + PARAM), PARAM_KIND)
    if CODE_BITS == 8:
        cp = field_ptr(table, t, CORRECTION, tl.int8)
    else:
        cp = field_ptr(table, t, CORRECTION, tl.int16)
    gp = typed_ptr(tl.load(grad_ptrs + t), GRAD_KIND)
    if STATE_BITS == 8:
        s0p = field_ptr(table, t, STATE0, tl.int8)
        s1p = field_ptr(table, t, STATE1, tl.uint8)
    else:
        s0p = field_ptr(table, t, STATE0, tl.float32)
        s1p = field_ptr(table, t, STATE1, tl.float32)
    s0sp = field_ptr(table, t, STATE0 + 1, tl.int16)
    s1sp = field_ptr(table, t, STATE1 + 1, tl.int16)
    row = scalars + t * MAX_SCALARS
    k = (
        tl.load(row), tl.load(row + 1), tl.load(row + 2), tl.load(row + 3), tl.load(row + 4),
        tl.load(row + 5), tl.load(row + 6), tl.load(row + 7), tl.load(row + 8),
    )  # fmt: skip

    TILE: tl.constexpr = ROWS * G
    end = tl.minimum(start + TILES * TILE, numel)
    whole_end = start + (end - start) // TILE * TILE  # the tiles wholly inside the tensor
    rows = tl.arange(0, ROWS)
    local = rows[:, None] * G + tl.arange(0, G)[None, :]  # a tile's offsets from its first
    for tile_start in range(start, whole_end, TILE):
        groups = tile_start // G + rows
        first = tile_start // G * G
        _step_tile(
            pp, cp, gp, s0p, s0sp, s1p, s1sp, k,
            first, local, everywhere(local), groups, everywhere(groups), grad_scale, found_inf,
            RULE, N_STATES, FORGET, LEVELS, FLAG0, FLAG1, FLAG2, PARAM_KIND, GRAD_KIND,
            CODE_BITS, STATE_BITS, MAXIMIZE, HAS_GRAD_SCALE, HAS_FOUND_INF, HW_ROUND,
            MASTER_DITHER, ROUNDING, SEQUENCED,
        )  # fmt: skip
    if whole_end < end:  # the tensor's last, partial tile: masked
        groups = whole_end // G + rows
        first = whole_end // G * G
        _step_tile(
            pp, cp, gp, s0p, s0sp, s1p, s1sp, k,
            first, local, first + local < numel, groups, groups * G < numel,
            grad_scale, found_inf,
            RULE, N_STATES, FORGET, LEVELS, FLAG0, FLAG1, FLAG2, PARAM_KIND, GRAD_KIND,
            CODE_BITS, STATE_BITS, MAXIMIZE, HAS_GRAD_SCALE, HAS_FOUND_INF, HW_ROUND,
            MASTER_DITHER, ROUNDING, SEQUENCED,
        )  # fmt: skip


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
