"""Fused Triton step kernels against the pure-PyTorch reference, bit for bit.

Without a GPU the kernels run in Triton's interpreter on CPU tensors (conftest.py
sets TRITON_INTERPRET=1); on a GPU the same tests compare CUDA kernels with the
CUDA reference, and a few more test CUDA graphs and torch.compile.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import slimoptim
from slimoptim import kernels

pytest.importorskip("triton")
from slimoptim.kernels import dispatch, launch  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
SIZES = (1, 31, 33, 4097)
gpu_only = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")


def _params(dtype, sizes=SIZES, seed=0):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for n in sizes:
        w = torch.randn(n, generator=gen) * 10 ** torch.empty(1).uniform_(-2, 1, generator=gen)
        out.append(torch.nn.Parameter(w.to(dtype).to(DEVICE)))
    return out


def _clone(params):
    return [torch.nn.Parameter(p.detach().clone()) for p in params]


def _set_grads(pairs, gen, nonfinite=False):
    """The same fresh random gradients on both param lists; heavy-tailed magnitudes."""
    for k, (p, q) in enumerate(pairs):
        g = torch.randn(p.shape, generator=gen) * 10.0 ** torch.randint(
            -4, 2, p.shape, generator=gen
        )
        g[1::9], g[2::13] = 0.0, -0.0  # signed zeros: the kernels must keep their signs
        if nonfinite and p.numel() > 64:
            g[40] = float("nan") if k % 2 else float("inf")  # one bad group per big tensor
        g = g.to(p.dtype).to(DEVICE)
        p.grad, q.grad = g.clone(), g.clone()


def _bits(t: torch.Tensor) -> torch.Tensor:
    """Bit patterns, so that NaNs compare and -0.0 differs from 0.0."""
    views = {2: torch.int16, 4: torch.int32}
    t = t.detach()
    return t.view(views[t.element_size()]) if t.element_size() in views else t


def _assert_same(fused_opt, ref_opt, ps, qs):
    for i, (p, q) in enumerate(zip(ps, qs, strict=True)):
        assert torch.equal(_bits(p), _bits(q)), f"param {i} ({p.numel()} elements) differs"
        sa, sb = fused_opt.state[p], ref_opt.state[q]
        assert sa.keys() == sb.keys()
        for name in sa:
            assert torch.equal(_bits(sa[name]), _bits(sb[name])), f"state {name} of param {i}"


def _run(cls, dtype, steps=3, sizes=SIZES, nonfinite=False, groups=None, **kw):
    ps = _params(dtype, sizes)
    qs = _clone(ps)
    make = groups or (lambda params: params)
    fused = cls(make(ps), fused=True, **kw)
    ref = cls(make(qs), fused=False, **kw)
    _step_both(fused, ref, ps, qs, torch.Generator().manual_seed(1), steps, nonfinite)
    assert fused.__dict__.get("_slimoptim_plans"), "the fused path did not run"
    return fused, ref, ps, qs


def _step_both(fused, ref, ps, qs, gen, steps, nonfinite=False) -> None:
    """``steps`` steps of both optimizers on the same fresh gradients, then every bit equal."""
    for _ in range(steps):
        _set_grads(list(zip(ps, qs, strict=True)), gen, nonfinite)
        fused.step()
        ref.step()
    _assert_same(fused, ref, ps, qs)


DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("master_weight_bits", (24, 32, None))
@pytest.mark.parametrize("state_bits", (8, 32))
def test_adamw_all_modes(dtype, master_weight_bits, state_bits):
    if dtype == torch.float32 and master_weight_bits == 32:
        pytest.skip("float32 params keep no correction: same as None")
    _run(
        slimoptim.AdamW, dtype, steps=2, lr=3e-2, weight_decay=0.1,
        master_weight_bits=master_weight_bits, state_bits=state_bits,
    )  # fmt: skip


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16))
def test_adam_coupled_decay_maximize_and_nonfinite_groups(dtype):
    _run(slimoptim.Adam, dtype, weight_decay=0.05, maximize=True, nonfinite=True)


@pytest.mark.parametrize(
    "kw",
    [
        dict(momentum=0.9),
        dict(momentum=0.9, nesterov=True, weight_decay=1e-2),
        dict(momentum=0.8, dampening=0.3, maximize=True, state_bits=32),
        dict(momentum=0.0, weight_decay=1e-3, master_weight_bits=32),
        dict(momentum=0.9, master_weight_bits=None),
    ],
)
@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16))
def test_sgd_modes(dtype, kw):
    _run(slimoptim.SGD, dtype, lr=0.05, nonfinite=True, **kw)


@pytest.mark.parametrize(
    "kw",
    [
        dict(),
        dict(weight_decay=0.5, maximize=True),
        dict(state_bits=32, master_weight_bits=32, weight_decay=0.1),
        dict(master_weight_bits=None, betas=(0.95, 0.98)),
    ],
)
@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float32))
def test_lion_modes(dtype, kw):
    _run(slimoptim.Lion, dtype, lr=1e-2, nonfinite=True, **kw)


def test_several_groups_tensor_lr_and_schedule():
    def groups(params):
        return [
            {"params": params[:2], "lr": torch.tensor(0.02), "betas": (0.8, 0.99)},
            {"params": params[2:], "weight_decay": 0.0, "group_size": 64},
        ]

    fused, ref, ps, qs = _run(slimoptim.AdamW, torch.bfloat16, steps=1, groups=groups, lr=1e-2)
    gen = torch.Generator().manual_seed(7)
    for step in range(2):  # a scheduler changing lr (tensor, in place) and betas between steps
        for opt in (fused, ref):
            opt.param_groups[0]["lr"].mul_(0.5)
            opt.param_groups[1]["betas"] = (0.9 - 0.1 * step, 0.995)
        _set_grads(list(zip(ps, qs, strict=True)), gen)
        fused.step()
        ref.step()
    _assert_same(fused, ref, ps, qs)


@pytest.mark.parametrize(
    "cls, kw",
    [
        (slimoptim.SGD, dict(momentum=0.9, nesterov=True, weight_decay=1e-2)),
        (slimoptim.AdamW, dict(betas=(0.9, 0.95), weight_decay=1e-3)),
        (slimoptim.Adam, dict(betas=(0.8, 0.99), weight_decay=1e-2)),
        (slimoptim.Lion, dict(betas=(0.9, 0.99), state_bits=32)),
    ],
)
def test_float64_tensor_hyperparameters(cls, kw):
    """A float64 tensor lr or betas is read as float32 by the kernels and by the reference
    (its fused multiply-adds included), as torch's float32 arithmetic reads it."""
    f64 = {"dtype": torch.float64, "device": DEVICE}
    kw = dict(kw, lr=torch.tensor(0.03, **f64))
    if "betas" in kw:
        kw["betas"] = tuple(torch.tensor(b, **f64) for b in kw["betas"])
    _run(cls, torch.float32, **kw)
    _run(cls, torch.bfloat16, **kw)


# the interpreter (numpy) warns of the NaN arithmetic these tests are about
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("cls", [slimoptim.Adam, slimoptim.SGD])
def test_non_finite_fp16_params_step_as_the_reference(cls):
    """fp16 params holding ±inf and NaN of either sign, with weight decay coupled into the
    gradient (their momenta and second moments turn non-finite too): the kernels store a
    NaN param as the canonical 0x7FFF, as the GPU's convert and the reference do."""
    ps = _params(torch.float16)
    for p in ps:
        flat = p.data.view(-1)
        flat[0] = float("nan")
        if flat.numel() > 40:
            flat[5], flat[33], flat[34] = -float("nan"), float("inf"), -float("inf")
    qs = _clone(ps)
    kw = dict(lr=1e-2, weight_decay=0.1) | ({"momentum": 0.9} if cls is slimoptim.SGD else {})
    fused, ref = cls(ps, fused=True, **kw), cls(qs, fused=False, **kw)
    _step_both(fused, ref, ps, qs, torch.Generator().manual_seed(5), steps=3)
    assert (_bits(ps[0])[0] & 0xFFFF) == 0x7FFF


def test_grad_scaler_unscale_and_found_inf():
    ps = _params(torch.float16)
    qs = _clone(ps)
    fused = slimoptim.AdamW(ps, fused=True, lr=1e-2)
    ref = slimoptim.AdamW(qs, fused=False, lr=1e-2)
    gen = torch.Generator().manual_seed(3)
    for found in (0.0, 1.0, 0.0):
        _set_grads(list(zip(ps, qs, strict=True)), gen)
        for opt in (fused, ref):  # what torch.amp.GradScaler hands an amp-aware optimizer
            opt.grad_scale = torch.tensor([1024.0], device=DEVICE)
            opt.found_inf = torch.tensor([found], device=DEVICE)
            opt.step()
            del opt.grad_scale, opt.found_inf
    _assert_same(fused, ref, ps, qs)
    assert fused.state[ps[0]]["step"].item() == 2.0  # the skipped step did not count


def test_one_launch_per_bucket_whatever_the_tensor_count(monkeypatch):
    launches = []
    monkeypatch.setattr(launch, "_launch", lambda *a: launches.append(a[1]))
    for sizes in ((5, 70), (5, 70, 3, 9, 100, 1, 1)):
        launches.clear()
        ps = _params(torch.bfloat16, sizes)
        ps.append(torch.nn.Parameter(torch.randn(8, device=DEVICE)))  # a float32 param: 2nd bucket
        opt = slimoptim.Lion(ps, fused=True)
        for p in ps:
            p.grad = torch.randn_like(p)
        opt.step()
        assert len(launches) == 2


def test_state_dict_round_trip_rebuilds_the_tables():
    fused, ref, ps, qs = _run(slimoptim.AdamW, torch.bfloat16, steps=2)
    assert all(fused.state[p]["step"].dim() == 0 for p in ps)  # per-param 0-d counters
    fused.load_state_dict(ref.state_dict())  # new state tensors: the kernel must follow them
    # Three steps: on CUDA the rebuilt plan runs eagerly, then captures its graph (whose
    # memory pool cannot be the old plan's: its graphs are gone), then replays it.
    _step_both(fused, ref, ps, qs, torch.Generator().manual_seed(11), steps=3)


def test_fused_none_uses_the_reference_on_cpu_and_false_never_fuses():
    ps = [torch.nn.Parameter(torch.randn(40))]
    for fused in (None, False):
        opt = slimoptim.AdamW(ps, fused=fused)
        ps[0].grad = torch.randn(40)
        opt.step()
        assert not any(p.device.type == "cpu" and plan.buckets
                       for plan in opt.__dict__.get("_slimoptim_plans", {}).values()
                       for p in plan.grad_params)  # fmt: skip


def test_fused_true_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(dispatch, "interpreting", lambda: False)
    p = torch.nn.Parameter(torch.randn(40))
    p.grad = torch.randn(40)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        slimoptim.AdamW([p], fused=True).step()


def test_without_triton_the_reference_runs_and_warns_once(monkeypatch):
    monkeypatch.setattr(kernels, "triton_available", lambda: False)
    # a param fused=True accepts (CUDA, or CPU under the interpreter): the error is Triton's
    p = torch.nn.Parameter(torch.randn(40, device=DEVICE))
    p.grad = torch.randn(40, device=DEVICE)
    with pytest.raises(RuntimeError, match="needs Triton"):
        slimoptim.SGD([p], fused=True).step()
    p = torch.nn.Parameter(torch.randn(40))
    items = [({}, p)]
    if CUDA:
        p = torch.nn.Parameter(torch.randn(40, device="cuda"))
        items = [({}, p)]

    class Opt:
        fused = None

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert kernels.fused_step(Opt(), items, None, None) is items
    assert len(caught) == (1 if CUDA else 0)


# ------------------------------------------------------------------ GPU only


@gpu_only
def test_cuda_graph_replays_follow_the_scheduler_and_steps_never_sync():
    torch.manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(n, device="cuda", dtype=torch.bfloat16)) for n in SIZES]
    qs = _clone(ps)
    for p in ps + qs:
        p.grad = torch.zeros_like(p)
    fused = slimoptim.AdamW(ps, lr=1e-2, fused=True)
    ref = slimoptim.AdamW(qs, lr=1e-2, fused=False)
    sched = torch.optim.lr_scheduler.StepLR(fused, step_size=1, gamma=0.5)
    ref_sched = torch.optim.lr_scheduler.StepLR(ref, step_size=1, gamma=0.5)

    def new_grads():
        for p, q in zip(ps, qs, strict=True):
            g = torch.randn_like(p)
            p.grad.copy_(g)
            q.grad.copy_(g)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up steps build the device tables
        for _ in range(2):
            new_grads()
            fused.step()
            ref.step()
    torch.cuda.current_stream().wait_stream(stream)
    new_grads()
    for opt in (fused, ref):  # a new lr: this step uploads hyper-parameters again
        opt.param_groups[0]["lr"] = 2e-2
    torch.cuda.set_sync_debug_mode("error")  # an eager fused step makes no host-device sync
    try:
        fused.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    ref.step()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fused.step()
    for _ in range(4):
        new_grads()
        kernels.refresh_hyperparameters(fused)
        graph.replay()
        ref.step()
        sched.step()
        ref_sched.step()
    torch.cuda.synchronize()
    _assert_same(fused, ref, ps, qs)
    assert fused.state[ps[0]]["step"].item() == 7.0


@gpu_only
def test_compiled_model_trains_and_compiled_step_runs():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.Linear(128, 8))
    model = model.cuda().to(torch.bfloat16)
    opt = slimoptim.AdamW(model.parameters(), lr=1e-2)
    compiled = torch.compile(model)
    x = torch.randn(256, 64, device="cuda", dtype=torch.bfloat16)
    y = torch.randn(256, 8, device="cuda", dtype=torch.bfloat16)
    losses = []
    step = torch.compile(opt.step)
    for i in range(20):
        loss = torch.nn.functional.mse_loss(compiled(x).float(), y.float())
        loss.backward()
        (step if i % 2 else opt.step)()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]
    assert opt.__dict__["_slimoptim_plans"], "the kernels did not run"


def test_replaced_param_storage_rebuilds_the_plan():
    """p.data = ... (Module.to, .half(), cast_model) must not leave the kernel writing to
    the old buffer."""
    ps = _params(torch.bfloat16, (33, 4097))
    qs = _clone(ps)
    fused = slimoptim.SGD(ps, lr=0.1, momentum=0.9, fused=True)
    ref = slimoptim.SGD(qs, lr=0.1, momentum=0.9, fused=False)
    gen = torch.Generator().manual_seed(3)
    for step in range(3):
        if step == 1:
            old = ps[1].data
            ps[1].data = ps[1].data.clone()
            old_bits = _bits(old).clone()
        _set_grads(list(zip(ps, qs, strict=True)), gen)
        fused.step()
        ref.step()
        _assert_same(fused, ref, ps, qs)
    assert torch.equal(_bits(old), old_bits)  # the discarded buffer was left alone


def test_subclass_overriding_the_update_runs_its_own_math():
    class ClippedAdamW(slimoptim.AdamW):
        def _update(self, w, g, states, group, scalars, denom_floor):
            return super()._update(w, g.clamp(-1e-3, 1e-3), states, group, scalars, denom_floor)

    assert dispatch.rule_for(slimoptim.Adam([torch.nn.Parameter(torch.ones(1))])) is not None
    ps = _params(torch.bfloat16, (64,))
    qs = _clone(ps)
    fused = ClippedAdamW(ps, fused=True)
    ref = ClippedAdamW(qs, fused=False)
    assert dispatch.rule_for(fused) is None
    _set_grads(list(zip(ps, qs, strict=True)), torch.Generator().manual_seed(4))
    fused.step()
    ref.step()
    _assert_same(fused, ref, ps, qs)
    m = slimoptim.formats.dequantize_momentum(
        fused.state[ps[0]]["exp_avg"], fused.state[ps[0]]["exp_avg_scale"], 32
    )
    assert m.abs().max() <= 1e-4 * (1 + 2**-8)  # (1 - beta1) * clipped grad; bf16 scale


def test_subclass_changing_how_its_states_round_runs_its_own_math():
    # The kernels bake in the rule's states and rounding: a Lion whose momentum rounds by
    # the decay rule must not take Lion's (stochastic-rule) kernel.
    from slimoptim.optimizers.state_spec import StateSpec

    class DecayRuleLion(slimoptim.Lion):
        state_specs = (StateSpec("exp_avg", signed=True, beta=lambda g: g["betas"][1]),)

    ps = _params(torch.bfloat16, (64,))
    qs = _clone(ps)
    fused = DecayRuleLion(ps, lr=1e-3, fused=True)
    ref = DecayRuleLion(qs, lr=1e-3, fused=False)
    assert dispatch.rule_for(fused) is None
    _step_both(fused, ref, ps, qs, torch.Generator().manual_seed(5), steps=3)


def test_skipped_group_keeps_its_exact_bits():
    """The kernel's split of a skipped element's rebuilt master gives back its bits."""
    p = torch.nn.Parameter(torch.randn(64).bfloat16().to(DEVICE))
    opt = slimoptim.AdamW([p], lr=0.01, fused=True)
    p.grad = torch.randn_like(p)
    opt.step()
    w = torch.tensor([0x3EB6806D], dtype=torch.int32).view(torch.float32)
    b, code = slimoptim.formats.split_master(w, torch.bfloat16, 8)
    with torch.no_grad():
        p[5] = b.bfloat16()[0].to(DEVICE)
    opt.state[p]["correction"][5] = code[0]
    before_p, before_code = p.detach().clone(), opt.state[p]["correction"].clone()
    g = torch.randn(64)
    g[3] = float("nan")
    p.grad = g.bfloat16().to(DEVICE)
    opt.step()
    assert torch.equal(_bits(p)[:32], _bits(before_p)[:32])
    assert torch.equal(opt.state[p]["correction"][:32], before_code[:32])
    assert not torch.equal(_bits(p)[32:], _bits(before_p)[32:])
