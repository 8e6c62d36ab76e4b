"""Format version 3 moved SGD's and Muon's momentum codes from square levels (c/127)**2 to
linear-square levels c * (127 + c) / 32258: their state_dicts of versions 1 and 2 load
converted, in the plain and in the row (FSDP2) form; AdamW's and Lion's load as they were."""

from __future__ import annotations

import random

import torch
from code_bounds import momentum_gap

import slimoptim
from slimoptim import distributed as sdist
from slimoptim import formats
from slimoptim.kernels import dispatch
from slimoptim.kernels.muon import MOMENTUM_LEVELS as MUON_KERNEL_LEVELS

GROUP = 8
CASES = [
    (slimoptim.AdamW, "exp_avg", {}, "square"),
    (slimoptim.Lion, "exp_avg", {}, "square"),
    (slimoptim.SGD, "momentum_buffer", {"momentum": 0.9}, "linear_square"),
    (slimoptim.Muon, "momentum_buffer", {}, "linear_square"),
]


def _set_version(sd: dict, version: int) -> None:
    for header in [sd["slimoptim"]] + [g["slimoptim"] for g in sd["param_groups"]]:
        header["format_version"] = version


def _stepped(cls, gen, **options):
    p = torch.nn.Parameter(torch.randn(6, 11, generator=gen))
    opt = cls([p], lr=1e-3, group_size=GROUP, fused=False, **options)
    p.grad = torch.randn(6, 11, generator=gen)
    opt.step()
    return p, opt


def _fresh(cls, p, **options):
    q = torch.nn.Parameter(p.detach().clone())
    return cls([q], lr=1e-3, group_size=GROUP, fused=False, **options)


def _state(opt):
    return opt.state[opt.param_groups[0]["params"][0]]


def test_each_optimizer_codes_its_momentum_in_the_levels_its_kernel_rule_uses():
    for cls, name, _, levels in CASES:
        spec = next(s for s in cls.state_specs if s.name == name)
        assert spec.levels == levels
        if cls is slimoptim.Muon:
            assert MUON_KERNEL_LEVELS == levels
        else:
            assert dispatch.RULES[cls.kernel_rule].momentum_levels == levels


def test_a_version_2_momentum_loads_at_the_nearest_level_of_its_optimizer():
    gen = torch.Generator().manual_seed(random.randrange(2**31))
    for cls, name, options, levels in CASES:
        p, opt = _stepped(cls, gen, **options)
        sd = opt.state_dict()
        assert sd["slimoptim"]["format_version"] == 4
        n = p.numel()
        code = torch.randint(-127, 128, (n,), generator=gen, dtype=torch.int8)
        scale = (torch.rand(formats.num_groups(n, GROUP), generator=gen) * 4).bfloat16()
        sd["state"][0][name], sd["state"][0][f"{name}_scale"] = code.clone(), scale.clone()
        _set_version(sd, 2)
        fresh = _fresh(cls, p, **options)
        fresh.load_state_dict(sd)
        state = _state(fresh)
        if levels == "square":  # what versions 1 and 2 wrote: loads as it is
            assert torch.equal(state[name], code) and torch.equal(state[f"{name}_scale"], scale)
            continue
        old = formats.dequantize_momentum(code, scale, GROUP, "square").double()
        new = formats.dequantize_momentum(state[name], state[f"{name}_scale"], GROUP, levels)
        s = formats.per_element(state[f"{name}_scale"].double(), GROUP, n)
        bound = s * momentum_gap(old / s, levels) / 2 * (1 + 1e-6)
        assert ((new.double() - old).abs() <= bound).all(), cls.__name__
        assert not torch.equal(state[name], code)  # the levels did move
        _set_version(sd, 3)  # the same codes said to be version 3 load untouched
        fresh.load_state_dict(sd)
        assert torch.equal(_state(fresh)[name], code)


def test_a_version_2_row_form_state_converts_as_the_plain_one():
    gen = torch.Generator().manual_seed(random.randrange(2**31))
    p, opt = _stepped(slimoptim.SGD, gen, momentum=0.9)
    sd = opt.state_dict()
    n = p.numel()
    code = torch.randint(-127, 128, (n,), generator=gen, dtype=torch.int8)
    sd["state"][0]["momentum_buffer"] = code
    scale = torch.rand(formats.num_groups(n, GROUP), generator=gen).bfloat16()
    sd["state"][0]["momentum_buffer_scale"] = scale
    raw = _fresh(slimoptim.SGD, p, momentum=0.9)
    raw.load_state_dict(sd)  # version 3: the codes as they are
    with sdist.row_form(raw):
        rows = raw.state_dict()
    _set_version(sd, 2)
    _set_version(rows, 2)
    plain = _fresh(slimoptim.SGD, p, momentum=0.9)
    row = _fresh(slimoptim.SGD, p, momentum=0.9)
    plain.load_state_dict(sd)
    row.load_state_dict(rows)
    a, b = _state(plain), _state(row)
    assert set(a) == set(b) and {"momentum_buffer", "momentum_buffer_scale"} <= set(a)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert not torch.equal(a["momentum_buffer"], code)  # converted
