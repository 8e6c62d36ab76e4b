"""The drop-in contract, numerics: torch's inputs and LR-scheduler sets, run on slimoptim.

Entries (optimizer x mode x param dtype) and inputs come from ``torch_optim_infos``, which
reads torch's ``optim_db``. Exact mode (``master_weight_bits=32, state_bits=32``) must
follow torch.optim (Lion: a float64 reference) on every input and scheduler set; the
default mode must go the right way and stay within the distance bound the README states.
"""

import math
import os

import pytest
import torch
from muon_common import torch_rounding
from torch.optim.lr_scheduler import ReduceLROnPlateau
from torch_optim_infos import (
    LionFloat64,
    infos,
    input_cases,
    input_kwargs,
    linear_loss,
    linear_problem,
    unsupported,
)

import slimoptim

STEPS = 20  # as torch's generic tests


def _skip_unsupported(info, kwargs):
    reason = unsupported(kwargs)
    if reason is None:
        return
    if kwargs.get("amsgrad"):  # the refusal itself is part of the contract
        with pytest.raises(ValueError, match="amsgrad"):
            info.make([torch.nn.Parameter(torch.randn(3))], **kwargs)
    pytest.skip(reason)


def _reference(info, params, kwargs):
    """torch.optim's twin on float32 copies, or the float64 Lion."""
    if info.torch_cls is None:
        copies = [torch.nn.Parameter(p.detach().double().clone()) for p in params]
        return copies, LionFloat64(copies, **kwargs)
    copies = [torch.nn.Parameter(p.detach().float().clone()) for p in params]
    return copies, info.torch_cls(copies, **kwargs)


def _step_schedulers(schedulers, loss):
    for s in schedulers:
        if isinstance(s, ReduceLROnPlateau):
            s.step(loss)
        else:
            s.step()


def _run_against_reference(info, index, scheduler_set, seed=0):
    """Both optimizers see the same gradients (taken at the reference's weights and
    rounded to the param dtype); returns the max error relative to the distance moved."""
    params, x = info.problem(seed)
    start = [p.detach().double().clone() for p in params]
    opt = info.make(params, **input_kwargs(info, index))
    ref_params, ref = _reference(info, params, input_kwargs(info, index))
    schedulers = [[make(o) for make in scheduler_set or ()] for o in (opt, ref)]
    for _ in range(STEPS):
        loss = linear_loss(ref_params, x)
        grads = torch.autograd.grad(loss, ref_params)
        for p, q, g in zip(params, ref_params, grads, strict=True):
            p.grad = g.to(info.dtype)
            q.grad = p.grad.to(q.dtype)
        opt.step()
        ref.step()
        for group_schedulers in schedulers:
            _step_schedulers(group_schedulers, loss.item())
    assert float(opt.param_groups[0]["lr"]) == pytest.approx(float(ref.param_groups[0]["lr"]))
    worst = 0.0
    for p, q, w0 in zip(params, ref_params, start, strict=True):
        ours, theirs = opt.master_weight(p).double(), q.detach().double()
        moved = (theirs - w0).abs().max().item()
        # float32 rounding of the weight itself: up to one ulp per step (2**-23 relative)
        rounding = STEPS * 2.0**-23 * theirs.abs()
        excess = ((ours - theirs).abs() - rounding).clamp(min=0)
        worst = max(worst, (excess.max() / moved).item())
    return worst, opt, ref


@pytest.mark.parametrize("info,index", input_cases(infos(mode="exact")))
def test_exact_mode_matches_torch_on_every_input_and_scheduler_set(info, index, monkeypatch):
    """Every torch input x (no scheduler + every scheduler set torch lists), fp32 and bf16.

    Tolerance: the float32 rounding of the weights (an ulp a step) plus 2e-5 of the largest
    distance an element moved. The two sides differ only in float32 rounding order; Lion's
    reference is float64, so there the difference is slimoptim's float32 rounding.

    Muon: torch's momentum lerp is a fused multiply-add where slimoptim's elementwise step
    rounds twice, and Newton-Schulz amplifies the bf16 rounding a one-ulp difference can
    flip (measured: up to 9% of the distance moved, on one element, over 40 seeds). So its
    two elementwise steps round as torch's here, and all the rest (Newton-Schulz, lr
    adjustment, decay, schedulers, states) must then match to the same bound (measured:
    no excess at all); tests/test_muon.py bounds the trajectory without the swap."""
    _skip_unsupported(info, input_kwargs(info, index))
    if info.name == "Muon":
        torch_rounding(monkeypatch)
    for scheduler_set in [None, *info.scheduler_sets()]:
        worst, opt, ref = _run_against_reference(info, index, scheduler_set)
        assert worst < 2e-5, f"schedulers {scheduler_set}: {worst:.2e}"
    # the states too, where torch keeps the same ones
    for p, q in zip(opt.param_groups[0]["params"], ref.param_groups[0]["params"], strict=True):
        for name, theirs in ref.state[q].items():
            if name != "step" and isinstance(theirs, torch.Tensor):
                ours = opt.state[p][name].double()
                scale = theirs.abs().max().item() + 1e-30
                assert (ours - theirs.double().reshape(-1)).abs().max() / scale < 1e-5, name


@pytest.mark.parametrize("info,index", input_cases(infos()))
def test_tensor_lr_of_any_shape_steps_as_the_float(info, index):
    """lr as a float, a 0-d tensor and a [[lr]] tensor give the very same bits (torch reads
    a 1-element tensor as a scalar); the [[lr]] case crashed on bf16 params before."""
    kwargs = input_kwargs(info, index)
    _skip_unsupported(info, kwargs)
    lr = torch.tensor(float(kwargs.pop("lr", 1e-3))).item()  # the float32 value, as a float
    results = []
    for value in (lr, torch.tensor(lr), torch.tensor([[lr]])):
        params, x = info.problem(seed=1)
        opt = info.make(params, lr=value, **kwargs)
        for _ in range(5):
            opt.zero_grad()
            linear_loss(params, x).backward()
            opt.step()
        results.append([opt.master_weight(p) for p in params])
    for other in results[1:]:
        for a, b in zip(results[0], other, strict=True):
            assert torch.equal(a, b)


def _direction_cases():
    """fp32 contiguous params with every scheduler set; strided fp32 params (a bf16 cast of
    a strided view is contiguous) and bf16 params without (their scheduler sets run in
    the exact-mode test)."""
    cases = []
    for case in input_cases(infos(mode="default")):
        info, index = case.values
        layouts = ("contiguous", "strided") if info.dtype == torch.float32 else ("contiguous",)
        for layout in layouts:
            cases.append(pytest.param(info, index, layout, id=f"{case.id}-{layout}"))
    return cases


@pytest.mark.parametrize("info,index,layout", _direction_cases())
def test_default_mode_goes_the_right_direction(info, index, layout):
    kwargs = input_kwargs(info, index)
    _skip_unsupported(info, kwargs)
    contiguous = layout == "contiguous"
    with_schedulers = contiguous and info.dtype == torch.float32
    for scheduler_set in [None, *(info.scheduler_sets() if with_schedulers else ())]:
        params, x = info.problem(seed=2, contiguous=contiguous)
        if info.dtype == torch.float32:
            assert contiguous or not params[0].is_contiguous()
        opt = info.make(params, **input_kwargs(info, index))
        schedulers = [make(opt) for make in scheduler_set or ()]

        def closure(opt=opt, params=params, x=x):
            opt.zero_grad()
            loss = linear_loss(params, x)
            loss.backward()
            return loss

        initial = closure().item()
        for _ in range(STEPS):
            loss = opt.step(closure)
            _step_schedulers(schedulers, loss.item())
        final = linear_loss(params, x).item()
        assert final > initial if kwargs.get("maximize") else final < initial


@pytest.mark.parametrize("info", infos(mode="default"), ids=lambda i: i.id)
def test_param_group_lr_with_schedulers_goes_the_right_direction(info):
    for scheduler_set in info.scheduler_sets():
        params, x = info.problem(seed=3)
        opt = info.make([{"params": [params[0]]}, {"params": [params[1]], "lr": 0.01}])
        schedulers = [make(opt) for make in scheduler_set]
        initial = linear_loss(params, x).item()
        for _ in range(STEPS):
            opt.zero_grad()
            loss = linear_loss(params, x)
            loss.backward()
            opt.step()
            _step_schedulers(schedulers, loss.item())
        assert linear_loss(params, x).item() < initial


@pytest.mark.parametrize("info,index", input_cases(infos(dtype="bf16")))
def test_param_groups_lr_and_weight_decay(info, index):
    """Per-group options: a group at lr 1e-28 keeps its exact bits while the other trains;
    a bias group with weight_decay=0 next to a decayed weight group still descends."""
    kwargs = input_kwargs(info, index)
    _skip_unsupported(info, kwargs)
    if float(kwargs.get("lr", 0)) == 0:
        kwargs["lr"] = 1e-3
    params, x = info.problem(seed=4)
    idle = torch.nn.Parameter(torch.randn(info.shape(40)).to(info.dtype))
    before = idle.detach().clone()
    opt = info.make(
        [{"params": params, **kwargs}, {"params": [idle], "weight_decay": 0.0}], lr=1e-28
    )
    initial = linear_loss(params, x).item()
    for _ in range(STEPS):
        opt.zero_grad()
        linear_loss(params, x).backward()
        idle.grad = torch.rand_like(idle)
        opt.step()
    final = linear_loss(params, x).item()
    assert final > initial if kwargs.get("maximize") else final < initial
    assert torch.equal(idle.detach(), before)
    assert torch.equal(opt.master_weight(idle), before.float())


@pytest.mark.parametrize("info,index", input_cases(infos()))
def test_zero_grads_and_params_without_grads_are_noops(info, index):
    kwargs = input_kwargs(info, index)
    _skip_unsupported(info, kwargs)
    kwargs["weight_decay"] = 0.0  # decay moves params whatever the gradient (as in torch)
    gen = torch.Generator().manual_seed(5)
    zero = torch.nn.Parameter(torch.randn(5, 7, generator=gen).to(info.dtype))
    gradless = torch.nn.Parameter(torch.randn(info.shape(6), generator=gen).to(info.dtype))
    frozen = torch.randn(info.shape(4), generator=gen).to(info.dtype)  # requires_grad=False
    before = [t.detach().clone() for t in (zero, gradless, frozen)]
    opt = info.make([zero, gradless, frozen], **kwargs)
    for _ in range(3):
        zero.grad = torch.zeros_like(zero)
        loss = opt.step(lambda: torch.tensor(1.0))
        assert loss.item() == 1.0
    for t, b in zip((zero, gradless, frozen), before, strict=True):
        assert torch.equal(t.detach(), b)
    assert torch.equal(opt.master_weight(zero), before[0].float())
    assert gradless not in opt.state and frozen not in opt.state
    assert opt.state[zero]["step"].item() == 3


# ------------------------------------------------------------ float64 params


def not_for_muon(reason: str):
    return pytest.param("Muon", marks=pytest.mark.skip(reason=f"not applicable to Muon: {reason}"))


@pytest.mark.parametrize(
    "name",
    [
        "AdamW",
        "Adam",
        "SGD",
        "Lion",
        not_for_muon(
            "its momentum is a float32 state under float64 params, and Newton-Schulz lifts "
            "that rounding out of reach of this 1e-5 bound; tests/test_muon.py::"
            "test_float64_params_and_a_one_element_lr_tensor_of_any_shape checks float64 "
            "params (kept float64, 2e-3 of torch's Muon)"
        ),
    ],
)
def test_float64_params_are_their_own_master(name):
    """float64 params step in float64 (states float32 or 8-bit): exact mode follows the
    float64 reference to float32 state precision, and the param is never rounded to float32."""
    kwargs = {"SGD": dict(lr=0.01, momentum=0.9, nesterov=True)}.get(name, dict(lr=0.01))
    gen = torch.Generator().manual_seed(6)
    w0 = torch.randn(300, generator=gen, dtype=torch.float64)
    ours, theirs = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(w0.clone())
    opt = getattr(slimoptim, name)([ours], master_weight_bits=32, state_bits=32, **kwargs)
    ref_cls = getattr(torch.optim, name, LionFloat64)
    ref = ref_cls([theirs], **kwargs)
    for _ in range(STEPS):
        g = torch.randn(300, generator=gen, dtype=torch.float64)
        ours.grad, theirs.grad = g.clone(), g.clone()
        opt.step()
        ref.step()
    assert ours.dtype == torch.float64
    assert torch.equal(opt.master_weight(ours), ours.detach())
    assert not torch.equal(ours.detach(), ours.detach().float().double())  # not float32 values
    moved = (theirs.detach() - w0).abs().max()
    assert (ours.detach() - theirs.detach()).abs().max() / moved < 1e-5
    default = getattr(slimoptim, name)([torch.nn.Parameter(w0.clone())], **kwargs)
    p = default.param_groups[0]["params"][0]
    p.grad = torch.randn_like(p)
    default.step()
    assert p.dtype == torch.float64 and torch.isfinite(p).all() and not torch.equal(p, w0)


# --------------------------------------------- default mode: the README's bound


def _default_vs_fp32(name, kwargs, seed, steps=STEPS):
    """torch's linear problem in closed loop: fp32 params, torch.optim (Lion: exact mode)
    against the default mode. Distance between the ends / distance fp32 moved."""
    params, x = linear_problem(torch.float32, seed)
    start = torch.cat([p.detach().reshape(-1).clone() for p in params])
    ref_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    cls = getattr(slimoptim, name)
    ref_cls = getattr(torch.optim, name, None)
    ref = ref_cls(ref_params, **kwargs) if ref_cls else cls(ref_params, **kwargs, **EXACT_KW)
    opt = cls(params, **kwargs)
    for _ in range(steps):
        for o, ps in ((opt, params), (ref, ref_params)):
            o.zero_grad()
            linear_loss(ps, x).backward()
            o.step()
    ours = torch.cat([p.detach().reshape(-1) for p in params])
    theirs = torch.cat([p.detach().reshape(-1) for p in ref_params])
    return ((ours - theirs).norm() / (theirs - start).norm()).item()


EXACT_KW = dict(master_weight_bits=32, state_bits=32)
# The README's "Semantics" bounds on torch's 60-element problem after 20 steps: the worst
# of benchmarks/default_mode_distance.py over 10 seeds x 4 inputs (AdamW/Adam 0.163, SGD
# 0.011, Lion 0.135 at format version 3; 0.162, 0.011, 0.147 before), rounded up. This
# subset (5 seeds) measures 0.071, 0.071, 0.011 and 0.074.
DISTANCE_BOUND = {"AdamW": 0.17, "Adam": 0.17, "SGD": 0.015, "Lion": 0.16}
DISTANCE_INPUTS = {
    "AdamW": [{}, {"lr": 0.01}, {"weight_decay": 0.1, "maximize": True}],
    "Adam": [{}, {"lr": 0.01}, {"weight_decay": 0.1}],
    "SGD": [{"momentum": 0.9}, {"momentum": 0.9, "nesterov": True, "weight_decay": 0.1}],
    "Lion": [{}, {"lr": 1e-3}, {"weight_decay": 0.1}],
}


# Muon: every gradient of torch's linear problem is rank one (residual x^T), and Newton-
# Schulz inflates the directions any rounding of the momentum adds (bf16 in torch's Muon
# too: its orthogonalised rank-one matrix has singular values 0.69, 0.65, 0.48, 0.19, 0.04)
# to near-unit size. So the 8-bit momentum moves the trajectory 41-64% away (measured, 10
# seeds) while the exact mode matches it exactly: no bound separates good from bad here.
# The default mode's bound is on full-rank gradients, in tests/test_muon.py::
# test_default_mode_tracks_the_fp32_reference.
MUON_RANK_ONE = "torch's problem has rank-one gradients, see the comment above this test"


@pytest.mark.parametrize("name", [*DISTANCE_BOUND, not_for_muon(MUON_RANK_ONE)])
def test_default_mode_distance_bound_on_torchs_problem(name):
    measured = [
        _default_vs_fp32(name, kwargs, seed)
        for kwargs in DISTANCE_INPUTS[name]
        for seed in range(5)
    ]
    assert all(math.isfinite(m) for m in measured)
    assert max(measured) < DISTANCE_BOUND[name], measured


@pytest.mark.parametrize("name", ["AdamW", "SGD", "Lion", "Muon"])
def test_tensor_lr_of_any_shape_in_the_kernel_path(name):
    """The fused kernels (Triton's interpreter on CPU) read a [[lr]] tensor as the float
    (Muon: its two passes around Newton-Schulz, on an 8 x 8 matrix)."""
    pytest.importorskip("triton", reason="the fused kernels need Triton")
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("CUDA-only: without a GPU the kernels run only under TRITON_INTERPRET=1")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    kwargs = {"SGD": dict(momentum=0.9)}.get(name, {})
    lr = torch.tensor(1e-2).item()
    results = []
    shape = (8, 8) if name == "Muon" else (64,)
    start = torch.linspace(-1, 1, 64, device=device).bfloat16().reshape(shape)
    for value in (lr, torch.tensor([[lr]], device=device)):
        p = torch.nn.Parameter(start.clone())
        opt = getattr(slimoptim, name)([p], lr=value, fused=True, **kwargs)
        for step in range(3):
            grad = torch.cos(torch.arange(64.0, device=device) * (step + 1)).bfloat16()
            p.grad = grad.reshape(shape)
            opt.step()
        results.append(opt.master_weight(p))
    assert torch.equal(*results)
    assert not torch.equal(results[0], start.float())
