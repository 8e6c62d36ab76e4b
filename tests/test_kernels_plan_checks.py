"""What a cached plan must notice about params and their states, not only gradients: a param
moved to another group, transposed in place or given another shape or dtype through
``p.data``, states left from other settings or another size, a plan built inside
``torch.inference_mode``, gradients without storage or on another device. In every case
the fused step does what ``fused=False`` does: the same bits, or the same error.
"""

from __future__ import annotations

import pytest
import torch
from test_kernels import DEVICE, _assert_same, _clone  # skips this module too without Triton
from test_kernels_grad_changes import _launches

import slimoptim

pytest.importorskip("triton")
from slimoptim.kernels import guards  # noqa: E402


def _pair(shapes, cls=slimoptim.AdamW, groups=None, **kw):
    gen = torch.Generator().manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(s, generator=gen).bfloat16().to(DEVICE)) for s in shapes]
    qs = _clone(ps)
    make = groups or (lambda params: params)
    kw.setdefault("lr", 1e-2)
    return cls(make(ps), fused=True, **kw), cls(make(qs), fused=False, **kw), ps, qs


def _grads(ps, qs, gen, skip=()) -> None:
    for i, (p, q) in enumerate(zip(ps, qs, strict=True)):
        if i not in skip:
            g = torch.randn(p.shape, generator=gen).bfloat16().to(DEVICE)
            p.grad, q.grad = g.clone(), g.clone()


def _stepped_once(shapes, seed: int, **kw):
    """``_pair`` after one step of both on the same gradients, and the generator."""
    fused, ref, ps, qs = _pair(shapes, **kw)
    gen = torch.Generator().manual_seed(seed)
    _grads(ps, qs, gen)
    fused.step(), ref.step()
    return fused, ref, ps, qs, gen


def _outcome(opt) -> str:
    """'ok' or the error's type and first words: what a step did."""
    try:
        opt.step()
    except Exception as error:  # noqa: BLE001 (compared between the two paths)
        return f"{type(error).__name__}: {str(error)[:40]}"
    return "ok"


def test_a_param_moved_to_another_group_steps_with_that_groups_settings():
    fused, ref, ps, qs = _pair(
        [(64,), (64,), (64,)], groups=lambda p: [{"params": p[:2]}, {"params": p[2:], "lr": 0.0}]
    )
    gen = torch.Generator().manual_seed(1)
    for step in range(3):
        if step == 1:  # the last param of group 0 to the front of group 1: same item order
            for opt in (fused, ref):
                opt.param_groups[1]["params"].insert(0, opt.param_groups[0]["params"].pop())
        _grads(ps, qs, gen)
        fused.step()
        ref.step()
        _assert_same(fused, ref, ps, qs)


def test_a_param_transposed_in_place_is_not_stepped_against_its_old_layout():
    fused, ref, ps, qs, gen = _stepped_once([(16, 16), (40,)], seed=2)
    with torch.no_grad():
        ps[0].t_(), qs[0].t_()  # same storage, transposed strides; the gradients stay
    for p, q in zip(ps, qs, strict=True):  # accumulated in place, as with set_to_none=False
        g = torch.randn(p.shape, generator=gen).bfloat16().to(DEVICE)
        p.grad.copy_(g), q.grad.copy_(g)
    assert _outcome(fused) == _outcome(ref)
    _assert_same(fused, ref, ps, qs)


@pytest.mark.parametrize(
    "change",
    [lambda p: p.data.view(4, 16), lambda p: p.data.view(torch.float16)],
    ids=["another shape", "another dtype"],
)
def test_a_param_reshaped_or_retyped_through_data_is_treated_as_the_reference_does(change):
    fused, ref, ps, qs, gen = _stepped_once([(64,), (40,)], seed=3)
    for p in (ps[0], qs[0]):
        p.data = change(p)  # same address; the old gradient is kept
    assert _outcome(fused) == _outcome(ref)
    _assert_same(fused, ref, ps, qs)


def test_a_param_grown_through_data_is_refused_not_stepped_past_its_states():
    fused, ref, ps, qs, gen = _stepped_once([(64, 16), (40,)], seed=4)
    for p in (ps[0], qs[0]):
        p.data = torch.cat([p.data, p.data])  # twice the elements; its states keep 1024
    _grads(ps, qs, gen, skip=(1,))  # another set of params with gradients: a new plan
    for p in (ps[1], qs[1]):
        p.grad = None
    for p, q in [(ps[0], qs[0])]:
        g = torch.randn(p.shape, generator=gen).bfloat16().to(DEVICE)
        p.grad, q.grad = g.clone(), g.clone()
    outcome = _outcome(ref)
    assert outcome != "ok"  # the reference refuses states of another size
    assert _outcome(fused) == outcome


@pytest.mark.parametrize("key,value", [("state_bits", 32), ("master_weight_bits", 32)])
def test_states_left_from_other_settings_are_not_read_as_the_new_ones(key, value):
    fused, ref, ps, qs, gen = _stepped_once([(64, 16), (40,)], seed=5)
    for opt in (fused, ref):
        opt.param_groups[0][key] = value  # a new plan over the 8-bit (24-bit) buffers
    for _ in range(2):
        _grads(ps, qs, gen)
        assert _outcome(fused) == _outcome(ref)
    _assert_same(fused, ref, ps, qs)


def test_sgd_momentum_turned_off_and_on_steps_as_the_reference():
    fused, ref, ps, qs = _pair([(64,), (40,)], cls=slimoptim.SGD, momentum=0.9)
    gen = torch.Generator().manual_seed(6)
    _grads(ps, qs, gen, skip=(1,))  # only the first param gets a momentum buffer
    fused.step(), ref.step()
    for momentum in (0.0, 0.9):
        for opt in (fused, ref):
            opt.param_groups[0]["momentum"] = momentum
        for _ in range(2):
            _grads(ps, qs, gen)
            fused.step(), ref.step()
            _assert_same(fused, ref, ps, qs)


def test_a_plan_built_in_inference_mode_serves_later_steps():
    fused, ref, ps, qs, gen = _stepped_once([(64,), (40,)], seed=7)
    _grads(ps, qs, gen, skip=(1,))  # another subset: its plan is built inside the mode
    ps[1].grad = qs[1].grad = None
    with torch.inference_mode():
        fused.step(), ref.step()
    for _ in range(2):  # new gradient addresses: the plan's tables are written again
        _grads(ps, qs, gen, skip=(1,))
        fused.step(), ref.step()
    _assert_same(fused, ref, ps, qs)


@pytest.mark.skipif(
    DEVICE == "cuda",
    reason="on CUDA torch's own kernels (the reference path's) read a storage resized to 0 "
    "at address 0: an illegal memory access that ends the process's CUDA context",
)
@pytest.mark.parametrize("stepped_before", [False, True], ids=["new plan", "cached plan"])
def test_a_gradient_without_storage_is_never_handed_to_a_kernel(monkeypatch, stepped_before):
    fused, ref, ps, qs = _pair([(64, 16), (40,)])
    gen = torch.Generator().manual_seed(8)
    launched = _launches(monkeypatch)
    if stepped_before:
        _grads(ps, qs, gen)
        fused.step(), ref.step()
    _grads(ps, qs, gen)
    for p in (ps[0], qs[0]):
        p.grad.untyped_storage().resize_(0)  # data_ptr() is 0 now: 16-byte "aligned"
    assert ps[0].grad.data_ptr() == 0
    before = len(launched)
    assert _outcome(fused) == _outcome(ref)
    assert not any(p is ps[0] for params in launched[before:] for p in params)


def test_the_python_checks_compare_devices_and_the_guard_params():
    """A gradient on another device (``p.grad.data = ...``) makes the guard say no; the
    Python checks must then say no too, not accept it and rebuild the guard."""
    fused, _, ps, _ = _pair([(64,), (40,)])
    for p in ps:
        p.grad = torch.randn(p.shape).bfloat16().to(DEVICE)
    fused.step()
    (plan,) = fused._slimoptim_plans.values()
    grads = [p.grad for p in plan.grad_params]
    assert guards._python_checks(plan, [*plan.grad_params, *grads])
    moved = [grads[0].to("meta"), *grads[1:]]
    assert not guards._python_checks(plan, [*plan.grad_params, *moved])
    transposed = [plan.grad_params[0].view(8, 8), *plan.grad_params[1:]]
    assert not guards._python_checks(plan, [*transposed, *grads])
