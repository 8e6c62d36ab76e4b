"""Triton mirrors of :mod:`slimoptim.formats`, operation for operation.

Every helper performs the same IEEE operations, in the same order, as its
PyTorch twin, so kernel and reference produce the same bits. Rules kept here:

* float32 -> bf16 rounding and bf16 <-> float32 moves go through integer bits
  (Triton's CPU interpreter truncates bf16 casts; bits are exact everywhere).
* division and square root use ``tl.div_rn`` / ``tl.sqrt_rn``: plain ``/`` and
  ``tl.sqrt`` are approximate on the GPU. Kernels are launched with
  ``enable_fp_fusion=False`` so that no multiply-add is contracted into an FMA behind
  the reference's back: an fma is written as ``tl.fma`` where the reference has
  ``ieee.fma_rn`` (or where the product is exact, so that both round alike).
* tiles are 2-D, ``(rows, group_size)``: one row per quantization group, so a
  group's scale is a row reduction.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import formats as ref
from .. import ieee


def _f32(x: float) -> float:
    """The float32 value of ``x`` as a Python float: the constant torch would multiply by."""
    return torch.tensor(x, dtype=torch.float32).item()


# Momentum level sets, by LEVELS = index in ref.MOMENTUM_LEVEL_SETS (0 square, 1 linear-
# square): offset LEVELS * 127, units (1 + LEVELS) * 127**2, and 1/units, which halves
# exactly for the second set. Compile-time arithmetic on the constexpr LEVELS.
assert ref.MOMENTUM_LEVEL_SETS == ("square", "linear_square")
assert ref._LEVEL_OFFSET["linear_square"] == ref.MOMENTUM_LEVELS
assert ref._LEVEL_UNITS["linear_square"] == 2 * ref._LEVEL_UNITS["square"]
MOMENTUM_LEVELS = tl.constexpr(float(ref.MOMENTUM_LEVELS))
SQUARE_UNITS = tl.constexpr(ref._LEVEL_UNITS["square"])
INV_SQUARE_UNITS = tl.constexpr(_f32(1.0 / ref._LEVEL_UNITS["square"]))
HALF_DITHER = tl.constexpr(float(ref.DITHER_LEVELS // 2))
INV_HALF_DITHER = tl.constexpr(1.0 / (ref.DITHER_LEVELS // 2))
CODE_MAGIC = tl.constexpr(1.5 * 2.0**23)
MOVEMENT_SLACK = tl.constexpr(ref.MOVEMENT_SLACK)
INV_DITHER_LEVELS = tl.constexpr(1.0 / ref.DITHER_LEVELS)
SEQUENCE_KEY = tl.constexpr(ref.SEQUENCE_KEY)
SEQUENCE_WORD = tl.constexpr(ref.SEQUENCE_WORD)
VARIANCE_LEVELS_INT = tl.constexpr(ref.VARIANCE_LEVELS)
VARIANCE_CODE_SHIFT = tl.constexpr(ref.VARIANCE_CODE_SHIFT)
FINEST_VARIANCE_SHIFT = tl.constexpr(ref.FINEST_VARIANCE_SHIFT)
VARIANCE_TOP_STEP = tl.constexpr(1 << ref.VARIANCE_CODE_SHIFT)
VARIANCE_TOP_MASK = tl.constexpr(ref._TOP_MASK)
VARIANCE_SHIFT_FIELD = tl.constexpr(ref._SHIFT_FIELD)
VARIANCE_LOWEST_TOP = tl.constexpr(ref._LOWEST_TOP)
VARIANCE_HIGHEST_TOP = tl.constexpr(ref._HIGHEST_TOP)
DENOM_FLOOR = tl.constexpr(_f32(ref.DENOM_FLOOR))
TINY_SCALE = tl.constexpr(ref.TINY_SCALE)
LIFT = tl.constexpr(ref.LIFT)
ROOT_LOW = tl.constexpr(1.0 - 2.0**-16)
SIGN_BIT = tl.constexpr(-(2**31))
BF16_NAN = tl.constexpr(ieee.BF16_NAN_BITS)
FP16_NAN = tl.constexpr(ieee.FP16_NAN_BITS)
BF16_MAX_BITS = tl.constexpr(ieee.BF16_MAX_BITS)
INF_BITS = tl.constexpr(ieee.INF_BITS)

# Parameter storage kinds (a tl.constexpr of the kernels).
FP32, BF16, FP16 = 0, 1, 2


@triton.jit
def is_finite(x):
    return tl.abs(x) < float("inf")  # False for +-inf and NaN


@triton.jit
def as_float(bits):
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def as_bits(x):
    return x.to(tl.int32, bitcast=True)


@triton.jit
def bf16_bits_to_float(bits16):
    """int16 bf16 bit patterns -> float32 (exact)."""
    return as_float(bits16.to(tl.int32) << 16)


@triton.jit
def round_to_bf16(x):
    """ieee.round_to_bf16: nearest bf16 (ties to even), kept in float32."""
    u = as_bits(x)
    lsb = (u >> 16) & 1
    rounded = (u + 0x7FFF + lsb) & -65536
    return as_float(tl.where(x != x, BF16_NAN << 16, rounded))


@triton.jit
def bf16_bits(b):
    """The int16 bits of float32 ``b`` from round_to_dtype: its top half (NaN is canonical)."""
    return (as_bits(b) >> 16).to(tl.int16)


@triton.jit
def float_to_bf16_bits(b):
    """bf16-exact float32 -> int16 bits; NaN becomes 0x7FC0 (a group scale's NaN, as
    torch's CPU cast writes it)."""
    bits = (as_bits(b) >> 16).to(tl.int16)
    return tl.where(b != b, 0x7FC0, bits).to(tl.int16)


@triton.jit
def round_to_dtype(x, PARAM: tl.constexpr, HW_ROUND: tl.constexpr):
    """Nearest ``PARAM`` value of float32 ``x``, kept in float32. On the GPU the hardware
    convert (cvt.rn: round to nearest even, the integer recipe's bits) is one instruction;
    the interpreter truncates bf16 casts, so it takes the integer recipe."""
    if PARAM == 1:
        if HW_ROUND:
            return x.to(tl.bfloat16).to(tl.float32)
        else:
            return round_to_bf16(x)
    elif PARAM == 2:
        return x.to(tl.float16).to(tl.float32)  # cvt.rn on the GPU, numpy RNE in the interpreter
    else:
        return x


# formats._FP16_UNITS as float32 exponent fields: (mantissa bits, smallest exponent field)
FP16_MANTISSA = tl.constexpr(ref._FP16_UNITS[0])
FP16_MIN_FIELD = tl.constexpr(ref._FP16_UNITS[1] + 127)


@triton.jit
def fp16_code_units(b, CODE_BITS: tl.constexpr):
    """formats.code_units: (unit, 1/unit) of an fp16 correction code, from b's exponent."""
    SHIFT: tl.constexpr = FP16_MANTISSA + CODE_BITS
    exponent = tl.maximum(as_bits(b) & 0x7F800000, FP16_MIN_FIELD << 23)
    # 1/unit's bits are ((SHIFT + 254) << 23) - exponent, summed so no term leaves int32
    inverse = (((SHIFT + 127) << 23) - exponent) + (127 << 23)
    return as_float(exponent - (SHIFT << 23)), as_float(inverse)


@triton.jit
def join_master(b, code, PARAM: tl.constexpr, CODE_BITS: tl.constexpr):
    """formats.join_master of float32 ``b`` and the integer ``code``."""
    if PARAM == 1:  # a bf16 code counts float32 bit patterns: one shift and one add
        rebuilt = as_float(as_bits(b) + (code.to(tl.int32) << (16 - CODE_BITS)))
        return tl.where(rebuilt != rebuilt, b, rebuilt)  # a stale code past 0 or Inf
    else:
        unit, _ = fp16_code_units(b, CODE_BITS)
        return b + code.to(tl.float32) * unit


@triton.jit
def split_master(
    w, noise, PARAM: tl.constexpr, CODE_BITS: tl.constexpr, HW_ROUND: tl.constexpr,
    DITHERED: tl.constexpr,
):  # fmt: skip
    """(low-precision value as float32, int32 code) of master ``w``; the code rounds
    to nearest or, ``DITHERED``, stochastically with int32 ``noise`` in [0, 65536)."""
    b = round_to_dtype(w, PARAM, HW_ROUND)
    LIMIT: tl.constexpr = 2 ** (CODE_BITS - 1) - 1  # symmetric, see formats.split_master
    if PARAM == 1:
        SHIFT: tl.constexpr = 16 - CODE_BITS
        distance = as_bits(w) - as_bits(b)
        if DITHERED:
            distance += noise >> 8
        elif SHIFT > 0:
            distance += 1 << (SHIFT - 1)
        code = tl.minimum(tl.maximum(distance >> SHIFT, -LIMIT), LIMIT)
        code = tl.where(w == w, code, 0)  # NaN: 0, not the distance to the canonical NaN
    else:
        _, inverse = fp16_code_units(b, CODE_BITS)
        scaled = (w - b) * inverse
        if DITHERED:
            offset = noise.to(tl.float32) * INV_DITHER_LEVELS
        else:
            offset = 0.5
        code = tl.minimum(tl.maximum(tl.floor(scaled + offset), -LIMIT), LIMIT)
        code = tl.where(is_finite(scaled), code, 0.0).to(tl.int32)
    return b, code


# ---------------------------------------------------------------- group scales


@triton.jit
def round_up_to_bf16(x):
    """ieee.round_up_to_bf16: x >= 0 or a positive NaN, capped at the largest bf16."""
    return as_float((tl.minimum(as_bits(x), BF16_MAX_BITS) + 0xFFFF) & -65536)


@triton.jit
def scale_lift(scale):
    """formats.scale_lift: LIFT for a scale below TINY_SCALE, else 1."""
    return tl.where(scale < TINY_SCALE, LIFT, 1.0)


@triton.jit
def safe_reciprocal(scale):
    ok = scale > 0
    return tl.where(
        ok, tl.div_rn(tl.full(scale.shape, 1.0, tl.float32), tl.where(ok, scale, 1.0)), 0.0
    )


# ----------------------------------------------------------- stochastic dither


@triton.jit
def mix32(x):
    """dither._mix32 on uint32: products wrap mod 2**32 like the masked int64 ones."""
    x = x ^ (x >> 16)
    x = x * 0x7FEB352D
    x = x ^ (x >> 15)
    x = x * 0x1B873593
    return x ^ (x >> 16)


@triton.jit
def mix_element_tail(x):
    """dither._mix_element on uint32 after its first product (``x`` = index * 0x7FEB352D)."""
    x = x ^ (x >> 16)
    return x * 0x046CA68B


@triton.jit
def dither(first, local, step, SEQUENCED: tl.constexpr):
    """formats.dither at the indices ``first + local`` (a scalar and a loop-invariant tile):
    the (momentum, variance or master) integer dithers in [0, 65536), the first as
    float32, the second as int32 (uint32 sums and products wrap mod 2**32). The hash's
    first product distributes over the sum mod 2**32, so its per-element part,
    ``local * 0x7FEB352D``, is the same for every tile of a program."""
    s = step.to(tl.int32).to(tl.uint32)
    local = local.to(tl.uint32) * 0x7FEB352D
    if SEQUENCED:
        x = (first.to(tl.uint32) + SEQUENCE_KEY) * 0x7FEB352D + local
        h = mix_element_tail(x) + s * SEQUENCE_WORD
    else:
        x = (first.to(tl.uint32) + mix32(s * 0x9E3779B1)) * 0x7FEB352D + local
        h = mix_element_tail(x)
    # The variance code adds its dither as an integer: no float round trip.
    return (h >> 16).to(tl.float32), (h & 0xFFFF).to(tl.int32)


# ------------------------------------------------------------ momentum (signed)


@triton.jit
def momentum_level(c, LEVELS: tl.constexpr):
    """formats._momentum_level, c * (offset + c) for c >= 0: exact (integers < 2**15)."""
    if LEVELS == 0:
        return c * c  # offset 0: 0 + c is c for c >= 0, so the bits are the same
    else:
        return c * (MOMENTUM_LEVELS + c)


@triton.jit
def dequantize_momentum(code, scale_row, LEVELS: tl.constexpr):
    y = code.to(tl.float32)
    inv_units: tl.constexpr = INV_SQUARE_UNITS * (1.0 - 0.5 * LEVELS)
    if LEVELS == 0:
        level = y * tl.abs(y)  # |y| + 0 is |y|: the same bits as the general form
    else:
        level = y * (tl.abs(y) + MOMENTUM_LEVELS)
    return level * inv_units * scale_row[:, None]


@triton.jit
def quantize_momentum(
    m, mask, noise, forget, previous, LEVELS: tl.constexpr, ROUNDING: tl.constexpr
):
    """(int8 code, bf16 scale as float32 per row) of momentum tile ``m`` as
    formats.quantize_momentum, by the ``ROUNDING`` rule (index in StateSpec.ROUNDINGS):
    0 decay (``forget``), 1 movement (``previous``), 2 stochastic (every value dithered,
    the decay rule's forget = 0).

    The level is found from a fast approximate ``tl.sqrt`` and one exact comparison (the
    reference corrects an exact root both ways): the same exact floor level, so the same
    bits.
    """
    offset: tl.constexpr = LEVELS * MOMENTUM_LEVELS
    units: tl.constexpr = SQUARE_UNITS * (1 + LEVELS)
    scale = round_up_to_bf16(tl.max(tl.where(mask, tl.abs(m), 0.0), axis=1))
    row_lift = scale_lift(scale)  # exact power of two: tiny groups' 1/scale would overflow
    factor = (safe_reciprocal(scale * row_lift) * units)[:, None]
    lift = row_lift[:, None]
    t = tl.minimum(tl.abs(m * lift) * factor, units)
    # The root scaled by ROOT_LOW is below the exact one (the approximate root errs by
    # ~2**-22, the bias is 2**-16) and above it minus one (roots are < 2**8), so its floor
    # is the level or the one below: one upward fix-up gives the exact floor level.
    if LEVELS == 0:
        low = tl.floor(tl.sqrt(t) * ROOT_LOW)
    else:
        # c (offset + c) = t at c = sqrt(t + offset**2 / 4) - offset / 2 (constexprs)
        low = tl.floor(tl.fma(tl.sqrt(t + offset * offset * 0.25), ROOT_LOW, -offset * 0.5))
    high = low + 1.0
    low = tl.where(momentum_level(high, LEVELS) <= t, high, low)
    # The reference's half_gap and threshold scaled by 2**-15 (1 / HALF_DITHER): every
    # product stays exact (below 2**24 units of 2**-16) and t * forget rounds alike unless
    # it is below 2**-111, far under any half gap, so every comparison is the reference's
    # and t - level needs no product by HALF_DITHER.
    half_gap = tl.fma(low, INV_HALF_DITHER, (offset + 1.0) * 0.5 * INV_HALF_DITHER)
    if ROUNDING == 2:
        threshold = noise * half_gap
    else:
        if ROUNDING == 1:
            change = (tl.abs(m - previous) * lift) * factor
            dithered = change < half_gap * (MOVEMENT_SLACK * HALF_DITHER)
        else:
            dithered = t * (forget * INV_HALF_DITHER) < half_gap
        threshold = tl.where(dithered, noise, HALF_DITHER) * half_gap
    # t - level(low), the level an exact product: one fma, the reference's bits
    if LEVELS == 0:
        below = tl.fma(-low, low, t)  # no + 0.0: it is not free (-0.0 + 0.0 is +0.0)
    else:
        below = tl.fma(-low, low + offset, t)
    up = below > threshold
    code = low + up.to(tl.float32)
    # m's sign bit on the code (one bitwise op; -0.0 converts to 0 like +0.0)
    code = as_float(as_bits(code) | (as_bits(m) & SIGN_BIT))
    # The integer code as the low byte of code + 1.5 * 2**23 (exact: |code| <= 127): no
    # float-to-int convert and no 16-bit zero extension before the bytes are packed. The
    # code is never NaN: t's minimum above drops a NaN (as torch.fmin in the reference).
    return as_bits(code + CODE_MAGIC).to(tl.int8), scale


# --------------------------------------------------------- variance (non-neg.)


@triton.jit
def variance_top_and_shift(v, mask):
    """formats.variance_top and formats.variance_shift per row, as int32: one max and one
    unsigned min reduction of the row's bits (zeros wrap to the largest unsigned value)."""
    v = tl.where(mask, v, 0.0)
    # |v|: an all-NaN row's max has no sign; capped at inf: its payload must not matter
    largest = tl.minimum(as_bits(tl.max(tl.abs(v), axis=1)), INF_BITS)
    top = (largest + (VARIANCE_TOP_STEP - 1)) & -VARIANCE_TOP_STEP
    top = tl.minimum(tl.maximum(top, VARIANCE_LOWEST_TOP), VARIANCE_HIGHEST_TOP)
    low = tl.min((as_bits(v) - 1).to(tl.uint32, bitcast=True), axis=1).to(tl.int32, bitcast=True)
    span = top - (low + 1)  # top - bits(smallest non-zero v), int32 wrap as the reference
    shift = tl.full(span.shape, FINEST_VARIANCE_SHIFT, tl.int32)
    for finer in tl.static_range(FINEST_VARIANCE_SHIFT, VARIANCE_CODE_SHIFT):
        shift += (span > ((VARIANCE_LEVELS_INT - 1) << finer)).to(tl.int32)
    return top, tl.where(low == -1, VARIANCE_CODE_SHIFT, shift)  # -1: an all-zero row


@triton.jit
def quantize_variance(v, mask, noise):
    """formats.quantize_variance (stochastic): integer operations on v's float32 bits."""
    top, shift = variance_top_and_shift(v, mask)
    coarsening = -shift + VARIANCE_CODE_SHIFT  # constexpr - tensor would stay a constexpr
    offset = noise << (shift - FINEST_VARIANCE_SHIFT)[:, None]
    below = (top[:, None] - as_bits(v) + offset) >> shift[:, None]
    code = tl.minimum(tl.maximum(VARIANCE_LEVELS_INT - below, 0), VARIANCE_LEVELS_INT)
    return code.to(tl.uint8), as_float(top | (coarsening << 16))


@triton.jit
def variance_scale_parts(scale_row):
    """formats.variance_scale_parts: (top as int32 bits, code shift) per row."""
    bits = as_bits(scale_row)
    return bits & VARIANCE_TOP_MASK, -((bits >> 16) & VARIANCE_SHIFT_FIELD) + VARIANCE_CODE_SHIFT


@triton.jit
def dequantize_variance(code, scale_row):
    """top - ((255 - code) << shift) as (top - (255 << shift)) + code * 2**shift: the same
    int32 (sums wrap alike), one multiply-add per element."""
    top, shift = variance_scale_parts(scale_row)
    code = code.to(tl.int32)
    base = top - (VARIANCE_LEVELS_INT << shift)
    bits = tl.maximum(base[:, None] + code * (1 << shift)[:, None], 0)
    return tl.where(code > 0, as_float(bits), 0.0)


@triton.jit
def variance_floor(scale_row):
    top, _ = variance_scale_parts(scale_row)
    return tl.sqrt_rn(as_float(top)) * DENOM_FLOOR
