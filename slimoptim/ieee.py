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
