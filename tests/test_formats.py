"""Property tests of the numeric formats against float64 arithmetic."""

import math
import random

import pytest
import torch
from code_bounds import level_position, momentum_gap
from hypothesis import given, settings
from hypothesis import strategies as st

from slimoptim import formats, ieee

GROUP = 32


def _bf16_values(draw_bits):
    bits = torch.tensor(draw_bits, dtype=torch.int32)
    return bits.view(torch.float32)


# Every float32 bit pattern that is finite: all exponents (bf16 shares them), both signs,
# subnormals, zero and powers of two all appear.
finite_f32 = st.integers(min_value=-(2**31), max_value=2**31 - 1).filter(
    lambda b: ((b >> 23) & 0xFF) != 0xFF
)
special_f32 = st.sampled_from(
    [0.0, -0.0, 1.0, 2.0, 0.5, 2.0**-126, 2.0**-133, 2.0**-149, 2.0**127, 3.3895e38, -(2.0**-140)]
)


def _ulp(b64: torch.Tensor, mantissa: int, min_exp: int) -> torch.Tensor:
    exp = torch.floor(torch.log2(b64.abs().clamp_min(2.0**-200))).clamp_min(min_exp)
    return torch.pow(2.0, exp - mantissa)


@settings(max_examples=60, deadline=None)
@given(st.lists(finite_f32, min_size=1, max_size=200), st.lists(special_f32, max_size=10))
def test_bf16_rounding_matches_torch_round_to_nearest_even(bits, specials):
    x = torch.cat([_bf16_values(bits), torch.tensor(specials, dtype=torch.float32)])
    expected = x.to(torch.bfloat16).float()  # CPU torch rounds to nearest even
    got = ieee.round_to_bf16(x)
    assert torch.equal(got.view(torch.int32), expected.view(torch.int32))


@settings(max_examples=60, deadline=None)
@given(
    st.lists(finite_f32, min_size=1, max_size=200),
    st.lists(special_f32, max_size=10),
    st.sampled_from([8, 16]),
)
def test_bf16_split_round_trip_is_within_half_a_code_step(bits, specials, code_bits):
    w = torch.cat([_bf16_values(bits), torch.tensor(specials, dtype=torch.float32)])
    w = w[w.abs() < 3.38e38]  # beyond bf16's max the value rounds to inf
    b, code = formats.split_master(w, torch.bfloat16, code_bits)
    assert code.dtype == formats.CODE_DTYPES[code_bits]
    assert torch.equal(b, w.to(torch.bfloat16).float())
    rebuilt = formats.join_master(b, code, torch.bfloat16, code_bits).double()
    # A code unit is 2**(16 - n) float32 steps of the smaller of |w| and |b| (subnormal
    # steps below 2**-126): half a unit from rounding, a whole one where the code clamped
    # at +-(2**(n-1) - 1) (w within half a unit of b's rounding midpoint).
    smaller = torch.minimum(w.double().abs(), b.double().abs())
    step = _ulp(smaller, 23, -126) * 2.0 ** (16 - code_bits)
    clamped = code.abs() == 2 ** (code_bits - 1) - 1
    error = (rebuilt - w.double()).abs()
    assert torch.all(error <= torch.where(clamped, step, step / 2))
    if code_bits == 16:  # a 32-bit master is exact but on a midpoint (|distance| 2**15)
        assert torch.equal(rebuilt[~clamped], w.double()[~clamped])


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(-65000, 65000, width=32), min_size=1, max_size=200))
def test_fp16_split_round_trip(values):
    w = torch.tensor(values, dtype=torch.float32)
    for code_bits in (8, 16):
        b, code = formats.split_master(w, torch.float16, code_bits)
        assert torch.equal(b, w.half().float())
        rebuilt = formats.join_master(b, code, torch.float16, code_bits).double()
        step = _ulp(b.double(), 10, -14) / 2.0**code_bits
        assert torch.all((rebuilt - w.double()).abs() <= step)


def test_24_bit_master_carries_16_significant_bits_and_32_bit_is_exact():
    w = torch.randn(100_000) * torch.exp(4 * torch.randn(100_000))
    w = w[w != 0]  # randn can return an exact 0 (~1 run in 100 here): no relative error
    b, code = formats.split_master(w, torch.bfloat16, 8)
    rel = ((formats.join_master(b, code, torch.bfloat16, 8).double() - w.double()) / w).abs()
    clamped = code.abs() == 127  # within half a unit of a rounding midpoint
    assert rel[~clamped].max() <= 2.0**-16 and rel.max() <= 2.0**-15
    b, code = formats.split_master(w, torch.bfloat16, 16)
    rebuilt = formats.join_master(b, code, torch.bfloat16, 16)
    exact = code.abs() != 2**15 - 1  # clamped: w within one float32 step of a midpoint
    assert exact.float().mean() > 0.999
    assert torch.equal(rebuilt[exact], w[exact])


def test_bf16_codes_count_float32_steps_towards_larger_magnitudes():
    """The code of w = b + k float32 steps is round(k / 2**(16 - n)) for either sign,
    also just below a power of two (finer steps than b's) and among subnormals."""
    starts = [0x3F800000, 0x3FC10000, 0x00000000, 0x00010000, 0x40000000, 0x7F000000]
    for start in starts:
        for sign in (0, -(2**31)):
            for k in (-32000, -1000, -129, -128, -127, 1, 127, 129, 1000, 32000):
                if start == 0 and k < 0:
                    continue  # below zero lies the other sign
                w_bits = torch.tensor([(start + k) | sign], dtype=torch.int32)
                w = w_bits.view(torch.float32)
                b, code = formats.split_master(w, torch.bfloat16, 8)
                assert b.view(torch.int32).item() == start | sign
                assert code.item() == math.floor(k / 256 + 0.5)
                b, code = formats.split_master(w, torch.bfloat16, 16)
                assert code.item() == k


@settings(max_examples=60, deadline=None)
@given(st.lists(finite_f32, min_size=1, max_size=200), st.sampled_from([8, 16]))
def test_splitting_a_rebuilt_master_gives_back_the_same_pair(bits, code_bits):
    """split(join(b, code)) == (b, code): an element that is not stepped keeps its bits."""
    # plus masters just above the midpoint below an odd bf16 value, where the code range
    # matters (see test_the_code_range_is_symmetric)
    near_midpoints = [0x3EB6806D, 0x3F81807F, -0x412F8003, 0x477F80C0]
    near_midpoints += [0x0A054000, 0x09C0C000, -0x0A7F4000, 0x0000C07F]  # tiny, subnormal
    w = torch.cat([_bf16_values(bits), _bf16_values(near_midpoints)])
    w = w[w.abs() < 3.38e38]
    b, code = formats.split_master(w, torch.bfloat16, code_bits)
    b2, code2 = formats.split_master(
        formats.join_master(b, code, torch.bfloat16, code_bits), torch.bfloat16, code_bits
    )
    # the same values and codes (a -0.0 parameter may come back as +0.0: -0.0 + 0.0 = +0.0)
    assert torch.equal(b, b2) and torch.equal(code, code2)


def test_the_code_range_is_symmetric():
    # 0x3eb6806d lies just above the midpoint below the odd bf16 0x3eb7: its code
    # would round to -128, whose rebuild is that midpoint, which re-rounds to 0x3eb6.
    w = torch.tensor([0x3EB6806D], dtype=torch.int32).view(torch.float32)
    b, code = formats.split_master(w, torch.bfloat16, 8)
    assert b.view(torch.int32).item() == 0x3EB70000 and code.item() == -127


def test_non_finite_masters_survive_the_split():
    w = torch.tensor([math.inf, -math.inf, math.nan, 1.0])
    b, code = formats.split_master(w, torch.bfloat16, 8)
    assert code[:3].eq(0).all()
    rebuilt = formats.join_master(b, code, torch.bfloat16, 8)
    assert rebuilt[0] == math.inf and rebuilt[1] == -math.inf and rebuilt[2].isnan()


@settings(max_examples=40, deadline=None)
@given(st.lists(finite_f32, min_size=1, max_size=300))
def test_group_scale_is_the_smallest_bf16_at_or_above_the_group_max(bits):
    x = _bf16_values(bits).abs()
    x = x[x < 3.3e38]
    if x.numel() == 0:
        return
    scale = formats.group_scale(x, GROUP)
    group_max = formats.group_view(x, GROUP).amax(1)
    assert torch.all(scale >= group_max)
    assert torch.equal(scale, ieee.round_to_bf16(scale))  # representable in bf16
    below = ieee.as_float(ieee.as_bits(scale) - 65536)  # next bf16 down
    assert torch.all((below < group_max) | (scale == 0))


def _heavy_tailed(n, generator=None):
    sign = torch.randn(n, generator=generator).sign()
    return sign * torch.exp(2 * torch.randn(n, generator=generator))


LEVEL_SETS = formats.MOMENTUM_LEVEL_SETS


@settings(max_examples=40, deadline=None)
@given(
    st.integers(1, 300),
    st.integers(0, 2**31 - 1),
    st.sampled_from([1, 7, 32, 64]),
    st.sampled_from([1e-3, 0.05, 0.1, 1.0]),
    st.sampled_from(LEVEL_SETS),
)
def test_momentum_code_lands_on_a_neighbouring_level(numel, seed, group_size, forget, levels):
    gen = torch.Generator().manual_seed(seed)
    m = _heavy_tailed(numel, gen) * 1e-3
    noise = torch.randint(0, 65536, (numel,), generator=gen).float()
    code, scale = formats.quantize_momentum(m, group_size, noise, forget, levels)
    assert code.dtype == torch.int8 and scale.dtype == torch.bfloat16
    assert scale.numel() == formats.num_groups(numel, group_size)
    decoded = formats.dequantize_momentum(code, scale, group_size, levels).double()
    s = formats.per_element(scale.double(), group_size, numel)
    offset, units = formats._LEVEL_OFFSET[levels], formats._LEVEL_UNITS[levels]
    t = m.double().abs() / s * units  # position among the levels c * (offset + c)
    level = code.double().abs()
    below = torch.floor(level_position(m.double() / s, levels))  # the level at or below t
    assert torch.all(level <= 127)
    assert torch.all((level == below) | (level == below + 1))  # never skips a level
    assert torch.all(torch.sign(decoded) * torch.sign(m) >= 0)
    # decoded values are the levels
    assert torch.allclose(decoded.abs(), level * (offset + level) / units * s, rtol=1e-6)
    gap_low, gap_high = t - below * (offset + below), (below + 1) * (offset + below + 1) - t
    closer = torch.where(gap_low <= gap_high, below, below + 1)
    nearest = formats.quantize_momentum_nearest(m, group_size, levels)[0]
    # the nearest level, but for float32 rounding of t right at a midpoint
    assert (nearest.double().abs() == closer).double().mean() >= 0.99
    # Where one step of decay moves a value by at least half a gap, it rounds to nearest
    # whatever the noise: only values that could freeze are dithered.
    moving = t * forget >= (below + (offset + 1) / 2) * (1 + 1e-6)
    assert (level[moving] != closer[moving]).sum() <= 0.01 * numel


def _uniform_groups_coded_to_nearest(levels: str):
    """(generator, values uniform in [-1, 1), dither noise, their nearest codes)."""
    gen = torch.Generator().manual_seed(random.randrange(2**31))
    m = torch.rand(32 * 512, generator=gen) * 2 - 1
    noise = torch.randint(0, 65536, m.shape, generator=gen).float()
    return gen, m, noise, formats.quantize_momentum_nearest(m, 32, levels)[0]


@pytest.mark.parametrize("levels", LEVEL_SETS)
def test_a_state_that_moves_rounds_to_nearest_and_one_that_could_freeze_is_dithered(levels):
    gen, m, noise, nearest = _uniform_groups_coded_to_nearest(levels)
    # forget 1 (no memory): a value moves by t (its level position squared, for square
    # levels) and is dithered where t < low + 1/2, so every value from 1.25 levels up
    # (above sqrt(1.5)) moves by more than half a gap and rounds to nearest whatever the
    # noise
    scale = formats.per_element(formats.group_scale(m.abs(), 32).double(), 32, m.numel())
    far = level_position(m / scale, levels) >= 1.25
    assert far.double().mean() > 0.9
    coded = formats.quantize_momentum(m, 32, noise, 1.0, levels)[0]
    assert torch.equal(coded[far], nearest[far])
    # forget 1e-6 (a state that barely decays): every value is dithered, and about half
    # of those between levels land on the far one
    dithered = formats.quantize_momentum(m, 32, noise, 1e-6, levels)[0]
    assert 0.2 < (dithered != nearest).double().mean() < 0.6


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 300), st.integers(0, 2**31 - 1), st.sampled_from([1, 5, 32]))
def test_variance_code_error_is_at_most_half_a_step_of_its_binade(numel, seed, group_size):
    gen = torch.Generator().manual_seed(seed)
    v = _heavy_tailed(numel, gen) ** 2 * 1e-6
    code, scale = formats.quantize_variance(v, group_size)
    assert code.dtype == torch.uint8
    top = formats.variance_scale_parts(scale)[0].view(torch.float32)  # scale sans shift
    s = formats.per_element(top.double(), group_size, numel)
    assert torch.all(s >= v.double()) and torch.all(s <= 2 * v.double().clamp_min(0).max() + 1)
    decoded = formats.dequantize_variance(code, scale, group_size).double()
    binade = torch.pow(2.0, torch.frexp(v.double()).exponent - 1.0)  # 2**floor(log2 v)
    in_range = v.double() > s * 2.0**-31
    err = (decoded - v.double()).abs()
    assert torch.all(err[in_range] <= binade[in_range] / 16 * (1 + 1e-9))
    assert torch.all(decoded[~in_range] <= s[~in_range] * 2.0**-31)


def test_zero_and_partial_groups_decode_to_zero():
    for numel in (1, 31, 33):
        z = torch.zeros(numel)
        noise = formats.dither(numel, torch.tensor(1))[0]
        code, scale = formats.quantize_momentum(z, GROUP, noise, 0.1)
        assert torch.equal(formats.dequantize_momentum(code, scale, GROUP), z)
        code, scale = formats.quantize_variance(z, GROUP)
        assert torch.equal(formats.dequantize_variance(code, scale, GROUP), z)


@pytest.mark.parametrize("levels", LEVEL_SETS)
def test_stochastic_rounding_is_unbiased_in_value(levels):
    m = torch.rand(64) * 2 - 1
    m[0] = 1.0  # pin the scale
    total = torch.zeros(64, dtype=torch.float64)
    trials = 2000
    for step in range(trials):
        noise = formats.dither(64, torch.tensor(step))[0]
        # forget 1e-6: a state too slow to move by half a gap, so every value is dithered
        code, scale = formats.quantize_momentum(m, 64, noise, 1e-6, levels)
        total += formats.dequantize_momentum(code, scale, 64, levels).double()
    # each value rounds to a level either side: mean error ~ level gap / (2 sqrt(trials))
    gap = momentum_gap(m, levels)
    assert torch.all((total / trials - m.double()).abs() < gap / 10)


def test_dither_is_uniform_independent_and_changes_with_step():
    a_m, a_v = formats.dither(100_000, torch.tensor(1.0))
    b_m, _ = formats.dither(100_000, torch.tensor(2.0))
    for a in (a_m, a_v):
        assert 0 <= a.min() and a.max() < 65536 and torch.equal(a, torch.floor(a))
        u = a / 65536
        assert abs(u.mean().item() - 0.5) < 0.01 and abs(u.var().item() - 1 / 12) < 0.005
    assert abs(torch.corrcoef(torch.stack([a_m, a_v]))[0, 1]) < 0.02
    assert (a_m == b_m).float().mean() < 0.01
    assert torch.equal(a_m, formats.dither(100_000, torch.tensor(1.0))[0])


def _pair_chi2(x: torch.Tensor, y: torch.Tensor) -> float:
    """Chi-square of (x, y) dither pairs over a 16 x 16 grid: 255 degrees of freedom."""
    cells = torch.bincount((x.long() >> 12) * 16 + (y.long() >> 12), minlength=256).double()
    expected = x.numel() / 256
    return ((cells - expected) ** 2 / expected).sum().item()


@pytest.mark.parametrize("sequenced", [False, True])
def test_dithers_of_neighbours_halves_and_steps_are_independent(sequenced):
    """Pairs of dithers fill the unit square evenly: neighbours in a row (lags 1, 2, 8 and a
    group's 32), the two halves, and one element at two steps (hashed only: a sequenced
    dither's steps are meant to be dependent). The same hash with other multipliers
    (0x9E3779B1, 0x7FEB352D) scores ~1500 at lag 1; independent draws 255 +- 23."""
    n = 2**18
    first, second = formats.dither(n, torch.tensor(3.0), sequenced=sequenced)
    scores = [_pair_chi2(first, second)]
    for half in (first, second):
        scores += [_pair_chi2(half[:-lag], half[lag:]) for lag in (1, 2, 8, 32)]
    if not sequenced:
        later = formats.dither(n, torch.tensor(4.0))
        scores += [_pair_chi2(first, later[0]), _pair_chi2(second, later[1])]
    assert max(scores) < 400, scores


def test_stochastic_variance_code_is_unbiased():
    gen = torch.Generator().manual_seed(7)
    v = torch.rand(64, generator=gen) ** 4
    total = torch.zeros(64, dtype=torch.float64)
    for step in range(2000):
        code, scale = formats.quantize_variance(v, 64, formats.dither(64, torch.tensor(step))[1])
        total += formats.dequantize_variance(code, scale, 64).double()
    # one code is at most 1/8 of v's binade; the mean over 2000 draws is within ~1/200 of it
    assert torch.all(((total / 2000 - v.double()) / v.double()).abs() < 0.01)


def _linear_int8(x, signed):
    """Plain absmax linear int8 (255 levels on sqrt(v) for v) for comparison."""
    if signed:
        s = formats.per_element(formats.group_view(x.abs(), GROUP).amax(1), GROUP, x.numel())
        return torch.round(x / s * 127) / 127 * s
    s = formats.per_element(formats.group_view(x, GROUP).amax(1), GROUP, x.numel())
    return (torch.round((x / s).sqrt() * 255) / 255) ** 2 * s


def test_companded_codes_beat_linear_int8_on_heavy_tailed_states():
    gen = torch.Generator().manual_seed(0)
    m = _heavy_tailed(GROUP * 4096, gen)
    v = _heavy_tailed(GROUP * 4096, gen) ** 2
    code, scale = formats.quantize_momentum(
        m, GROUP, formats.dither(m.numel(), torch.tensor(3))[0], 0.1
    )
    m_err = ((formats.dequantize_momentum(code, scale, GROUP) - m) / m).abs().median()
    m_lin = ((_linear_int8(m, True) - m) / m).abs().median()
    code, scale = formats.quantize_variance(v, GROUP)
    decoded_v = formats.dequantize_variance(code, scale, GROUP)
    v_err = ((decoded_v - v) / v).abs().median()
    v_lin = ((_linear_int8(v, False) - v) / v).abs().median()
    assert m_err < m_lin / 2 and v_err < v_lin / 2
    # linear-square levels are 3x as fine at zero as at the top (linear int8: even)
    m_code, m_scale = formats.quantize_momentum_nearest(m, GROUP, "linear_square")
    m_decoded = formats.dequantize_momentum(m_code, m_scale, GROUP, "linear_square")
    assert ((m_decoded - m) / m).abs().median() < m_lin / 1.5
    # a value may decode to zero only below the update's denominator floor
    floor = formats.variance_floor(scale, GROUP, v.numel())
    assert torch.all(v[decoded_v == 0].sqrt() < floor[decoded_v == 0])
    assert (_linear_int8(v, False) == 0).sum() > 10 * (decoded_v == 0).sum()


@pytest.mark.parametrize("levels", LEVEL_SETS)
def test_movement_rule_rounds_moved_values_to_nearest_and_dithers_unmoved_ones(levels):
    gen, m, noise, nearest = _uniform_groups_coded_to_nearest(levels)
    # half the values moved by a quarter of their group's largest (far more than half a
    # gap of either level set), half did not move at all
    moved = torch.rand(m.shape, generator=gen) < 0.5
    previous = torch.where(moved, m - 0.25 * m.sign(), m)
    coded = formats.quantize_momentum(m, 32, noise, None, levels, previous=previous)[0]
    assert torch.equal(coded[moved], nearest[moved])
    assert 0.2 < (coded[~moved] != nearest[~moved]).double().mean() < 0.6


def _ema_of_a_steady_gradient(previous_rule: bool, steps: int = 3000) -> torch.Tensor:
    """Decoded 8-bit EMA (beta 0.99, Lion's beta2) of a constant gradient, per element.

    Each group's first element already sits at its gradient, 1.0, and fixes the scale;
    the others start at 0 and head for gradients between 0.65 and 0.95 of it."""
    gen = torch.Generator().manual_seed(random.randrange(2**31))
    groups = 256
    g = 0.65 + 0.3 * torch.rand(groups, GROUP, generator=gen)
    g[:, 0] = 1.0
    g = g.reshape(-1)
    m = torch.where(torch.arange(g.numel()) % GROUP == 0, g, 0.0)
    for step in range(steps):
        noise = formats.dither(g.numel(), torch.tensor(float(step)))[0]
        new = m * 0.99 + g * 0.01
        if previous_rule:
            code, scale = formats.quantize_momentum(new, GROUP, noise, None, previous=m)
        else:
            code, scale = formats.quantize_momentum(new, GROUP, noise, 0.01)
        m = formats.dequantize_momentum(code, scale, GROUP)
    return (m - g).view(groups, GROUP)[:, 1:].double()


def test_movement_rule_lets_a_slow_ema_reach_its_average():
    # The decay rule rounds these values to nearest (one step of decay, 1 % of them, is
    # more than half a gap), so each stops where a step's move drops under half a gap,
    # well short of its gradient. The movement rule dithers there: unbiased, so the
    # states reach their gradients on average.
    gap = 2 / formats.MOMENTUM_LEVELS  # the square levels' widest gap, relative to scale
    stuck = _ema_of_a_steady_gradient(previous_rule=False)
    assert stuck.mean() < -2 * gap
    reached = _ema_of_a_steady_gradient(previous_rule=True)
    assert reached.mean().abs() < 0.1 * gap
    assert reached.abs().max() < 4 * gap


def test_movement_rule_dithers_a_change_of_half_a_gap_under_float32_rounding():
    # Found by test_movement_rule_lets_a_slow_ema_reach_its_average: the state sits on
    # level 73 of a group whose largest is 1.0, and a steady gradient moves it by what
    # float32 counts as a hair over half the gap to 74, while t lands a hair under the
    # midpoint. Without the slack, nearest rounding returns it to 73 at every step.
    previous = torch.zeros(GROUP)
    previous[0], previous[1] = 1.0, 73**2 / formats.MOMENTUM_LEVELS**2
    code, scale = formats.quantize_momentum_nearest(previous, GROUP)
    previous = formats.dequantize_momentum(code, scale, GROUP)
    assert code[1] == 73
    new = previous * 0.99 + torch.tensor([1.0, 0.7861000299453735] + [0.0] * (GROUP - 2)) * 0.01
    zero_noise = torch.zeros(GROUP)  # dithered values then always go up
    code, _ = formats.quantize_momentum(new, GROUP, zero_noise, None, previous=previous)
    assert code[1] == 74
    assert formats.quantize_momentum_nearest(new, GROUP)[0][1] == 73


def test_state_spec_refuses_an_unknown_rounding_and_a_decay_rule_without_beta():
    from slimoptim.optimizers.state_spec import StateSpec

    with pytest.raises(ValueError, match="rounding must be one of"):
        StateSpec("exp_avg", signed=True, rounding="nearest")
    with pytest.raises(ValueError, match="needs beta"):
        StateSpec("exp_avg", signed=True)
    assert StateSpec("exp_avg", signed=True, rounding="movement").by_movement
