"""The per-step upload's ring of pinned buffers (kernels/staging.py) never overwrites a
buffer whose copy the GPU has not run yet, and a fused step whose uploads queue up behind
a busy GPU (new gradient addresses and a new learning rate every step) still gives the
reference's bits. CUDA only: on the CPU the upload is a plain copy, tested everywhere."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_kernels import _assert_same, gpu_only  # skips this module too without Triton

import slimoptim

pytest.importorskip("triton")
from slimoptim.kernels import staging  # noqa: E402

# Long enough that every copy below is enqueued before the GPU reaches the first one.
SLEEP_CYCLES = 200_000_000


@gpu_only
def test_ring_keeps_buffers_of_pending_copies():
    ring = staging.StagingRing(torch.device("cuda", torch.cuda.current_device()))
    n_copies = 3 * staging.DEPTH + 1
    rng = np.random.default_rng()
    words = [rng.integers(-(2**62), 2**62, size=int(rng.integers(1, 300))) for _ in range(n_copies)]
    dsts = [torch.zeros(len(w), dtype=torch.int64, device="cuda") for w in words]
    torch.cuda._sleep(SLEEP_CYCLES)  # every copy waits behind this in the stream
    host = np.empty(300, dtype=np.int64)
    for w, dst in zip(words, dsts, strict=True):
        host[: len(w)] = w
        ring.copy(host[: len(w)], dst)
        host[:] = -1  # the caller may reuse its array at once
    busy = ring.fallbacks
    torch.cuda.synchronize()
    for w, dst in zip(words, dsts, strict=True):
        assert np.array_equal(dst.cpu().numpy(), w)
    # The first DEPTH copies used the ring; the rest found their buffer still pending.
    assert busy == n_copies - staging.DEPTH
    # Once the GPU has caught up the ring is reused, however often it has gone round.
    for w, dst in zip(words, dsts, strict=True):
        ring.copy(w[::-1].copy(), dst)
        torch.cuda.synchronize()
        assert np.array_equal(dst.cpu().numpy(), w[::-1])
    assert ring.fallbacks == busy


@gpu_only
@pytest.mark.parametrize("sleep_every", [1, 5])
def test_queued_uploads_step_like_the_reference(sleep_every):
    """Sleeping every step the GPU falls ever further behind (the ring runs out and falls
    back); every fifth step it catches up in between (the ring is reused)."""
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    shapes = [(64, 32), (96,), (33,), (8, 8)]
    ps = [torch.nn.Parameter(torch.randn(s, generator=gen).bfloat16().cuda()) for s in shapes]
    qs = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    fused = slimoptim.AdamW(ps, lr=1e-2, fused=True)
    ref = slimoptim.AdamW(qs, lr=1e-2, fused=False)
    for step in range(3 * staging.DEPTH):
        lr = 1e-2 * (1 - step / 100)  # a schedule: the hyper-parameters change every step
        for opt in (fused, ref):
            opt.param_groups[0]["lr"] = lr
        for p, q in zip(ps, qs, strict=True):
            g = torch.randn(p.shape, generator=gen).bfloat16().cuda()
            p.grad, q.grad = g, g.clone()  # new gradient tensors every step
        if step % sleep_every == 0:
            torch.cuda._sleep(SLEEP_CYCLES // 10)
        fused.step()
        ref.step()
    ring = fused._slimoptim_shared[("staging", ps[0].device)]
    if sleep_every == 1:
        assert ring.fallbacks > 0
    _assert_same(fused, ref, ps, qs)


def test_cpu_upload_is_a_plain_copy():
    dst = torch.zeros(5, dtype=torch.int64)
    words = np.random.default_rng().integers(-(2**62), 2**62, size=5)
    shared = {}
    staging.copy_to_device(shared, words, dst)
    assert np.array_equal(dst.numpy(), words)
    assert shared == {}  # no ring (and no CUDA call) for a CPU destination
