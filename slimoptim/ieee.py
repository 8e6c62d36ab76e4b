"""float32 operations with the same bits on every backend.

The reference update rules and formats use them where a plain torch expression would
round differently from the kernels: a square root (torch's vectorised CPU root is not
always correctly rounded), a fused multiply-add (one rounding of ``a * b + c``; the
GPU does it in one instruction, torch has no float32 fma of its own), and rounding to
bf16/fp16 through integer bits (Triton's interpreter truncates float32 -> bf16 casts,
and the backends' casts make different NaNs).
"""

from __future__ import annotations

import torch

BF16_NAN_BITS = 0x7FFF  # the canonical bf16 NaN (CUDA's, and its round-to-nearest convert's)
FP16_NAN_BITS = 0x7FFF  # the canonical fp16 NaN, likewise
BF16_MAX_BITS = 0x7F7F0000  # float32 bits of the largest finite bf16
INF_BITS = 0x7F800000  # float32 bits of +inf; every positive NaN's are above them


def sqrt_rn(x: torch.Tensor) -> torch.Tensor:
    """Correctly rounded float32 square root on every backend.

    torch's vectorised float32 sqrt on AVX-512 CPUs is not correctly rounded
    (about 1 element in 5 is off by one ulp); the float64 root rounded to
    float32 is, because a float32 root never lies within a float64 ulp of a
    float32 rounding boundary. The kernels use the IEEE ``sqrt_rn``.
    """
    return torch.sqrt(x.double()).float()


def _float64(x) -> torch.Tensor:
    """An operand of float32 arithmetic, rounded to float32 as torch reads it (a Python
    number, a 0-dim float64 tensor), in float64."""
    if isinstance(x, torch.Tensor):
        return x.float().double()
    return torch.tensor(x, dtype=torch.float32).double()


def _float64_arithmetic(*operands) -> bool:
    """Whether torch computes in float64 on these operands: a float64 tensor with
    dimensions is among them (0-dim tensors take the dimensioned ones' dtype, as in
    ``g * torch.tensor(0.1, dtype=torch.float64)``, which is float32)."""
    tensors = [x for x in operands if isinstance(x, torch.Tensor)]
    deciding = [x for x in tensors if x.dim() > 0] or tensors
    return any(x.dtype == torch.float64 for x in deciding)


def fma_rn(a, b, c) -> torch.Tensor:
    """float32 ``a * b + c`` rounded once (to nearest, ties to even), as the GPU's fma.

    The product of two float32 values is exact in float64; the float64 sum is rounded to
    odd (its error, from Knuth's two-sum, is exact: where the sum was inexact and its last
    bit is even, it moves one float64 step towards the exact value), and a value rounded
    to odd with at least two more bits than float32 rounds to float32 as the exact value
    would. Rounding the float64 sum to nearest instead could round twice: ``a * b`` on a
    float32 midpoint plus a tiny ``c`` would land on the midpoint and then go to even.
    Infinities and NaN pass through the float64 arithmetic unchanged. Where torch itself
    would compute in float64 (float64 params, which no kernel steps) it is ``a * b + c``
    in float64; a 0-dim float64 operand of float32 tensors (a float64 tensor lr) is read
    as float32, as the kernels read it.
    """
    if _float64_arithmetic(a, b, c):
        return a * b + c
    product = _float64(a) * _float64(b)
    addend = _float64(c)
    total = product + addend
    # two-sum: product + addend == total + error exactly (no overflow: |a * b| < 2**256)
    addend_part = total - product
    error = (product - (total - addend_part)).add_(addend - addend_part)
    # +1 where the exact value lies farther from zero than the sum, -1 nearer, 0 where the
    # sum is exact, infinite or NaN (a zero sum is exact: two finite float32 products and
    # values never cancel to below float64's smallest step)
    towards_exact = torch.sign(error).mul_(torch.sign(total)).nan_to_num_(0).to(torch.int64)
    bits = total.view(torch.int64)  # a float's magnitude grows with its bits, either sign
    bits.add_(towards_exact.mul_(1 - (bits & 1)))  # only an even last bit moves: to odd
    return total.float()


# ------------------------------------------------ bits and low-precision rounding


def as_bits(x: torch.Tensor) -> torch.Tensor:
    """float32 values as their int32 bit patterns."""
    return x.contiguous().view(torch.int32)


def as_float(bits: torch.Tensor) -> torch.Tensor:
    """int32 bit patterns as float32 values."""
    return bits.view(torch.float32)


def round_to_bf16(x: torch.Tensor) -> torch.Tensor:
    """Round float32 to the nearest bf16 (ties to even); result kept in float32.

    Done with integer arithmetic because Triton's CPU interpreter truncates
    float32 -> bf16 casts; this way every backend gives the same bits.
    """
    u = as_bits(x)
    lsb = (u >> 16) & 1
    rounded = (u + 0x7FFF + lsb) & -65536
    # Every NaN becomes bf16's canonical NaN, as the GPU's convert makes it.
    return as_float(torch.where(torch.isnan(x), BF16_NAN_BITS << 16, rounded))


def as_low_precision(b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A ``dtype`` value ``b`` (float32, from round_to_dtype) as a ``dtype`` tensor. bf16
    goes by its top bits, so a NaN stays the canonical 0x7FFF round_to_bf16 made it
    (torch's own cast would make it 0x7FC0, or keep its sign, on the CPU)."""
    if dtype == torch.float16:  # a NaN as the GPU's convert makes it, whatever its sign
        bits = b.to(torch.float16).view(torch.int16)
        return torch.where(torch.isnan(b), FP16_NAN_BITS, bits).view(torch.float16)
    if dtype != torch.bfloat16:
        return b.to(dtype)
    return (as_bits(b) >> 16).to(torch.int16).view(torch.bfloat16)


def round_to_dtype(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Round float32 ``x`` to nearest ``dtype`` value, returned as float32."""
    if dtype == torch.bfloat16:
        return round_to_bf16(x)
    if dtype == torch.float16:
        return x.to(torch.float16).float()
    return x


def round_up_to_bf16(x: torch.Tensor) -> torch.Tensor:
    """Smallest bf16 value >= x for x >= 0, capped at the largest finite bf16, as is a
    positive NaN of any payload: which NaN a group's max gives depends on the backend
    (torch's CPU amax 0x7FC00000, the GPU's 0x7FFFFFFF, which would wrap to -0)."""
    capped = torch.clamp(as_bits(x), max=BF16_MAX_BITS)
    return as_float((capped + 0xFFFF) & -65536)


def wrap_int32(x: torch.Tensor) -> torch.Tensor:
    """int64 -> int32 with two's-complement wrap-around, as the kernels' int32 arithmetic."""
    return (((x + 2**31) & 0xFFFFFFFF) - 2**31).to(torch.int32)
