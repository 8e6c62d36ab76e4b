"""A format-3 bf16 correction (units of ulp(b) / 2**n) loads as the same master under
format 4's code (float32 steps, formats.split_master), against the param's loaded value."""

import random
import warnings

import pytest
import torch
from checkpoint_common import make_model

import slimoptim
from slimoptim import checkpoint, state_io

# Small quantization groups, so that the test model's tensors span several.
GROUP = 8


def _gen():
    return torch.Generator().manual_seed(random.randrange(2**31))


def _version3_pairs(n: int, code_bits: int, gen) -> tuple[torch.Tensor, torch.Tensor]:
    """Random bf16 values (a quarter of them powers of two, some tiny) and format-3 codes
    that keep the master inside b's rounding interval: towards smaller magnitudes a power
    of two's interval is half as wide (at most half the range), below 2**-100 codes were 0."""
    mantissa = torch.randint(0, 128, (n,), generator=gen)
    mantissa[torch.rand(n, generator=gen) < 0.25] = 0
    exponent = torch.randint(60, 190, (n,), generator=gen)
    exponent[:4] = torch.tensor([1, 20, 26, 27])  # 2**-126 .. 2**-100: no code below 2**-100
    sign = torch.where(torch.rand(n, generator=gen) < 0.5, -(2**31), 0)
    b = ((sign | (exponent << 23) | (mantissa << 16)).to(torch.int32)).view(torch.float32)
    limit = 2 ** (code_bits - 1) - 1
    code = torch.randint(-limit, limit + 1, (n,), generator=gen)
    shrinking = (code * torch.sign(b)) < 0  # towards smaller magnitudes
    code = torch.where((mantissa == 0) & shrinking, code // 2 + (code % 2), code)
    code[exponent < 27] = 0
    dtype = torch.int8 if code_bits == 8 else torch.int16
    return b, code.to(dtype)


def _version3_master_float64(b: torch.Tensor, code: torch.Tensor, code_bits: int):
    exponent = torch.floor(torch.log2(b.double().abs())).clamp_min(-100)
    return b.double() + code.double() * torch.pow(2.0, exponent - 7 - code_bits)


def _set_version(sd: dict, version: int) -> None:
    for header in [sd["slimoptim"]] + [g["slimoptim"] for g in sd["param_groups"]]:
        header["format_version"] = version


@pytest.mark.parametrize("master_weight_bits", [24, 32])
def test_a_version_3_correction_loads_as_the_same_master(master_weight_bits):
    gen, code_bits = _gen(), master_weight_bits - 16
    n = 4000
    b, old_code = _version3_pairs(n, code_bits, gen)
    p = torch.nn.Parameter(b.bfloat16())
    opt = slimoptim.AdamW([p], lr=1e-3, master_weight_bits=master_weight_bits, fused=False)
    p.grad = torch.randn(n, generator=gen).bfloat16()
    opt.step()
    sd = opt.state_dict()
    assert sd["slimoptim"]["format_version"] == 4
    sd["state"][0]["correction"] = old_code.clone()
    _set_version(sd, 3)
    with torch.no_grad():
        p.copy_(b.bfloat16())  # the weights the checkpoint was saved with
    fresh = slimoptim.AdamW([p], lr=1e-3, master_weight_bits=master_weight_bits, fused=False)
    with pytest.warns(UserWarning, match="Load the model's weights before"):
        fresh.load_state_dict(sd)  # a wrong order cannot be detected: it says so
    got = fresh.master_weight(p).double()
    expected = _version3_master_float64(b, old_code, code_bits)
    assert torch.equal(expected.float().double(), expected)  # a float32 master
    # Exactly the old master, but on the midpoint below a power of two (old code -2**(n-2)
    # towards smaller magnitudes), whose new code (2**15 float32 steps) clamps a unit short.
    midpoint = (old_code.abs() == 2 ** (code_bits - 2)) & ((old_code * torch.sign(b)) < 0)
    midpoint &= (b.view(torch.int32) & 0x7FFFFF) == 0
    assert torch.equal(got[~midpoint], expected[~midpoint])
    step = torch.pow(2.0, torch.floor(torch.log2(expected.abs())) - 23 + 16 - code_bits)
    assert torch.all((got - expected)[midpoint].abs() <= step[midpoint])
    assert sd["state"][0]["correction"].equal(old_code)  # the caller's state_dict unchanged


def test_load_checkpoint_converts_against_the_checkpoint_weights(tmp_path, monkeypatch):
    """load_checkpoint checks the optimizer part before loading the model: the conversion
    must wait for the checkpoint's weights, not use the fresh model's."""
    gen = _gen()
    model = make_model(torch.bfloat16, random.randrange(2**31))
    opt = slimoptim.AdamW(model.parameters(), lr=1e-3, group_size=GROUP, fused=False)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=gen).bfloat16()
    opt.step()
    expected = {}
    for p in model.parameters():
        b = p.detach().float().reshape(-1)
        old_code = torch.randint(-60, 61, (b.numel(),), generator=gen, dtype=torch.int8)
        opt.state[p]["correction"] = old_code.view(opt.state[p]["correction"].shape)
        expected[p] = _version3_master_float64(b, old_code, 8).float().view(p.shape)
    monkeypatch.setattr(state_io, "FORMAT_VERSION", 3)  # as slimoptim <= 0.x wrote it
    checkpoint.save_checkpoint(tmp_path / "v3.ckpt", model, opt)
    monkeypatch.undo()
    other = make_model(torch.bfloat16, random.randrange(2**31))  # other weights
    fresh = slimoptim.AdamW(other.parameters(), lr=1e-3, group_size=GROUP, fused=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the right order: no warning
        checkpoint.load_checkpoint(tmp_path / "v3.ckpt", other, fresh)
    for p, q in zip(model.parameters(), other.parameters(), strict=True):
        assert torch.equal(fresh.master_weight(q), expected[p])
