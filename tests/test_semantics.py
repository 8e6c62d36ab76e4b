"""torch.optim semantics: schedulers, closures, groups, state_dict, bad input, non-finite."""

import io
import math

import pytest
import torch

import slimoptim


def _pair(name, n=200, dtype=torch.float32, seed=0, **kwargs):
    gen = torch.Generator().manual_seed(seed)
    w0 = torch.randn(n, generator=gen)
    ref = torch.nn.Parameter(w0.clone())
    ours = torch.nn.Parameter(w0.clone().to(dtype))
    return (
        ref,
        getattr(torch.optim, name)([ref], **kwargs),
        ours,
        getattr(slimoptim, name)([ours], master_weight_bits=32, state_bits=32, **kwargs),
    )


@pytest.mark.parametrize(
    "name,kwargs",
    [("AdamW", dict(lr=1e-2, weight_decay=0.1)), ("SGD", dict(lr=1e-2, momentum=0.9))],
)
def test_one_cycle_lr_with_cycling_momentum_matches_torch(name, kwargs):
    ref, ref_opt, ours, opt = _pair(name, **kwargs)
    scheds = [
        torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.05, total_steps=60, cycle_momentum=True)
        for o in (ref_opt, opt)
    ]
    gen = torch.Generator().manual_seed(1)
    for _ in range(60):
        g = torch.randn(200, generator=gen)
        ref.grad, ours.grad = g.clone(), g.clone()
        ref_opt.step()
        opt.step()
        for s in scheds:
            s.step()
    key = "betas" if name == "AdamW" else "momentum"
    assert opt.param_groups[0][key] == ref_opt.param_groups[0][key]
    assert torch.allclose(ours, ref, rtol=1e-5, atol=1e-6)


def test_tensor_lr_and_closure():
    ref, ref_opt, ours, opt = _pair("AdamW", lr=torch.tensor(0.01))
    gen = torch.Generator().manual_seed(2)
    for _ in range(10):
        x = torch.randn(200, generator=gen)
        for p, o in ((ref, ref_opt), (ours, opt)):

            def closure(p=p, o=o, x=x):
                o.zero_grad()
                loss = (p * x).sum() ** 2
                loss.backward()
                return loss

            loss = o.step(closure)
            assert loss is not None
    assert torch.allclose(ours, ref, rtol=1e-5, atol=1e-6)


def test_zero_grad_add_param_group_frozen_and_gradless_params():
    a = torch.nn.Parameter(torch.randn(10, dtype=torch.bfloat16))
    frozen = torch.nn.Parameter(torch.randn(10, dtype=torch.bfloat16), requires_grad=False)
    idle = torch.nn.Parameter(torch.randn(10, dtype=torch.bfloat16))
    opt = slimoptim.AdamW([a, frozen, idle], lr=0.1)
    late = torch.nn.Parameter(torch.randn(40, dtype=torch.bfloat16))
    opt.add_param_group({"params": [late], "lr": 0.5, "state_bits": 32})
    before_idle = idle.detach().clone()
    a.grad, late.grad = torch.randn_like(a), torch.randn_like(late)
    opt.step()
    assert frozen not in opt.state and idle not in opt.state
    assert torch.equal(idle, before_idle)
    assert opt.state[late]["exp_avg"].dtype == torch.float32  # per-group override
    assert opt.state[a]["exp_avg"].dtype == torch.int8
    opt.zero_grad()
    assert a.grad is None
    a.grad = torch.randn_like(a)
    opt.zero_grad(set_to_none=False)
    assert a.grad is not None and a.grad.eq(0).all()


def test_tied_parameters_are_stepped_once():
    emb = torch.nn.Embedding(50, 8).bfloat16()
    head = torch.nn.Linear(8, 50, bias=False).bfloat16()
    head.weight = emb.weight  # tied
    model = torch.nn.Sequential(emb, head)
    ref = [p.detach().float().clone() for p in model.parameters()]
    assert len(ref) == 1
    # both names of the tied weight, as a list built from the modules would hold them
    with pytest.warns(UserWarning, match="duplicate"):
        opt = slimoptim.SGD([emb.weight, head.weight], lr=0.1, master_weight_bits=32, state_bits=32)
    assert len(opt.param_groups[0]["params"]) == 2
    model(torch.arange(10)).float().sum().backward()
    g = emb.weight.grad.float().clone()
    opt.step()
    # stepped once: w - lr * g (float32 lr) rounded once, but a 32-bit master on a bf16
    # midpoint is kept one float32 step inside it (docs/formats.md): within 1.5 steps
    # (twice, stepped twice, it would be off by about |lr * g|)
    exact = ref[0].double() - torch.tensor(0.1).double() * g.double()
    error = (opt.master_weight(emb.weight).double() - exact).abs()
    assert (error <= exact.abs() * 1.5 * 2.0**-23 + 2.0**-149).all()


def test_a_param_appended_twice_after_a_step_is_still_stepped_once():
    # The duplicate check is cached on the groups' params lists (identity, length): an
    # in-place append must be seen.
    a, b = (torch.nn.Parameter(torch.randn(8)) for _ in range(2))
    opt = slimoptim.SGD([a], lr=0.1, master_weight_bits=32, state_bits=32)
    a.grad = torch.ones(8)
    opt.step()
    opt.param_groups[0]["params"] += [b, b]
    before = b.detach().clone()
    b.grad = torch.full((8,), 2.0)
    opt.step()
    assert torch.allclose(b.detach(), before - 0.2)


def test_a_param_swapped_in_twice_in_place_is_still_stepped_once():
    # Same list, same length: the cached duplicate check keys on the ids themselves.
    a, b = (torch.nn.Parameter(torch.randn(8)) for _ in range(2))
    opt = slimoptim.SGD([a, b], lr=0.1, master_weight_bits=32, state_bits=32)
    a.grad, b.grad = torch.ones(8), torch.ones(8)
    opt.step()
    opt.param_groups[0]["params"][1] = a
    before = a.detach().clone()
    a.grad = torch.full((8,), 2.0)
    opt.step()
    assert torch.allclose(a.detach(), before - 0.2)


def test_non_contiguous_parameters():
    base = torch.randn(16, 32)
    p = torch.nn.Parameter(base.t())  # non-contiguous view
    assert not p.is_contiguous()
    q = torch.nn.Parameter(p.detach().contiguous().clone())
    opts = [slimoptim.AdamW([x], lr=0.1, master_weight_bits=32, state_bits=32) for x in (p, q)]
    for _ in range(3):
        g = torch.randn(32, 16)
        p.grad, q.grad = g.clone(), g.clone()
        for o in opts:
            o.step()
    assert torch.equal(p.detach(), q.detach())


@pytest.mark.parametrize("name", ["AdamW", "Adam", "SGD", "Lion"])
@pytest.mark.parametrize("on_disk", [False, True])
def test_state_dict_round_trip_continues_bit_identically(name, on_disk):
    kwargs = dict(momentum=0.9, nesterov=True) if name == "SGD" else {}

    def build():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 33), torch.nn.Linear(33, 1)).bfloat16()
        return model, getattr(slimoptim, name)(model.parameters(), lr=1e-2, **kwargs)

    def train(model, opt, steps, seed):
        gen = torch.Generator().manual_seed(seed)
        for _ in range(steps):
            opt.zero_grad()
            model(torch.randn(4, 8, generator=gen).bfloat16()).float().pow(2).sum().backward()
            opt.step()

    model, opt = build()
    train(model, opt, 3, 1)
    sd_model, sd_opt = model.state_dict(), opt.state_dict()
    if on_disk:
        buf = io.BytesIO()
        torch.save({"model": sd_model, "opt": sd_opt}, buf)
        buf.seek(0)
        loaded = torch.load(buf, weights_only=True)
        sd_model, sd_opt = loaded["model"], loaded["opt"]
    else:
        sd_model = {k: v.clone() for k, v in sd_model.items()}
        sd_opt = {
            **sd_opt,
            "state": {k: {n: t.clone() for n, t in s.items()} for k, s in sd_opt["state"].items()},
        }
    train(model, opt, 4, 2)
    model2, opt2 = build()
    model2.load_state_dict(sd_model)
    opt2.load_state_dict(sd_opt)
    train(model2, opt2, 4, 2)
    for p, q in zip(model.parameters(), model2.parameters(), strict=True):
        assert torch.equal(p, q)
        assert torch.equal(opt.master_weight(p), opt2.master_weight(q))


def _stepped(name="AdamW", dtype=torch.bfloat16, **kwargs):
    p = torch.nn.Parameter(torch.randn(40, dtype=dtype))
    opt = getattr(slimoptim, name)([p], **kwargs)
    p.grad = torch.randn_like(p)
    opt.step()
    return p, opt


def test_load_state_dict_rejects_mismatches_and_changes_nothing():
    p, opt = _stepped()
    snapshot = {k: v.clone() for k, v in opt.state[p].items()}
    _, lion = _stepped("Lion")
    with pytest.raises(ValueError, match="Lion optimizer, not AdamW"):
        opt.load_state_dict(lion.state_dict())
    _, other_mode = _stepped(state_bits=32)
    with pytest.raises(ValueError, match="state_bits"):
        opt.load_state_dict(other_mode.state_dict())
    bigger = torch.nn.Parameter(torch.randn(41, dtype=torch.bfloat16))
    big_opt = slimoptim.AdamW([bigger])
    bigger.grad = torch.randn_like(bigger)
    big_opt.step()
    with pytest.raises(ValueError, match="shape"):
        opt.load_state_dict(big_opt.state_dict())
    with pytest.raises(ValueError, match="not written by a slimoptim"):
        opt.load_state_dict(torch.optim.AdamW([torch.nn.Parameter(torch.randn(40))]).state_dict())
    sd = opt.state_dict()
    sd["slimoptim"] = {**sd["slimoptim"], "format_version": 99}
    with pytest.raises(ValueError, match="format_version"):
        opt.load_state_dict(sd)
    for k, v in snapshot.items():
        assert torch.equal(opt.state[p][k], v)


def test_load_state_dict_keeps_float32_states_of_bf16_params_exact():
    # torch.optim.Optimizer.load_state_dict would cast these to bf16 and lose bits.
    p, opt = _stepped(state_bits=32, master_weight_bits=32)
    sd = opt.state_dict()
    q = torch.nn.Parameter(p.detach().clone())
    opt2 = slimoptim.AdamW([q], state_bits=32, master_weight_bits=32)
    opt2.load_state_dict(sd)
    assert opt2.state[q]["exp_avg"].dtype == torch.float32
    assert torch.equal(opt2.state[q]["exp_avg_sq"], opt.state[p]["exp_avg_sq"])


@pytest.mark.parametrize(
    "bad,match",
    [
        (dict(lr=-1.0), "learning rate"),
        (dict(betas=(1.0, 0.9)), "beta"),
        (dict(eps=-1.0), "epsilon"),
        (dict(weight_decay=-0.1), "weight_decay"),
        (dict(master_weight_bits=16), "master_weight_bits"),
        (dict(state_bits=4), "state_bits"),
        (dict(group_size=0), "group_size"),
        (dict(amsgrad=True), "amsgrad"),
    ],
)
def test_invalid_arguments_name_the_parameter(bad, match):
    with pytest.raises(ValueError, match=match):
        slimoptim.AdamW([torch.nn.Parameter(torch.randn(3))], **bad)


def test_amsgrad_is_refused_per_group_too():
    with pytest.raises(ValueError, match="amsgrad"):
        slimoptim.AdamW([{"params": [torch.nn.Parameter(torch.randn(3))], "amsgrad": True}])


def test_load_state_dict_hooks_run():
    p, opt = _stepped()
    seen = []
    opt.register_load_state_dict_pre_hook(lambda o, sd: seen.append("pre"))
    opt.register_load_state_dict_post_hook(lambda o: seen.append("post"))
    opt.load_state_dict(opt.state_dict())
    assert seen == ["pre", "post"]


def test_invalid_sgd_and_lion_arguments():
    p = [torch.nn.Parameter(torch.randn(3))]
    with pytest.raises(ValueError, match="momentum"):
        slimoptim.SGD(p, momentum=-0.1)
    with pytest.raises(ValueError, match="Nesterov"):
        slimoptim.SGD(p, momentum=0.0, nesterov=True)
    with pytest.raises(ValueError, match="beta"):
        slimoptim.Lion(p, betas=(0.9, 1.5))


def test_bad_params_and_grads():
    with pytest.raises(TypeError, match="int64"):
        slimoptim.AdamW([torch.zeros(3, dtype=torch.int64)])
    with pytest.raises(TypeError, match="complex"):
        slimoptim.AdamW([torch.nn.Parameter(torch.randn(3, dtype=torch.complex64))])
    p = torch.nn.Parameter(torch.randn(4, 3))
    opt = slimoptim.AdamW([p])
    p.grad = torch.randn(4, 3).to_sparse()
    with pytest.raises(TypeError, match="sparse"):
        opt.step()
    emb = torch.nn.Embedding(5, 3, sparse=True)
    opt = slimoptim.SGD(emb.parameters(), lr=0.1)
    emb(torch.tensor([1])).sum().backward()
    with pytest.raises(TypeError, match="sparse"):
        opt.step()


@pytest.mark.parametrize("bad_value", [math.nan, math.inf])
@pytest.mark.parametrize("name", ["AdamW", "SGD", "Lion"])
def test_non_finite_gradient_freezes_only_its_group(bad_value, name):
    kwargs = dict(momentum=0.9) if name == "SGD" else {}
    gen = torch.Generator().manual_seed(3)
    w = [torch.randn(100, generator=gen).bfloat16() for _ in range(2)]
    clean = [torch.nn.Parameter(x.clone()) for x in w]
    dirty = [torch.nn.Parameter(x.clone()) for x in w]
    opts = [getattr(slimoptim, name)(ps, lr=0.01, **kwargs) for ps in (clean, dirty)]
    for step in range(4):
        grads = [torch.randn(100, generator=gen).bfloat16() for _ in range(2)]
        for ps in (clean, dirty):
            for p, g in zip(ps, grads, strict=True):
                p.grad = g.clone()
        if step == 1:
            dirty[0].grad[40] = bad_value  # element 40 sits in group 1 (32..63)
            frozen = dirty[0].detach()[32:64].clone()
            frozen_state = {k: v.clone() for k, v in opts[1].state[dirty[0]].items()}
        for o in opts:
            o.step()
        if step == 1:
            assert torch.equal(dirty[0].detach()[32:64], frozen)
            code = "exp_avg" if name != "SGD" else "momentum_buffer"
            assert torch.equal(opts[1].state[dirty[0]][code][32:64], frozen_state[code][32:64])
            assert torch.isfinite(opts[1].master_weight(dirty[0])).all()
    # other groups of the same tensor and the other tensor stepped as if nothing happened
    assert torch.equal(dirty[1], clean[1])
    assert torch.equal(dirty[0][:32], clean[0][:32])
    assert torch.isfinite(dirty[0]).all()


def test_fp16_params_with_grad_scaler():
    """GradScaler hands slimoptim grad_scale/found_inf; fp16 grads need no unscale_."""
    torch.manual_seed(0)
    model = torch.nn.Linear(16, 4).half()
    twin = torch.nn.Linear(16, 4).half()
    twin.load_state_dict(model.state_dict())
    opt = slimoptim.AdamW(model.parameters(), lr=1e-2)
    twin_opt = slimoptim.AdamW(twin.parameters(), lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=1000)
    for step in range(5):
        x = torch.randn(8, 16).half()
        loss = model(x).float().pow(2).mean()
        scaler.scale(loss).backward()
        if step == 2:
            model.weight.grad[0, 0] = math.inf  # overflow: the whole step must be skipped
            before = [opt.master_weight(p).clone() for p in model.parameters()]
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        if step == 2:
            assert scaler.get_scale() == 512.0
            for p, b in zip(model.parameters(), before, strict=True):
                assert torch.equal(opt.master_weight(p), b)
            continue
        twin_opt.zero_grad()
        twin(x).float().pow(2).mean().backward()
        twin_opt.step()
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        # same math up to the fp16 rounding of scaled vs unscaled gradients
        assert torch.allclose(opt.master_weight(p), twin_opt.master_weight(q), atol=2e-3)
    assert opt.state[model.weight]["step"] == 4


@pytest.mark.parametrize("name", ["AdamW", "SGD", "Lion"])
def test_skipped_elements_keep_their_exact_bits(name):
    """An element at the end of the code range on an odd bf16 value is the case where a
    re-split could move it; a skipped group must keep every bit."""
    kwargs = dict(momentum=0.9) if name == "SGD" else {}
    p = torch.nn.Parameter(torch.randn(64).bfloat16())
    opt = getattr(slimoptim, name)([p], lr=0.01, **kwargs)
    p.grad = torch.randn_like(p)
    opt.step()
    w = torch.tensor([0x3EB6806D], dtype=torch.int32).view(torch.float32)
    b, code = slimoptim.formats.split_master(w, torch.bfloat16, 8)
    with torch.no_grad():
        p[5] = b.bfloat16()[0]
    opt.state[p]["correction"][5] = code[0]
    before_p, before_code = p.detach().clone(), opt.state[p]["correction"].clone()
    g = torch.randn(64)
    g[3] = math.nan  # group 0 (elements 0..31) is skipped
    p.grad = g.bfloat16()
    opt.step()
    assert torch.equal(p.detach()[:32].view(torch.int16), before_p[:32].view(torch.int16))
    assert torch.equal(opt.state[p]["correction"][:32], before_code[:32])
    assert not torch.equal(p.detach()[32:], before_p[32:])  # the other group stepped
