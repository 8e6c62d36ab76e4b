"""The numeric formats of slimoptim, as pure PyTorch functions.

This module is the reference: the Triton kernels must reproduce its bits. Every
function works on flat float32 tensors, and every bit of a result is decided by
operations whose float32 result IEEE-754 fixes (add, multiply, one division per
group, floor, integer bit operations), so the same inputs give the same bits on
any backend.

Two formats live here:

* Master-weight split. A float32 master ``w`` is stored as its round-to-nearest
  low-precision value ``b`` (the bf16/fp16 parameter) plus a signed integer
  ``code`` of ``n`` bits. For bf16, whose bits are float32's top half, the code is
  the distance from ``b`` to ``w`` counted in float32 bit patterns, rounded to
  ``2**(16 - n)`` of them: integer arithmetic on the bits, no exponent to read.
  For fp16 it holds ``w - b`` in units of ``ulp(b) / 2**n``, a power of two, so
  the split and the rebuild are exact float32 arithmetic. Either way
  ``|w - b| <= ulp(b) / 2`` makes the code fit.
* Group-quantized 8-bit states. Each run of ``group_size`` values shares one
  bf16 scale. Momentum codes index square (or half-linear, half-square) levels
  below the group's absmax, rounded to nearest except where a decaying state could
  freeze (there stochastically and without bias, so it reaches zero as in float32);
  the second moment is a
  logarithmic code, read off its float32 bits, below a power-of-two group scale.
"""

from __future__ import annotations

import torch

# The dither's names that the formats, their tests and the kernels' mirror read from here.
from .dither import DITHER_LEVELS, SEQUENCE_KEY, SEQUENCE_WORD, dither  # noqa: F401
from .ieee import INF_BITS, as_bits, as_float, round_to_dtype, round_up_to_bf16, sqrt_rn, wrap_int32

# Relative level below which a square-level momentum code cannot resolve a value: its
# smallest non-zero level is (1/127)**2 of the group scale. The denominator sqrt(v) is
# floored at the same fraction of sqrt(v's group top), which keeps every element's
# update bounded (docs/formats.md, "Bounded updates").
MOMENTUM_LEVELS = 127
VARIANCE_LEVELS = 255
DENOM_FLOOR = 1.0 / MOMENTUM_LEVELS**2

# fp16's (mantissa bits, smallest exponent the correction's unit follows): below its
# smallest normal the unit stays put, so subnormal masters keep a correction too.
_FP16_UNITS = (10, -14)
# bf16's, for the codes of state_dict format 3 and older (a unit of ulp(b) / 2**n, b's
# exponent clamped at 2**-100), which state_io converts on loading.
VERSION3_BF16_UNITS = (7, -100)
CORRECTED_DTYPES = (torch.bfloat16, torch.float16)
CODE_DTYPES = {8: torch.int8, 16: torch.int16}


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """The shard this rank owns for a DTensor (FSDP2), the tensor itself otherwise: what
    the formats and the kernels operate on."""
    return t.to_local() if hasattr(t, "to_local") else t


def correction_bits(param: torch.Tensor, master_weight_bits: int | None) -> int | None:
    """Bits of the stored master-weight correction for ``param``, None when none is kept."""
    if param.dtype not in CORRECTED_DTYPES or master_weight_bits is None:
        return None
    return master_weight_bits - 16


def code_units(b: torch.Tensor, code_bits: int, units: tuple = _FP16_UNITS):
    """(unit, 1/unit) of an fp16 correction code for values ``b`` (or a format-3 bf16 one,
    ``units`` VERSION3_BF16_UNITS): the unit is ulp(b) / 2**code_bits, a power of two
    built from b's exponent bits."""
    mantissa, min_exp = units
    exponent = torch.clamp(as_bits(b) & 0x7F800000, min=(min_exp + 127) << 23)
    unit = exponent - ((mantissa + code_bits) << 23)
    # ((shift + 254) << 23) - exponent, summed so that no term leaves int32
    inverse = (((mantissa + code_bits + 127) << 23) - exponent) + (127 << 23)
    return as_float(unit), as_float(inverse)


def split_master(
    w: torch.Tensor, dtype: torch.dtype, code_bits: int, noise: torch.Tensor | None = None
):
    """Split float32 master ``w`` into (low-precision value as float32, int code).

    Codes span +-(2**(n-1) - 1), symmetric: a rebuilt master then always lies strictly
    inside ``b``'s rounding interval, so splitting it again gives back the same
    ``(b, code)``. With -2**(n-1) it could land on the midpoint below an odd ``b`` and
    re-round to the even neighbour, moving an element that was not stepped.

    A bf16 master's code counts float32 bit patterns from ``b`` to ``w`` (towards larger
    magnitudes for either sign), ``2**(16 - n)`` to a unit: the same values as units of
    ``ulp(b) / 2**n`` wherever ``w`` and ``b`` share a binade, twice as fine just below a
    power of two, and down to float32's subnormals. The code rounds to nearest or, given
    ``noise`` (integers in [0, 65536), see :func:`dither`) and 8-bit codes, stochastically:
    away from ``b`` with probability equal to the fraction of a unit beyond the code
    towards ``b``, so the rebuilt master is unbiased. An update of under half a unit then
    moves the master on average instead of never (Lion's steps of +-lr,
    docs/formats.md). A rebuilt master splits back to the same code either way. 16-bit
    codes hold every bf16 master exactly but ties (``w`` on a midpoint): nothing to
    dither. An fp16 master's code is ``w - b`` in units of ``ulp(b) / 2**n`` (the
    subnormals' unit below 2**-14), rounded the same two ways.
    """
    b = round_to_dtype(w, dtype)
    limit = 2 ** (code_bits - 1) - 1
    if dtype == torch.bfloat16:
        shift = 16 - code_bits
        distance = as_bits(w) - as_bits(b)
        if noise is not None and code_bits == 8:
            distance = distance + (noise.to(torch.int32) >> 8)  # its top 8 bits: a unit's fraction
        elif shift:
            distance = distance + (1 << (shift - 1))
        code = torch.clamp(distance >> shift, -limit, limit)  # >>: floor, as the kernels'
        code = torch.where(torch.isnan(w), 0, code)  # not the distance to the canonical NaN
        return b, code.to(CODE_DTYPES[code_bits])
    scaled = (w - b) * code_units(b, code_bits)[1]
    if noise is None or code_bits != 8:
        offset = 0.5
    else:  # exact but near zero, where the unit is clamped and the sum rounds: the same
        # float32 operations on every backend
        offset = noise * (1.0 / DITHER_LEVELS)
    code = torch.clamp(torch.floor(scaled + offset), -limit, limit)
    code = torch.where(torch.isfinite(scaled), code, torch.zeros_like(code))
    return b, code.to(CODE_DTYPES[code_bits])


def join_master(b: torch.Tensor, code: torch.Tensor, dtype: torch.dtype, code_bits: int):
    """Rebuild the float32 master from the low-precision value ``b`` (float32) and its code.

    A bf16 code that steps past zero or beyond Inf rebuilds a NaN bit pattern; the master
    is then ``b``. split_master never makes such a pair: a stale code does, whose param was
    set to +-0 or +-Inf outside the optimizer (pruning, ``zero_()``, a weights-only load)."""
    if dtype == torch.bfloat16:
        rebuilt = as_float(as_bits(b) + (code.to(torch.int32) << (16 - code_bits)))
        return torch.where(torch.isnan(rebuilt), b, rebuilt)
    return b + code.float() * code_units(b, code_bits)[0]


# ---------------------------------------------------------------- group scales


def num_groups(numel: int, group_size: int) -> int:
    return (numel + group_size - 1) // group_size


def group_view(x: torch.Tensor, group_size: int, fill: float = 0.0) -> torch.Tensor:
    """(groups, group_size) view of flat ``x``, the partial last group padded with ``fill``."""
    pad = (-x.numel()) % group_size
    if pad:
        x = torch.cat([x, x.new_full((pad,), fill)])
    return x.view(-1, group_size)


def per_element(group_values: torch.Tensor, group_size: int, numel: int) -> torch.Tensor:
    """Broadcast one value per group back to the ``numel`` elements."""
    return group_values.repeat_interleave(group_size)[:numel]


def group_scale(magnitude: torch.Tensor, group_size: int) -> torch.Tensor:
    """Per-group bf16 scale (as float32) >= the group's largest ``magnitude``. NaN is
    passed over unless the whole group is NaN, as the kernels' float max (IEEE maxNum)
    does; a state turns NaN only after a param did."""
    return round_up_to_bf16(_largest(group_view(magnitude, group_size)))


def _largest(rows: torch.Tensor) -> torch.Tensor:
    """Per row of values >= 0 (or NaN), the IEEE maxNum reduction the kernels' float max
    does: NaN passed over unless the whole row is NaN, which gives NaN (torch's amax would
    give NaN for one NaN). Which NaN differs between backends (the GPU's max makes
    0x7FFFFFFF), so callers cap the bits before they use them."""
    nan = torch.isnan(rows)
    largest = torch.where(nan, 0.0, rows).amax(dim=1)
    return torch.where(nan.all(dim=1), rows.amax(dim=1), largest)


# A group scale below TINY_SCALE is lifted by LIFT (a power of two, so exactly) before its
# reciprocal is taken, and the group's values with it: 1/scale overflows float32 for a
# subnormal bf16 scale (below 2**-128), which would send every code of the group to the
# top level. Larger scales keep a lift of 1, so their bits do not change.
TINY_SCALE = 2.0**-64
LIFT = 2.0**64


def scale_lift(scale: torch.Tensor) -> torch.Tensor:
    """Per group, LIFT if the scale is below TINY_SCALE, else 1: both scale and values are
    multiplied by it (exactly: every value of the group is at most the scale < 2**-64)."""
    return torch.where(scale < TINY_SCALE, LIFT, 1.0)


def _safe_reciprocal(scale: torch.Tensor) -> torch.Tensor:
    """1/scale per group (0 for a zero scale). Codes multiply by it: one IEEE division per
    group instead of one per element, which keeps the fused kernels memory-bound."""
    ok = scale > 0
    return torch.where(ok, torch.ones_like(scale) / torch.where(ok, scale, 1.0), 0.0)


# ------------------------------------------------------------ momentum (signed)

# Level c of a signed code sits at c * (offset + c) / units of the group scale. Two level
# sets, chosen by what the update rule does with the state (docs/formats.md, "Momentum"):
# * "square" (offset 0): (c/127)**2, as fine as 6e-5 of the scale near zero. Rules that
#   divide by or take the sign of the state (AdamW, Lion) need small elements' relative
#   precision: an element of a heavy-tailed group whose momentum rounded up to a coarse
#   first level would be divided by its own tiny sqrt(v).
# * "linear_square" (offset 127): half linear, half square, levels 1/252 of the scale
#   apart at zero and 3/254 at the top. For rules whose update is linear in the state
#   (SGD, Muon) what counts is the error relative to the group: ~15 % less than square.
MOMENTUM_LEVEL_SETS = ("square", "linear_square")  # index: the kernels' LEVELS constexpr
_LEVEL_OFFSET = {"square": 0, "linear_square": MOMENTUM_LEVELS}
_LEVEL_UNITS = {"square": float(MOMENTUM_LEVELS**2), "linear_square": float(2 * MOMENTUM_LEVELS**2)}


MOVEMENT_SLACK = 1 + 2**-12  # see quantize_momentum's movement rule
# Where a signed code dithers (optimizers.state_spec.StateSpec); the kernels' ROUNDING
# constexpr is the index.
MOMENTUM_ROUNDINGS = ("decay", "movement", "stochastic")


def _momentum_level(c: torch.Tensor, offset: int) -> torch.Tensor:
    return c * (offset + c)  # exact: integers below 2**15


def quantize_momentum(
    m: torch.Tensor,
    group_size: int,
    noise: torch.Tensor,
    forget,
    levels: str = "square",
    previous: torch.Tensor | None = None,
):
    """Signed 8-bit code c of ``m``, decoding to sign(c) * |c| * (offset + |c|) / units of
    the group scale (``levels``, see MOMENTUM_LEVEL_SETS).

    Values round to the nearest level, except where nearest rounding could undo the
    step: where the state's change in one step is under half the gap to the next level,
    nearest rounding could return it to the same level step after step (a decaying state
    would freeze, a state tracking a steady gradient would stick away from its average).
    There the level below or above is picked with ``noise`` (integers in [0, 65536), see
    :func:`dither`) with probabilities that make the decoded value unbiased; nearest
    rounding elsewhere halves the error variance that stochastic rounding adds. The
    change is bounded by one step of decay, ``forget`` (1 - beta) times the value (the
    decay rule; ``forget`` 0 dithers every value), or, given ``previous`` (the decoded
    state before the step), measured as |m - previous| (the movement rule; ``forget`` is
    then unused). A tiny group (even
    subnormal) is lifted by an exact power of two first (:func:`scale_lift`). Only exact
    float32 operations decide the code (the square root is corrected to the exact floor
    level), so every backend gives the same bits with a fast approximate root.
    """
    offset, units = _LEVEL_OFFSET[levels], _LEVEL_UNITS[levels]
    scale = group_scale(m.abs(), group_size)
    group_lift = scale_lift(scale)
    lift = per_element(group_lift, group_size, m.numel())
    # 1/scale and the units in one factor per group (its range allows it: the lift keeps
    # 1/scale below 2**70); the lift stays on the values, whose products it keeps normal.
    factor = _safe_reciprocal(scale * group_lift) * units
    factor = per_element(factor, group_size, m.numel())
    # fmin, as the kernels' minimum: a NaN value takes the top level, not a NaN code
    t = torch.fmin((m * lift).abs() * factor, torch.tensor(units))
    # low: the largest c with c * (offset + c) <= t, from the root of c**2 + offset c = t
    low = torch.floor((torch.sqrt(t * 4.0 + offset * offset) - offset) * 0.5)
    low = torch.where(_momentum_level(low, offset) > t, low - 1, low)
    low = torch.where(_momentum_level(low + 1, offset) <= t, low + 1, low)
    # Up with probability (t - level) / gap, or at noise = half range (nearest). The gap
    # is 2 * half_gap; both products stay below 2**24, so they are exact.
    half_gap = low + (offset + 1) * 0.5
    if previous is None:
        dithered = t * forget < half_gap
    else:
        # The slack (relative 2**-12, exact on half_gap) covers float32 rounding: a change
        # a hair over half a gap by this count, and under it by t's distance to the
        # level, would round back to the same level at every step, for good.
        change = ((m - previous).abs() * lift) * factor
        dithered = change < half_gap * MOVEMENT_SLACK
    threshold = torch.where(dithered, noise, DITHER_LEVELS // 2) * half_gap
    up = (t - _momentum_level(low, offset)) * (DITHER_LEVELS // 2) > threshold
    code = low + up.float()
    code = torch.where(torch.signbit(m), -code, code)  # m's sign bit, as the kernels' (NaN's too)
    return code.to(torch.int8), scale.to(torch.bfloat16)


def quantize_momentum_nearest(m: torch.Tensor, group_size: int, levels: str = "square"):
    """:func:`quantize_momentum` rounding every value to its nearest level (conversions)."""
    noise = torch.full_like(m, DITHER_LEVELS // 2)
    return quantize_momentum(m, group_size, noise, 1.0, levels)


def dequantize_momentum(
    code: torch.Tensor, scale: torch.Tensor, group_size: int, levels: str = "square"
):
    y = code.float()
    return (
        y
        * (y.abs() + _LEVEL_OFFSET[levels])
        * (1.0 / _LEVEL_UNITS[levels])
        * per_element(scale.float(), group_size, code.numel())
    )


# --------------------------------------------------------- variance (non-neg.)

# The code counts v's float32 bit pattern (a piecewise-linear log2) down from the group's
# top in steps of 2**shift: 2**(23 - shift) codes per binade. The top is the group's
# largest v rounded up to a multiple of 2**20 (an eighth of a binade); each group takes
# the finest shift whose 255 codes still reach its smallest non-zero v. The stored bf16
# scale holds both: the top in its exponent and first 3 mantissa bits, and
# VARIANCE_CODE_SHIFT - shift in its last 4 (docs/formats.md, "Second moment"). Before
# adaptive shifts the scale was a power of two: it reads as the same top and the
# coarsest shift, so those states decode as they always did.
VARIANCE_CODE_SHIFT = 20  # the coarsest shift: 8 codes per binade over 32 binades
FINEST_VARIANCE_SHIFT = 16  # 128 codes per binade over 2 binades; the dither's 16 bits
_TOP_MASK = 0x7FF00000  # exponent and the first 3 mantissa bits
_SHIFT_FIELD = 0xF  # the last 4 bf16 mantissa bits: VARIANCE_CODE_SHIFT - shift
_LOWEST_TOP = 1 << 23  # 2**-126, the scale of an all-zero or subnormal group
_HIGHEST_TOP = 0x7F700000  # the largest top below inf (1.875 * 2**127)
_UINT32 = 0xFFFFFFFF


def variance_top(v: torch.Tensor, group_size: int) -> torch.Tensor:
    """Per group (int32 float bits), the largest ``v`` rounded up to a multiple of 2**20
    (the coarsest code step), within [2**-126, 1.875 * 2**127]: a multiple of every finer
    step too, so code levels fall on every binade edge."""
    return top_of_largest(as_bits(_largest(group_view(v.abs(), group_size))))


def top_of_largest(largest: torch.Tensor) -> torch.Tensor:
    """variance_top from the bits of the group's largest |v|. A NaN (an all-NaN group) is
    capped at +Inf first: which NaN a max gives depends on the backend (torch's CPU amax
    0x7FC00000, the GPU's 0x7FFFFFFF, which would wrap when rounded up)."""
    step = 1 << VARIANCE_CODE_SHIFT
    capped = torch.clamp(largest, max=INF_BITS)
    return torch.clamp((capped + (step - 1)) & -step, _LOWEST_TOP, _HIGHEST_TOP)


def variance_shift(v: torch.Tensor, top: torch.Tensor, group_size: int) -> torch.Tensor:
    """Per group (int32), the finest code step 2**shift, shift in [16, 20], whose lowest
    code 1 still holds the group's smallest non-zero v after any rounding offset (at most
    2**shift - 1): ``top - bits(v_min) <= 254 * 2**shift``. An all-zero group takes 20.

    The smallest non-zero bits are the unsigned minimum of ``bits - 1``, plus one (0
    wraps to the largest unsigned value and drops out): integer operations, as in the
    kernels, whose int32 arithmetic ``wrap_int32`` reproduces.
    """
    below_one = (as_bits(group_view(v, group_size)).to(torch.int64) - 1) & _UINT32
    low = below_one.amin(dim=1)  # 2**32 - 1: every value is 0 (or padding)
    span = wrap_int32(top.to(torch.int64) - low - 1)  # top - bits(smallest non-zero v)
    shift = torch.full_like(span, FINEST_VARIANCE_SHIFT)
    for finer in range(FINEST_VARIANCE_SHIFT, VARIANCE_CODE_SHIFT):
        shift += (span > ((VARIANCE_LEVELS - 1) << finer)).to(torch.int32)
    return torch.where(low == _UINT32, VARIANCE_CODE_SHIFT, shift)


def variance_scale_parts(scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(top as int32 float bits, code shift) of stored bf16 variance scales."""
    bits = as_bits(scale.float())
    return bits & _TOP_MASK, VARIANCE_CODE_SHIFT - ((bits >> 16) & _SHIFT_FIELD)


def quantize_variance(v: torch.Tensor, group_size: int, noise: torch.Tensor | None = None):
    """Unsigned 8-bit logarithmic code of ``v`` >= 0 below the group's top.

    The code counts v's float32 bit pattern (a piecewise-linear log2) down from
    the top (:func:`variance_top`) in steps of 2**shift, the shift chosen per
    group (:func:`variance_shift`): from 128 codes per binade over 2 binades (a
    step of 1/128 of v's binade) for a narrow group to 8 per binade over 32
    binades (1/8) for a group whose values span more. The group's smallest
    non-zero v keeps a code >= 1 unless it lies more than 31.75 binades below the
    top; code 0 is exactly zero. ``noise`` (integers in [0, 65536)) rounds stochastically and
    without bias, which a second moment needs: with beta2 = 0.999 each step moves
    v by ~0.1%, less than half a code, so round-to-nearest would freeze it.
    ``noise=None`` rounds to nearest. Integer operations only: no root, no division.
    """
    top = variance_top(v, group_size)
    shift = variance_shift(v, top, group_size)
    coarsening = VARIANCE_CODE_SHIFT - shift  # the stored field
    shift_e = per_element(shift, group_size, v.numel())
    if noise is None:  # half a step
        offset = torch.ones_like(shift_e) << (shift_e - 1)
    else:  # the 16-bit dither scaled to the step: uniform in [0, 2**shift), shift >= 16
        offset = noise.to(torch.int32) << (shift_e - FINEST_VARIANCE_SHIFT)
    top_e = per_element(top, group_size, v.numel())
    below = (top_e - as_bits(v) + offset) >> shift_e
    code = torch.clamp(VARIANCE_LEVELS - below, 0, VARIANCE_LEVELS)
    scale = as_float(top | (coarsening << 16))
    return code.to(torch.uint8), scale.to(torch.bfloat16)


def dequantize_variance(code: torch.Tensor, scale: torch.Tensor, group_size: int):
    code = code.to(torch.int32)
    top, shift = (per_element(x, group_size, code.numel()) for x in variance_scale_parts(scale))
    bits = torch.clamp(top - ((VARIANCE_LEVELS - code) << shift), min=0)
    return torch.where(code > 0, as_float(bits.to(torch.int32)), 0.0)


def variance_floor(scale: torch.Tensor, group_size: int, numel: int) -> torch.Tensor:
    """Per-element floor for sqrt(v) in the update denominator (see DENOM_FLOOR), from the
    group's top (the scale without its shift field)."""
    top = as_float(variance_scale_parts(scale)[0])
    return per_element(sqrt_rn(top) * DENOM_FLOOR, group_size, numel)
