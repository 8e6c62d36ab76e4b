"""A gradient that stops fitting its bucket after the plan was built is caught before any
kernel runs, and that step goes to the reference path: bit for bit the reference's.

The checks run every step over every param (guards.grad_addresses); these tests pin
each case down, so that a faster check cannot drop one unnoticed.
"""

from __future__ import annotations

import pytest
import torch
from test_kernels import DEVICE, _assert_same  # skips this module too without Triton

import slimoptim

pytest.importorskip("triton")
from slimoptim.kernels import dispatch, guards  # noqa: E402

SHAPES = ((8, 16), (40,), (33,))


def _pair(dtype=torch.bfloat16, cls=slimoptim.AdamW, **kw):
    gen = torch.Generator().manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype).to(DEVICE)) for s in SHAPES]
    qs = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    return cls(ps, lr=1e-2, fused=True, **kw), cls(qs, lr=1e-2, fused=False, **kw), ps, qs


def _launches(monkeypatch) -> list:
    """The params of every plan launched from now on, one list per launch."""
    launched, launch_plan = [], dispatch.launch_plan

    def recording(plan, *args, **kwargs):
        launched.append(list(plan.grad_params))
        launch_plan(plan, *args, **kwargs)

    monkeypatch.setattr(dispatch, "launch_plan", recording)
    return launched


def _step_both(fused, ref, ps, qs, gen, change=None) -> None:
    """One step of both on the same fresh gradients; ``change(p, grad)`` sets the fused
    and the reference param's gradient when given."""
    for p, q in zip(ps, qs, strict=True):
        g = torch.randn(p.shape, generator=gen).to(p.dtype).to(DEVICE)
        for param in (p, q):
            if change is None:
                param.grad = g.clone()
            else:
                change(param, g.clone())
    fused.step()
    ref.step()
    _assert_same(fused, ref, ps, qs)


def _non_contiguous(p, g):
    p.grad = g.t().contiguous().t() if g.dim() == 2 else g  # same shape, column-major
    assert g.dim() != 2 or not p.grad.is_contiguous()


def _misaligned(p, g):
    buffer = torch.empty(g.numel() + 8, dtype=g.dtype, device=g.device)
    p.grad = buffer[1 : g.numel() + 1].view(g.shape).copy_(g)
    assert p.grad.data_ptr() % 16 != 0


def _float32_through_data(p, g):
    p.grad = g
    p.grad.data = g.float()  # Tensor.data's setter accepts another dtype: no grad check
    assert p.grad.dtype == torch.float32 != p.dtype


def _float32_through_grad_dtype(p, g):
    p.grad_dtype = None  # lets the grad setter take any dtype
    p.grad = g.float()


def _negative_view(p, g):
    p.grad = g.neg()._neg_view()  # the values of g, its bits stored negated
    assert p.grad.is_neg()


CHANGES = [_non_contiguous, _misaligned, _float32_through_data, _negative_view]
if hasattr(torch.Tensor, "grad_dtype"):
    CHANGES.append(_float32_through_grad_dtype)


@pytest.fixture(params=["C guard", "Python checks"])
def checks(request, monkeypatch):
    """Each test runs with the one-call layout guard and with the Python checks it
    replaces where PyTorch has none (kernels/guards.py)."""
    if request.param == "Python checks":
        monkeypatch.setattr(dispatch, "layout_guard", lambda tensors: None)
    else:
        assert guards.layout_guard([torch.zeros(2)]) is not None, "this torch has no guard"
    return request.param


@pytest.mark.parametrize("change", CHANGES, ids=lambda f: f.__name__.strip("_"))
def test_a_gradient_that_no_longer_fits_goes_to_the_reference(monkeypatch, checks, change):
    fused, ref, ps, qs = _pair()
    gen = torch.Generator().manual_seed(1)
    launched = _launches(monkeypatch)
    _step_both(fused, ref, ps, qs, gen)
    assert len(launched) == 1  # the plan is built and launched
    if checks == "C guard":  # fitting gradients: the guard, not the fallback, said yes
        (plan,) = fused._slimoptim_plans.values()
        assert plan.layout_guard.check(*plan.grad_params, *[p.grad for p in plan.grad_params])
    _step_both(fused, ref, ps, qs, gen, change)
    assert len(launched) == 1, "a kernel ran on a gradient it cannot read"
    _step_both(fused, ref, ps, qs, gen)
    assert len(launched) == 2  # fitting gradients again: a plan is built anew


def test_params_without_a_gradient_are_left_alone_whichever_they_are(monkeypatch, checks):
    """The same subset several steps running (step() keeps its items), then another."""
    fused, ref, ps, qs = _pair()
    gen = torch.Generator().manual_seed(2)
    launched = _launches(monkeypatch)
    for missing in ((), (1,), (1,), (0, 2), (0, 2), (), (0, 1, 2), ()):

        def change(p, g, missing=missing):
            index = next(i for i, q in enumerate((*ps, *qs)) if q is p) % len(ps)
            p.grad = None if index in missing else g

        _step_both(fused, ref, ps, qs, gen, change)
        stepped = [p for i, p in enumerate(ps) if i not in missing]
        if stepped:
            assert {id(p) for p in launched[-1]} == {id(p) for p in stepped}
    assert [fused.state[p]["step"].item() for p in ps] == [5, 5, 5]


def test_a_step_params_wrapper_that_replaces_the_gradients_is_followed():
    """step() hands the gradients it read to the kernels only when nothing stands between:
    a wrapper (or a subclass) of step_params may set others."""
    fused, ref, ps, qs = _pair()
    step_params = fused.step_params

    def doubling(items):
        for _, p in items:
            p.grad = p.grad * 2  # new tensors: the ones step() read are stale
        step_params(items)

    fused.step_params = doubling
    gen = torch.Generator().manual_seed(3)
    for _ in range(3):
        for p, q in zip(ps, qs, strict=True):
            g = torch.randn(p.shape, generator=gen).to(p.dtype).to(DEVICE)
            p.grad, q.grad = g.clone(), g * 2
        fused.step()
        ref.step()
        _assert_same(fused, ref, ps, qs)


def test_a_step_params_patched_onto_the_class_is_followed(monkeypatch):
    """The same for a wrapper patched onto the class itself (instrumentation does that)."""
    fused, ref, ps, qs = _pair()
    calls = []
    original = slimoptim.SlimOptimizer.step_params

    def counting(self, items):
        calls.append(len(items))
        original(self, items)

    monkeypatch.setattr(slimoptim.SlimOptimizer, "step_params", counting)
    gen = torch.Generator().manual_seed(5)
    for _ in range(2):
        for p, q in zip(ps, qs, strict=True):
            g = torch.randn(p.shape, generator=gen).to(p.dtype).to(DEVICE)
            p.grad, q.grad = g.clone(), g
        fused.step()
        ref.step()
        _assert_same(fused, ref, ps, qs)
    assert calls == [len(ps)] * 4  # both optimizers, both steps


def test_a_replaced_param_group_dict_is_read_by_the_next_step():
    """A plan reads its groups' hyper-parameters: a group dict replaced in param_groups
    (here with lr 0) must reach the kernels, not the old dict's lr."""
    fused, ref, ps, qs = _pair()
    gen = torch.Generator().manual_seed(9)
    for step in range(3):
        if step == 1:
            for opt in (fused, ref):
                opt.param_groups[0] = {**opt.param_groups[0], "lr": 0.0}
        for p, q in zip(ps, qs, strict=True):
            g = torch.randn(p.shape, generator=gen).to(p.dtype).to(DEVICE)
            p.grad, q.grad = g.clone(), g
        before = [p.detach().clone() for p in ps]
        fused.step()
        ref.step()
        _assert_same(fused, ref, ps, qs)
    assert all(torch.equal(p, b) for p, b in zip(ps, before, strict=True))  # lr 0: unmoved


def test_the_grad_setter_refuses_another_dtype_device_or_shape():
    """What dispatch does not rely on alone: the setter checks, but ``.data`` and
    ``grad_dtype`` get around its dtype check (tested above)."""
    p = torch.nn.Parameter(torch.randn(4, dtype=torch.bfloat16))
    with pytest.raises(RuntimeError, match="dtype|type"):
        p.grad = torch.randn(4)
    with pytest.raises(RuntimeError, match="size"):
        p.grad = torch.randn(5, dtype=torch.bfloat16)
    if torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="device"):
            p.grad = torch.randn(4, dtype=torch.bfloat16, device="cuda")


def test_a_param_whose_storage_moved_is_not_written_through_its_old_address(monkeypatch, checks):
    """``p.data = ...`` (Module.to, .half(), cast_model): that step goes to the reference,
    the old buffer is left alone, and the next step builds a plan on the new one."""
    fused, ref, ps, qs = _pair()
    gen = torch.Generator().manual_seed(4)
    launched = _launches(monkeypatch)
    _step_both(fused, ref, ps, qs, gen)
    old = ps[1].data
    ps[1].data = old.clone()
    old_bits = old.clone()
    _step_both(fused, ref, ps, qs, gen)
    assert len(launched) == 1 and torch.equal(old, old_bits)
    _step_both(fused, ref, ps, qs, gen)
    assert len(launched) == 2


def test_gradients_that_come_back_at_other_addresses_are_read_where_they_are(monkeypatch, checks):
    """Two sets of gradient tensors in turn, and one set twice running (its addresses are
    those found last step): every step launches, bit for bit the reference's."""
    fused, ref, ps, qs = _pair()
    gen = torch.Generator().manual_seed(5)
    launched = _launches(monkeypatch)
    buffers = [[torch.empty_like(p) for p in ps] for _ in range(2)]
    for which in (0, 1, 0, 0, 1, 1, 0):
        for p, q, buffer in zip(ps, qs, buffers[which], strict=True):
            buffer.copy_(torch.randn(p.shape, generator=gen).to(p.dtype))
            p.grad, q.grad = buffer, buffer.clone()
        fused.step()
        ref.step()
        _assert_same(fused, ref, ps, qs)
    assert len(launched) == 7


def test_a_gradient_of_another_size_through_data_is_refused_before_any_kernel(monkeypatch, checks):
    """``p.grad.data = ...`` takes a tensor of any size: the kernels would read past it."""
    fused, _, ps, _ = _pair()
    gen = torch.Generator().manual_seed(6)
    launched = _launches(monkeypatch)
    for p in ps:
        p.grad = torch.randn(p.shape, generator=gen).to(p.dtype).to(DEVICE)
    fused.step()
    before = [p.detach().clone() for p in ps]
    ps[0].grad.data = torch.zeros(3, dtype=ps[0].dtype, device=DEVICE)
    with pytest.raises(ValueError, match="shape"):
        fused.step()
    assert len(launched) == 1
    assert all(torch.equal(p, b) for p, b in zip(ps, before, strict=True))


def test_a_misaligned_gradient_from_the_start_goes_to_the_reference_under_one_plan(
    monkeypatch,
):
    """Not a plan rebuilt every step (as when only the per-step check saw it)."""
    fused, ref, ps, qs = _pair()
    gen = torch.Generator().manual_seed(7)
    launched = _launches(monkeypatch)
    plans = []
    for _ in range(3):
        _step_both(fused, ref, ps, qs, gen, _misaligned_first)
        plans.append(list(fused._slimoptim_plans.values()))
    assert all(p == plans[0] for p in plans) and len(plans[0]) == 1
    assert [len(params) for params in launched] == [2, 2, 2]  # the other two, fused


def _misaligned_first(p, g):
    (_misaligned if p.shape == SHAPES[0] else _plain)(p, g)


def _plain(p, g):
    p.grad = g


def test_a_guard_that_stopped_fitting_is_rebuilt_where_the_gradients_fit(monkeypatch):
    """The guard also compares the thread's dispatch state (autocast, inference mode): a
    plan stepped in another state than it was built in gets a guard for that state."""
    fused, ref, ps, qs = _pair()
    gen = torch.Generator().manual_seed(8)
    _step_both(fused, ref, ps, qs, gen)
    (plan,) = fused._slimoptim_plans.values()
    plan.layout_guard = guards.layout_guard(
        [*plan.grad_params, *[p.grad.float() for p in plan.grad_params]]
    )
    launched = _launches(monkeypatch)
    _step_both(fused, ref, ps, qs, gen)
    assert len(launched) == 1 and plan.guard_rebuilds == 1
    assert plan.layout_guard.check(*plan.grad_params, *[p.grad for p in plan.grad_params])
