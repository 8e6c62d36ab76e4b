"""slimoptim.Muon's drop-in semantics: groups, state_dict, checkpoints, non-finite
gradients, GradScaler, gradient release, memory, bad input, the parameter split (CPU)."""

import copy
import io
import math
import random

import pytest
import torch
from muon_common import SHAPES, TinyNet, new_seed, teacher_batches
from torch import nn

import slimoptim
from slimoptim import checkpoint


def test_param_groups_step_as_separate_optimizers():
    """Per-group options and modes; add_param_group; a param without grad gets no state."""
    gen = torch.Generator().manual_seed(new_seed())
    ws = [torch.randn(s, generator=gen).bfloat16() for s in [(16, 40), (40, 16), (8, 8)]]
    ps = [nn.Parameter(w.clone()) for w in ws]
    qs = [nn.Parameter(w.clone()) for w in ws]
    opt = slimoptim.Muon([{"params": [ps[0]], "lr": 0.05, "nesterov": False}], lr=0.01)
    opt.add_param_group({"params": [ps[1], ps[2]], "state_bits": 32, "weight_decay": 0.0})
    solo = [
        slimoptim.Muon([qs[0]], lr=0.05, nesterov=False),
        slimoptim.Muon([qs[1]], lr=0.01, state_bits=32, weight_decay=0.0),
    ]
    for _ in range(5):
        for p, q in zip(ps[:2], qs[:2], strict=True):
            p.grad = torch.randn(p.shape, generator=gen).bfloat16()
            q.grad = p.grad.clone()
        opt.step()
        for o in solo:
            o.step()
    for p, q, o in zip(ps[:2], qs[:2], solo, strict=True):
        assert torch.equal(p, q)
        assert all(torch.equal(v, o.state[q][k]) for k, v in opt.state[p].items())
    assert opt.state[ps[1]]["momentum_buffer"].dtype == torch.float32
    assert ps[2] not in opt.state and torch.equal(ps[2], qs[2])


def test_non_contiguous_param_steps_like_a_contiguous_one():
    gen = torch.Generator().manual_seed(new_seed())
    a = nn.Parameter(torch.randn(48, 32, generator=gen).bfloat16())
    b = nn.Parameter(torch.empty(32, 48, dtype=torch.bfloat16))
    b.data = a.detach().t().contiguous().t()  # the same (48, 32) values, column-major
    assert not b.is_contiguous()
    opts = [slimoptim.Muon([a], lr=0.02), slimoptim.Muon([b], lr=0.02)]
    for _ in range(3):
        g = torch.randn(48, 32, generator=gen).bfloat16()
        a.grad, b.grad = g.clone(), g.clone()
        for o in opts:
            o.step()
    assert torch.equal(a, b)
    assert torch.equal(opts[0].master_weight(a), opts[1].master_weight(b))


def _train(model, opt, steps, seed):
    for tokens, targets in teacher_batches(seed, steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(tokens).float(), targets).backward()
        opt.step()


def _hidden_model_and_muon(seed, dtype=torch.bfloat16, **mode):
    torch.manual_seed(seed)
    model = TinyNet().to(dtype)
    for p in slimoptim.muon_param_groups(model).adamw:
        p.requires_grad_(False)  # only Muon's matrices train here
    return model, slimoptim.Muon([p for p in model.parameters() if p.requires_grad], **mode)


@pytest.mark.parametrize("on_disk", [False, True])
def test_state_dict_round_trip_continues_bit_identically(on_disk):
    model, opt = _hidden_model_and_muon(1, lr=0.02)
    _train(model, opt, 3, seed=5)
    sd_model, sd_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    if on_disk:
        buf = io.BytesIO()
        torch.save({"model": sd_model, "opt": sd_opt}, buf)
        buf.seek(0)
        loaded = torch.load(buf, weights_only=True)
        sd_model, sd_opt = loaded["model"], loaded["opt"]
    assert sd_opt["slimoptim"]["optimizer"] == "Muon"
    _train(model, opt, 4, seed=6)
    model2, opt2 = _hidden_model_and_muon(2, lr=0.02)
    model2.load_state_dict(sd_model)
    opt2.load_state_dict(sd_opt)
    _train(model2, opt2, 4, seed=6)
    for p, q in zip(model.parameters(), model2.parameters(), strict=True):
        assert torch.equal(p, q)
    for p, q in zip(opt.param_groups[0]["params"], opt2.param_groups[0]["params"], strict=True):
        assert torch.equal(opt.master_weight(p), opt2.master_weight(q))


def test_state_dict_of_another_optimizer_is_refused():
    model, opt = _hidden_model_and_muon(1)
    adamw = slimoptim.AdamW([p for p in model.parameters() if p.requires_grad])
    with pytest.raises(ValueError, match="AdamW optimizer, not Muon"):
        opt.load_state_dict(adamw.state_dict())


MODES = [(torch.bfloat16, 24, 8), (torch.bfloat16, None, 8), (torch.float32, 32, 32)]


@pytest.mark.parametrize("dtype,master,state", MODES, ids=str)
def test_save_and_load_checkpoint_resume_bit_identically(dtype, master, state, tmp_path):
    seed, mode = new_seed(), dict(master_weight_bits=master, state_bits=state)

    def build(init_seed):
        model, opt = _hidden_model_and_muon(init_seed, dtype, lr=0.02, **mode)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.05, total_steps=20)
        return model, opt, sched

    def train(model, opt, sched, steps, data_seed):
        for _ in range(steps):
            _train(model, opt, 1, data_seed)
            data_seed += 1
            sched.step()

    model, opt, sched = build(1)
    train(model, opt, sched, 6, seed)
    straight = model.state_dict()
    model, opt, sched = build(1)
    train(model, opt, sched, 3, seed)
    checkpoint.save_checkpoint(tmp_path / "ckpt.pt", model, opt, sched, extra={"step": 3})
    model, opt, sched = build(2)
    assert checkpoint.load_checkpoint(tmp_path / "ckpt.pt", model, opt, sched) == {"step": 3}
    train(model, opt, sched, 3, seed + 3)
    for key, value in model.state_dict().items():
        assert torch.equal(value, straight[key]), f"{key}, seed {seed}"


@pytest.mark.parametrize("bad_value", [math.nan, math.inf])
def test_a_non_finite_gradient_skips_its_whole_matrix_only(bad_value):
    gen = torch.Generator().manual_seed(new_seed())
    ws = [torch.randn(s, generator=gen).bfloat16() for s in SHAPES]
    clean = [nn.Parameter(w.clone()) for w in ws]
    dirty = [nn.Parameter(w.clone()) for w in ws]
    clean_opt, dirty_opt = slimoptim.Muon(clean, lr=0.02), slimoptim.Muon(dirty, lr=0.02)
    for step in range(4):
        grads = [torch.randn(s, generator=gen).bfloat16() for s in SHAPES]
        for p, q, g in zip(clean, dirty, grads, strict=True):
            p.grad, q.grad = g.clone(), g.clone()
        if step == 2:
            dirty[0].grad[3, 5] = bad_value
            before = dirty[0].detach().clone()
            state_before = {k: v.clone() for k, v in dirty_opt.state[dirty[0]].items()}
        dirty_opt.step()
        if step == 2:
            assert torch.equal(dirty[0], before)
            for k, v in dirty_opt.state[dirty[0]].items():
                assert torch.equal(v, state_before[k]), f"{k} changed"
            continue  # the clean run skips this step for matrix 0 too
        clean_opt.step()
    assert torch.equal(dirty[1].detach().isfinite(), torch.ones_like(dirty[1], dtype=torch.bool))
    assert dirty_opt.state[dirty[0]]["step"] == 3 and dirty_opt.state[dirty[1]]["step"] == 4
    # matrix 0 stepped as if the bad step had not happened
    assert torch.equal(dirty[0], clean[0])


def test_grad_scaler_skips_the_whole_step():
    torch.manual_seed(new_seed())
    model = nn.Linear(16, 8, bias=False).half()
    opt = slimoptim.Muon(model.parameters(), lr=0.02)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    for step in range(3):
        x = torch.randn(4, 16).half()
        scaler.scale(model(x).float().pow(2).mean()).backward()
        if step == 1:
            model.weight.grad[0, 0] = math.inf
            before = opt.master_weight(model.weight).clone()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        if step == 1:
            assert torch.equal(opt.master_weight(model.weight), before)
    assert opt.state[model.weight]["step"] == 2


@pytest.mark.parametrize("master,state", [(24, 8), (24, 32), (None, 8)])
def test_gradient_release_is_bit_identical_to_step(master, state):
    """Muon for the hidden matrices and AdamW for the rest, each released in backward."""
    seed = new_seed()
    torch.manual_seed(seed)
    ref_model = TinyNet().bfloat16()
    model = copy.deepcopy(ref_model)
    mode = dict(master_weight_bits=master, state_bits=state)
    opts = []
    for m in (ref_model, model):
        split = slimoptim.muon_param_groups(m)
        opts.append((slimoptim.Muon(split.muon, lr=0.02, **mode), slimoptim.AdamW(split.adamw)))
    handles = [
        slimoptim.enable_gradient_release(model, o, bucket_bytes=random.choice([0, 2**20]))
        for o in opts[1]
    ]
    for tokens, targets in teacher_batches(seed, 3):
        nn.functional.cross_entropy(ref_model(tokens).float(), targets).backward()
        for o in opts[0]:
            o.step()
            o.zero_grad()
        nn.functional.cross_entropy(model(tokens).float(), targets).backward()
        assert all(p.grad is None for p in model.parameters())
    for p, q in zip(ref_model.parameters(), model.parameters(), strict=True):
        assert torch.equal(p, q), f"seed {seed}"
    for h in handles:
        h.remove()


def test_memory_report_at_default_is_4_06_bytes_per_param():
    model = nn.Sequential(nn.Linear(256, 512, bias=False), nn.Linear(512, 256, bias=False))
    model = model.bfloat16()
    opt = slimoptim.Muon(model.parameters())
    model(torch.randn(2, 256).bfloat16()).float().sum().backward()
    opt.step()
    report = slimoptim.memory_report(opt)
    per = report["bytes_per_param"]
    # 2 (bf16) + 1 (int8 correction) + 1 (int8 momentum) + 2/32 (bf16 scales) = 4.0625
    held = per["params"] + per["master_correction"] + per["states"] + per["state_scales"]
    assert held == 4.0625
    assert 2.0625 < report["optimizer_bytes_per_param"] < 2.063  # + two 4-byte step counters
    exact = slimoptim.Muon(model.parameters(), master_weight_bits=32, state_bits=32)
    exact.step()
    assert slimoptim.memory_report(exact)["bytes_per_param"]["states"] == 4.0


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(lr=-1.0), "learning rate"),
        (dict(momentum=-0.1), "momentum"),
        (dict(weight_decay=-0.1), "weight_decay"),
        (dict(eps=-1.0), "epsilon"),
        (dict(ns_steps=100), "ns_steps"),
        (dict(ns_steps=2.5), "ns_steps"),
        (dict(ns_coefficients=(1.0, 2.0)), "ns_coefficients"),
        (dict(adjust_lr_fn="rms"), "function rms is not supported.*adjust_lr_fn"),
        (dict(master_weight_bits=16), "master_weight_bits"),
        (dict(state_bits=4), "state_bits"),
    ],
)
def test_invalid_arguments_name_the_parameter(kwargs, match):
    with pytest.raises(ValueError, match=match):
        slimoptim.Muon([nn.Parameter(torch.randn(4, 4))], **kwargs)


def test_non_matrix_params_are_refused_with_the_recipe():
    with pytest.raises(ValueError, match=r"2D parameters .* size: \(8,\).*muon_param_groups"):
        slimoptim.Muon([nn.Parameter(torch.randn(8, 4)), nn.Parameter(torch.randn(8))])
    opt = slimoptim.Muon([nn.Parameter(torch.randn(8, 4))])
    with pytest.raises(ValueError, match="2D"):
        opt.add_param_group({"params": [nn.Parameter(torch.randn(2, 3, 4))]})
    assert len(opt.param_groups) == 1


def test_bad_gradients_are_refused_before_any_matrix_steps():
    a, b = nn.Parameter(torch.randn(8, 4)), nn.Parameter(torch.randn(8, 4))
    opt = slimoptim.Muon([a, b])
    before = a.detach().clone()
    a.grad = torch.randn(8, 4)
    b.grad = torch.randn(8, 4).to_sparse()
    with pytest.raises(TypeError, match="sparse"):
        opt.step()
    assert torch.equal(a, before) and a not in opt.state


def test_dtensor_params_are_refused():
    import torch.distributed as dist

    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    from torch.distributed.tensor import DeviceMesh, Replicate, distribute_tensor

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        mesh = DeviceMesh("cpu", [0])
        p = nn.Parameter(distribute_tensor(torch.randn(8, 4), mesh, [Replicate()]))
        with pytest.raises(TypeError, match="DTensor.*Newton-Schulz needs the whole matrix"):
            slimoptim.Muon([p])
    finally:
        dist.destroy_process_group()


def test_muon_param_groups_splits_the_usual_way():
    model = TinyNet()
    model.head.weight = model.embed.weight  # tied: goes to AdamW, once
    model.fc2.bias.requires_grad_(False)
    split = slimoptim.muon_param_groups(model)
    assert [id(p) for p in split.muon] == [id(model.fc1.weight), id(model.fc2.weight)]
    expected = [model.embed.weight, model.fc1.bias, model.norm.weight, model.norm.bias]
    assert [id(p) for p in split.adamw] == [id(p) for p in expected]
    # a head with another name, given by its full dotted name
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    split = slimoptim.muon_param_groups(net, exclude=["2"])
    assert [id(p) for p in split.muon] == [id(net[0].weight)]
    assert len(split.adamw) == 3


def test_without_triton_fused_true_is_an_error_and_none_runs_the_reference(monkeypatch):
    from slimoptim import kernels

    monkeypatch.setattr(kernels, "triton_available", lambda: False)
    # a param fused=True accepts (CUDA, or CPU under the interpreter): the error is Triton's
    device = "cuda" if torch.cuda.is_available() else "cpu"
    p = nn.Parameter(torch.randn(8, 4, device=device))
    p.grad = torch.randn(8, 4, device=device)
    with pytest.raises(RuntimeError, match="needs Triton"):
        slimoptim.Muon([p], fused=True).step()
    opt = slimoptim.Muon([p])
    opt.step()
    assert opt.state[p]["step"] == 1


def test_torch_muon_error_inputs_raise_as_torch_muon_does():
    """torch's own Muon error inputs (optim_db): the same error type, and a message that
    starts as torch's. Complex params are refused at construction (TypeError, as by every
    slimoptim optimizer) instead of at the first step."""
    pytest.importorskip("expecttest")  # torch.testing._internal needs it
    from torch_optim_infos import TORCH_INFOS

    errors = TORCH_INFOS["Muon"].optim_error_inputs_func(device="cpu", dtype=torch.float32)
    checked = 0
    for error in errors:
        case = error.optimizer_error_input
        if "complex" in case.desc:
            with pytest.raises(TypeError, match="complex"):
                slimoptim.Muon(case.params, **case.kwargs).step()
            continue
        if error.error_type is UserWarning:
            with pytest.warns(UserWarning, match=error.error_regex):
                slimoptim.Muon(case.params, **case.kwargs)
        else:
            with pytest.raises(error.error_type, match=error.error_regex):
                slimoptim.Muon(case.params, **case.kwargs)
        checked += 1
    assert checked >= 8
