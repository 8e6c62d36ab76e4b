"""Muon's fused passes against its reference path, bit for bit.

Without a GPU the kernels run in Triton's interpreter on CPU tensors (conftest.py sets
TRITON_INTERPRET=1); Newton-Schulz runs on PyTorch in both paths. On a GPU the same
tests compare the CUDA kernels with the CUDA reference.
"""

from __future__ import annotations

import copy
import math
import random

import pytest
import torch
from torch import nn

import slimoptim

pytest.importorskip("triton")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# tall, wide, sizes off the 32-value groups, one spanning several interpreter chunks, and
# three tall (48, 32): one Newton-Schulz batch (the second of them gets the NaN below)
SHAPES = [(48, 32), (48, 32), (33, 70), (1, 40), (100, 90), (48, 32)]


def _bits(t: torch.Tensor) -> torch.Tensor:
    """Bit patterns, so that NaNs compare and -0.0 differs from 0.0."""
    views = {2: torch.int16, 4: torch.int32}
    t = t.detach()
    return t.view(views[t.element_size()]) if t.element_size() in views and t.dim() else t


def _pair(dtype, seed, **kwargs):
    gen = torch.Generator().manual_seed(seed)
    ws = [torch.randn(s, generator=gen).to(dtype).to(DEVICE) for s in SHAPES]
    ps = [nn.Parameter(w.clone()) for w in ws]
    qs = [nn.Parameter(w.clone()) for w in ws]
    return (
        ps,
        qs,
        slimoptim.Muon(ps, fused=True, **kwargs),
        slimoptim.Muon(qs, fused=False, **kwargs),
    )


def _set_grads(ps, qs, gen, bad=None):
    for k, (p, q) in enumerate(zip(ps, qs, strict=True)):
        g = torch.randn(p.shape, generator=gen) * 10.0 ** torch.randint(-3, 2, (), generator=gen)
        if k == bad:
            g[0, -1] = math.nan
        g = g.to(p.dtype).to(DEVICE)
        p.grad, q.grad = g.clone(), g.clone()


def _assert_same(opt, ref, ps, qs, start):
    for i, (p, q) in enumerate(zip(ps, qs, strict=True)):
        assert torch.equal(_bits(p), _bits(q)), f"param {i} {tuple(p.shape)} differs"
        assert opt.state[p].keys() == ref.state[q].keys()
        for name, value in opt.state[p].items():
            assert torch.equal(_bits(value), _bits(ref.state[q][name])), f"{name} of param {i}"
    assert any(not torch.equal(p, s) for p, s in zip(ps, start, strict=True)), "nothing moved"


CASES = [
    (torch.bfloat16, dict(lr=0.02)),
    (torch.bfloat16, dict(lr=0.02, nesterov=False, weight_decay=0.0, master_weight_bits=32)),
    (torch.bfloat16, dict(lr=0.01, master_weight_bits=None, state_bits=32)),
    (torch.float16, dict(lr=0.01, adjust_lr_fn="match_rms_adamw", group_size=64)),
    (torch.float32, dict(lr=0.02, momentum=0.9, state_bits=32)),
    (torch.float32, dict(lr=0.02, ns_steps=3)),
]


@pytest.mark.parametrize("dtype,kwargs", CASES, ids=str)
def test_fused_passes_match_the_reference_bit_for_bit(dtype, kwargs):
    """Three steps; in the second, one matrix's gradient holds a NaN (skipped whole)."""
    seed = random.randrange(2**31)
    ps, qs, opt, ref = _pair(dtype, seed, **kwargs)
    start = [p.detach().clone() for p in ps]
    gen = torch.Generator().manual_seed(seed)
    for step in range(3):
        _set_grads(ps, qs, gen, bad=1 if step == 1 else None)
        opt.step()
        ref.step()
    assert "_slimoptim_muon_plans" in opt.__dict__, "the kernels did not run"
    assert opt.state[ps[1]]["step"] == 2 and opt.state[ps[0]]["step"] == 3
    _assert_same(opt, ref, ps, qs, start)


class SequencedMuon(slimoptim.Muon):
    dither = "sequenced"


class StochasticMasterMuon(slimoptim.Muon):
    master_rounding = "stochastic"


@pytest.mark.parametrize("cls", [SequencedMuon, StochasticMasterMuon], ids=str)
def test_a_subclass_that_rounds_otherwise_steps_by_its_reference(cls):
    """Muon's kernels bake in its roundings: such a subclass must not take them."""
    seed = random.randrange(2**31)
    gen = torch.Generator().manual_seed(seed)
    ws = [torch.randn(s, generator=gen).bfloat16().to(DEVICE) for s in SHAPES]
    ps, qs = ([nn.Parameter(w.clone()) for w in ws] for _ in range(2))
    opt, ref = cls(ps, lr=0.02, fused=True), cls(qs, lr=0.02, fused=False)
    start = [p.detach().clone() for p in ps]
    for _ in range(3):
        _set_grads(ps, qs, gen)
        opt.step()
        ref.step()
    assert "_slimoptim_muon_plans" not in opt.__dict__
    _assert_same(opt, ref, ps, qs, start)


def test_newton_schulz_batches_hold_same_shape_matrices_of_a_group_up_to_the_scratch():
    from slimoptim.kernels.muon import _batches  # noqa: PLC0415

    a, b = {}, {}
    shapes = [(4, 16), (16, 4), (4, 16), (3, 5), (4, 16), (3, 5), (4, 16), (4, 16)]
    groups = [a, a, a, a, a, a, b, a]
    items = [(g, torch.empty(s)) for g, s in zip(groups, shapes, strict=True)]
    batches, slots = _batches(items, capacity=3 * 64)
    # (4, 16): three fit the scratch, the fourth opens a batch; (3, 5) (15 elements) stays
    # alone to keep 16-byte slots; the other group's (4, 16) is its own batch.
    assert batches == [[0, 2, 4], [1], [3], [5], [6], [7]]
    assert slots == [0, 0, 1, 0, 2, 0, 0, 0]


def test_fused_tensor_lr_scheduler_groups_and_state_dict_reload():
    seed = random.randrange(2**31)
    ps, qs, opt, ref = _pair(torch.bfloat16, seed, lr=torch.tensor(0.02))
    start = [p.detach().clone() for p in ps]
    for o, params in ((opt, ps), (ref, qs)):
        o.param_groups[0]["params"] = params[:2]
        o.add_param_group({"params": params[2:], "lr": 0.05, "state_bits": 32})
    scheds = [
        torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.05, total_steps=10) for o in (opt, ref)
    ]
    gen = torch.Generator().manual_seed(seed)
    for step in range(4):
        _set_grads(ps, qs, gen)
        opt.step()
        ref.step()
        for s in scheds:
            s.step()
        if step == 1:  # replaces every state dict: the tables must be rebuilt
            opt.load_state_dict(ref.state_dict())
    _assert_same(opt, ref, ps, qs, start)


def test_fused_grad_scaler_unscales_and_skips_on_found_inf():
    seed = random.randrange(2**31)
    ps, qs, opt, ref = _pair(torch.float16, seed, lr=0.02)
    start = [p.detach().clone() for p in ps]
    gen = torch.Generator().manual_seed(seed)
    for step in range(3):
        _set_grads(ps, qs, gen)
        for o in (opt, ref):  # what GradScaler.step hands a slimoptim optimizer
            o.grad_scale = torch.tensor(1024.0, device=DEVICE)
            o.found_inf = torch.tensor(float(step == 1), device=DEVICE)
            o.step()
    assert opt.state[ps[0]]["step"] == 2
    _assert_same(opt, ref, ps, qs, start)


def test_fused_gradient_release_matches_step():
    seed = random.randrange(2**31)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(40, 72, bias=False), nn.Tanh(), nn.Linear(72, 24, bias=False))
    model = model.bfloat16().to(DEVICE)
    ref_model = copy.deepcopy(model)
    opt = slimoptim.Muon(model.parameters(), lr=0.02, fused=True)
    ref = slimoptim.Muon(ref_model.parameters(), lr=0.02, fused=False)
    handle = slimoptim.enable_gradient_release(model, opt, bucket_bytes=0)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(3):
        x = torch.randn(8, 40, generator=gen).bfloat16().to(DEVICE)
        model(x).float().square().mean().backward()
        assert all(p.grad is None for p in model.parameters())
        ref_model(x).float().square().mean().backward()
        ref.step()
        ref.zero_grad()
    for p, q in zip(model.parameters(), ref_model.parameters(), strict=True):
        assert torch.equal(_bits(p), _bits(q)), f"seed {seed}"
    assert len(opt._slimoptim_muon_plans) == 2, "each released matrix steps through the kernels"
    handle.remove()


def test_a_larger_matrix_added_later_regrows_the_shared_scratch():
    seed = random.randrange(2**31)
    ps, qs, opt, ref = _pair(torch.bfloat16, seed, lr=0.02)
    start = [p.detach().clone() for p in ps]
    gen = torch.Generator().manual_seed(seed)
    _set_grads(ps, qs, gen)
    opt.step()
    ref.step()
    big = torch.randn(130, 120, generator=gen).bfloat16().to(DEVICE)
    ps.append(nn.Parameter(big.clone()))
    qs.append(nn.Parameter(big.clone()))
    start.append(big)
    opt.add_param_group({"params": [ps[-1]]})
    ref.add_param_group({"params": [qs[-1]]})
    for _ in range(2):
        _set_grads(ps, qs, gen)
        opt.step()
        ref.step()
    assert opt._slimoptim_muon_scratch[ps[0].device][0].numel() == 130 * 120
    _assert_same(opt, ref, ps, qs, start)


@pytest.mark.skipif(DEVICE == "cuda", reason="checks the CPU refusal outside the interpreter")
def test_fused_true_on_cpu_without_the_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    p = nn.Parameter(torch.randn(8, 4))
    p.grad = torch.randn(8, 4)
    with pytest.raises(RuntimeError, match="fused=True. requires .* supported devices"):
        slimoptim.Muon([p], fused=True).step()


def test_fused_none_on_cpu_uses_the_reference():
    p = nn.Parameter(torch.randn(8, 4))
    p.grad = torch.randn(8, 4)
    opt = slimoptim.Muon([p])
    opt.step()
    assert "_slimoptim_muon_plans" not in opt.__dict__
