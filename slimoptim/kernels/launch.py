"""Launching a plan's kernels: eagerly, or by replaying a CUDA graph of the launches.

Per bucket a step is a step-counter kernel, a dozen small torch ops for the per-tensor
scalars and the step kernel: ~15 launches whose host cost (~0.25 ms) would dominate small
models and gradient release, which steps a few tensors at a time. On CUDA each plan
therefore captures its launch sequence in a CUDA graph once it has run eagerly (the
first run compiles the kernels) and replays it afterwards: one launch per plan. The
graph reads everything from the plan's device buffers, which every step refreshes first
(gradient addresses, hyper-parameters), so a replay is the eager sequence. Inside a
user's own graph capture the launches stay eager and are captured with it.

Destroying a CUDA graph while this thread captures another invalidates that capture
(``cudaErrorStreamCaptureInvalidated``), and since PyTorch no longer collects garbage
before a capture, an optimizer in a reference cycle (an LR scheduler makes one) can be
collected in the middle of anyone's capture. So the graphs of a plan freed during a
capture outlive it until the next eager step (``_park_if_capturing``), and the plans' own
captures run with the cyclic garbage collector paused, so that nobody else's graph is
destroyed during them. Not covered: a capture in torch's default "global" mode on one
thread while another thread (a data loader's, say) frees a plan (CUDA then forbids the
destruction from any thread), and parked graphs wait for the next eager fused step
(their memory with them).
"""

from __future__ import annotations

import contextlib
import gc
import os
import threading
import weakref

import torch
import triton

from ..formats import MOMENTUM_LEVEL_SETS, MOMENTUM_ROUNDINGS
from . import common as cm

# Elements per tile (rounded to whole quantization groups), tiles per program, warps per
# program, register cap by the rule's number of states (0, 1, 2). 8 elements per thread
# (4 threads per 32-element group) halve the per-group work per element. Two-state rules
# (AdamW) capped at 80 registers fit 25 one-warp programs on an SM (uncapped: 117
# registers, 17 programs, slower; at 64 they spill); rules of one state or none need no
# more than 64 without spilling, which lets 32 programs share an SM, the hardware's limit.
# Swept on the H200 (benchmarks/NOTES.md v17, v21); the GPU bit check covers the tail-tile
# case that 8 elements per thread once miscompiled (Triton 3.6, v4).
CONFIG = {"block": 256, "tiles": 8, "num_warps": 1, "maxnreg": (64, 64, 80)}
# The interpreter's cost is per program and per launch, not per element: larger tiles
# keep tests quick; 4 tiles per chunk still puts whole and tail tiles in one program
# for a 4097-element tensor.
INTERPRETER_CONFIG = {"block": 2048, "tiles": 4}

# Replay the plans' launch sequences as CUDA graphs (SLIMOPTIM_CUDA_GRAPHS=0 turns it off).
USE_GRAPHS = os.environ.get("SLIMOPTIM_CUDA_GRAPHS", "1") != "0"


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def launch_plan(plan, grad_scale, found_inf, capturing: bool, settings=()) -> None:
    """Step every bucket of ``plan`` (gradient addresses and hyper-parameters uploaded).

    ``plan.launch_all(scale, found_inf)`` enqueues its launch sequence (a bucket plan's is
    :func:`launch_buckets`); ``settings`` are the host values it bakes into its launches (a
    graph is captured per distinct value).
    """
    scale = _device_scalar(grad_scale, plan.device)
    inf = _device_scalar(found_inf, plan.device)
    launch_all = plan.launch_all
    if not USE_GRAPHS or plan.device.type != "cuda" or capturing or interpreting():
        launch_all(scale, inf)
        return
    _free_dropped_graphs()
    key = (scale is not None, inf is not None, settings)
    graphs = _graphs_of(plan)
    if key not in graphs:
        launch_all(scale, inf)  # the first run of this kind is eager: it compiles
        graphs[key] = None  # ... and only once it has run is the plan captured
        return
    if graphs[key] is None:
        graphs[key] = _capture(plan, key, launch_all)
    if scale is not None:
        plan.static_scale.copy_(scale)
    if inf is not None:
        plan.static_inf.copy_(inf)
    graphs[key].replay()


def _capture(plan, key, launch_all) -> torch.cuda.CUDAGraph:
    has_scale, has_inf, _ = key
    with torch.cuda.device(plan.device), torch.inference_mode(False):
        if not hasattr(plan, "static_scale"):
            plan.static_scale = torch.ones(1, device=plan.device)
            plan.static_inf = torch.zeros(1, device=plan.device)
        graph = torch.cuda.CUDAGraph()
        # thread_local: gradient release captures inside backward, while autograd's
        # threads keep launching their own work.
        # Each device its own capture stream: torch's default one is created on whatever
        # device was current at the process's first capture.
        stream = plan.shared.setdefault(("capture_stream", plan.device), torch.cuda.Stream())
        pool, pool_graphs = _pool(plan)
        # A collection now could destroy another graph: see the module's doc.
        with (
            _collector_paused(),
            torch.cuda.graph(graph, pool=pool, stream=stream, capture_error_mode="thread_local"),
        ):
            launch_all(
                plan.static_scale if has_scale else None,
                plan.static_inf if has_inf else None,
            )
    pool_graphs.add(graph)
    return graph


_pause_lock = threading.Lock()
_pauses = [0, False]  # captures under way (threads: gradient release), collector was on


@contextlib.contextmanager
def _collector_paused():
    """The cyclic garbage collector off while any thread's plan capture runs, back on
    (if it was on) when the last one ends."""
    with _pause_lock:
        if _pauses[0] == 0:
            _pauses[1] = gc.isenabled()
            gc.disable()
        _pauses[0] += 1
    try:
        yield
    finally:
        with _pause_lock:
            _pauses[0] -= 1
            if _pauses[0] == 0 and _pauses[1]:
                gc.enable()


# Graphs of plans freed during a capture on this thread: destroyed by the next eager step.
_dropped_graphs: list[dict] = []


def _graphs_of(plan) -> dict:
    """The plan's {key: CUDAGraph or None (not captured yet)}, watched: see
    ``_park_if_capturing``."""
    graphs = plan.__dict__.get("graphs")
    if graphs is None:
        graphs = plan.graphs = {}
        weakref.finalize(plan, _park_if_capturing, graphs).atexit = False
    return graphs


def _park_if_capturing(graphs: dict) -> None:
    """Called as a plan is freed (rebuilt, or its optimizer collected): its graphs are
    destroyed when this returns, unless this thread is capturing a graph; then they are
    kept until the next eager step."""
    if _capturing_here():
        _dropped_graphs.append(graphs)


def _free_dropped_graphs() -> None:
    if _dropped_graphs and not _capturing_here():
        _dropped_graphs.clear()


def _capturing_here() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def _pool(plan) -> tuple:
    """(memory pool, the live graphs captured into it) for a new capture.

    One pool for an optimizer's graphs captured from one stream of a device: their
    temporaries live only within a replay, and replays on one stream run one after
    another. (Gradient release steps from the streams autograd runs on.) A pool whose
    graphs have all been freed (their plans rebuilt, e.g. after ``load_state_dict``) cannot
    be shared again (the caching allocator asserts that a shared pool is in use), so it is
    replaced by a new one.
    """
    key = ("graph_pool", plan.device, torch.cuda.current_stream(plan.device))
    pool, graphs = plan.shared.get(key, (None, None))
    if pool is None or not graphs:
        pool, graphs = torch.cuda.graph_pool_handle(), weakref.WeakSet()
        plan.shared[key] = (pool, graphs)
    return pool, graphs


def launch_buckets(plan, scale, inf) -> None:
    """Every bucket's launches: step counters, then the skeleton kernel with the rule."""
    dummy = plan.buckets[0].steps
    for bucket in plan.buckets:
        _launch(plan, bucket, scale if scale is not None else dummy, inf, dummy, scale is not None)


def _device_scalar(t, device):
    if t is None:
        return None
    return t.to(device=device, dtype=torch.float32, non_blocking=True).reshape(-1)


def _launch(plan, bucket, scale, found_inf, dummy, has_scale) -> None:
    """The bucket's two launches: step counters, then the skeleton kernel with the rule."""
    has_inf = found_inf is not None
    found_inf = found_inf if has_inf else dummy
    cm.bump_steps_kernel[(triton.cdiv(bucket.n, 1024),)](
        bucket.table, bucket.n, bucket.steps, found_inf, HAS_FOUND_INF=has_inf, BLOCK=1024
    )
    hyper = plan.hyper.index_select(0, bucket.hyper_rows)
    scalars = plan.rule.scalars(hyper, bucket.steps)
    width = cm.MAX_SCALARS.value
    scalars = torch.nn.functional.pad(scalars, (0, width - scalars.shape[1])).contiguous()
    grad_ptrs = plan.grad_ptrs[bucket.first : bucket.first + bucket.n]
    flags = [bucket.flags.get(name, False) for name in plan.rule.flag_names]
    flags += [False] * (3 - len(flags))
    cm.step_kernel[(bucket.n_chunks,)](
        bucket.table,
        grad_ptrs,
        bucket.numels,
        bucket.chunk_tensor,
        bucket.chunk_start,
        scalars,
        scale,
        found_inf,
        RULE=plan.rule.update,
        N_STATES=bucket.n_states,
        FORGET=plan.rule.forget_column,
        LEVELS=MOMENTUM_LEVEL_SETS.index(plan.rule.momentum_levels),
        FLAG0=flags[0],
        FLAG1=flags[1],
        FLAG2=flags[2],
        PARAM_KIND=bucket.param_kind,
        GRAD_KIND=bucket.grad_kind,
        CODE_BITS=bucket.code_bits,
        STATE_BITS=bucket.state_bits,
        G=bucket.g,
        ROWS=bucket.rows,
        TILES=bucket.tiles,
        MAXIMIZE=bucket.maximize,
        HAS_GRAD_SCALE=has_scale,
        HAS_FOUND_INF=has_inf,
        HW_ROUND=not interpreting(),
        MASTER_DITHER=plan.rule.master_rounding == "stochastic" and bucket.code_bits == 8,
        ROUNDING=MOMENTUM_ROUNDINGS.index(plan.rule.momentum_rounding),
        SEQUENCED=plan.rule.dither == "sequenced",
        **kernel_options(bucket.n_states),
    )


def kernel_options(n_states: int) -> dict:
    """Triton launch options of the step kernel for a rule of ``n_states`` states."""
    cap = CONFIG["maxnreg"][n_states]
    # No fp contraction: an fma is written as tl.fma wherever the reference rounds once.
    options = {"num_warps": CONFIG["num_warps"], "enable_fp_fusion": False}
    return {**options, "maxnreg": cap} if cap else options
