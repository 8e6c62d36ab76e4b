"""kernels/guards.py: the one-call checks the fused step runs over every gradient each
step, against the Python checks they stand for."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")
from slimoptim.kernels import guards  # noqa: E402

SHAPES = ((8, 16), (40,), (3, 1, 5))


def _grads(gen, dtype=torch.bfloat16):
    return [torch.randn(s, generator=gen).to(dtype) for s in SHAPES]


def _changed(g: torch.Tensor) -> dict:
    """Tensors like ``g`` in one respect the kernels cannot read through the plan."""
    out = {
        "float32": g.float(),
        "float16": g.half(),
        "requires grad": g.clone().requires_grad_(),
        "other shape, same numel": g.reshape(-1, 1) if g.dim() == 1 else g.reshape(-1),
        "a row of padding": torch.zeros(g.shape[0], g[0].numel() + 1, dtype=g.dtype)[:, 1:],
        "sparse": g.to_sparse(),
        "None": None,
    }
    if g.dim() == 2:
        out["transposed"] = g.t().contiguous().t()
    return out


def test_the_guard_exists_on_this_torch():
    # CI's torch (2.13) and the GPU machine's (2.11) both have it: a fallback taken here
    # would leave the C path untested.
    assert guards._guard_works()


def test_the_layout_guard_accepts_fresh_tensors_of_the_same_layout_only():
    gen = torch.Generator().manual_seed(0)
    kept = _grads(gen)
    guard = guards.layout_guard(kept)
    assert guard.check(*_grads(gen))  # new tensors, new values, the same layouts
    for i, g in enumerate(kept):
        for name, other in _changed(g).items():
            if name == "a row of padding" and g.dim() != 2:
                other = torch.zeros(g.numel() * 2, dtype=g.dtype)[::2].view(g.shape)
            ts = list(_grads(gen))
            ts[i] = other
            assert not guard.check(*ts), (i, name)


def test_same_addresses_in_c_and_in_python_agree(monkeypatch):
    gen = torch.Generator().manual_seed(1)
    ts = _grads(gen)
    addresses = [t.data_ptr() for t in ts]
    indices = list(range(len(ts)))
    moved = list(ts)
    moved[2] = ts[2].clone()
    views = [t.view(-1)[0:] for t in ts]  # other tensor objects at the same addresses
    results = []
    for in_c in (True, False):
        if not in_c:
            monkeypatch.delattr(torch._C, "_tensors_data_ptrs_at_indices_equal", raising=False)
        elif not hasattr(torch._C, "_tensors_data_ptrs_at_indices_equal"):
            continue  # CPU builds of torch: the Python path only (run below)
        results.append([guards.same_addresses(t, addresses, indices) for t in (ts, moved, views)])
    assert all(r == [True, False, True] for r in results), results


def test_plain_dense_tells_the_tensors_whose_address_is_their_elements():
    from torch.testing._internal.two_tensor import TwoTensor  # noqa: PLC0415

    t = torch.randn(4)
    assert guards.plain_dense(t) and guards.plain_dense(torch.nn.Parameter(t))
    assert not guards.plain_dense(t._neg_view())  # elements stored negated
    assert not guards.plain_dense(TwoTensor(t, t.clone()))  # a wrapper: data_ptr() is 0
    assert not guards.plain_dense(t.to_sparse())
