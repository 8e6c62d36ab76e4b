"""The Triton momentum code (kernels/formats.py) against formats.py, bit for bit.

The kernel finds a value's level from an approximate root and one upward fix-up, the
reference from an exact root corrected both ways: they must agree on every value,
above all on values whose scaled magnitude lies exactly on a level or one float32 step
to either side of it. Without a GPU the kernel runs in Triton's interpreter (conftest.py
sets TRITON_INTERPRET=1), whose root is exact; on a GPU as compiled CUDA, whose root is
the approximate one, which is what this test exists for.
"""

from __future__ import annotations

import random

import pytest
import torch

from slimoptim import formats

pytest.importorskip("triton")
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from slimoptim.kernels import formats as kf  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
GROUP = 32
ROWS = 4


@triton.jit
def _quantize_kernel(
    m_ptr, previous_ptr, noise_ptr, code_ptr, scale_ptr, decoded_ptr, forget, numel,
    G: tl.constexpr, ROWS: tl.constexpr, LEVELS: tl.constexpr, BY_MOVEMENT: tl.constexpr,
):  # fmt: skip
    groups = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    offs = groups[:, None] * G + tl.arange(0, G)[None, :]
    mask = offs < numel
    m = tl.load(m_ptr + offs, mask=mask, other=0.0)
    previous = tl.load(previous_ptr + offs, mask=mask, other=0.0)
    noise = tl.load(noise_ptr + offs, mask=mask, other=0.0)
    code, scale = kf.quantize_momentum(m, mask, noise, forget, previous, LEVELS, BY_MOVEMENT)
    tl.store(code_ptr + offs, code, mask)
    tl.store(scale_ptr + groups, kf.float_to_bf16_bits(scale), groups * G < numel)
    tl.store(decoded_ptr + offs, kf.dequantize_momentum(code, scale, LEVELS), mask)


def boundary_groups(levels: str, gen: torch.Generator) -> torch.Tensor:
    """Groups whose scale is a random power of two and whose other values sit on every
    level's boundary, one and two float32 steps either side, with either sign."""
    units = formats._LEVEL_UNITS[levels]
    offset = formats._LEVEL_OFFSET[levels]
    q = torch.arange(formats.MOMENTUM_LEVELS + 1, dtype=torch.float64)
    on_level = (q * (offset + q) / units).float()
    candidates = torch.cat([on_level + k * on_level.abs() * 2.0**-23 for k in (-2, -1, 0, 1, 2)])
    candidates = candidates[(candidates > 0) & (candidates <= 1)]
    candidates = candidates[torch.randperm(len(candidates), generator=gen)]
    per_group = GROUP - 1
    n_groups = -(-len(candidates) // per_group)
    padded = torch.cat([candidates, torch.rand(n_groups * per_group - len(candidates))])
    values = padded.view(n_groups, per_group)
    signs = torch.where(torch.rand(values.shape, generator=gen) < 0.5, -1.0, 1.0)
    scales = 2.0 ** torch.randint(-40, 20, (n_groups, 1), generator=gen).float()
    groups = torch.cat([torch.ones(n_groups, 1), values * signs], dim=1) * scales
    heavy = torch.randn(8, GROUP, generator=gen) ** 5  # and some heavy-tailed groups
    return torch.cat([groups.reshape(-1), heavy.reshape(-1), torch.randn(GROUP - 5)])


@pytest.mark.parametrize("levels", formats.MOMENTUM_LEVEL_SETS)
@pytest.mark.parametrize("rule", ["nearest", "decay", "movement"])
def test_kernel_momentum_code_matches_the_reference_bit_for_bit(levels, rule):
    gen = torch.Generator().manual_seed(random.randrange(2**31))
    m = boundary_groups(levels, gen)
    n = m.numel()
    # Every level boundary is hit exactly by some value (the test's point).
    units = formats._LEVEL_UNITS[levels]
    offset = formats._LEVEL_OFFSET[levels]
    scale = formats.group_scale(m.abs(), GROUP)
    t = (m * formats.per_element(1 / scale, GROUP, n)).abs() * units
    q = torch.arange(1, formats.MOMENTUM_LEVELS + 1).float()
    hit = torch.isin(q * (offset + q), t)
    assert hit.float().mean() > 0.9, "too few values exactly on a level"

    noise = torch.randint(0, formats.DITHER_LEVELS, (n,), generator=gen).float()
    # The extreme dithers too: at 0 a value a hair above a level rounds up, so a level
    # found one too low would show.
    extreme = torch.rand(n, generator=gen)
    noise[extreme < 0.2] = 0.0
    noise[extreme > 0.9] = formats.DITHER_LEVELS - 1
    previous = m + torch.randn(n, generator=gen) * m.abs() * 0.01
    forget = 0.1
    if rule == "nearest":
        noise = torch.full((n,), formats.DITHER_LEVELS // 2, dtype=torch.float32)
    by_movement = rule == "movement"
    code, scale = formats.quantize_momentum(
        m, GROUP, noise, forget, levels, previous if by_movement else None
    )
    decoded = formats.dequantize_momentum(code, scale, GROUP, levels)

    k_code = torch.empty(n, dtype=torch.int8, device=DEVICE)
    k_scale = torch.empty(formats.num_groups(n, GROUP), dtype=torch.int16, device=DEVICE)
    k_decoded = torch.empty(n, dtype=torch.float32, device=DEVICE)
    grid = (triton.cdiv(formats.num_groups(n, GROUP), ROWS),)
    _quantize_kernel[grid](
        m.to(DEVICE), previous.to(DEVICE), noise.to(DEVICE), k_code, k_scale, k_decoded,
        forget, n, G=GROUP, ROWS=ROWS, LEVELS=formats.MOMENTUM_LEVEL_SETS.index(levels),
        BY_MOVEMENT=by_movement, enable_fp_fusion=False,
    )  # fmt: skip
    assert torch.equal(k_code.cpu(), code)
    assert torch.equal(k_scale.cpu(), scale.view(torch.int16))
    assert torch.equal(k_decoded.cpu().view(torch.int32), decoded.view(torch.int32))
