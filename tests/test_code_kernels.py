"""The Triton state codes (kernels/formats.py) against formats.py, bit for bit.

Second moment: a small kernel quantizes arbitrary tiles with
``kernels.formats.quantize_variance`` and decodes them again, so the groups can be built
bit by bit: heavy-tailed groups, spans exactly on each shift boundary and one bit past it,
all-zero, subnormal and saturating groups, a partial last group.

Momentum: the kernel finds a value's level from an approximate root and one upward
fix-up, the reference from an exact root corrected both ways: they must agree on every
value, above all on values whose scaled magnitude lies exactly on a level or one float32
step to either side of it (on a GPU the root is the approximate one, which is what that
test exists for; the interpreter's is exact).

Without a GPU the kernels run in Triton's interpreter (conftest.py sets TRITON_INTERPRET=1);
on a GPU as compiled CUDA.
"""

from __future__ import annotations

import random

import pytest
import torch

import slimoptim
from slimoptim import formats, ieee

pytest.importorskip("triton")
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from slimoptim.kernels import formats as kf  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
GROUP = 32
ROWS = 4


@triton.jit
def _round_trip_kernel(
    v_ptr, noise_ptr, code_ptr, scale_ptr, decoded_ptr, floor_ptr, numel,
    G: tl.constexpr, ROWS: tl.constexpr,
):  # fmt: skip
    groups = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    offs = groups[:, None] * G + tl.arange(0, G)[None, :]
    mask = offs < numel
    group_mask = groups * G < numel
    v = tl.load(v_ptr + offs, mask=mask, other=0.0)
    noise = tl.load(noise_ptr + offs, mask=mask, other=0)
    code, scale = kf.quantize_variance(v, mask, noise)
    tl.store(code_ptr + offs, code, mask)
    tl.store(scale_ptr + groups, kf.float_to_bf16_bits(scale), group_mask)
    tl.store(decoded_ptr + offs, kf.dequantize_variance(code, scale), mask)
    tl.store(floor_ptr + groups, kf.variance_floor(scale), group_mask)


def kernel_round_trip(v: torch.Tensor, noise: torch.Tensor):
    """(codes, bf16 scales, decoded v, per-group floor) from the Triton helpers; ``noise``
    holds the reference's dither integers, or None for round-to-nearest (a dither of
    32768 is half a step at every shift)."""
    n = v.numel()
    groups = formats.num_groups(n, GROUP)
    offset = torch.full((n,), 32768) if noise is None else noise.long()
    code = torch.empty(n, dtype=torch.uint8, device=DEVICE)
    scale = torch.empty(groups, dtype=torch.int16, device=DEVICE)
    decoded = torch.empty(n, dtype=torch.float32, device=DEVICE)
    floor = torch.empty(groups, dtype=torch.float32, device=DEVICE)
    grid = (triton.cdiv(groups, ROWS),)
    _round_trip_kernel[grid](
        v.to(DEVICE), offset.to(torch.int32).to(DEVICE), code, scale, decoded, floor, n,
        G=GROUP, ROWS=ROWS,
    )  # fmt: skip
    return code, scale.view(torch.bfloat16), decoded, floor


def hard_groups(gen: torch.Generator) -> torch.Tensor:
    """Groups that stress the code, each 32 values; the last group left partial."""
    out = []
    for shift in range(formats.FINEST_VARIANCE_SHIFT, formats.VARIANCE_CODE_SHIFT + 1):
        for extra in (0, 1):  # exactly on the boundary, one bit past it
            top = (random.randrange(60, 200) << 23) | (random.randrange(8) << 20)
            span = ((formats.VARIANCE_LEVELS - 1) << shift) + extra
            bits = torch.randint(top - span, top + 1, (GROUP,), generator=gen)
            bits[0], bits[1], bits[2] = top, top - span, 0
            out.append(bits.to(torch.int32).view(torch.float32))
    for binades in (1, 3, 7, 15, 31, 60):  # heavy tails, up to far beyond the code's range
        exponent = -torch.rand(GROUP, generator=gen) * binades
        out.append((2.0 ** (exponent + random.randrange(-100, 100))).float())
    out.append(torch.zeros(GROUP))
    out.append(torch.rand(GROUP, generator=gen) * 2.0**-135)  # subnormal
    mixed = torch.rand(GROUP, generator=gen) * 2.0**-120
    mixed[::3] = 0.0
    out.append(mixed)  # normal and subnormal values, and zeros
    out.append(torch.tensor([float("inf")] + [3.0e38] * (GROUP - 1)))  # saturated
    out.append(torch.rand(GROUP - 7, generator=gen) ** 8)  # partial last group
    return torch.cat(out)


@pytest.mark.parametrize("nearest", [False, True], ids=["dithered", "nearest"])
def test_kernel_variance_code_matches_the_reference_bit_for_bit(nearest):
    gen = torch.Generator().manual_seed(random.randrange(2**31))
    v = hard_groups(gen)
    noise = None if nearest else torch.randint(0, 65536, v.shape, generator=gen).float()
    code, scale = formats.quantize_variance(v, GROUP, noise)
    decoded = formats.dequantize_variance(code, scale, GROUP)
    floor = formats.variance_floor(scale, GROUP, v.numel())[::GROUP]
    k_code, k_scale, k_decoded, k_floor = (x.cpu() for x in kernel_round_trip(v, noise))
    shifts = formats.variance_scale_parts(scale)[1]
    assert len(set(shifts.tolist())) == 5, "every shift should occur"
    assert torch.equal(k_code, code)
    assert torch.equal(k_scale.view(torch.int16), scale.view(torch.int16))
    assert torch.equal(k_decoded.view(torch.int32), decoded.view(torch.int32))
    assert torch.equal(k_floor.view(torch.int32), floor.view(torch.int32))


def test_fused_step_from_old_power_of_two_scales_matches_the_reference():
    """A state written before adaptive shifts (power-of-two scales, random codes) steps
    identically in the kernel and the reference, which decode it as before."""
    gen = torch.Generator().manual_seed(random.randrange(2**31))
    n = 4 * GROUP + 5
    start = torch.randn(n, generator=gen)
    params = [torch.nn.Parameter(start.clone().to(DEVICE)) for _ in range(2)]
    opts = [
        slimoptim.AdamW([p], lr=1e-3, fused=fused)
        for p, fused in zip(params, (True, False), strict=True)
    ]
    code = torch.randint(1, 256, (n,), generator=gen, dtype=torch.uint8)
    exponent = torch.randint(100, 130, (formats.num_groups(n, GROUP),), generator=gen)
    scale = (exponent.to(torch.int32) << 23).view(torch.float32).to(torch.bfloat16)
    grads = [torch.randn(n, generator=gen) * 1e-2 for _ in range(2)]
    for opt, p in zip(opts, params, strict=True):
        p.grad = grads[0].to(DEVICE)
        opt.step()  # creates the states
        opt.state[p]["exp_avg_sq"].copy_(code)
        opt.state[p]["exp_avg_sq_scale"].copy_(scale)
        p.grad = grads[1].to(DEVICE)
        opt.step()
    assert opts[0].__dict__.get("_slimoptim_plans"), "the fused path did not run"
    assert torch.equal(params[0].view(torch.int32), params[1].view(torch.int32))
    for key, value in opts[1].state[params[1]].items():
        a, b = opts[0].state[params[0]][key].reshape(-1), value.reshape(-1)
        assert torch.equal(a.view(torch.uint8), b.view(torch.uint8)), key


# the interpreter (numpy) warns of the NaN arithmetic these tests are about
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_kernel_variance_code_of_non_finite_states_matches_the_reference():
    """A second moment turns ±inf, then NaN, once a param has (coupled decay of an inf
    weight): the group's top passes NaN over, as the kernels' float max does, and a group
    of NaN alone gets the highest top whatever NaN its max is, so the bits stay equal."""
    gen = torch.Generator().manual_seed(random.randrange(2**31))
    groups = torch.rand(7, GROUP, generator=gen) * 10.0 ** torch.randint(-30, 38, (7, 1))
    groups[0, 3] = float("nan")
    groups[1, 7], groups[1, 9] = -float("nan"), float("inf")
    groups[2, :] = float("nan")
    groups[3, :] = -float("nan")  # x86's default NaN has its sign bit set
    groups[4, 0] = float("inf")
    groups[5, :] = _nan_payloads(GROUP, gen)
    groups[6, :] = _GPU_NAN  # the NaN the GPU's float max of NaNs gives
    v = groups.reshape(-1)
    noise = torch.randint(0, 65536, v.shape, generator=gen).float()
    code, scale = formats.quantize_variance(v, GROUP, noise)
    k_code, k_scale, _, _ = (x.cpu() for x in kernel_round_trip(v, noise))
    assert torch.equal(k_scale.view(torch.int16), scale.view(torch.int16))
    assert torch.equal(k_code, code)
    assert torch.isfinite(scale.float()).all()
    top, _ = formats.variance_scale_parts(scale)
    assert (top[1:] == formats._HIGHEST_TOP).all()  # inf or NaN: the highest top


_GPU_NAN = torch.tensor([0x7FFFFFFF], dtype=torch.int32).view(torch.float32)


def test_group_rounding_of_any_nan_is_the_largest_value():
    """Every positive NaN bit pattern (the max of an all-NaN group, whichever NaN the
    backend's max gives) rounds up to the largest bf16 scale and to the highest variance
    top, in the reference and in the kernels' mirror; finite values and +inf as before."""
    nans = torch.arange(0x7F800001, 0x80000000, 4097, dtype=torch.int64)
    nans = torch.cat([nans, torch.tensor([0x7FC00000, 0x7FFF0001, 0x7FFFFFFF])])
    finite = torch.randint(0, 0x7F800000, (4096,), dtype=torch.int64)
    edges = torch.tensor([0, 1, 0x7F7F0000, 0x7F7F0001, 0x7F7FFFFF, 0x7F800000])
    bits = torch.cat([nans, finite, edges]).to(torch.int32)
    scale = ieee.as_bits(ieee.round_up_to_bf16(bits.view(torch.float32)))
    top = formats.top_of_largest(bits)
    is_nan = bits > 0x7F800000
    assert (scale[is_nan] == ieee.BF16_MAX_BITS).all()
    assert (top[is_nan] == formats._HIGHEST_TOP).all()
    # the rest: the smallest bf16 >= x (capped), and a multiple of the top's step >= x
    x, up = bits[~is_nan].double(), scale[~is_nan]
    assert ((up & 0xFFFF) == 0).all() and (up <= ieee.BF16_MAX_BITS).all()
    assert ((up >= x) | (up == ieee.BF16_MAX_BITS)).all() and ((up - x) < 65536).all()
    step = 1 << formats.VARIANCE_CODE_SHIFT
    t = top[~is_nan]
    assert ((t % step) == 0).all() and ((t >= x) | (t == formats._HIGHEST_TOP)).all()
    k_scale = _kernel_round_up(bits.view(torch.float32))
    assert torch.equal(k_scale.cpu(), scale)


@triton.jit
def _round_up_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs, mask=offs < n)
    tl.store(out_ptr + offs, kf.as_bits(kf.round_up_to_bf16(x)), offs < n)


def _kernel_round_up(x: torch.Tensor) -> torch.Tensor:
    out = torch.empty(x.numel(), dtype=torch.int32, device=DEVICE)
    _round_up_kernel[(triton.cdiv(x.numel(), 1024),)](x.to(DEVICE), out, x.numel(), BLOCK=1024)
    return out


def _nan_payloads(n, gen):
    """n NaNs of either sign with random payloads, among them the GPU's canonical NaN
    (0x7FFFFFFF, what its float max of NaNs gives), which must decide nothing either."""
    bits = torch.randint(0x7F800001, 0x80000000, (n,), generator=gen, dtype=torch.int64)
    bits[0] = 0x7FFFFFFF
    bits[1::2] |= 1 << 31  # negative NaNs
    return ((bits + 2**31) % 2**32 - 2**31).to(torch.int32).view(torch.float32)


# ---------------------------------------------------------------- momentum


@triton.jit
def _quantize_kernel(
    m_ptr, previous_ptr, noise_ptr, code_ptr, scale_ptr, decoded_ptr, forget, numel,
    G: tl.constexpr, ROWS: tl.constexpr, LEVELS: tl.constexpr, ROUNDING: tl.constexpr,
):  # fmt: skip
    groups = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    offs = groups[:, None] * G + tl.arange(0, G)[None, :]
    mask = offs < numel
    m = tl.load(m_ptr + offs, mask=mask, other=0.0)
    previous = tl.load(previous_ptr + offs, mask=mask, other=0.0)
    noise = tl.load(noise_ptr + offs, mask=mask, other=0.0)
    code, scale = kf.quantize_momentum(m, mask, noise, forget, previous, LEVELS, ROUNDING)
    tl.store(code_ptr + offs, code, mask)
    tl.store(scale_ptr + groups, kf.float_to_bf16_bits(scale), groups * G < numel)
    tl.store(decoded_ptr + offs, kf.dequantize_momentum(code, scale, LEVELS), mask)


def kernel_momentum_code(m, previous, noise, forget, levels: str, rounding: int):
    """(int8 codes, bf16 scale bits, decoded values) of ``m`` from the Triton helpers."""
    n = m.numel()
    code = torch.empty(n, dtype=torch.int8, device=DEVICE)
    scale = torch.empty(formats.num_groups(n, GROUP), dtype=torch.int16, device=DEVICE)
    decoded = torch.empty(n, dtype=torch.float32, device=DEVICE)
    grid = (triton.cdiv(formats.num_groups(n, GROUP), ROWS),)
    _quantize_kernel[grid](
        m.to(DEVICE), previous.to(DEVICE), noise.to(DEVICE), code, scale, decoded,
        forget, n, G=GROUP, ROWS=ROWS, LEVELS=formats.MOMENTUM_LEVEL_SETS.index(levels),
        ROUNDING=rounding, enable_fp_fusion=False,
    )  # fmt: skip
    return code, scale, decoded


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
@pytest.mark.parametrize("rule", ["nearest", "decay", "movement", "stochastic"])
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
    forget = 0.0 if rule == "stochastic" else 0.1
    if rule == "nearest":
        noise = torch.full((n,), formats.DITHER_LEVELS // 2, dtype=torch.float32)
    by_movement = rule == "movement"
    rounding = formats.MOMENTUM_ROUNDINGS.index("decay" if rule == "nearest" else rule)
    code, scale = formats.quantize_momentum(
        m, GROUP, noise, forget, levels, previous if by_movement else None
    )
    decoded = formats.dequantize_momentum(code, scale, GROUP, levels)

    k_code, k_scale, k_decoded = kernel_momentum_code(m, previous, noise, forget, levels, rounding)
    assert torch.equal(k_code.cpu(), code)
    assert torch.equal(k_scale.cpu(), scale.view(torch.int16))
    assert torch.equal(k_decoded.cpu().view(torch.int32), decoded.view(torch.int32))


def decay_boundary_groups(levels: str, forget: float) -> torch.Tensor:
    """Groups of scale 1 whose values put ``t * forget`` exactly on, and 1-3 float32 steps
    either side of, half the gap above their level: where the decay rule switches between
    nearest and dithered rounding (the kernel compares scaled copies of both sides)."""
    units = formats._LEVEL_UNITS[levels]
    offset = formats._LEVEL_OFFSET[levels]
    values = []
    for c in range(formats.MOMENTUM_LEVELS):
        t = torch.tensor((c + (offset + 1) / 2) / forget, dtype=torch.float32)
        if not c * (offset + c) <= t.item() < (c + 1) * (offset + c + 1):
            continue  # that t lies at another level
        for step in range(-3, 4):
            target = (t.view(torch.int32) + step).view(torch.float32)
            m = (target / units).view(torch.int32)
            for nudge in range(-4, 5):  # a value whose t is exactly the target
                candidate = (m + nudge).view(torch.float32)
                if (candidate * units).float() == target and 0 < candidate < 1:
                    values.append(candidate.item())
                    break
    x = torch.tensor(values)
    per_group = GROUP - 1
    x = torch.cat([x, torch.full((-len(x) % per_group,), 0.25)]).view(-1, per_group)
    return torch.cat([torch.ones(len(x), 1), x], dim=1).reshape(-1)  # each group's max 1


@pytest.mark.parametrize("levels", formats.MOMENTUM_LEVEL_SETS)
@pytest.mark.parametrize("forget", [0.01, 0.02, 0.05, 0.1, 2.0**-3, 0.3, 0.9])
def test_kernel_momentum_code_matches_where_one_decay_step_is_half_a_gap(levels, forget):
    m = decay_boundary_groups(levels, forget)
    assert ((m != 1) & (m != 0.25)).sum() >= 7  # at least one level has such values
    gen = torch.Generator().manual_seed(random.randrange(2**31))
    m = torch.where(torch.rand(m.shape, generator=gen) < 0.5, -m, m)
    noise = torch.randint(0, formats.DITHER_LEVELS, m.shape, generator=gen).float()
    noise[::3], noise[1::7] = formats.DITHER_LEVELS // 2, 0.0
    rounding = formats.MOMENTUM_ROUNDINGS.index("decay")
    code, scale = formats.quantize_momentum(m, GROUP, noise, forget, levels, None)
    k_code, k_scale, _ = kernel_momentum_code(m, m, noise, forget, levels, rounding)
    assert torch.equal(k_code.cpu(), code)
    assert torch.equal(k_scale.cpu(), scale.view(torch.int16))


# the interpreter (numpy) warns of the NaN arithmetic these tests are about
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("levels", formats.MOMENTUM_LEVEL_SETS)
@pytest.mark.parametrize("rule", ["decay", "movement", "stochastic"])
def test_kernel_momentum_code_of_non_finite_states_matches_the_reference(levels, rule):
    """A momentum turns ±inf or NaN once a param has (an inf weight under coupled decay):
    the group's scale passes NaN over and a NaN takes the top level with its sign bit, in
    the reference as in the kernels (a float max and minimum), so their bits stay equal."""
    gen = torch.Generator().manual_seed(random.randrange(2**31))
    groups = torch.randn(6, GROUP, generator=gen) * 10.0 ** torch.randint(-30, 38, (6, 1))
    specials = [float("nan"), -float("nan"), float("inf"), -float("inf"), 3.4028235e38]
    for row in range(6):
        picks = torch.randint(0, GROUP, (row + 1,), generator=gen)
        groups[row, picks] = torch.tensor(specials)[torch.arange(row + 1) % len(specials)]
    groups[5] = _nan_payloads(GROUP, gen)  # a group of NaN alone
    m = torch.cat([groups.reshape(-1), _GPU_NAN.expand(GROUP)])  # and the GPU's NaN alone
    n = m.numel()
    noise = torch.randint(0, formats.DITHER_LEVELS, (n,), generator=gen).float()
    previous = m * 0.9
    forget = 0.0 if rule == "stochastic" else 0.1
    code, scale = formats.quantize_momentum(
        m, GROUP, noise, forget, levels, previous if rule == "movement" else None
    )
    rounding = formats.MOMENTUM_ROUNDINGS.index(rule)
    k_code, k_scale, _ = kernel_momentum_code(m, previous, noise, forget, levels, rounding)
    assert torch.equal(k_scale.cpu(), scale.view(torch.int16))
    assert torch.equal(k_code.cpu(), code)
    assert torch.isfinite(scale.float()).all()
    top = formats.MOMENTUM_LEVELS
    assert (code[torch.isnan(m)].abs() == top).all()  # NaN: the top level
    assert (scale[5:].view(torch.int16) == ieee.BF16_MAX_BITS >> 16).all()  # the largest
