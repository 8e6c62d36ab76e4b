"""float32 operations rounded once, with the same bits on every backend.

The reference update rules and formats use them where a plain torch expression would
round differently from the kernels: a square root (torch's vectorised CPU root is not
always correctly rounded) and a fused multiply-add (one rounding of ``a * b + c``; the
GPU does it in one instruction, torch has no float32 fma of its own).
"""

from __future__ import annotations

import torch


def sqrt_rn(x: torch.Tensor) -> torch.Tensor:
    """Correctly rounded float32 square root on every backend.

    torch's vectorised float32 sqrt on AVX-512 CPUs is not correctly rounded
    (about 1 element in 5 is off by one ulp); the float64 root rounded to
    float32 is, because a float32 root never lies within a float64 ulp of a
    float32 rounding boundary. The kernels use the IEEE ``sqrt_rn``.
    """
    return torch.sqrt(x.double()).float()


def _float64(x) -> torch.Tensor | float:
    """A float32 tensor or a Python number (rounded to float32 first, as torch's float32
    arithmetic reads it) in float64."""
    if isinstance(x, torch.Tensor):
        return x.float().double()
    return float(torch.tensor(x, dtype=torch.float32))


def fma_rn(a, b, c) -> torch.Tensor:
    """float32 ``a * b + c`` rounded once (to nearest, ties to even), as the GPU's fma.

    The product of two float32 values is exact in float64; the float64 sum is rounded to
    odd (its error, from Knuth's two-sum, is exact: where the sum was inexact and its last
    bit is even, it moves one float64 step towards the exact value), and a value rounded
    to odd with at least two more bits than float32 rounds to float32 as the exact value
    would. Rounding the float64 sum to nearest instead could round twice: ``a * b`` on a
    float32 midpoint plus a tiny ``c`` would land on the midpoint and then go to even.
    Infinities and NaN pass through the float64 arithmetic unchanged. With a float64
    tensor among the operands (float64 params, which no kernel steps) it is ``a * b + c``
    in float64.
    """
    if any(isinstance(x, torch.Tensor) and x.dtype == torch.float64 for x in (a, b, c)):
        return a * b + c
    product = _float64(a) * _float64(b)
    addend = _float64(c)
    total = product + addend
    # two-sum: product + addend == total + error exactly (no overflow: |a * b| < 2**256)
    addend_part = total - product
    error = (product - (total - addend_part)) + (addend - addend_part)
    bits = total.view(torch.int64)
    even_and_inexact = (error != 0) & ((bits & 1) == 0) & torch.isfinite(total)
    # one step away from zero where the error has the sum's sign, towards zero otherwise
    # (a zero sum is exact: two finite float32 products and values never cancel to below
    # float64's smallest step)
    away = (error > 0) == (total > 0)
    bits = bits + torch.where(even_and_inexact, torch.where(away, 1, -1), 0)
    return bits.view(torch.float64).float()
