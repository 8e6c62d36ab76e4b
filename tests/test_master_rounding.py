"""Stochastic rounding of the 24-bit master's code (formats.split_master) and the sequenced
dither (formats.dither): Lion's rounding."""

import random

import pytest
import torch

import slimoptim
from slimoptim import formats
from slimoptim.kernels import dispatch


def _gen():
    return torch.Generator().manual_seed(random.randrange(2**31))


def _noise(n, gen):
    return torch.randint(0, formats.DITHER_LEVELS, (n,), generator=gen).float()


def test_a_dithered_code_is_unbiased_within_its_unit():
    gen = _gen()
    b = (torch.rand(64, generator=gen) * 0.5 + 1.25).bfloat16().float()  # w stays in [1, 2)
    unit = 2.0**-15  # 2**8 float32 steps of 2**-23 in [1, 2)
    # float32 holds 8 bits below a unit here: fractions are multiples of 1/256
    fraction = torch.randint(0, 256, (64,), generator=gen) / 256
    whole = torch.randint(-100, 100, (64,), generator=gen).float()
    w = b + (whole + fraction) * unit
    assert torch.equal((w - b) / unit, whole + fraction)  # exact
    draws = 4000
    codes = torch.stack(
        [formats.split_master(w, torch.bfloat16, 8, _noise(64, gen))[1] for _ in range(draws)]
    ).float()
    assert ((codes == whole) | (codes == whole + 1)).all()  # the two codes around w
    # mean code - whole estimates the fraction; 5 standard errors (<= 0.5 / sqrt(draws))
    error = (codes.mean(0) - whole - fraction).abs()
    assert error.max() < 5 * 0.5 / draws**0.5
    nearest = formats.split_master(w, torch.bfloat16, 8)[1].float()
    assert torch.equal(nearest, whole + (fraction >= 0.5).float())


def test_a_rebuilt_master_splits_back_to_its_code_whatever_the_noise():
    gen = _gen()
    w = torch.randn(4096, generator=gen) * 3
    for bits in (8, 16):
        b, code = formats.split_master(w, torch.bfloat16, bits, _noise(w.numel(), gen))
        rebuilt = formats.join_master(b, code, torch.bfloat16, bits)
        b2, code2 = formats.split_master(rebuilt, torch.bfloat16, bits, _noise(w.numel(), gen))
        assert torch.equal(b2, b) and torch.equal(code2, code)


def test_16_bit_codes_ignore_the_noise():
    gen = _gen()
    w = torch.randn(4096, generator=gen)
    nearest = formats.split_master(w, torch.bfloat16, 16)
    dithered = formats.split_master(w, torch.bfloat16, 16, _noise(w.numel(), gen))
    assert torch.equal(nearest[0], dithered[0]) and torch.equal(nearest[1], dithered[1])


class NearestLion(slimoptim.Lion):
    master_rounding = "nearest"


def _lion_drift(cls, master_weight_bits, lr, steps, gen):
    """(master after ``steps`` Lion steps on a constant gradient, float64 value) / lr."""
    # |w| in [1, 2), away from its ends: unit 2**-15 (just below a power of two it halves)
    start = (1.01 + 0.98 * torch.rand(256, generator=gen)).bfloat16()
    p = torch.nn.Parameter(start.clone())
    opt = cls([p], lr=lr, betas=(0.9, 0.99), master_weight_bits=master_weight_bits, fused=False)
    grad = torch.where(torch.rand(256, generator=gen) < 0.5, -1.0, 1.0).bfloat16()
    for _ in range(steps):
        p.grad = grad.clone()
        opt.step()
    exact = start.double() - steps * lr * grad.double()  # sign(m) = sign(g) at every step
    return (opt.master_weight(p).double() - exact) / (steps * lr)


def test_lion_moves_a_24_bit_master_by_steps_under_half_a_unit():
    """lr = 0.4 code units for |w| in [1, 2): nearest rounding never moves the master."""
    gen = _gen()
    lr, steps = 0.4 * 2.0**-15, 300
    # Each step adds a zero-mean error under one unit: after 300 steps its spread is
    # ~sqrt(300 / 6) ~ 7 units ~ 0.06 of the movement (120 units); 256 elements' mean
    # is 16x tighter.
    error = _lion_drift(slimoptim.Lion, 24, lr, steps, gen)
    assert error.abs().mean() < 0.2
    assert error.mean().abs() < 0.03
    # A 32-bit master is float32: it rounds each step (102.4 ulps) by under half an ulp.
    assert _lion_drift(slimoptim.Lion, 32, lr, steps, gen).abs().max() < 0.5 / 102.4
    stuck = _lion_drift(NearestLion, 24, lr, steps, gen)
    assert stuck.abs().min() > 0.99  # what the dither is for: not one step taken


def test_every_optimizer_and_its_kernel_rule_round_alike():
    assert slimoptim.Lion.master_rounding == "stochastic"
    assert slimoptim.Lion.dither == "sequenced"
    for cls in (slimoptim.AdamW, slimoptim.Adam, slimoptim.SGD, slimoptim.Lion):
        rule = dispatch.RULES[cls.kernel_rule]
        assert rule.master_rounding == cls.master_rounding
        assert rule.dither == cls.dither
        assert rule.momentum_rounding == cls.state_specs[0].rounding
    # Muon's kernels launch MASTER_DITHER=False, ROUNDING decay, SEQUENCED=False
    assert slimoptim.Muon.master_rounding == "nearest" and slimoptim.Muon.dither == "hashed"
    assert slimoptim.Muon.state_specs[0].rounding == "decay"


def test_a_lion_whose_master_rounds_to_nearest_steps_by_its_reference():
    p = torch.nn.Parameter(torch.randn(64).bfloat16())
    assert NearestLion([p]).kernel_rule_name() is None
    assert slimoptim.Lion([p]).kernel_rule_name() == "lion"


def test_a_sequenced_dither_spreads_each_element_evenly_over_its_range():
    n, steps = 512, 1000
    dithers = torch.stack(
        [formats.dither(n, torch.tensor(float(s)), sequenced=True)[i] for s in range(steps)
         for i in (0, 1)]
    ).view(steps, 2, n)  # fmt: skip
    for fraction in (0.1, 0.37, 0.5, 0.83):
        below = (dithers < fraction * formats.DITHER_LEVELS).sum(0).float()
        # A Weyl sequence's discrepancy grows like log(steps): a handful, where an
        # independent dither's count spreads by sqrt(steps * f * (1 - f)) ~ 10-16 (its
        # largest deviation over 512 elements ~ 3.5x that).
        assert (below - steps * fraction).abs().max() <= 6
    hashed = torch.stack([formats.dither(n, torch.tensor(float(s)))[0] for s in range(steps)])
    spread = ((hashed < 0.5 * formats.DITHER_LEVELS).sum(0).float() - steps / 2).abs().max()
    assert spread > 20  # the check above can tell the two apart


def _coded_ema_error(sequenced: bool, seed: int) -> float:
    """Relative RMS error of a beta 0.99 EMA of noisy gradients, coded at every step with
    the stochastic rule, over steps 301-600."""
    gen = torch.Generator().manual_seed(seed)
    n, beta = 32 * 64, 0.99
    mean = torch.randn(n, generator=gen) * 0.1
    exact, coded, errors = torch.zeros(n), torch.zeros(n), []
    for step in range(1, 601):
        g = mean + torch.randn(n, generator=gen)
        exact = beta * exact + (1 - beta) * g
        noise = formats.dither(n, torch.tensor(float(step)), sequenced=sequenced)[0]
        code, scale = formats.quantize_momentum(beta * coded + (1 - beta) * g, 32, noise, 0.0)
        coded = formats.dequantize_momentum(code, scale, 32)
        if step > 300:
            errors.append(((coded - exact) ** 2).mean() / (exact**2).mean())
    return float(sum(errors) / len(errors)) ** 0.5


def test_a_sequenced_dither_keeps_a_slow_ema_closer_than_an_independent_one():
    seed = random.randrange(2**31)
    sequenced, hashed = _coded_ema_error(True, seed), _coded_ema_error(False, seed)
    assert sequenced < 0.85 * hashed  # ~0.7x measured


def test_a_class_whose_stochastic_master_would_share_a_states_dither_is_refused():
    with pytest.raises(TypeError, match="second half"):

        class StochasticAdamW(slimoptim.AdamW):
            master_rounding = "stochastic"

    with pytest.raises(TypeError, match="dither must be"):

        class OddLion(slimoptim.Lion):
            dither = "blue"


def _special_bf16_masters(gen) -> torch.Tensor:
    """bf16 params with NaN, +-Inf, the largest finite, subnormals and tiny values, beside
    ordinary ones: 4096 values (whole tiles and a tail)."""
    w = torch.randn(4099, generator=gen) * 10.0 ** torch.randint(-3, 2, (4099,), generator=gen)
    specials = [float("nan"), float("inf"), -float("inf"), 3.3895e38, -3.3895e38, 1e-38, -3e-39]
    specials += [1e-40, -2e-41, 1.2e-30, 0.0, -0.0, 2.0, -0.5]
    index = torch.randperm(4099, generator=gen)[: 10 * len(specials)]
    w[index] = torch.tensor(specials * 10)
    return w.bfloat16()


@pytest.mark.parametrize("cls", [slimoptim.AdamW, slimoptim.Lion])
@pytest.mark.parametrize("master_weight_bits", [24, 32])
def test_kernels_split_special_masters_as_the_reference(cls, master_weight_bits):
    """Masters that decay towards zero by weight decay alone (AdamW's eps 1e30 makes its
    update vanish; Lion's gradients are 0), so tiny and subnormal masters keep nonzero
    codes, next to NaN and Inf: the kernels' split and join give the reference's bits."""
    pytest.importorskip("triton")
    gen = _gen()
    start = _special_bf16_masters(gen)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    options = {"eps": 1e30} if cls is slimoptim.AdamW else {}
    runs = []
    for fused in (True, False):
        p = torch.nn.Parameter(start.clone().to(device))
        opt = cls(
            [p], lr=0.5, weight_decay=0.1, master_weight_bits=master_weight_bits,
            fused=fused, **options,
        )  # fmt: skip
        for _ in range(3):
            p.grad = torch.zeros_like(p) if cls is slimoptim.Lion else torch.ones_like(p)
            opt.step()
        runs.append((p.detach().view(torch.int16), opt.state[p]["correction"]))
    (p_fused, c_fused), (p_ref, c_ref) = runs
    assert torch.equal(p_fused, p_ref) and torch.equal(c_fused, c_ref)
    assert c_ref.ne(0).float().mean() > 0.9  # the codes are in use
    tiny = start.float().abs() < 1e-30
    assert c_ref.cpu()[tiny & (start.float() != 0)].ne(0).any()  # tiny masters keep codes


@pytest.mark.parametrize("fused", [True, False])
def test_a_param_zeroed_outside_the_optimizer_keeps_a_finite_master(fused):
    """Pruning or zero_() after a step leaves the old codes beside +-0 params: a negative
    code would step past zero to a NaN bit pattern (and +Inf plus a positive one beyond
    Inf); the master is then the param itself, and the next step stays finite."""
    pytest.importorskip("triton")
    gen = _gen()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    p = torch.nn.Parameter((torch.randn(4099, generator=gen) * 0.5).bfloat16().to(device))
    opt = slimoptim.AdamW([p], lr=1e-3, fused=fused)
    p.grad = torch.randn(4099, generator=gen).bfloat16().to(device)
    opt.step()
    code = opt.state[p]["correction"]
    assert code.lt(0).any() and code.gt(0).any()  # stale codes of both signs remain
    pruned = torch.rand(4099, generator=gen).to(device) < 0.5
    infinite = torch.nonzero(~pruned & (code > 0)).flatten()[:8]
    with torch.no_grad():
        p[pruned] = 0.0
        p[infinite] = float("inf")
    master = opt.master_weight(p)
    assert not master.isnan().any()
    # a pruned weight's master is its stale code's tiny subnormal, or +-0
    assert master[pruned].abs().max() < 1e-38 and master[pruned & (code < 0)].eq(0).all()
    assert master[infinite].eq(float("inf")).all()
    p.grad = torch.zeros_like(p)
    opt.step()
    assert not p.isnan().any()
