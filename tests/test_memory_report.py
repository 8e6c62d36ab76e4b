"""memory_report counts every byte the optimizer adds to the device's allocated memory:
the state, the fused step's tables and the caching allocator's rounding of their blocks.

On a GPU the sum must equal ``torch.cuda.memory_allocated()``'s growth over the first
step (the states and tables are made then); on the CPU the pieces are checked apart."""

from __future__ import annotations

import copy
import gc
import weakref

import pytest
import torch

import slimoptim
from slimoptim.memory import allocator_rounding, block_sizes

CUDA = torch.cuda.is_available()
MiB = 2**20


def test_block_sizes_walks_each_segment():
    segments = [
        {
            "address": 4096,
            "blocks": [
                {"size": 512, "state": "active_allocated"},
                {"size": 1536, "state": "inactive"},
                {"size": 2048, "state": "active_allocated"},
            ],
        },
        {"address": 10 * MiB, "blocks": [{"size": 2 * MiB, "state": "active_allocated"}]},
    ]
    assert block_sizes(segments) == {4096: 512, 4096 + 2048: 2048, 10 * MiB: 2 * MiB}


def test_rounding_is_zero_off_cuda():
    s = torch.empty(3 * MiB + 1, dtype=torch.int8).untyped_storage()
    assert allocator_rounding({s.data_ptr(): s.nbytes()}) == 0  # in no CUDA block


def test_rounding_reads_the_block_at_each_state_storage(monkeypatch):
    """The allocator's snapshot faked around real (CPU) state tensors: each distinct
    storage is rounded to the active block at its address; free blocks and storages in no
    block add nothing."""
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    ps = [torch.nn.Parameter(torch.randn(n, generator=gen)) for n in (1000, 77, 5)]
    for p in ps:
        p.grad = torch.randn(p.shape, generator=gen)
    opt = torch.optim.SGD(ps, lr=0.1, momentum=0.9)
    opt.step()
    bufs = [opt.state[p]["momentum_buffer"] for p in ps]
    opt.state[ps[0]]["a_view"] = bufs[0][10:]  # shares the first buffer's storage
    segments = [
        {"address": bufs[0].data_ptr(), "blocks": [{"size": 4096, "state": "active_allocated"}]},
        {
            "address": bufs[1].data_ptr() - 512,
            "blocks": [
                {"size": 512, "state": "inactive"},
                {"size": 512, "state": "active_allocated"},
            ],
        },
        # The third buffer's address starts a free block (a cached, not allocated, one).
        {"address": bufs[2].data_ptr(), "blocks": [{"size": 512, "state": "inactive"}]},
        {"address": 2**40, "blocks": [{"size": 2 * MiB, "state": "active_allocated"}]},
    ]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_allocator_backend", lambda: "native")
    monkeypatch.setattr(torch.cuda, "memory_snapshot", lambda include_traces=True: segments)
    report = slimoptim.memory_report(opt)
    assert report["allocator_rounding"] == (4096 - 4000) + (512 - 77 * 4)
    # By storage: the view adds no bytes (though "bytes" counts it, tensor by tensor).
    assert report["optimizer_bytes_allocated"] == (1000 + 77 + 5) * 4 + 96 + 204
    # A torch whose memory_snapshot takes no arguments.
    monkeypatch.setattr(torch.cuda, "memory_snapshot", lambda: segments)
    assert slimoptim.memory_report(opt)["allocator_rounding"] == 96 + 204
    monkeypatch.setattr(torch.cuda, "get_allocator_backend", lambda: "cudaMallocAsync")
    assert slimoptim.memory_report(opt)["allocator_rounding"] == 0  # no blocks to read


def test_a_wrapper_subclass_state_is_counted_at_its_size():
    from torch.testing._internal.two_tensor import TwoTensor  # noqa: PLC0415

    p = torch.nn.Parameter(torch.randn(8))
    p.grad = torch.randn(8)
    opt = torch.optim.SGD([p], lr=0.1, momentum=0.9)
    opt.step()
    opt.state[p]["wrapped"] = TwoTensor(torch.randn(8), torch.randn(8))  # no storage of its own
    report = slimoptim.memory_report(opt)
    assert report["optimizer_bytes_allocated"] == 32 + 32  # the buffer, the wrapper's size


def test_sparse_params_are_counted_without_rounding():
    p = torch.nn.Parameter(torch.randn(6, 5).to_sparse())
    p.grad = torch.randn(6, 5).to_sparse()
    opt = torch.optim.SGD([p], lr=0.1, momentum=0.9)
    opt.step()
    report = slimoptim.memory_report(opt)  # a sparse tensor has no storage to look up
    assert report["allocator_rounding"] == 0 and report["kernel_tables"] == 0
    assert report["optimizer_bytes_allocated"] == report["optimizer_bytes"] > 0


def _params(device, shapes):
    """bf16 params of ``shapes`` (sizes or tuples) with gradients, fresh random values."""
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    ps = [torch.nn.Parameter(torch.randn(s, generator=gen).bfloat16().to(device)) for s in shapes]
    for p in ps:
        p.grad = torch.randn(p.shape, generator=gen).bfloat16().to(device)
    return ps


def _first_step(make_optimizer, params) -> tuple[int, dict]:
    """(growth of torch.cuda.memory_allocated() over building the optimizer and its first
    step, memory_report after it)."""
    # No collection inside the window: an earlier test's cyclic garbage freed there (an
    # optimizer and its plans' CUDA graphs) would shrink the delta.
    gc.collect()
    gc.disable()
    try:
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        opt = make_optimizer(params)
        opt.step()
        torch.cuda.synchronize()
        delta = torch.cuda.memory_allocated() - before
    finally:
        gc.enable()
    return delta, slimoptim.memory_report(opt)


def _bucket_table_bytes(plan) -> int:
    """Bytes of an AdamW plan's tables, listed apart from Plan.device_tables: the upload
    buffer (its two views, gradient addresses and hyper-parameters, are one storage) and
    each bucket's."""
    tables = ("table", "numels", "chunk_tensor", "chunk_start", "hyper_rows", "steps")
    return plan.upload.nbytes + sum(getattr(b, t).nbytes for b in plan.buckets for t in tables)


def test_reference_path_holds_only_its_state():
    opt = slimoptim.AdamW(_params("cpu", (1000, 37)), lr=1e-3, fused=False)
    opt.step()
    report = slimoptim.memory_report(opt)
    assert report["kernel_tables"] == 0
    assert report["optimizer_bytes_allocated"] == report["optimizer_bytes"]


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device (the caching allocator)")
@pytest.mark.parametrize("cls", [slimoptim.AdamW, slimoptim.Lion])
@pytest.mark.parametrize("fused", [None, False])
def test_report_equals_the_allocator_delta_of_the_first_step(cls, fused):
    # Odd sizes: 1-byte states above 1 MiB whose blocks the allocator rounds up, small
    # ones from its 512-byte pool, and a 10 MiB+ one in its own segment.
    sizes = (3 * MiB + 4097, 11 * MiB + 333, 5000, 77, MiB // 2 + 1)
    delta, report = _first_step(lambda ps: cls(ps, lr=1e-4, fused=fused), _params("cuda", sizes))
    assert report["allocator_rounding"] > 0
    assert (report["kernel_tables"] > 0) == (fused is None)
    assert report["optimizer_bytes_allocated"] == delta, report


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device (the caching allocator)")
@pytest.mark.parametrize("fused", [None, False])
def test_muon_report_equals_the_allocator_delta_of_the_first_step(fused):
    # The matmul libraries' workspaces (made by a stream's first matmuls) are the caching
    # allocator's too but not the optimizer's (the model's matmuls share them): a first
    # optimizer on a small matrix makes them before the measurement.
    warm = slimoptim.Muon(_params("cuda", [(64, 96)]), lr=1e-3, fused=fused)
    warm.step()
    del warm
    # Matrices whose 1-byte states round up; the fused path's scratch buffers count too.
    params = _params("cuda", [(1031, 1536), (2051, 768)])
    delta, report = _first_step(lambda ps: slimoptim.Muon(ps, lr=1e-3, fused=fused), params)
    assert report["allocator_rounding"] > 0
    assert report["optimizer_bytes_allocated"] == delta, report


def test_fused_step_counts_its_tables_once():
    pytest.importorskip("triton")  # CPU: the interpreter (tests/conftest.py)
    params = _params("cuda" if CUDA else "cpu", (1000, 37, 4096))
    opt = slimoptim.AdamW(params, lr=1e-3, fused=True)
    opt.step()
    (plan,) = opt._slimoptim_plans.values()
    expected = _bucket_table_bytes(plan)
    report = slimoptim.memory_report(opt)
    assert report["kernel_tables"] == expected
    rounding = report["allocator_rounding"]
    assert rounding > 0 if CUDA else rounding == 0  # on CUDA: blocks of 512 bytes and up
    assert report["optimizer_bytes_allocated"] == report["optimizer_bytes"] + expected + rounding


def test_tables_of_several_plans_add_up():
    pytest.importorskip("triton")
    params = _params("cuda" if CUDA else "cpu", (1000, 37))
    opt = slimoptim.AdamW(params, lr=1e-3, fused=True)
    group = opt.param_groups[0]
    for p in params:  # one plan per param, as gradient release builds them
        opt.step_params([(group, p)])
    plans = list(opt._slimoptim_plans.values())
    assert len(plans) == 2
    each = [_bucket_table_bytes(plan) for plan in plans]
    assert slimoptim.memory_report(opt)["kernel_tables"] == sum(each)


def test_a_load_frees_the_state_it_replaced_at_once():
    """The cached plans hold the state dicts they were built for: load_state_dict drops
    them, so the replaced state is freed by the load, not by the next step."""
    pytest.importorskip("triton")
    params = _params("cuda" if CUDA else "cpu", (1000, 37))
    opt = slimoptim.AdamW(params, lr=1e-3, fused=True)
    opt.step()
    old = [weakref.ref(t) for state in opt.state.values() for t in state.values()]
    assert slimoptim.memory_report(opt)["kernel_tables"] > 0
    opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert all(r() is None for r in old)
    loaded = slimoptim.memory_report(opt)
    assert loaded["replaced_state"] == 0 and loaded["kernel_tables"] == 0
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()  # builds a plan on the loaded state
    assert slimoptim.memory_report(opt)["kernel_tables"] > 0


def test_state_replaced_by_hand_is_counted_until_the_next_step():
    """State dicts swapped in ``opt.state`` without a load: the cached plans still hold
    the old ones (freed as the next step rebuilds them); the allocated count includes them
    until then."""
    pytest.importorskip("triton")
    params = _params("cuda" if CUDA else "cpu", (1000, 37))
    opt = slimoptim.AdamW(params, lr=1e-3, fused=True)
    opt.step()
    before = slimoptim.memory_report(opt)
    assert before["replaced_state"] == 0
    for p in params:
        opt.state[p] = copy.deepcopy(opt.state[p])
    replaced = slimoptim.memory_report(opt)
    assert replaced["replaced_state"] == before["optimizer_bytes"]  # every old state tensor
    allocated = before["optimizer_bytes_allocated"] + before["optimizer_bytes"]
    assert replaced["optimizer_bytes_allocated"] == allocated + (
        replaced["allocator_rounding"] - before["allocator_rounding"]
    )
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()  # rebuilds the plan on the new state dicts
    assert slimoptim.memory_report(opt)["replaced_state"] == 0


def test_muon_plans_count_their_shared_scratch_once():
    """Two Muon plans (one matrix each, as gradient release builds them) share the
    optimizer's scratch buffers: counted once, beside each plan's own tables."""
    pytest.importorskip("triton")
    ps = _params("cuda" if CUDA else "cpu", [(48, 40), (24, 32)])
    opt = slimoptim.Muon(ps, lr=0.02, fused=True)
    group = opt.param_groups[0]
    for p in ps:
        opt.step_params([(group, p)])
    plans = list(opt._slimoptim_muon_plans.values())
    assert len(plans) == 2 and plans[0].scratch is plans[1].scratch
    scratch = 2 * 48 * 40 * 2  # two bf16 buffers as large as the largest matrix
    own = sum(
        t.nbytes
        for plan in plans
        for t in (
            plan.momentum_table,
            plan.master_table,
            plan.numels,
            plan.ortho_ptrs,
            plan.upload,  # with its two views
            plan.ok,
            plan.skip,
            plan.momentum_scalars,  # the last step's scalars, held until the next step
            plan.master_scalars,
            *(kw[name] for kw in plan.launch for name in ("chunk_tensor", "chunk_start")),
        )
    )
    assert slimoptim.memory_report(opt)["kernel_tables"] == scratch + own
