"""Trajectories of slimoptim optimizers against torch.optim and float64 references."""

import pytest
import torch

import slimoptim

N = 1000
STEPS = 100


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _bf16_grad(shape, gen):
    # Gradients representable in bf16, so both optimizers see the very same values.
    return torch.randn(shape, generator=gen).bfloat16().float()


CASES = [
    ("AdamW", dict(lr=1e-2, weight_decay=0.1)),
    ("AdamW", dict(lr=1e-3, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.0, maximize=True)),
    ("Adam", dict(lr=1e-2, weight_decay=0.1)),
    ("SGD", dict(lr=1e-2, momentum=0.9, nesterov=True, weight_decay=0.1)),
    ("SGD", dict(lr=1e-2, momentum=0.9, dampening=0.3, maximize=True)),
    ("SGD", dict(lr=1e-2)),
]


@pytest.mark.parametrize("name,kwargs", CASES)
@pytest.mark.parametrize("param_dtype", [torch.float32, torch.bfloat16])
def test_full_precision_mode_matches_torch_optim(name, kwargs, param_dtype):
    gen = torch.Generator().manual_seed(1)
    w0 = torch.randn(N, generator=gen).to(param_dtype).float()
    ref = torch.nn.Parameter(w0.clone())
    ours = torch.nn.Parameter(w0.clone().to(param_dtype))
    ref_opt = getattr(torch.optim, name)([ref], **kwargs)
    opt = getattr(slimoptim, name)([ours], master_weight_bits=32, state_bits=32, **kwargs)
    for _ in range(STEPS):
        g = _bf16_grad(N, gen)
        ref.grad, ours.grad = g.clone(), g.clone().to(param_dtype)
        ref_opt.step()
        opt.step()
    assert _rel(opt.master_weight(ours), ref.detach()) < 1e-6


def _lion_float64(w, grads, lr, betas, wd):
    m = torch.zeros_like(w)
    for g in grads:
        w = w * (1 - lr * wd)
        w = w - lr * torch.sign(betas[0] * m + (1 - betas[0]) * g)
        m = betas[1] * m + (1 - betas[1]) * g
    return w


@pytest.mark.parametrize("param_dtype", [torch.float32, torch.bfloat16])
def test_lion_matches_a_float64_reference(param_dtype):
    gen = torch.Generator().manual_seed(2)
    w0 = torch.randn(N, generator=gen).to(param_dtype).float()
    grads = [_bf16_grad(N, gen) for _ in range(STEPS)]
    p = torch.nn.Parameter(w0.clone().to(param_dtype))
    opt = slimoptim.Lion([p], lr=1e-3, weight_decay=0.1, master_weight_bits=32, state_bits=32)
    for g in grads:
        p.grad = g.to(param_dtype)
        opt.step()
    ref = _lion_float64(w0.double(), [g.double() for g in grads], 1e-3, (0.9, 0.99), 0.1)
    diff = (opt.master_weight(p).double() - ref).abs()
    # sign(direction) of a direction within rounding of zero may flip (a 2*lr jump):
    # allow that in under 1% of elements. The rest differ only by float32 rounding of
    # w (~6e-8 per step) accumulated over 100 steps: 5e-6 relative.
    flipped = diff > 1e-4
    assert flipped.float().mean() < 0.01
    assert _rel(opt.master_weight(p)[~flipped], ref[~flipped]) < 5e-6


@pytest.mark.parametrize("name", ["AdamW", "SGD", "Lion"])
def test_default_compact_mode_tracks_fp32_closely(name):
    kwargs = {"SGD": dict(lr=1e-2, momentum=0.9), "Lion": dict(lr=1e-4)}.get(name, {})
    gen = torch.Generator().manual_seed(3)
    w0 = torch.randn(N, generator=gen).bfloat16().float()
    ref, ours = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(w0.clone().bfloat16())
    ref_opt = torch.optim.AdamW if name == "AdamW" else slimoptim.__dict__[name]
    ref_opt = (
        ref_opt([ref], **kwargs)
        if name == "AdamW"
        else ref_opt([ref], master_weight_bits=32, state_bits=32, **kwargs)
    )
    opt = getattr(slimoptim, name)([ours], **kwargs)
    for _ in range(STEPS):
        g = _bf16_grad(N, gen) + 0.3  # a consistent direction the trajectory must follow
        ref.grad, ours.grad = g.clone(), g.clone().bfloat16()
        ref_opt.step()
        opt.step()
    moved = (ref.detach() - w0).norm()
    # the distance between trajectories, relative to how far the fp32 one moved; Lion's
    # sign update turns small momentum errors into whole +-lr steps, hence its looser bound
    tolerance = 0.1 if name == "Lion" else 0.05
    assert (opt.master_weight(ours) - ref.detach()).norm() / moved < tolerance


def _teacher_task(seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(512, 16, generator=gen)
    teacher = torch.randn(16, 1, generator=gen)
    return x, torch.tanh(x @ teacher)


def _train(model, opt, x, y, steps=300):
    losses = []
    for _ in range(steps):
        loss = torch.nn.functional.mse_loss(model(x.to(model[0].weight.dtype)).float(), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return sum(losses[-20:]) / 20


def _mlp(seed, dtype):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.Tanh(), torch.nn.Linear(64, 1))
    return model.to(dtype)


def test_24_bit_master_closes_the_gap_that_bf16_without_master_leaves():
    """Loss tolerance: within 5% of fp32 AdamW; bf16 with no master is > 20% worse."""
    x, y = _teacher_task(0)
    fp32 = _mlp(0, torch.float32)
    fp32_loss = _train(fp32, torch.optim.AdamW(fp32.parameters(), lr=2e-4), x, y)
    slim = _mlp(0, torch.bfloat16)
    slim_loss = _train(slim, slimoptim.AdamW(slim.parameters(), lr=2e-4), x, y)
    bare = _mlp(0, torch.bfloat16)
    bare_loss = _train(
        bare, slimoptim.AdamW(bare.parameters(), lr=2e-4, master_weight_bits=None), x, y
    )
    assert abs(slim_loss - fp32_loss) < 0.05 * fp32_loss
    assert bare_loss > 1.2 * fp32_loss


def test_heavy_tailed_groups_keep_every_update_bounded():
    """One gradient per group 1000x the rest: |update|/lr stays near fp32 AdamW's."""
    gen = torch.Generator().manual_seed(4)
    n, steps, lr = 32 * 64, 200, 1e-3
    w0 = torch.randn(n, generator=gen).bfloat16().float()
    ref, ours = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(w0.clone().bfloat16())
    ref_opt = torch.optim.AdamW([ref], lr=lr, weight_decay=0.0)
    opt = slimoptim.AdamW([ours], lr=lr, weight_decay=0.0)
    big = torch.zeros(n, dtype=torch.bool)
    big[::32] = True
    worst_ref = worst_ours = 0.0
    for step in range(steps):
        g = torch.randn(n, generator=gen) * torch.where(big, 1000.0, 1.0)
        if step % 3 == 0:
            g = torch.where(big, g, 0.0)  # small elements sometimes get no gradient at all
        g = g.bfloat16().float()
        before_ref, before = ref.detach().clone(), opt.master_weight(ours).clone()
        ref.grad, ours.grad = g.clone(), g.bfloat16()
        ref_opt.step()
        opt.step()
        worst_ref = max(worst_ref, ((ref.detach() - before_ref).abs().max() / lr).item())
        worst_ours = max(worst_ours, ((opt.master_weight(ours) - before).abs().max() / lr).item())
    assert worst_ours <= 3 * worst_ref


def test_small_momentum_decays_to_zero_as_in_fp32():
    """An element that stops receiving gradient must not keep a stuck momentum."""
    n = 64
    p = torch.nn.Parameter(torch.zeros(n, dtype=torch.bfloat16))
    opt = slimoptim.SGD([p], lr=1e-3, momentum=0.9)
    gen = torch.Generator().manual_seed(5)
    for _ in range(5):
        p.grad = torch.randn(n, generator=gen).bfloat16()
        opt.step()
    for _ in range(300):  # only element 0 of each group keeps a gradient
        g = torch.zeros(n)
        g[::32] = 1.0
        p.grad = g.bfloat16()
        opt.step()
    buf = slimoptim.formats.dequantize_momentum(
        opt.state[p]["momentum_buffer"], opt.state[p]["momentum_buffer_scale"], 32
    )
    quiet = torch.ones(n, dtype=torch.bool)
    quiet[::32] = False
    assert buf[quiet].abs().max() == 0  # fp32: 0.9**300 ~ 2e-14 of the start
    assert torch.allclose(buf[~quiet], torch.full((2,), 10.0), rtol=0.02)  # g / (1 - 0.9)


def test_state_bytes_per_param():
    model = torch.nn.Linear(1024, 1000).bfloat16()
    limits = {"AdamW": 3.2, "SGD": 2.1, "Lion": 2.1}
    for name, limit in limits.items():
        for bits, extra in ((24, 0), (32, 1)):
            kwargs = dict(momentum=0.9) if name == "SGD" else {}
            opt = getattr(slimoptim, name)(model.parameters(), master_weight_bits=bits, **kwargs)
            for p in model.parameters():
                p.grad = torch.randn_like(p)
            opt.step()
            per_param = slimoptim.state_nbytes(opt) / sum(p.numel() for p in model.parameters())
            assert per_param <= limit + extra
            assert per_param > limit + extra - 0.2
            report = slimoptim.memory_report(opt)
            assert report["optimizer_bytes"] == slimoptim.state_nbytes(opt)
            assert report["bytes_per_param"]["master_correction"] == bits / 8 - 2
