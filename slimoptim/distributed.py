"""FSDP2 (DTensor) parameters: optimizer states in a form DCP can save, load and reshard.

Under FSDP2 each rank steps its local shard and keeps its states as plain local
tensors in the compact layout the step uses (flat codes, one scale per
``group_size`` values of the local shard: a quantization group never spans two
ranks). That layout depends on where the shards start, so ``state_dict()`` hands
DCP the **row form**, whose global shapes do not depend on the world size:

* element-wise entries (``correction``, 8-bit codes, float32 states) are
  DTensors shaped like the parameter, with its mesh and placements;
* each group-scale entry ``<state>_scale`` is a bf16 DTensor of shape
  ``(rows, 2 + k)``, sharded like the parameter's rows (dim 0). Row ``i`` holds
  the row's *phase* (the offset of its first element inside its quantization
  group, as two base-256 digits, exact in bf16) and then the scales of the
  ``k`` groups its elements can touch, so every row is self-describing.

Loading (``load_state_dict``, so ``set_optimizer_state_dict`` too) turns the row
form back into local tensors. Where the saved phases equal this shard's, the
groups are the same and the scales are gathered exactly: always at the same
world size, and at any world size for parameters whose rows hold a multiple of
``group_size`` values. Elsewhere (another world size, groups that now span an
old shard boundary) the 8-bit states are decoded with their saved scales and
re-quantized to the new groups (round to nearest); corrections, float32 states
and ``step`` are element-wise and always exact.

Parameters are viewed as ``rows x cols`` (``rows = shape[0]``), which is how
FSDP2 shards them (``Shard(0)``). Other placements are refused.
"""

from __future__ import annotations

import contextlib
import math

import torch

from . import formats
from .errors import CheckpointError
from .formats import local_tensor

PHASE_BASE = 256  # phase digits: integers below 256 are exact in bf16
PHASE_COLUMNS = 2
MAX_GROUP_SIZE = PHASE_BASE**PHASE_COLUMNS
_ROW_FORM_FLAG = "_slimoptim_row_form"


def is_dtensor(t) -> bool:
    return isinstance(t, torch.Tensor) and hasattr(t, "to_local") and hasattr(t, "placements")


def _fail(message: str):
    raise CheckpointError(f"cannot load optimizer state_dict: {message}")


# ------------------------------------------------------------------ layout


def rows_and_cols(shape) -> tuple[int, int]:
    """A parameter as ``rows x cols``: FSDP2 shards whole rows (dim 0)."""
    if len(shape) == 0:
        return 1, 1
    return shape[0], math.prod(shape[1:])


def scale_columns(cols: int, group_size: int) -> int:
    """Groups a row of ``cols`` values can touch, whatever its phase (at least 1)."""
    return max(1, (cols + group_size - 2) // group_size + 1) if cols else 1


def check_placements(p: torch.Tensor, group_size: int) -> None:
    """Refuse DTensor layouts the row form cannot describe, before anything is created."""
    from torch.distributed.tensor import Replicate, Shard  # noqa: PLC0415

    for placement in p.placements:
        if isinstance(placement, Replicate) or (type(placement) is Shard and placement.dim == 0):
            continue
        raise NotImplementedError(
            f"slimoptim steps DTensor parameters sharded on dim 0 (FSDP2's default) or "
            f"replicated; a parameter of shape {tuple(p.shape)} has placements "
            f"{tuple(p.placements)}. Leave fully_shard's shard_placement_fn unset for the "
            "parameters of a slimoptim optimizer."
        )
    if group_size > MAX_GROUP_SIZE:
        raise NotImplementedError(
            f"group_size={group_size} is above {MAX_GROUP_SIZE}, the largest the sharded "
            "checkpoint form records; use a smaller group_size with FSDP2."
        )


def local_rows(p: torch.Tensor) -> tuple[int, int]:
    """(first global row, number of rows) of this rank's shard; the whole tensor if plain."""
    rows, _ = rows_and_cols(p.shape)
    if not is_dtensor(p) or len(p.shape) == 0:
        return 0, rows
    from torch.distributed.tensor._utils import (  # noqa: PLC0415
        compute_local_shape_and_global_offset,
    )

    shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
    return offset[0], shape[0]


def shard_phases(n_rows: int, cols: int, group_size: int, device) -> torch.Tensor:
    """Offset of each local row's first value inside its group (groups restart at the shard)."""
    return (torch.arange(n_rows, device=device, dtype=torch.int64) * cols) % group_size


# ----------------------------------------------------------- flat -> row form


def _scale_table(scale: torch.Tensor, n_rows: int, cols: int, size: int) -> torch.Tensor:
    """(n_rows, 2 + k) bf16: each row's phase digits, then the scales its values use."""
    k = scale_columns(cols, size)
    device = scale.device
    row = torch.arange(n_rows, device=device, dtype=torch.int64)
    phase = (row * cols) % size
    first = (row * cols) // size  # the group of each row's first value
    column = torch.arange(k, device=device, dtype=torch.int64)
    index = first[:, None] + column[None, :]
    used = column[None, :] <= ((phase + cols - 1) // size)[:, None]
    used &= index < scale.numel()
    picked = scale[index.clamp(max=max(scale.numel() - 1, 0))] if scale.numel() else None
    scales = torch.zeros((n_rows, k), dtype=torch.bfloat16, device=device)
    if picked is not None:
        scales = torch.where(used, picked, scales)
    digits = torch.stack([phase // PHASE_BASE, phase % PHASE_BASE], dim=1).to(torch.bfloat16)
    return torch.cat([digits, scales], dim=1)


def _as_global(p: torch.Tensor, local: torch.Tensor, global_shape) -> torch.Tensor:
    """Wrap ``local`` (this rank's rows) as a DTensor sharded like ``p``; plain stays plain."""
    if not is_dtensor(p):
        return local
    from torch.distributed.tensor import DTensor  # noqa: PLC0415

    stride = torch.empty(global_shape, device="meta").stride()
    return DTensor.from_local(
        local,
        p.device_mesh,
        p.placements,
        run_check=False,
        shape=torch.Size(global_shape),
        stride=stride,
    )


def _scale_names(opt, group) -> set[str]:
    if group["state_bits"] != 8:
        return set()
    return {spec.scale_name for spec in opt._specs_for(group)}


def row_form_state(opt, p: torch.Tensor, group: dict, state: dict) -> dict:
    """One parameter's live (local, flat) state as the row form (see the module docstring)."""
    size = group["group_size"]
    if is_dtensor(p):
        check_placements(p, size)
    rows, cols = rows_and_cols(p.shape)
    _, n_rows = local_rows(p)
    local_shape = (n_rows, *p.shape[1:]) if len(p.shape) else ()
    scales = _scale_names(opt, group)
    out = {}
    for name, value in state.items():
        if name == "step" or not isinstance(value, torch.Tensor):
            out[name] = value
        elif name in scales:
            table = _scale_table(value, n_rows, cols, size)
            out[name] = _as_global(p, table, (rows, table.shape[1]))
        else:
            out[name] = _as_global(p, value.view(local_shape), tuple(p.shape))
    return out


def _wants_row_form(opt, p) -> bool:
    return is_dtensor(p) or getattr(opt, _ROW_FORM_FLAG, False)


def to_row_form(opt, state_dict: dict) -> dict:
    """``state_dict()`` hook: the row form for DTensor parameters; others are left as they are."""
    params = [p for group in opt.param_groups for p in group["params"]]
    if not any(_wants_row_form(opt, p) for p in params):
        return state_dict
    state = dict(state_dict["state"])  # torch's state_dict shares the live per-param dicts
    pairs = zip(opt.param_groups, state_dict["param_groups"], strict=True)
    for group, saved_group in pairs:
        for p, saved_id in zip(group["params"], saved_group["params"], strict=True):
            if saved_id in state and _wants_row_form(opt, p):
                state[saved_id] = row_form_state(opt, p, group, state[saved_id])
    return {**state_dict, "state": state}


@contextlib.contextmanager
def row_form(optimizer):
    """Within this block ``optimizer.state_dict()`` gives the row form for plain parameters too,
    which is what an FSDP2 run's DCP checkpoint holds (see :func:`load_unsharded`)."""
    setattr(optimizer, _ROW_FORM_FLAG, True)
    try:
        yield optimizer
    finally:
        optimizer.__dict__.pop(_ROW_FORM_FLAG, None)


# ----------------------------------------------------------- row -> flat form


def _is_row_form(saved_state: dict) -> bool:
    """The flat form holds only 1-D tensors (and the 0-d step); the row form does not."""
    return any(
        isinstance(v, torch.Tensor) and name != "step" and (is_dtensor(v) or v.dim() != 1)
        for name, v in saved_state.items()
    )


def _local_part(p, saved_id, name, value, global_shape) -> torch.Tensor:
    """This rank's rows of a row-form entry (a DTensor sharded like ``p``, or a whole tensor)."""
    if tuple(value.shape) != tuple(global_shape):
        _fail(
            f"state '{name}' of parameter {saved_id!r} has shape {tuple(value.shape)}, expected "
            f"{tuple(global_shape)} for a parameter of shape {tuple(p.shape)}."
        )
    if is_dtensor(value):
        if not is_dtensor(p):
            _fail(
                f"state '{name}' of parameter {saved_id!r} is a DTensor but the parameter is not "
                "sharded; load an FSDP2 checkpoint into an unsharded model with "
                "slimoptim.distributed.load_unsharded (or full_state_dict=True)."
            )
        if tuple(value.placements) != tuple(p.placements):
            _fail(
                f"state '{name}' of parameter {saved_id!r} has placements "
                f"{tuple(value.placements)}, the parameter {tuple(p.placements)}."
            )
        return value.to_local()
    start, n_rows = local_rows(p)
    return value[start : start + n_rows] if len(global_shape) else value


def _per_element_scales(table, phase, cols, size) -> torch.Tensor:
    """Each value's saved group scale, from its row's phase and column."""
    j = torch.arange(cols, device=table.device, dtype=torch.int64)
    column = PHASE_COLUMNS + (phase.to(table.device)[:, None] + j[None, :]) // size
    return torch.gather(table, 1, column).reshape(-1)


def _gathered_scales(table, phase, n_rows, cols, size) -> torch.Tensor:
    """The local groups' scales when the saved groups are this shard's groups."""
    n_groups = formats.num_groups(n_rows * cols, size)
    first = torch.arange(n_groups, device=table.device, dtype=torch.int64) * size
    row = first // cols if cols else first
    phase = phase.to(table.device)  # a checkpoint loaded to the CPU for a CUDA model
    column = (phase[row] + first - row * cols) // size
    return table[row, PHASE_COLUMNS + column]


def _phases(table: torch.Tensor) -> torch.Tensor:
    digits = table[:, :PHASE_COLUMNS].to(torch.int64)
    return digits[:, 0] * PHASE_BASE + digits[:, 1]


def requantize(spec, code, per_element_scale, size, saved_levels):
    """Decode with the saved per-value scales, re-quantize to this shard's groups (nearest)."""
    if spec.signed:
        values = formats.dequantize_momentum(code, per_element_scale, 1, saved_levels(spec))
        return formats.quantize_momentum_nearest(values, size, spec.levels)
    values = formats.dequantize_variance(code, per_element_scale, 1)
    return formats.quantize_variance(values, size)


def flat_state(
    opt, p: torch.Tensor, group: dict, saved_id, saved_state: dict, saved_levels
) -> dict:
    """A row-form state of one parameter as this rank's live flat tensors (see module doc).
    ``saved_levels(spec)``: the level set of the saved signed codes (an older format
    version's may differ from the live one: they are re-quantized)."""
    size = group["group_size"]
    if is_dtensor(p):
        check_placements(p, size)
    rows, cols = rows_and_cols(p.shape)
    _, n_rows = local_rows(p)
    expected = opt._expected_state(p, group)
    scales = _scale_names(opt, group)
    k = scale_columns(cols, size)
    local = {}
    for name, value in saved_state.items():
        if name == "step" or name not in expected or not isinstance(value, torch.Tensor):
            local[name] = value  # state_io names what is wrong with it
            continue
        shape = (rows, PHASE_COLUMNS + k) if name in scales else tuple(p.shape)
        part = _local_part(p, saved_id, name, value, shape)
        dtype = expected[name][0]
        if part.dtype != dtype:
            _fail(
                f"state '{name}' of parameter {saved_id!r} is {part.dtype}, expected {dtype} "
                f"for a parameter of shape {tuple(p.shape)} ({p.dtype})."
            )
        local[name] = part if name in scales else part.reshape(-1)
    own_phase = shard_phases(n_rows, cols, size, local_tensor(p).device)
    for spec in opt._specs_for(group):
        if spec.scale_name not in scales or spec.scale_name not in local:
            continue
        table = local[spec.scale_name]
        phase = _phases(table).to(own_phase.device)
        if phase.numel() and not bool(((phase >= 0) & (phase < size)).all()):
            _fail(
                f"state '{spec.scale_name}' of parameter {saved_id!r} holds group phases outside "
                f"[0, {size}): it was not written by slimoptim with group_size={size}."
            )
        same_levels = not spec.signed or saved_levels(spec) == spec.levels
        if same_levels and torch.equal(phase, own_phase):  # same groups and levels: exact
            local[spec.scale_name] = _gathered_scales(table, phase, n_rows, cols, size)
        elif spec.name in local:
            per_element = _per_element_scales(table, phase, cols, size)
            local[spec.name], local[spec.scale_name] = requantize(
                spec, local[spec.name], per_element, size, saved_levels
            )
    return local


def localize(opt, pairs, saved: dict, saved_levels=lambda spec: spec.levels) -> dict:
    """``load_state_dict`` hook: row-form entries become this rank's flat local tensors."""
    out = None
    for p, group, saved_id in pairs:
        entry = saved.get(saved_id)
        if not isinstance(entry, dict) or not _is_row_form(entry):
            continue
        if out is None:
            out = dict(saved)  # never change the caller's state_dict
        out[saved_id] = flat_state(opt, p, group, saved_id, entry, saved_levels)
    return saved if out is None else out


# ------------------------------------------------------------ conversions


def load_unsharded(
    checkpoint_id,
    model: torch.nn.Module,
    optimizer,
    *,
    model_key: str = "model",
    optim_key: str = "optim",
    options=None,
) -> dict:
    """Load an FSDP2 run's DCP checkpoint into an unsharded model and optimizer, in one process.

    The checkpoint must hold ``{model_key: model.state_dict(), optim_key:
    get_optimizer_state_dict(model, optimizer, options)}`` as saved by the sharded
    run (other keys are not read). Returns the loaded template. Follow with
    ``slimoptim.save_checkpoint`` for one resume file, or ``slimoptim.save_model(...,
    fp32=True)`` for float32 weights.
    """
    import torch.distributed.checkpoint as dcp  # noqa: PLC0415
    from torch.distributed.checkpoint import state_dict as dsd  # noqa: PLC0415

    with row_form(optimizer):
        template = {
            model_key: model.state_dict(),
            optim_key: dsd.get_optimizer_state_dict(model, optimizer, options=options),
        }
        dcp.load(template, checkpoint_id=checkpoint_id)
        model.load_state_dict(template[model_key])
        dsd.set_optimizer_state_dict(model, optimizer, template[optim_key], options=options)
    return template


def sharded_fp32_state_dict(model: torch.nn.Module, optimizer) -> dict:
    """``model.state_dict()`` with each stepped parameter as its float32 master, as DTensors
    sharded like the parameters (for ``dcp.save``, or ``.full_tensor()`` on every rank)."""
    managed = {id(p) for group in optimizer.param_groups for p in group["params"]}
    out = {}
    for name, value in model.state_dict(keep_vars=True).items():
        if id(value) in managed:
            master = optimizer.master_weight(value).detach()
            out[name] = _as_global(value, master, tuple(value.shape))
        else:
            out[name] = value.detach()
    return out
