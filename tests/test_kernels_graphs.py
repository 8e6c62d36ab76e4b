"""CUDA graphs after a plan is dropped: a plan rebuilt (after ``load_state_dict``, or when
its gradients stop fitting) or collected with its optimizer frees the CUDA graphs it
replayed; later captures, the optimizer's own and a user's ``torch.cuda.graph`` of another
optimizer's step, must still work and step bit for bit as the reference path. Destroying
a graph during a capture invalidates the capture (benchmarks/NOTES.md v22, v23): freed
plans' graphs wait for the next eager step (kernels/launch.py)."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from test_kernels import _assert_same, _clone, _params, gpu_only

import slimoptim

pytest.importorskip("triton")
from slimoptim import kernels  # noqa: E402
from slimoptim.kernels import dispatch, launch  # noqa: E402


def _pair(cls, seed, **kw):
    ps = _params(torch.bfloat16, seed=seed)
    qs = _clone(ps)
    for p in ps + qs:
        p.grad = torch.zeros_like(p)
    return cls(ps, lr=1e-2, fused=True, **kw), cls(qs, lr=1e-2, fused=False, **kw), ps, qs


def _new_grads(ps, qs, gen):
    for p, q in zip(ps, qs, strict=True):
        g = torch.randn(p.shape, generator=gen).to(p.dtype).to(p.device)
        p.grad.copy_(g)
        q.grad.copy_(g)


def _steps(fused, ref, ps, qs, gen, n):
    for _ in range(n):  # the second step of a plan captures its graph, the third replays
        _new_grads(ps, qs, gen)
        fused.step()
        ref.step()
    torch.cuda.synchronize()
    _assert_same(fused, ref, ps, qs)


def _user_capture(fused, ref, ps, qs, gen, during=lambda: None):
    """Another optimizer's step captured by the user, replayed twice (the reference steps
    eagerly; no fused eager step runs after the capture). ``during()`` runs inside the
    capture, after the step."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        _steps(fused, ref, ps, qs, gen, 3)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fused.step()
        during()
    for _ in range(2):
        _new_grads(ps, qs, gen)
        graph.replay()
        ref.step()
    torch.cuda.synchronize()
    _assert_same(fused, ref, ps, qs)
    return graph


def _reload(opt):
    opt.load_state_dict(opt.state_dict())


@gpu_only
@pytest.mark.parametrize("drop", ["load_state_dict", "clear"], ids=str)
def test_captures_after_a_plan_and_its_graph_were_dropped(drop):
    gen = torch.Generator().manual_seed(0)
    fused, ref, ps, qs = _pair(slimoptim.AdamW, seed=1)
    _steps(fused, ref, ps, qs, gen, 3)
    old_plans = list(fused._slimoptim_plans.values())
    assert any(g is not None for p in old_plans for g in p.__dict__.get("graphs", {}).values())
    if drop == "load_state_dict":
        _reload(fused)
        _reload(ref)
    else:  # as a step does when a gradient or param stops fitting its plan
        fused._slimoptim_plans.clear()
    del old_plans
    _steps(fused, ref, ps, qs, gen, 3)  # a new plan: eager, captured, replayed
    other, other_ref, rs, ss = _pair(slimoptim.SGD, seed=2, momentum=0.9)
    _user_capture(other, other_ref, rs, ss, gen)
    _steps(fused, ref, ps, qs, gen, 2)  # the first optimizer's graph still replays


@pytest.mark.parametrize("capturing", [False, True], ids=["eager", "during a capture"])
def test_a_freed_plans_graphs_wait_only_while_a_capture_runs(monkeypatch, capturing):
    """The mechanism on any device: a plan freed outside a capture takes its graphs with
    it; one freed during a capture parks them, and the next call outside a capture
    destroys them."""

    class Plan:  # stands for dispatch.Plan / muon.MuonPlan
        pass

    class Graph:  # stands for torch.cuda.CUDAGraph
        pass

    monkeypatch.setattr(launch, "_dropped_graphs", [])  # whatever earlier tests parked
    plan, graph = Plan(), Graph()
    launch._graphs_of(plan)["key"] = graph
    assert launch._graphs_of(plan)["key"] is graph  # one dict per plan
    alive = weakref.ref(graph)
    plan.cycle = plan  # as an optimizer with an LR scheduler is: only the collector frees it
    del plan, graph
    monkeypatch.setattr(launch, "_capturing_here", lambda: capturing)
    gc.collect()
    assert (alive() is not None) == capturing
    assert len(launch._dropped_graphs) == capturing
    launch._free_dropped_graphs()
    assert (alive() is not None) == capturing  # still capturing: still parked
    monkeypatch.setattr(launch, "_capturing_here", lambda: False)
    launch._free_dropped_graphs()
    assert alive() is None and not launch._dropped_graphs


@gpu_only
def test_an_optimizer_collected_during_a_user_capture_does_not_break_it():
    gen = torch.Generator().manual_seed(3)
    fused, ref, ps, qs = _pair(slimoptim.AdamW, seed=4)
    _steps(fused, ref, ps, qs, gen, 3)  # its plan holds a captured graph
    fused.cycle = fused  # as an LR scheduler's patched step makes
    dead = weakref.ref(fused)
    gc.disable()  # so that the collection inside the capture is the one that frees it
    try:
        del fused
        other, other_ref, rs, ss = _pair(slimoptim.SGD, seed=5, momentum=0.9)
        # The collector, as an allocation in the middle of the capture would run it.
        _user_capture(other, other_ref, rs, ss, gen, during=gc.collect)
    finally:
        gc.enable()
    assert dead() is None and launch._dropped_graphs  # freed during it; its graphs parked
    _steps(other, other_ref, rs, ss, gen, 1)  # eager: the parked graphs are destroyed
    assert not launch._dropped_graphs


@gpu_only
def test_the_plans_own_capture_runs_with_the_collector_paused(monkeypatch):
    seen, launch_buckets = [], dispatch.launch_buckets

    def recording(plan, scale, inf):
        seen.append((torch.cuda.is_current_stream_capturing(), gc.isenabled()))
        launch_buckets(plan, scale, inf)

    monkeypatch.setattr(dispatch, "launch_buckets", recording)
    gen = torch.Generator().manual_seed(6)
    fused, ref, ps, qs = _pair(slimoptim.AdamW, seed=7)
    assert gc.isenabled()
    _steps(fused, ref, ps, qs, gen, 3)  # eager, captured, replayed (no launch_all call)
    assert seen == [(False, True), (True, False)] and gc.isenabled()


def test_the_collector_stays_paused_until_the_last_of_overlapping_captures_ends():
    """Two threads' plan captures (gradient release) overlapping: the collector comes back
    on only when both have ended, and only if it was on before."""
    for was_on in (True, False):
        (gc.enable if was_on else gc.disable)()
        try:
            first, second = launch._collector_paused(), launch._collector_paused()
            first.__enter__()
            second.__enter__()
            assert not gc.isenabled()
            first.__exit__(None, None, None)  # the first to start ends first
            assert not gc.isenabled()
            second.__exit__(None, None, None)
            assert gc.isenabled() == was_on
        finally:
            gc.enable()


def test_a_load_keeps_the_plans_a_users_graph_captured_and_says_so():
    """A plan used inside the user's capture of step() is kept for the optimizer's life:
    the graph reads its tables (a load must not free them). The capture faked (it needs
    a GPU); the test below captures for real."""
    fused = _pair(slimoptim.AdamW, seed=9)[0]
    fused.step()
    (plan,) = fused._slimoptim_plans.values()
    fused.__dict__[kernels.USER_CAPTURED] = {id(plan): plan}
    with pytest.warns(UserWarning, match="captured in a CUDA graph"):
        fused.load_state_dict(fused.state_dict())
    assert not fused._slimoptim_plans and list(kernels._plans(fused)) == [plan]
    assert kernels.replaced_state(fused)  # the state it holds is counted


@gpu_only
def test_a_users_graph_of_step_still_replays_after_a_load():
    gen = torch.Generator().manual_seed(10)
    fused, ref, ps, qs = _pair(slimoptim.AdamW, seed=11)
    graph = _user_capture(fused, ref, ps, qs, gen)
    (plan,) = fused._slimoptim_plans.values()
    with pytest.warns(UserWarning, match="captured in a CUDA graph"):
        fused.load_state_dict(fused.state_dict())
    assert list(kernels._plans(fused)) == [plan]  # kept: the graph reads its tables
    graph.replay()  # steps the state from before the load, through live memory
    torch.cuda.synchronize()
