"""Checkpoints across formats: fp32 state dicts with the masters, safetensors model
files, torch.optim state dicts exported and imported within the codes' stated error."""

import pytest
import safetensors
import torch
from checkpoint_common import (
    assert_same_tensors,
    assert_unchanged,
    build,
    make_model,
    new_seed,
    snapshot,
)
from code_bounds import momentum_gap
from torch import nn

import slimoptim
from slimoptim import checkpoint, formats
from slimoptim.state_io import CheckpointError

# ----------------------------------------------------- fp32 export/import


def bf16_ulp(b: torch.Tensor) -> torch.Tensor:
    """ulp of bf16 values (8 significant bits), normals only."""
    _, exponent = torch.frexp(b)
    return torch.ldexp(torch.ones_like(b), exponent - 8)


def test_fp32_state_dict_holds_masters_and_leaves_other_entries(tmp_path):
    model, opt, sched = build("AdamW", torch.bfloat16, 24, 8, seed=new_seed())
    frozen = nn.Linear(3, 3).bfloat16()
    model.append(frozen.requires_grad_(False))
    model.register_buffer("counter", torch.tensor([3, 4]))
    opt = slimoptim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        x = torch.randn(8, 12, dtype=torch.bfloat16)
        model[:3](x).float().pow(2).mean().backward()
        opt.step()
    sd = checkpoint.fp32_state_dict(model, opt)
    assert sd.keys() == model.state_dict().keys()
    for name, p in model[:3].named_parameters():
        assert sd[name].dtype == torch.float32
        assert torch.equal(sd[name], opt.master_weight(p))
    # The masters carry bits the bf16 params do not.
    assert not torch.equal(sd["0.weight"], model[0].weight.float())
    assert sd["3.weight"].dtype == torch.bfloat16 and torch.equal(sd["3.weight"], frozen.weight)
    assert torch.equal(sd["counter"], torch.tensor([3, 4]))


@pytest.mark.parametrize("master", [24, 32])
def test_load_fp32_state_dict_sets_masters_as_closely_as_the_format_allows(master):
    model = make_model(torch.bfloat16, new_seed())
    opt = slimoptim.AdamW(model.parameters(), master_weight_bits=master)
    weights = {k: torch.randn(v.shape) * 0.3 for k, v in model.state_dict().items()}
    # Values a 24-bit master holds exactly: a bf16 value plus up to +-127 codes.
    exact = weights["0.weight"][:4].bfloat16().float()
    weights["0.weight"][:4] = exact + bf16_ulp(exact) * torch.randint(-127, 128, exact.shape) / 256
    # Midpoints between consecutive bf16 values: one of each two rounds down to even.
    b0 = exact[0, 0].abs().bfloat16()
    b1, b2 = ((b0.view(torch.int16) + k).view(torch.bfloat16) for k in (1, 2))
    weights["0.weight"][4, 0] = (b0.float() + b1.float()) / 2
    weights["0.weight"][4, 1] = (b1.float() + b2.float()) / 2
    checkpoint.load_fp32_state_dict(model, opt, weights)
    for name, p in model.named_parameters():
        w, got, b = weights[name], opt.master_weight(p), p.detach().float()
        # One code of a (master_weight_bits - 16)-bit correction is ulp(b) / 2**(bits - 16).
        unit = bf16_ulp(b) / 2 ** (master - 16)
        # Half a code, or one where the code sits at an end of its symmetric range
        # (w within half a code of a midpoint between two bf16 values).
        at_end = (opt.state[p]["correction"].abs() == 2 ** (master - 17) - 1).view(b.shape)
        assert ((got - w).abs() <= torch.where(at_end, unit, unit / 2)).all()
        assert torch.equal(b, w.bfloat16().float())  # the param is the nearest bf16
    if master == 24:
        got = opt.master_weight(model[0].weight)
        assert torch.equal(got[:4], weights["0.weight"][:4])
        midpoints, unit = weights["0.weight"][4, :2], bf16_ulp(b0.float()) / 256
        assert ((got[4, :2] - midpoints).abs() <= unit).all()
    # Stepping starts from those masters, like a fresh optimizer would.
    model(torch.randn(4, 12, dtype=torch.bfloat16)).float().sum().backward()
    opt.step()
    assert all(s["step"] == 1 for s in opt.state.values())


def test_fp32_round_trip_through_safetensors_with_tied_weights(tmp_path):
    def tied_model(seed):
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(24, 24), nn.ReLU(), nn.Linear(24, 24)).bfloat16()
        model[2].weight = model[0].weight
        return model

    model = tied_model(new_seed())
    opt = slimoptim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(3):
        model(torch.randn(5, 24, dtype=torch.bfloat16)).float().pow(2).mean().backward()
        opt.step()
    checkpoint.save_model(model, tmp_path / "fp32.safetensors", opt, fp32=True)
    with safetensors.safe_open(tmp_path / "fp32.safetensors", framework="pt") as f:
        assert sorted(f.keys()) == ["0.bias", "0.weight", "2.bias"]  # the tie saved once
    checkpoint.save_model(model, tmp_path / "bf16.safetensors")

    fresh = tied_model(new_seed())
    fresh_opt = slimoptim.AdamW(fresh.parameters(), lr=1e-2)
    checkpoint.load_model(fresh, tmp_path / "fp32.safetensors", fresh_opt)
    assert fresh[2].weight is fresh[0].weight
    for p, q in zip(model.parameters(), fresh.parameters(), strict=True):
        assert torch.equal(opt.master_weight(p), fresh_opt.master_weight(q))
        assert torch.equal(p, q)

    plain = tied_model(new_seed())
    checkpoint.load_model(plain, tmp_path / "bf16.safetensors")
    assert_same_tensors(model.state_dict(), plain.state_dict())


def test_corrupted_safetensors_file_is_named(tmp_path):
    model = make_model(torch.bfloat16, new_seed())
    path = tmp_path / "weights.safetensors"
    checkpoint.save_model(model, path)
    path.write_bytes(path.read_bytes()[:100])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError, match="cannot read safetensors file .*weights.safetensors"):
        checkpoint.load_model(model, path)
    assert_same_tensors(before, model.state_dict())


# ------------------------------------------------------- torch.optim interop

TORCH_CASES = {
    "AdamW": dict(lr=1e-3, weight_decay=0.1),
    "Adam": dict(lr=1e-3, weight_decay=0.01),
    "SGD": dict(lr=1e-2, momentum=0.9, nesterov=True),
}


def set_grads(model, seed: int) -> None:
    # bf16-representable gradients, so bf16 and fp32 models see the same values.
    gen = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=gen).bfloat16().to(p.dtype)


def step_both_then_gap(opt, model, torch_opt, torch_model, seed: int) -> float:
    """Five more steps of both on the same gradients, then :func:`relative_gap`."""
    start = {k: v.detach().clone() for k, v in torch_model.named_parameters()}
    for step in range(5, 10):
        set_grads(model, seed + step)
        set_grads(torch_model, seed + step)
        opt.step()
        torch_opt.step()
    return relative_gap(opt, model, torch_model, start)


def relative_gap(opt, model, torch_model, start: dict) -> float:
    """|slimoptim master - torch param| relative to how far torch moved since ``start``."""
    gap = moved = 0.0
    for (name, p), q in zip(model.named_parameters(), torch_model.parameters(), strict=True):
        gap += (opt.master_weight(p) - q.detach()).double().pow(2).sum().item()
        moved += (q.detach() - start[name]).double().pow(2).sum().item()
    return (gap / moved) ** 0.5


@pytest.mark.parametrize("name", TORCH_CASES)
@pytest.mark.parametrize("dtype,state_bits", [(torch.bfloat16, 8), (torch.float32, 32)])
def test_export_to_torch_optim_then_both_step_alike(name, dtype, state_bits):
    seed, kwargs = new_seed(), TORCH_CASES[name]
    model = make_model(dtype, seed)
    opt = getattr(slimoptim, name)(model.parameters(), state_bits=state_bits, **kwargs)
    for step in range(5):
        set_grads(model, seed + step)
        opt.step()
    torch_model = make_model(torch.float32, seed)
    torch_model.load_state_dict(checkpoint.fp32_state_dict(model, opt))
    torch_opt = getattr(torch.optim, name)(torch_model.parameters(), lr=123.0)
    exported = checkpoint.to_torch_state_dict(opt)
    torch_opt.load_state_dict(exported)
    assert torch_opt.param_groups[0]["lr"] == kwargs["lr"]
    # Exported states are the dequantized values, param-shaped.
    p0 = model[0].weight
    state_name = "momentum_buffer" if name == "SGD" else "exp_avg"
    decoded = opt._load_states(opt.state[p0], opt.param_groups[0], p0.numel())[state_name]
    assert torch.equal(torch_opt.state[torch_model[0].weight][state_name], decoded.view(p0.shape))

    # 32-bit states on fp32 params follow torch to float32 rounding; 8-bit
    # states (and bf16 params with a 24-bit master) to a few percent of the path.
    limit = 1e-5 if state_bits == 32 else 0.03
    assert step_both_then_gap(opt, model, torch_opt, torch_model, seed) < limit


def within_momentum_bound(decoded, exact, levels: str, group_size=32) -> bool:
    """Nearest level: |decoded - m| <= half the gap between the levels around m."""
    scale = formats.per_element(
        formats.group_scale(exact.abs(), group_size), group_size, exact.numel()
    ).double()
    bound = scale * momentum_gap(exact / scale, levels) / 2 * (1 + 1e-5) + 1e-30
    return bool(((decoded - exact).abs() <= bound).all())


def within_variance_bound(decoded, exact, group_size=32) -> bool:
    """Round to nearest on the logarithmic code: within 1/16 of v's binade (half a code),
    for v down to 2**-31 of the group's top; below that, at most that much."""
    top = formats.variance_top(exact, group_size).view(torch.float32)
    scale = formats.per_element(top, group_size, exact.numel()).double()
    exact, decoded = exact.double(), decoded.double()
    binade = torch.pow(2.0, torch.frexp(exact).exponent - 1.0)
    in_range = exact > scale * 2.0**-31
    err = (decoded - exact).abs()
    return bool(
        (err[in_range] <= binade[in_range] / 16 * (1 + 1e-9)).all()
        and (decoded[~in_range] <= scale[~in_range] * 2.0**-31).all()
    )


@pytest.mark.parametrize("name", TORCH_CASES)
@pytest.mark.parametrize("state_bits", [8, 32])
def test_import_from_torch_optim_quantizes_within_the_stated_error(name, state_bits):
    seed, kwargs = new_seed(), TORCH_CASES[name]
    torch_model = make_model(torch.float32, seed)
    torch_opt = getattr(torch.optim, name)(torch_model.parameters(), **kwargs)
    for step in range(5):
        set_grads(torch_model, seed + step)
        torch_opt.step()
    model = make_model(torch.bfloat16, new_seed())
    opt = getattr(slimoptim, name)(model.parameters(), lr=7.0, state_bits=state_bits)
    checkpoint.load_fp32_state_dict(model, opt, torch_model.state_dict())
    corrections = [opt.state[p]["correction"].clone() for p in model.parameters()]
    checkpoint.from_torch_state_dict(opt, torch_opt.state_dict())
    assert opt.param_groups[0]["lr"] == kwargs["lr"]
    params = zip(model.parameters(), torch_model.parameters(), corrections, strict=True)
    for p, q, correction in params:
        assert torch.equal(opt.state[p]["correction"], correction), "weights are kept"
        ref = torch_opt.state[q]
        got = opt._load_states(opt.state[p], opt.param_groups[0], p.numel())
        for state_name, decoded in got.items():
            exact = ref[state_name].reshape(-1)
            if state_bits == 32:
                assert torch.equal(decoded, exact)
            elif state_name == "exp_avg_sq":
                assert within_variance_bound(decoded, exact)
            else:
                levels = {s.name: s.levels for s in opt._specs_for(opt.param_groups[0])}
                assert within_momentum_bound(decoded, exact, levels[state_name])
        if name != "SGD":
            assert opt.state[p]["step"] == ref["step"]

    assert step_both_then_gap(opt, model, torch_opt, torch_model, seed) < 0.03


def test_torch_state_dicts_of_another_kind_are_refused_and_change_nothing():
    model = make_model(torch.float32, new_seed())
    torch_sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    torch_adam = torch.optim.Adam(model.parameters())
    torch_amsgrad = torch.optim.AdamW(model.parameters(), amsgrad=True)
    for o in (torch_sgd, torch_adam, torch_amsgrad):
        set_grads(model, new_seed())
        o.step()
    bf16 = make_model(torch.bfloat16, new_seed())
    opt = slimoptim.AdamW(bf16.parameters())
    set_grads(bf16, new_seed())
    opt.step()
    other = make_model(torch.bfloat16, new_seed())
    other.append(nn.Linear(7, 2).bfloat16())
    cases = [
        (opt, torch_sgd.state_dict(), r"has no \['betas', 'eps', 'amsgrad'\]"),
        (opt, torch_adam.state_dict(), "torch Adam \\(L2 weight decay\\) state_dict"),
        (opt, torch_amsgrad.state_dict(), "amsgrad=True"),
        (opt, opt.state_dict(), "it is a slimoptim state_dict"),
        (slimoptim.Adam(other.parameters()), torch_adam.state_dict(), "has 4 parameters"),
    ]
    for target, sd, message in cases:
        before = snapshot(target)
        with pytest.raises(CheckpointError, match=message):
            checkpoint.from_torch_state_dict(target, sd)
        assert_unchanged(target, before)
