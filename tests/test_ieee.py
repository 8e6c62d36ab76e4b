"""ieee.fma_rn against exact rational arithmetic, and the kernels' tl.fma against it."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from slimoptim.ieee import fma_rn, sqrt_rn

try:
    import triton
    import triton.language as tl
except ImportError:  # the optional kernels' package
    triton = None


def _round_to_float32(value: Fraction) -> float:
    """The float32 nearest to ``value`` (ties to even), for values below float32's max."""
    guess = np.float32(float(value))
    down = np.nextafter(guess, np.float32(-np.inf))
    up = np.nextafter(guess, np.float32(np.inf))

    def key(candidate):
        distance = abs(Fraction(float(candidate)) - value)
        odd = int(np.array(candidate, dtype=np.float32).view(np.int32)) & 1
        return (distance, odd)

    return float(min((down, guess, up), key=key))


def _exact_fma(a, b, c) -> torch.Tensor:
    values = [
        _round_to_float32(Fraction(x) * Fraction(y) + Fraction(z))
        for x, y, z in zip(a.tolist(), b.tolist(), c.tolist(), strict=True)
    ]
    return torch.tensor(values, dtype=torch.float32)


def _same_bits(x: torch.Tensor, y: torch.Tensor) -> bool:
    return torch.equal(x.view(torch.int32), y.view(torch.int32))


def test_fma_rounds_once_on_random_and_wide_ranging_values():
    g = torch.Generator().manual_seed(torch.seed() % 2**31)
    n = 4000
    a = torch.randn(n, generator=g) * torch.exp2(torch.randint(-50, 50, (n,), generator=g).float())
    b = torch.randn(n, generator=g) * torch.exp2(torch.randint(-50, 50, (n,), generator=g).float())
    # addends from far below the product's last bit to far above it
    c = (
        (a * b)
        * torch.randn(n, generator=g)
        * torch.exp2(torch.randint(-70, 20, (n,), generator=g).float())
    )
    assert _same_bits(fma_rn(a, b, c), _exact_fma(a, b, c))


def test_fma_rounds_once_where_rounding_twice_would_not():
    # (1 + 2**-12)**2 = 1 + 2**-11 + 2**-24: a float32 midpoint, exact in float64. A tiny
    # addend decides the direction; the float64 sum rounded to nearest would lose it and
    # then round the midpoint to even.
    a = torch.full((6,), 1 + 2.0**-12)
    c = torch.tensor([2.0**-80, -(2.0**-80), 0.0, 2.0**-149, -(2.0**-149), 2.0**-60])
    for sign in (1.0, -1.0):
        result = fma_rn(a * sign, a, c * sign)
        assert _same_bits(result, _exact_fma(a * sign, a, c * sign))
        naive = (a.double() * sign * a.double() + (c * sign).double()).float()
        assert not _same_bits(naive, result)  # the case this function exists for


def test_fma_of_subnormal_results_and_specials():
    a = torch.tensor([2.0**-70, 3.0 * 2.0**-75, 2.0**100, float("inf"), 0.0, -0.0, 1.0])
    b = torch.tensor([2.0**-70, 2.0**-75, 2.0**100, 1.0, float("inf"), 1.0, float("nan")])
    c = torch.tensor([2.0**-149, -(2.0**-140), 1.0, 1.0, 0.0, -0.0, 1.0])
    result = fma_rn(a, b, c)
    assert _same_bits(result[:2], _exact_fma(a[:2], b[:2], c[:2]))  # subnormal results
    assert result[2] == float("inf") and result[3] == float("inf")
    assert torch.isnan(result[4]) and torch.isnan(result[6])  # 0 * inf, NaN
    assert result[5] == 0 and torch.signbit(result[5])  # -0 * 1 + -0 is -0


def test_fma_reads_python_numbers_as_float32():
    x = torch.randn(257)
    # 0.1 is not a float32: the kernels multiply by its float32 value
    assert _same_bits(fma_rn(x, 0.1, 1.0), fma_rn(x, torch.tensor(0.1), torch.tensor(1.0)))


def _float32s(limit: float):
    return st.floats(width=32, allow_nan=False, min_value=-limit, max_value=limit)


@settings(max_examples=300, deadline=None)
@given(_float32s(2.0**50), _float32s(2.0**50), _float32s(2.0**100))
def test_fma_matches_exact_rounding(a, b, c):
    ta, tb, tc = (torch.tensor([v], dtype=torch.float32) for v in (a, b, c))
    result = fma_rn(ta, tb, tc)
    expected = _exact_fma(ta, tb, tc)
    if expected.item() == 0:  # the sign of an exact zero: IEEE's rule
        assert result.item() == 0
    else:
        assert _same_bits(result, expected)


def test_sqrt_is_correctly_rounded():
    x = torch.rand(2000) * torch.exp2(torch.randint(-140, 120, (2000,)).float())
    root = sqrt_rn(x)
    for value, r in zip(x.tolist(), root.tolist(), strict=True):
        # r is the nearest float32 to sqrt(value): its neighbours' midpoints bracket it
        below = Fraction(float(np.nextafter(np.float32(r), np.float32(0))))
        above = Fraction(float(np.nextafter(np.float32(r), np.float32(np.inf))))
        low, high = (below + Fraction(r)) / 2, (Fraction(r) + above) / 2
        assert low**2 <= Fraction(value) <= high**2


if triton is not None:

    @triton.jit
    def _fma_kernel(a_ptr, b_ptr, c_ptr, out_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        a = tl.load(a_ptr + offs, mask=mask)
        b = tl.load(b_ptr + offs, mask=mask)
        c = tl.load(c_ptr + offs, mask=mask)
        tl.store(out_ptr + offs, tl.fma(a, b, c), mask=mask)


@pytest.mark.skipif(triton is None, reason="Triton is not installed")
def test_triton_fma_rounds_as_the_reference():
    """The kernels' tl.fma (the interpreter's here, conftest.py; the GPU's in the GPU run)
    rounds as fma_rn."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    n = 4096
    a = torch.randn(n, device=device) * 3
    b = torch.randn(n, device=device)
    c = -(a * b) * (1 + torch.randn(n, device=device) * 2.0**-20)  # heavy cancellation
    c[: n // 2] = torch.randn(n // 2, device=device)
    out = torch.empty_like(a)
    _fma_kernel[(triton.cdiv(n, 256),)](a, b, c, out, n, BLOCK=256)
    assert _same_bits(out.cpu(), fma_rn(a.cpu(), b.cpu(), c.cpu()))


def test_fma_reads_a_zero_dim_float64_operand_as_float32():
    x, y = torch.randn(1000), torch.randn(1000)
    lr = torch.tensor(0.1, dtype=torch.float64)  # torch computes x * lr in float32
    once = fma_rn(x, lr, y)
    assert once.dtype == torch.float32
    assert _same_bits(once, fma_rn(x, torch.tensor(0.1), y))
    assert _same_bits(once, _exact_fma(x, torch.full_like(x, 0.1), y))
    # float64 tensors with dimensions (float64 params) stay float64
    wide = fma_rn(x.double(), lr, y.double())
    assert wide.dtype == torch.float64
    assert torch.equal(wide, x.double() * lr + y.double())
    assert fma_rn(1.5, 2.0, 0.25).item() == 3.25  # numbers alone
