"""Checkpoints: compact on disk, exact resume (also in a new process), DCP, bad input."""

import os
import random
import subprocess
import sys
import warnings

import pytest
import safetensors
import torch
from code_bounds import momentum_gap
from torch import nn

import slimoptim
from slimoptim import checkpoint, formats
from slimoptim.state_io import CheckpointError

OPTIMIZERS = {
    "AdamW": lambda ps, **mode: slimoptim.AdamW(ps, lr=2e-2, weight_decay=0.1, **mode),
    "Adam": lambda ps, **mode: slimoptim.Adam(ps, lr=2e-2, weight_decay=0.01, **mode),
    "SGD": lambda ps, **mode: slimoptim.SGD(ps, lr=2e-2, momentum=0.9, weight_decay=0.01, **mode),
    "SGD-nesterov": lambda ps, **mode: slimoptim.SGD(
        ps, lr=2e-2, momentum=0.9, nesterov=True, **mode
    ),
    "Lion": lambda ps, **mode: slimoptim.Lion(ps, lr=2e-3, weight_decay=0.1, **mode),
}
# (param dtype, master_weight_bits, state_bits); fp32 params keep no correction, so
# only one master setting is distinct for them.
MODES = [
    (dtype, master, state)
    for dtype in (torch.bfloat16, torch.float16)
    for master in (24, 32, None)
    for state in (8, 32)
] + [(torch.float32, 24, 8), (torch.float32, 24, 32)]


def new_seed() -> int:
    return random.randrange(2**31)


def make_model(dtype, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    # Sizes that are not multiples of the 32-value quantization group.
    return nn.Sequential(nn.Linear(12, 40), nn.Tanh(), nn.Linear(40, 7)).to(dtype)


def build(name: str, dtype, master, state, seed: int):
    """Model, optimizer and a scheduler that also moves betas/momentum (OneCycleLR)."""
    model = make_model(dtype, seed)
    opt = OPTIMIZERS[name](model.parameters(), master_weight_bits=master, state_bits=state)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=opt.defaults["lr"], total_steps=50)
    return model, opt, sched


def train(model, opt, sched, steps: range, data_seed: int) -> None:
    dtype = next(model.parameters()).dtype
    for step in steps:
        gen = torch.Generator().manual_seed(data_seed + step)
        x = torch.randn(16, 12, generator=gen).to(dtype)
        target = torch.randn(16, 7, generator=gen)
        loss = (model(x).float() - target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()


def assert_same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        assert torch.equal(a[key], b[key]), f"{key} differs"


def snapshot(opt) -> tuple:
    """A deep copy of everything load may change: per-param state and group options."""
    state = {id(p): {k: v.clone() for k, v in s.items()} for p, s in opt.state.items()}
    groups = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
    return state, repr(groups)


def assert_unchanged(opt, before: tuple) -> None:
    state, groups = snapshot(opt)
    assert groups == before[1]
    assert state.keys() == before[0].keys()
    for pid in state:
        assert_same_tensors(state[pid], before[0][pid])


# ------------------------------------------------------------------- size


def test_adamw_24_8_checkpoint_is_at_most_5_2_bytes_per_param(tmp_path):
    torch.manual_seed(new_seed())
    model = nn.Sequential(nn.Linear(2048, 1024), nn.Linear(1024, 2048)).to(torch.bfloat16)
    opt = slimoptim.AdamW(model.parameters())
    model(torch.randn(2, 2048, dtype=torch.bfloat16)).sum().backward()
    opt.step()
    sd = opt.state_dict()
    correction = sd["state"][0]["correction"]
    assert correction.dtype == torch.int8 and correction.element_size() == 1
    path = tmp_path / "ckpt.pt"
    torch.save({"model": model.state_dict(), "optimizer": sd}, path)
    n = sum(p.numel() for p in model.parameters())
    assert n > 4_000_000
    per_param = path.stat().st_size / n
    # 2 (bf16) + 1 (correction) + 1 + 1 (states) + 2 * 2 / 32 (bf16 scales) = 5.125
    assert 5.1 < per_param <= 5.2, per_param


# ---------------------------------------------------------- exact resume


def resume_case(name, dtype, master, state, tmp_path, k=4, n=4):
    """(params of an uninterrupted run, params after save at k / load / n more)."""
    data_seed = new_seed()
    model, opt, sched = build(name, dtype, master, state, seed=1)
    train(model, opt, sched, range(k + n), data_seed)
    straight = model.state_dict()

    model, opt, sched = build(name, dtype, master, state, seed=1)
    train(model, opt, sched, range(k), data_seed)
    path = tmp_path / f"{name}.pt"
    checkpoint.save_checkpoint(path, model, opt, sched, extra={"step": k})
    # Fresh objects, built from another init: everything must come from the file.
    model, opt, sched = build(name, dtype, master, state, seed=2)
    extra = checkpoint.load_checkpoint(path, model, opt, sched)
    assert extra == {"step": k}
    train(model, opt, sched, range(k, k + n), data_seed)
    return straight, model.state_dict(), opt


@pytest.mark.parametrize("name", OPTIMIZERS)
@pytest.mark.parametrize("dtype,master,state", MODES, ids=str)
def test_resume_from_disk_is_bit_identical(name, dtype, master, state, tmp_path):
    straight, resumed, opt = resume_case(name, dtype, master, state, tmp_path)
    assert_same_tensors(straight, resumed)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_load_keeps_native_dtypes_without_casting_to_the_param_dtype(dtype, tmp_path, monkeypatch):
    # torch.optim.Optimizer.load_state_dict would cast float32 states (and the
    # int8 correction) to the param dtype; ours must keep every bit and not call it.
    def torch_load_state_dict(*args, **kwargs):
        raise AssertionError("torch.optim.Optimizer.load_state_dict was called")

    monkeypatch.setattr(torch.optim.Optimizer, "load_state_dict", torch_load_state_dict)
    model, opt, sched = build("AdamW", dtype, 24, 32, seed=new_seed())
    train(model, opt, sched, range(3), new_seed())
    saved = opt.state_dict()
    path = tmp_path / "opt.pt"
    torch.save(saved, path)
    fresh_model, fresh, _ = build("AdamW", dtype, 24, 32, seed=new_seed())
    fresh.load_state_dict(torch.load(path))
    loaded = fresh.state_dict()
    for pid, entries in saved["state"].items():
        assert loaded["state"][pid]["exp_avg_sq"].dtype == torch.float32
        assert loaded["state"][pid]["correction"].dtype == torch.int8
        assert_same_tensors(entries, loaded["state"][pid])
    # The float32 states hold values a bf16/fp16 cast would change.
    v = saved["state"][0]["exp_avg_sq"]
    assert not torch.equal(v.to(dtype).float(), v)


CHILD = """
import sys, torch
sys.path.insert(0, sys.argv[1])
import test_checkpoint as t
from slimoptim import checkpoint, formats
from slimoptim.state_io import CheckpointError
name, dtype, master, state = sys.argv[2], getattr(torch, sys.argv[3]), sys.argv[4], int(sys.argv[5])
master = None if master == "None" else int(master)
model, opt, sched = t.build(name, dtype, master, state, seed=3)
checkpoint.load_checkpoint(sys.argv[6], model, opt, sched)
t.train(model, opt, sched, range(4, 8), int(sys.argv[7]))
torch.save(model.state_dict(), sys.argv[8])
"""


@pytest.mark.parametrize(
    "name,dtype,master,state",
    [
        ("AdamW", "bfloat16", 24, 8),
        ("SGD-nesterov", "float16", 32, 32),
        ("Lion", "bfloat16", None, 8),
    ],
)
def test_resume_in_a_new_process_is_bit_identical(name, dtype, master, state, tmp_path):
    data_seed = new_seed()
    torch_dtype = getattr(torch, dtype)
    model, opt, sched = build(name, torch_dtype, master, state, seed=1)
    train(model, opt, sched, range(4), data_seed)
    path, out = tmp_path / "ckpt.pt", tmp_path / "params.pt"
    checkpoint.save_checkpoint(path, model, opt, sched)
    train(model, opt, sched, range(4, 8), data_seed)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    args = [os.path.dirname(os.path.abspath(__file__)), name, dtype, str(master), str(state)]
    subprocess.run(
        [sys.executable, "-c", CHILD, *args, str(path), str(data_seed), str(out)],
        check=True,
        env=env,
    )
    assert_same_tensors(model.state_dict(), torch.load(out))


# ------------------------------------------------------------------- DCP


@pytest.mark.parametrize("flatten", [False, True])
@pytest.mark.parametrize("name", ["AdamW", "SGD", "Lion"])
def test_distributed_checkpoint_resume_is_bit_identical(name, flatten, tmp_path):
    dcp = pytest.importorskip("torch.distributed.checkpoint")
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )

    options = StateDictOptions(flatten_optimizer_state_dict=flatten)
    data_seed = new_seed()
    model, opt, sched = build(name, torch.bfloat16, 24, 8, seed=1)
    train(model, opt, sched, range(6), data_seed)
    straight = model.state_dict()

    model, opt, sched = build(name, torch.bfloat16, 24, 8, seed=1)
    train(model, opt, sched, range(3), data_seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "no process group: running without one"
        osd = get_optimizer_state_dict(model, opt, options=options)
        saved = {"model": model.state_dict(), "optim": osd, "sched": sched.state_dict()}
        dcp.save(saved, checkpoint_id=tmp_path)
        model, opt, sched = build(name, torch.bfloat16, 24, 8, seed=2)
        template = {
            "model": model.state_dict(),
            "optim": get_optimizer_state_dict(model, opt, options=options),
            "sched": sched.state_dict(),
        }
        dcp.load(template, checkpoint_id=tmp_path)
        model.load_state_dict(template["model"])
        set_optimizer_state_dict(model, opt, template["optim"], options=options)
        sched.load_state_dict(template["sched"])
    for saved_state in opt.state.values():
        assert saved_state["correction"].dtype == torch.int8
    train(model, opt, sched, range(3, 6), data_seed)
    assert_same_tensors(straight, model.state_dict())


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
