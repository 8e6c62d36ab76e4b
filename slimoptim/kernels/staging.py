"""Host-to-device copies of the per-step tables without a sync and without a new pinned
buffer per copy.

A non-blocking copy must come from pinned memory, and its source must stay untouched until
the GPU has run it: the copy waits in the stream behind whatever was enqueued before it.
``Tensor.pin_memory()`` per copy is safe but costs tens of microseconds of host time
(the caching host allocator's bookkeeping), which every step with new gradient addresses
or a scheduled learning rate paid. So each optimizer keeps, per device, a small ring of
pinned buffers; a buffer is written again only once the event recorded after its last
copy has completed. When the GPU lags so far behind that the next buffer's copy is still
pending, the copy falls back to a fresh pinned buffer rather than waiting: step() never
blocks on the GPU.
"""

from __future__ import annotations

import numpy as np
import torch

DEPTH = 8  # buffers per ring: uploads in flight before the fallback


class StagingRing:
    """Pinned int64 buffers, reused in turn, each guarded by the event of its last copy."""

    def __init__(self, device: torch.device, depth: int = DEPTH):
        self.device = device
        self.buffers: list[torch.Tensor | None] = [None] * depth
        self.arrays: list[np.ndarray | None] = [None] * depth  # the buffers' numpy views
        self.events = [torch.cuda.Event() for _ in range(depth)]
        self.next = 0
        self.fallbacks = 0  # copies that found their buffer busy (for tests and profiling)

    def copy(self, host: np.ndarray, dst: torch.Tensor) -> None:
        """``dst.copy_(host)``, enqueued on ``dst``'s device's current stream."""
        slot, event = self.next, self.events[self.next]
        if not event.query():  # a never-recorded event counts as completed
            self.fallbacks += 1
            dst.copy_(torch.from_numpy(host).pin_memory(), non_blocking=True)
            return
        buffer = self.buffers[slot]
        if buffer is None or buffer.numel() < host.size:
            buffer = torch.empty(max(host.size, 64), dtype=torch.int64, pin_memory=True)
            self.buffers[slot], self.arrays[slot] = buffer, buffer.numpy()
        self.arrays[slot][: host.size] = host
        dst.copy_(buffer[: host.size], non_blocking=True)
        event.record(torch.cuda.current_stream(self.device))
        self.next = (slot + 1) % len(self.events)


def copy_to_device(shared: dict, host: np.ndarray, dst: torch.Tensor) -> None:
    """Copy ``host`` (int64 words) into ``dst`` without a sync: through the ring of the
    optimizer (``shared``: its per-optimizer cache) for ``dst``'s device when on CUDA."""
    if not dst.is_cuda:
        dst.copy_(torch.from_numpy(host))
        return
    ring = shared.get(("staging", dst.device))
    if ring is None:
        ring = shared[("staging", dst.device)] = StagingRing(dst.device)
    ring.copy(host, dst)
