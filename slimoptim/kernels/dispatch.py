"""Multi-tensor launch of the step kernels: buckets, cached tables, per-step uploads.

Parameters that share everything a kernel is compiled for (update rule, param and
grad dtype, master/state format, group size, flags) form a bucket, stepped by one
launch whatever the number of tensors. A plan (the buckets of one set of
parameters) is built once and cached on the optimizer; it holds on the device:

* a pointer table (param, correction, step counter, states and their scales),
* the element counts and a chunk -> (tensor, first element) map,
* one buffer that every step refreshes with a single host-to-device copy from
  pinned memory: the gradient addresses (which change when grads are set to
  None) and the param groups' hyper-parameters (which schedulers change).

Per step, per bucket: one tiny Triton launch advances the step counters (no
host sync: a skipped GradScaler step adds 0), a few vectorised torch ops turn
counters and hyper-parameters into per-tensor scalars, and one launch of the
skeleton kernel (kernels/common.py) with the optimizer's rule steps every element.

An optimizer names its rule (``SlimOptimizer.kernel_rule_name``); this module
maps the name to the rule, so kernels never import the optimizers.
"""

from __future__ import annotations

import operator

import numpy as np
import torch

from ..formats import correction_bits, local_tensor
from . import USER_CAPTURED
from . import common as cm
from .adamw import AdamWRule
from .guards import grad_addresses, layout_guard, plain_dense
from .launch import CONFIG, INTERPRETER_CONFIG, interpreting, launch_buckets, launch_plan
from .lion import LionRule
from .sgd import SGDRule

RULES = {"adamw": AdamWRule, "sgd": SGDRule, "lion": LionRule}

MAX_PLANS = 4096  # parameter subsets cached per optimizer (gradient release steps one at a time)

KINDS = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


# C-level accessors for the per-step passes over every param (no Python frame per tensor).
_grad_of = operator.attrgetter("grad")


def rule_for(opt):
    """The kernel rule the optimizer declares (None: a subclass with its own math)."""
    name = opt.kernel_rule_name()
    return RULES.get(name) if name is not None else None


def _chunk_elements() -> int:
    block, tiles = tiling()
    return block * tiles


def tiling() -> tuple[int, int]:
    config = INTERPRETER_CONFIG if interpreting() else CONFIG
    return config["block"], config["tiles"]


def aligned(t: torch.Tensor) -> bool:
    return local_tensor(t).data_ptr() % 16 == 0


def has_storage(t: torch.Tensor) -> bool:
    """False for a tensor with elements but no memory (its storage resized to 0: address 0)."""
    return t.numel() == 0 or t.data_ptr() != 0


def state_fits(opt, p, group, state: dict) -> bool:
    """Every state tensor the kernels will read or write through a raw address has the
    dtype, size and device the group's settings call for, and is aligned. A state left
    from other settings (state_bits or master_weight_bits changed, a param resized through
    ``p.data``) is the reference path's to refuse: the kernels would run past it."""
    device = local_tensor(p).device
    for name, (dtype, shape) in opt._expected_state(p, group).items():
        t = local_tensor(state[name])
        if t.dtype != dtype or t.shape != shape or t.device != device:
            return False
        if not has_storage(t) or (t.dim() > 0 and not (aligned(t) and t.is_contiguous())):
            return False
    return True


class Bucket:
    """Tensors stepped by one launch, and the device tables that launch reads."""

    def __init__(self, key, rule, members, device, first):
        self.flags = dict(key[-1])
        (self.param_kind, self.grad_kind, self.code_bits, self.state_bits, self.g) = key[:5]
        self.maximize, self.n_states = key[5:7]
        self.params = [p for p, _, _ in members]
        self.n = len(members)
        self.first = first  # offset of this bucket's gradients in the plan's gradient array
        block, self.tiles = tiling()
        self.rows = max(1, block // self.g)
        per_chunk = self.rows * self.g * self.tiles

        table = torch.zeros(self.n, cm.N_FIELDS.value, dtype=torch.int64)
        names = rule.state_names[: self.n_states]  # the group's states (plan: state_fits)
        for i, (p, _, state) in enumerate(members):
            table[i, cm.PARAM.value] = local_tensor(p).data_ptr()
            table[i, cm.STEP.value] = local_tensor(state["step"]).data_ptr()
            if "correction" in state:
                table[i, cm.CORRECTION.value] = local_tensor(state["correction"]).data_ptr()
            for field, name in zip((cm.STATE0.value, cm.STATE1.value), names, strict=False):
                table[i, field] = local_tensor(state[name]).data_ptr()
                if f"{name}_scale" in state:
                    table[i, field + 1] = local_tensor(state[f"{name}_scale"]).data_ptr()
        numels = torch.tensor([local_tensor(p).numel() for p in self.params], dtype=torch.int32)
        chunks = (numels.long() + per_chunk - 1) // per_chunk
        chunk_tensor = torch.repeat_interleave(torch.arange(self.n), chunks)
        first_chunk = torch.cumsum(chunks, 0) - chunks
        chunk_index = torch.arange(int(chunks.sum())) - first_chunk[chunk_tensor]
        self.n_chunks = int(chunks.sum())
        self.table = table.to(device)
        self.numels = numels.to(device)
        self.chunk_tensor = chunk_tensor.to(torch.int32).to(device)
        self.chunk_start = (chunk_index * per_chunk).to(torch.int32).to(device)
        # The param-group row of each tensor in the plan's hyper-parameter table.
        rows = [row for _, row, _ in members]
        self.hyper_rows = torch.tensor(rows, dtype=torch.int64, device=device)
        self.steps = torch.zeros(self.n, dtype=torch.float32, device=device)


class Plan:
    """Buckets for one list of (group, param) items, plus the reference-path leftovers."""

    def __init__(self, opt, rule, items):
        self.rule = rule
        self.shared = opt.__dict__.setdefault("_slimoptim_shared", {})  # e.g. graph pools
        self.reference = []
        self.groups = []  # param groups whose values are uploaded, in row order
        group_row = {}
        members = {}
        self.states = []  # (param, state dict) pairs: identity checked every step
        for group, p in items:
            state = fusable_state(opt, group, p)
            if state is None:
                self.reference.append((group, p))
                continue
            if id(group) not in group_row:
                group_row[id(group)] = len(self.groups)
                self.groups.append(group)
            key = (
                KINDS[p.dtype],
                KINDS[local_tensor(p.grad).dtype],
                correction_bits(p, group["master_weight_bits"]) or 0,
                group["state_bits"],
                group["group_size"],
                bool(group.get("maximize", False)),
                len(opt._specs_for(group)),
                tuple(sorted(rule.flags(opt, group).items())),
            )
            if members and p.device != next(iter(members))[0]:
                self.reference.append((group, p))  # one device per plan
                continue
            members.setdefault((p.device, key), []).append((p, group_row[id(group)], state))
            self.states.append((p, state))
        self.device = next(iter(members))[0] if members else None
        self.buckets, first = [], 0
        for (_, key), ms in members.items():
            self.buckets.append(Bucket(key, rule, ms, self.device, first))
            first += len(ms)
        self.grad_params = [p for b in self.buckets for p in b.params]
        self.positions = _positions(items, self.grad_params)
        # FSDP2 params and grads are DTensors: the kernels step their local shards.
        self.sharded = any(hasattr(p, "to_local") for p in self.grad_params)
        # Each step compares the params' addresses too (see guards.grad_addresses).
        self.param_ptrs = [local_tensor(p).data_ptr() for p in self.grad_params]
        self.indices = list(range(len(self.grad_params)))
        # What each param and gradient was when the plan was built, as the steps check them
        # (guards.grad_addresses): the tables hold their addresses and sizes.
        checked = [local_tensor(p) for p in self.grad_params]
        checked += [local_tensor(p.grad) for p in self.grad_params]
        self.types, self.dtypes = list(map(type, checked)), [t.dtype for t in checked]
        self.shapes, self.devices = [t.shape for t in checked], [t.device for t in checked]
        # Gradients with elements: an address of 0 (storage freed) must never reach a kernel.
        self.nonempty = np.array([g.numel() > 0 for g in checked[len(self.grad_params) :]])
        kernels_run = self.device is not None and not self.sharded
        self.layout_guard = layout_guard(checked) if kernels_run else None
        self.guard_rebuilds = 0
        self.found = None  # (addresses as ints, as an array) that the last step found
        n_ptrs, n_vals = len(self.grad_params), len(self.groups) * len(rule.group_values)
        self.n_ptrs = n_ptrs
        if self.device is not None:
            self.upload = torch.zeros(n_ptrs + n_vals, dtype=torch.int64, device=self.device)
            self.grad_ptrs = self.upload[:n_ptrs]
            self.hyper = self.upload[n_ptrs:].view(torch.float64).view(len(self.groups), -1)
        self.last_grad_ptrs = self.last_values = None

    def launch_all(self, scale, found_inf) -> None:
        launch_buckets(self, scale, found_inf)

    def device_tables(self) -> list:
        """The tensors this plan keeps (tables, upload buffer, graph inputs; views too)."""
        return tensor_attributes(self, *self.buckets)

    def param_states(self) -> list:
        """(param, state dict) of each param, as when the plan was built."""
        return self.states

    def grads(self, item_grads: list | None) -> list:
        """The gradients of ``grad_params``, in their order: picked from ``item_grads`` (the
        gradients of the items the plan was built for, just read by step()) or read here."""
        if item_grads is None:
            return list(map(_grad_of, self.grad_params))
        if self.positions is None:
            return item_grads
        return list(map(item_grads.__getitem__, self.positions))

    def still_valid(self, opt) -> bool:
        # Loading a state_dict (state_io, checkpoint) replaces every param's state dict, so
        # checking the first and last param catches it without a per-param lookup per step.
        ends = (self.states[0], self.states[-1]) if self.states else ()
        return all(opt.state.get(p) is s for p, s in ends)


def tensor_attributes(*objects) -> list:
    return [v for o in objects for v in vars(o).values() if isinstance(v, torch.Tensor)]


def _positions(items, params: list) -> list | None:
    """Where each of ``params`` stands in ``items``; None when they are the items in order."""
    index = {id(p): i for i, (_, p) in enumerate(items)}
    positions = [index[id(p)] for p in params]
    return None if positions == list(range(len(items))) else positions


def eligible(opt, group, p) -> bool:
    if p.grad is None or hasattr(p, "to_local") != hasattr(p.grad, "to_local"):
        return False
    p, grad = local_tensor(p), local_tensor(p.grad)
    # int32 element offsets: a chunk's end must stay below 2**31
    if not p.is_contiguous() or p.numel() > 2**31 - 1 - _chunk_elements():
        return False
    if grad.shape != p.shape:  # a DTensor grad placed unlike its param
        return False
    if p.dtype not in KINDS:  # float64 params are their own master: reference path
        return False
    if not (plain_dense(p) and plain_dense(grad)) or grad.dtype not in KINDS:
        return False
    if not grad.is_contiguous() or not aligned(grad):  # misaligned: a plan every step
        return False
    if grad.device != p.device or not (has_storage(p) and has_storage(grad)):
        return False
    size = group["group_size"]
    if size & (size - 1) or size > 4096 or not aligned(p):
        return False
    if p.device.type == "cuda":
        return True
    if p.device.type == "cpu" and opt.fused and interpreting():
        return True
    if opt.fused:
        raise RuntimeError(
            f"fused=True needs a CUDA parameter (got one on {p.device}); on the CPU the Triton "
            "kernels run only under the interpreter (TRITON_INTERPRET=1). Use fused=None to "
            "pick the kernel on CUDA and the reference path elsewhere."
        )
    return False


def fusable_state(opt, group, p) -> dict | None:
    """The state of ``p`` (created where missing) when the kernels can step ``p``, else
    None: the reference path takes it (and refuses, with its own error, a state left from
    other settings)."""
    if not eligible(opt, group, p):
        return None
    state = opt._ensure_state(p, group)
    return state if state_fits(opt, p, group, state) else None


def split_values(rows, width: int) -> tuple[np.ndarray, list]:
    """Rows of float or tensor values as float64 [len(rows), width], and the
    (row, column, tensor) of the tensor-valued ones (copied on the device instead)."""
    rows = list(rows)
    values = np.zeros((len(rows), width), dtype=np.float64)
    tensors = []
    for r, row in enumerate(rows):
        for c, v in enumerate(row):
            if isinstance(v, torch.Tensor):
                tensors.append((r, c, v))
            else:
                values[r, c] = v
    return values, tensors


def _host_values(plan) -> tuple[np.ndarray, list]:
    """The groups' values as float64, and the (row, column, tensor) of tensor-valued ones."""
    rows = (plan.rule.values(group) for group in plan.groups)
    return split_values(rows, len(plan.rule.group_values))


def upload(plan, host: np.ndarray, dst: torch.Tensor, tensors: list) -> None:
    """``host`` (int64 words) into ``dst`` without a sync, then the tensor values into
    ``plan.hyper``."""
    staging = torch.from_numpy(host)
    if dst.is_cuda:
        staging = staging.pin_memory()  # the caching host allocator keeps it alive until copied
    dst.copy_(staging, non_blocking=True)
    upload_tensors(plan, tensors)


def upload_tensors(plan, tensors: list) -> None:
    for r, c, v in tensors:  # a tensor lr: device-side copy, no sync
        plan.hyper[r, c] = v.to(device=plan.hyper.device, dtype=torch.float64)


def refresh_hyperparameters(opt) -> None:
    """Copy every param group's current hyper-parameters to the device tables.

    ``step()`` does this itself; call it before replaying a captured CUDA graph
    of ``step()`` so that scheduler changes (lr, betas, ...) reach the replay.
    """
    for plan in getattr(opt, "_slimoptim_plans", {}).values():
        if plan.device is not None:
            values, tensors = _host_values(plan)
            upload(plan, values.reshape(-1).view(np.int64), plan.upload[plan.n_ptrs :], tensors)
            plan.last_values = values.tobytes()


def _plan_for(opt, rule, items):
    plans = opt.__dict__.setdefault("_slimoptim_plans", {})
    # Group options decide what a kernel is compiled for: a change rebuilds the plan.
    modes = tuple(
        (g["master_weight_bits"], g["state_bits"], g["group_size"], g.get("maximize", False))
        + tuple(rule.flags(opt, g).values())
        for g in opt.param_groups
    )
    # The groups themselves too: a plan reads its groups' hyper-parameters, so a group dict
    # replaced in param_groups needs a new plan (the plan holds the old dicts: no id reuse).
    key = (_param_ids(opt, items), modes, tuple(map(id, opt.param_groups)))
    plan = plans.get(key)
    if plan is not None and plan.still_valid(opt):
        return plan
    if _capturing(items):
        raise RuntimeError(
            "slimoptim: the fused step must run once eagerly (same params, same state) before "
            "it is captured in a CUDA graph: it builds its device tables then."
        )
    if len(plans) >= MAX_PLANS:
        plans.clear()
    with torch.inference_mode(False):  # its tables are written by later steps, in any mode
        plans[key] = plan = Plan(opt, rule, items)
    return plan


def _param_ids(opt, items) -> tuple:
    """The ids of the items' groups and params: a param moved to another group needs
    another plan (its hyper-parameter row, flags and bucket). step() hands over the same
    tuple while the same params have gradients (a tuple cannot change), so its ids are
    kept with it: no pass per step."""
    kept = opt.__dict__.get("_slimoptim_item_ids")
    if kept is not None and kept[0] is items:
        return kept[1]
    ids = tuple(id(x) for item in items for x in item)
    if type(items) is tuple:
        opt.__dict__["_slimoptim_item_ids"] = (items, ids)
    return ids


def _capturing(items) -> bool:
    return bool(items) and items[0][1].is_cuda and torch.cuda.is_current_stream_capturing()


def step_fused(opt, items, grad_scale, found_inf, grads=None) -> list:
    """Step the fusable items in bucket launches; return the items left to the reference.
    ``grads``: the items' gradients, just read by step() (None: read here)."""
    rule = rule_for(opt)
    if rule is None:
        return items
    plan = _plan_for(opt, rule, items)
    if plan.device is None:
        return plan.reference
    addresses = grad_addresses(plan, plan.grads(grads))
    if addresses is None:  # a grad or param changed storage, dtype or layout: rebuild next step
        opt._slimoptim_plans.clear()
        return items
    ptrs = addresses.tobytes()  # compared with the last upload's as bytes
    capturing = _capturing(items)
    if capturing:
        if ptrs != plan.last_grad_ptrs:
            raise RuntimeError(
                "slimoptim: gradients moved since the last eager step; a captured step needs "
                "static gradients (zero_grad(set_to_none=False) and one eager step first)."
            )
        # The user's graph reads this plan's tables for as long as it lives: never free them.
        opt.__dict__.setdefault(USER_CAPTURED, {})[id(plan)] = plan
    else:
        values, tensors = _host_values(plan)
        # Skip the copy when nothing changed (the caching allocator often hands back the
        # same gradient addresses); tensor-valued hyper-parameters are copied on device.
        if ptrs != plan.last_grad_ptrs or values.tobytes() != plan.last_values:
            host = np.concatenate([addresses, values.reshape(-1).view(np.int64)])
            upload(plan, host, plan.upload, tensors)
            plan.last_grad_ptrs, plan.last_values = ptrs, values.tobytes()
        else:
            upload_tensors(plan, tensors)
    # Nothing is stepped before every gradient has been checked: the reference leftovers
    # (sparse, complex, ...) raise here, before the kernels run.
    opt.check_grads(plan.reference)
    launch_plan(plan, grad_scale, found_inf, capturing=capturing)
    return plan.reference
