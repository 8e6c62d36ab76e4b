"""AdamW's momentum levels chosen per group from its second moment's code ("by_variance",
formats.py): linear-square where v's group spans at most 16 binades, square where it spans
more, read back from the stored variance scale; every update stays bounded."""

from __future__ import annotations

import random

import pytest
import torch
from code_bounds import momentum_gap

import slimoptim
from slimoptim import distributed as sdist
from slimoptim import formats

GROUP = 32


def _gen() -> torch.Generator:
    return torch.Generator().manual_seed(random.randrange(2**31))


def _states(gen: torch.Generator, n_groups: int = 400):
    """Momenta and second moments of groups whose v spans 0 to 40 binades."""
    g = torch.randn(n_groups, GROUP, generator=gen)
    spread = torch.randint(0, 41, (n_groups, 1), generator=gen).float()
    v = torch.exp2(-spread * torch.rand(n_groups, GROUP, generator=gen))
    v[:, 0] = 1.0  # each group reaches its top and, at element 1, its bottom
    v[:, 1] = torch.exp2(-spread[:, 0])
    return (g * v.sqrt()).reshape(-1), v.reshape(-1)


def test_each_group_takes_the_levels_its_second_moment_calls_for():
    gen = _gen()
    m, v = _states(gen)
    _, v_scale = formats.quantize_variance(v, GROUP)
    noise = torch.randint(0, formats.DITHER_LEVELS, m.shape, generator=gen).float()
    code, scale = formats.quantize_momentum(m, GROUP, noise, 0.1, "by_variance", None, v_scale)
    decoded = formats.dequantize_momentum(code, scale, GROUP, "by_variance", v_scale)
    _, shift = formats.variance_scale_parts(v_scale)
    linear = shift <= formats.LINEAR_MOMENTUM_MAX_SHIFT
    assert 0.2 < linear.float().mean() < 0.8  # both kinds of group are here
    for levels, groups in (("linear_square", linear), ("square", ~linear)):
        fixed_code, fixed_scale = formats.quantize_momentum(m, GROUP, noise, 0.1, levels)
        rows = formats.per_element(groups, GROUP, m.numel())
        assert torch.equal(code[rows], fixed_code[rows]) and torch.equal(
            scale[groups], fixed_scale[groups]
        )
        fixed = formats.dequantize_momentum(fixed_code, fixed_scale, GROUP, levels)
        assert torch.equal(decoded[rows], fixed[rows])
    # the choice follows the span: v of 16 binades or fewer is linear-square
    span = torch.log2(formats.group_view(v, GROUP).amax(1) / formats.group_view(v, GROUP).amin(1))
    assert bool(linear[span <= 15.5].all()) and not bool(linear[span > 16.5].any())
    with pytest.raises(ValueError, match="second moment"):
        formats.dequantize_momentum(code, scale, GROUP, "by_variance")


def _largest_direction(m, v, levels, v_scale, floor):
    """Largest |m_hat| / max(sqrt(v_hat), floor) per group, every small momentum rounded
    up to its first level (noise 0: the decay rule's worst draw)."""
    noise = torch.zeros_like(m)
    code, scale = formats.quantize_momentum(m, GROUP, noise, 0.1, levels, None, v_scale)
    m_hat = formats.dequantize_momentum(code, scale, GROUP, levels, v_scale)
    v_hat = formats.dequantize_variance(*formats.quantize_variance(v, GROUP), GROUP)
    direction = m_hat.abs() / torch.maximum(v_hat.sqrt(), floor)
    return formats.group_view(direction, GROUP).amax(1)


def test_a_tiny_momentum_rounded_up_moves_no_element_more_than_its_group_allows():
    """Each group: one element with m = sqrt(v) = 1 (update 1) and 31 whose v lies up to
    40 binades lower with a momentum 1e-3 of their own sqrt(v) (update 1e-3). Rounded up
    to the first level, a small momentum's update must stay within the group's largest;
    linear-square levels everywhere would not keep it there."""
    gen = _gen()
    spread = torch.arange(0, 41).float()
    v = torch.exp2(-spread[:, None] * torch.rand(41, GROUP, generator=gen))
    v[:, 0], v[:, 1] = 1.0, torch.exp2(-spread)
    m = v.sqrt() * 1e-3
    m[:, 0] = 1.0
    m, v = m.reshape(-1), v.reshape(-1)
    _, v_scale = formats.quantize_variance(v, GROUP)
    floor = formats.variance_floor(v_scale, GROUP, v.numel())
    chosen = _largest_direction(m, v, "by_variance", v_scale, floor)
    assert chosen.max() <= 1.05, chosen.max()
    linear = _largest_direction(m, v, "linear_square", None, floor)
    assert linear.max() > 30  # what the per-group choice prevents (64x: the floor stops it)


def test_a_version_4_adamw_state_converts_alike_in_plain_and_row_form():
    """Version 4 coded AdamW's momentum with square levels: a state_dict of that version
    loads re-coded to the nearest "by_variance" level, the same in FSDP2's row form."""
    gen = _gen()
    p = torch.nn.Parameter(torch.randn(12, 40, generator=gen))
    opt = slimoptim.AdamW([p], lr=1e-3, fused=False)
    for _ in range(3):
        p.grad = torch.randn(12, 40, generator=gen) * torch.rand(12, 1, generator=gen) ** 4
        opt.step()
    sd = opt.state_dict()
    n = p.numel()
    code = torch.randint(-127, 128, (n,), generator=gen, dtype=torch.int8)
    sd["state"][0]["exp_avg"] = code.clone()
    raw = slimoptim.AdamW([torch.nn.Parameter(p.detach().clone())], lr=1e-3, fused=False)
    raw.load_state_dict(sd)
    with sdist.row_form(raw):
        rows = raw.state_dict()
    for state_dict in (sd, rows):
        for header in [state_dict["slimoptim"]] + [
            g["slimoptim"] for g in state_dict["param_groups"]
        ]:
            header["format_version"] = 4
    loaded = []
    for state_dict in (sd, rows):
        fresh = slimoptim.AdamW([torch.nn.Parameter(p.detach().clone())], lr=1e-3, fused=False)
        fresh.load_state_dict(state_dict)
        loaded.append(fresh.state[fresh.param_groups[0]["params"][0]])
    assert torch.equal(loaded[0]["exp_avg"], loaded[1]["exp_avg"])
    assert torch.equal(loaded[0]["exp_avg_scale"], loaded[1]["exp_avg_scale"])
    scale = sd["state"][0]["exp_avg_scale"]
    old = formats.dequantize_momentum(code, scale, GROUP, "square")
    v_scale = loaded[0]["exp_avg_sq_scale"]
    new = formats.dequantize_momentum(
        loaded[0]["exp_avg"], loaded[0]["exp_avg_scale"], GROUP, "by_variance", v_scale
    )
    s = formats.per_element(loaded[0]["exp_avg_scale"].float(), GROUP, n)
    bound = s * momentum_gap(old / s, "by_variance") / 2 * (1 + 1e-5)  # half a gap
    assert ((new - old).abs() <= bound).all()
    assert not torch.equal(loaded[0]["exp_avg"], code)  # re-coded
