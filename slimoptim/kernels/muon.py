"""Muon's two elementwise passes as rules of the step-kernel skeleton (kernels/common.py).

A Muon step of one matrix is: (A) the momentum pass, then Newton-Schulz on PyTorch
matmuls (the optimizer runs it), then (B) the master pass. Both passes are launches of
the skeleton with their own table rows:

* A reads the gradient and the momentum state and stores the new state; the matrix to
  orthogonalise goes out through the skeleton's param slot, into a bf16 scratch buffer
  with no correction (its round to nearest even is the ``.bfloat16()`` that starts
  Newton-Schulz).
* B reads the param and its correction, with the orthogonalised matrix in the gradient
  slot and no state, and stores the new master.

Same-shape matrices of a param group go through Newton-Schulz together (``_batches``):
pass A of each writes its own slot of the scratch buffer, one batched Newton-Schulz
orthogonalises every slot, then pass B of each reads its slot. A skipped matrix's slot
keeps stale values; the batched matmuls keep each slot's result to itself and pass B
does not read it.

Each pass is launched per matrix, with its skip flag (non-finite gradient, or
GradScaler's found_inf) as the skeleton's ``found_inf``: a skipped matrix keeps its
state, master and step counter whole, as the reference does. The step counters and the
scalar rows of all matrices are updated by a few torch ops per step, before the passes.
Nothing waits for the host.
"""

from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl

from ..formats import MOMENTUM_LEVEL_SETS, MOMENTUM_ROUNDINGS, correction_bits
from . import common as cm
from .dispatch import (
    KINDS,
    fusable_state,
    split_values,
    tensor_attributes,
    tiling,
    upload,
    upload_tensors,
)
from .launch import interpreting, kernel_options, launch_plan

# Columns of the per-tensor float32 scalar rows; 0 is the step.
ONE_MINUS_MOMENTUM, MOMENTUM = tl.constexpr(1), tl.constexpr(2)
MOMENTUM_LEVELS = "linear_square"  # the update is linear in the momentum (formats.py)
DECAY, LR_ADJUSTED = tl.constexpr(1), tl.constexpr(2)


@triton.jit
def muon_momentum_rule(_scratch, g, buf, _s1, _floor, k, NESTEROV, _UNUSED1, _UNUSED2):
    """optimizers.muon.muon_momentum, operation for operation: (update, new buffer)."""
    buf = buf + (g - buf) * k[ONE_MINUS_MOMENTUM]
    if NESTEROV:
        update = g + (buf - g) * k[MOMENTUM]
    else:
        update = buf
    return update, buf, _s1


@triton.jit
def muon_master_rule(w, ortho, _s0, _s1, _floor, k, HAS_WEIGHT_DECAY, _UNUSED1, _UNUSED2):
    """optimizers.muon.muon_master_update, operation for operation."""
    if HAS_WEIGHT_DECAY:
        w = w * k[DECAY]
    return w - ortho * k[LR_ADJUSTED], _s0, _s1


class MuonPlan:
    """Device tables of a list of matrices, built once, and the per-step uploads."""

    def __init__(self, opt, items):
        self.items = items
        self.states = [opt._ensure_state(p, group) for group, p in items]
        self.device = items[0][1].device
        n, device = len(items), self.device
        self.scratch, self.ortho = _scratch(opt, device)
        momentum = torch.zeros(n, cm.N_FIELDS.value, dtype=torch.int64)
        master = torch.zeros(n, cm.N_FIELDS.value, dtype=torch.int64)
        block, self.tiles = tiling()
        self.batches, slots = _batches(items, self.scratch.numel())
        # Byte offset of each matrix's slot in the scratch buffers (bf16).
        offsets = [slot * p.numel() * 2 for slot, (_, p) in zip(slots, items, strict=True)]
        self.launch = []
        for i, ((group, p), state) in enumerate(zip(items, self.states, strict=True)):
            momentum[i, cm.PARAM.value] = self.scratch.data_ptr() + offsets[i]
            momentum[i, cm.STEP.value] = master[i, cm.STEP.value] = state["step"].data_ptr()
            momentum[i, cm.STATE0.value] = state["momentum_buffer"].data_ptr()
            if "momentum_buffer_scale" in state:
                momentum[i, cm.STATE0.value + 1] = state["momentum_buffer_scale"].data_ptr()
            master[i, cm.PARAM.value] = p.data_ptr()
            if "correction" in state:
                master[i, cm.CORRECTION.value] = state["correction"].data_ptr()
            g = group["group_size"]
            rows = max(1, block // g)
            per_chunk = rows * g * self.tiles
            chunks = (p.numel() + per_chunk - 1) // per_chunk
            # Each launch passes the whole tables; its chunks name row i.
            self.launch.append(
                {
                    "chunk_tensor": torch.full((chunks,), i, dtype=torch.int32, device=device),
                    "chunk_start": torch.arange(chunks, dtype=torch.int32, device=device)
                    * per_chunk,
                    "n_chunks": chunks,
                    "TILES": self.tiles,
                    "G": g,
                    "ROWS": rows,
                    "PARAM_KIND": KINDS[p.dtype],
                    "CODE_BITS": correction_bits(p, group["master_weight_bits"]) or 0,
                    "STATE_BITS": group["state_bits"],
                }
            )
        self.momentum_table = momentum.to(device)
        self.master_table = master.to(device)
        self.numels = torch.tensor([p.numel() for _, p in items], dtype=torch.int32).to(device)
        ortho = [self.ortho.data_ptr() + offset for offset in offsets]
        self.ortho_ptrs = torch.tensor(ortho, dtype=torch.int64).to(device)
        # Per step: gradient addresses, then per matrix (1 - momentum, momentum, decay, lr_adj).
        self.upload = torch.zeros(n * 5, dtype=torch.int64, device=device)
        self.grad_ptrs = self.upload[:n]
        self.hyper = self.upload[n:].view(torch.float64).view(n, 4)
        self.param_ptrs = [p.data_ptr() for _, p in items]
        self.last_host = None
        # Per step: which matrices step (1.0) or are skipped (0.0), and each launch's
        # found_inf row (16 bytes, so every row's address stays aligned).
        self.ok = torch.zeros(n, device=device)
        self.skip = torch.zeros(n, 4, device=device)
        self.shared = opt.__dict__.setdefault("_slimoptim_shared", {})  # graph pools

    def device_tables(self) -> list:
        """The tensors this plan keeps (tables, upload buffer, scratch shared with others)."""
        per_launch = [v for kw in self.launch for v in kw.values() if isinstance(v, torch.Tensor)]
        return tensor_attributes(self) + per_launch

    def param_states(self) -> list:
        """(param, state dict) of each matrix, as when the plan was built."""
        return [(p, s) for (_, p), s in zip(self.items, self.states, strict=True)]

    def still_valid(self, opt) -> bool:
        scratch = opt._slimoptim_muon_scratch[self.device][0]  # regrown by add_param_group
        if scratch is not self.scratch:
            return False
        return [p.data_ptr() for _, p in self.items] == self.param_ptrs and all(
            opt.state.get(p) is s for (_, p), s in zip(self.items, self.states, strict=True)
        )

    def begin_step(self, rows: list[list], ok: torch.Tensor) -> None:
        """Upload this step's gradient addresses, per-matrix values (float or tensor) and
        skip flags (``ok``, bool [n]) into the plan's buffers, which the launches read."""
        host, tensors = split_values(rows, 4)
        ptrs = np.asarray([p.grad.data_ptr() for _, p in self.items], dtype=np.int64)
        payload = np.concatenate([ptrs, host.reshape(-1).view(np.int64)])
        if self.last_host is None or not np.array_equal(payload, self.last_host):
            upload(self, payload, self.upload, tensors)
            self.last_host = payload
        else:
            upload_tensors(self, tensors)
        self.ok.copy_(ok)

    def run(self, newton_schulz, settings: list[tuple], grad_scale) -> None:
        """The step of every matrix, batch by batch: pass A, ``newton_schulz``, pass B.

        ``settings`` holds per batch (coefficients, ns_steps, eps, nesterov, has weight
        decay): host values the launches bake in. On CUDA the sequence is replayed as one
        CUDA graph after its first run (kernels/launch.py), so a step costs a handful of
        launches on the host instead of ~25 per matrix.
        """
        self.newton_schulz, self.settings = newton_schulz, settings
        # Never inside a user's capture: Muon.step_params refuses one.
        launch_plan(self, grad_scale, None, capturing=False, settings=tuple(settings))

    def launch_all(self, grad_scale, _found_inf) -> None:
        # A skipped matrix's counter adds 0, as in the reference; a few launches for all.
        self.skip[:, 0] = 1 - self.ok
        counters = [state["step"] for state in self.states]
        torch._foreach_add_(counters, list(self.ok.unbind()))
        steps = torch.stack(counters).double()[:, None]
        width = cm.MAX_SCALARS.value
        self.momentum_scalars = _rows(torch.cat([steps, self.hyper[:, :2]], 1), width)
        self.master_scalars = _rows(torch.cat([steps, self.hyper[:, 2:]], 1), width)
        for batch, setting in zip(self.batches, self.settings, strict=True):
            coefficients, ns_steps, eps, nesterov, has_weight_decay = setting
            for i in batch:
                self.momentum(i, grad_scale, nesterov)
            updates, ortho = self.batch_buffers(batch)
            self.newton_schulz(updates, coefficients, ns_steps, eps, out=ortho)
            for i in batch:
                self.master(i, has_weight_decay)

    def momentum(self, i, grad_scale, nesterov) -> None:
        """Pass A for matrix ``i``: its bf16 matrix to orthogonalise goes to its scratch slot."""
        p = self.items[i][1]
        _launch(
            self.launch[i], self.momentum_table, self.numels, self.grad_ptrs,
            self.momentum_scalars, self.skip[i], grad_scale,
            muon_momentum_rule, 1, nesterov, KINDS[p.grad.dtype], 1, 0,
        )  # fmt: skip

    def batch_buffers(self, batch: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """The matrices to orthogonalise of ``batch`` (after pass A) and where their
        orthogonalised updates go before pass B: bf16 views [rows, cols] for one matrix,
        [k, rows, cols] for k."""
        shape = self.items[batch[0]][1].shape
        numel = shape.numel() * len(batch)
        views = (self.scratch[:numel], self.ortho[:numel])
        if len(batch) == 1:
            return tuple(v.view(shape) for v in views)
        return tuple(v.view(len(batch), *shape) for v in views)

    def master(self, i, has_weight_decay) -> None:
        """Pass B for matrix ``i``, reading its update from its slot of the second scratch
        buffer (``batch_buffers``)."""
        info = self.launch[i]
        _launch(
            info, self.master_table, self.numels, self.ortho_ptrs, self.master_scalars,
            self.skip[i], None, muon_master_rule, 0, has_weight_decay, 1,
            info["PARAM_KIND"], info["CODE_BITS"],
        )  # fmt: skip


def _rows(values: torch.Tensor, width: int) -> torch.Tensor:
    """float32 scalar rows [n, width] (column 0 the step) from float64 values [n, <= width]."""
    return torch.nn.functional.pad(values.float(), (0, width - values.shape[1])).contiguous()


def _launch(
    info, table, numels, grad_ptrs, scalars, skip, grad_scale, rule, n_states, flag,
    grad_kind, param_kind, code_bits,
):  # fmt: skip
    has_scale = grad_scale is not None
    cm.step_kernel[(info["n_chunks"],)](
        table,
        grad_ptrs,
        numels,
        info["chunk_tensor"],
        info["chunk_start"],
        scalars,
        grad_scale if has_scale else skip,
        skip,
        RULE=rule,
        N_STATES=n_states,
        FORGET=ONE_MINUS_MOMENTUM,
        LEVELS=MOMENTUM_LEVEL_SETS.index(MOMENTUM_LEVELS),
        FLAG0=flag,
        FLAG1=False,
        FLAG2=False,
        PARAM_KIND=param_kind,
        GRAD_KIND=grad_kind,
        CODE_BITS=code_bits,
        STATE_BITS=info["STATE_BITS"],
        G=info["G"],
        ROWS=info["ROWS"],
        TILES=info["TILES"],
        MAXIMIZE=False,
        HAS_GRAD_SCALE=has_scale,
        HAS_FOUND_INF=True,
        HW_ROUND=not interpreting(),
        MASTER_DITHER=False,  # Muon's master rounds to nearest (SlimOptimizer.master_rounding)
        ROUNDING=MOMENTUM_ROUNDINGS.index("decay"),  # optimizers.state_spec.MOMENTUM_BUFFER
        SEQUENCED=False,
        **kernel_options(n_states),
    )


def _batches(items, capacity: int) -> tuple[list[list[int]], list[int]]:
    """Newton-Schulz batches of the matrices (lists of item indices) and each matrix's slot
    in its batch. A batch holds same-shape matrices of one param group, as many as the
    scratch buffers (``capacity`` elements, the largest matrix) hold: batching costs no
    memory. Shapes of odd sizes (not a multiple of 64 elements) stay alone, so every
    slot keeps the kernels' alignment."""
    open_batches, batches, slots = {}, [], []
    for i, (group, p) in enumerate(items):
        key = (tuple(p.shape), id(group))
        batch = open_batches.get(key)
        if batch is None or p.numel() % 64 or (len(batch) + 1) * p.numel() > capacity:
            batch = open_batches[key] = []
            batches.append(batch)
        slots.append(len(batch))
        batch.append(i)
    return batches, slots


def _scratch(opt, device) -> tuple[torch.Tensor, torch.Tensor]:
    """bf16 buffers for the update and the orthogonalised matrix, one pair per optimizer and
    device, as large as its largest matrix: every matrix uses them in turn (the stream runs
    A, Newton-Schulz and B of one matrix before the next), in every plan."""
    buffers = opt.__dict__.setdefault("_slimoptim_muon_scratch", {})
    largest = max(p.numel() for g in opt.param_groups for p in g["params"] if p.device == device)
    if device not in buffers or buffers[device][0].numel() < largest:
        buffers[device] = tuple(
            torch.empty(largest, dtype=torch.bfloat16, device=device) for _ in range(2)
        )
    return buffers[device]


def split_fusable(opt, items) -> tuple[list, list]:
    """(items the Muon kernels step, items left to the reference path)."""
    fused, reference = [], []
    for group, p in items:
        fits = fusable_state(opt, group, p) is not None
        (fused if fits else reference).append((group, p))
    device = fused[0][1].device if fused else None
    reference += [(g, p) for g, p in fused if p.device != device]
    return [(g, p) for g, p in fused if p.device == device], reference


def plan_for(opt, items) -> MuonPlan:
    plans = opt.__dict__.setdefault("_slimoptim_muon_plans", {})
    modes = tuple(
        (g["master_weight_bits"], g["state_bits"], g["group_size"]) for g in opt.param_groups
    )
    # Each matrix's group, dtype and shape too: its tables and launch settings depend on them.
    matrices = tuple((id(g), id(p), p.dtype, p.shape, p.grad.dtype) for g, p in items)
    key = (matrices, modes)
    plan = plans.get(key)
    if plan is None or not plan.still_valid(opt):
        if len(plans) >= 4096:
            plans.clear()
        with torch.inference_mode(False):  # its tables are written by later steps
            plans[key] = plan = MuonPlan(opt, items)
    return plan
