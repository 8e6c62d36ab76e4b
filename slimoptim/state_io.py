"""Validated, all-or-nothing loading of slimoptim state_dicts.

A slimoptim state_dict is torch's (``state`` keyed by parameter index,
``param_groups``) holding the optimizer's native tensors: int8/int16 weight
corrections, int8/uint8 state codes with bf16 group scales (or float32 states),
and a float32 ``step`` per parameter. Nothing is cast on the way in or out.

A ``slimoptim`` header names the optimizer and the format version. It sits at
the top level and is repeated in every saved parameter group, because
``torch.distributed.checkpoint``'s ``get_optimizer_state_dict`` keeps only
``state`` and ``param_groups`` (and re-keys both by parameter name).

Loading checks everything first, builds the new state on the side and only
then swaps it in, so a failed load leaves the optimizer exactly as it was.
"""

from __future__ import annotations

import copy
import math
import warnings
from dataclasses import dataclass

import torch

from . import formats, kernels
from .distributed import localize, requantize
from .errors import CheckpointError
from .formats import local_tensor

# The state_dict format. 2: the second moment's bf16 scales carry a per-group code step
# (formats.py), which version-1 readers would decode wrongly, so they must refuse it;
# version 1 (power-of-two scales) reads unchanged, as a version-2 scale with the coarsest
# step. 3: SGD's and Muon's momentum codes use linear-square levels (formats.py); their
# version 1 and 2 codes (square levels) are converted on loading (below). 4: a bf16
# param's correction counts float32 steps (formats.split_master); older ones, in units of
# the param's ulp, are converted against the param's value when the state is applied.
FORMAT_VERSION = 4
READABLE_FORMAT_VERSIONS = (1, 2, 3, 4)

HEADER_KEY = "slimoptim"
_GROUP_MODE_KEYS = ("master_weight_bits", "state_bits", "group_size")
# Flags torch.optim added after its first release: a group saved without one loads with
# torch's default, as torch.optim's own __setstate__ fills them in.
_LATER_FLAGS = {"maximize": False, "amsgrad": False}
# torch.optim's implementation keywords: no slimoptim group holds them, none is loaded.
_IMPLEMENTATION_KEYS = ("foreach", "capturable", "differentiable", "fused")


def _fail(message: str):
    raise CheckpointError(f"cannot load optimizer state_dict: {message}")


# ------------------------------------------------------------------ saving


def header_of(opt) -> dict:
    return {"optimizer": type(opt).__name__, "format_version": FORMAT_VERSION}


def with_header(opt, state_dict: dict) -> dict:
    """Add the header to a torch-made optimizer state_dict, at the top and in every group."""
    header = header_of(opt)
    state_dict[HEADER_KEY] = header
    for group in state_dict["param_groups"]:
        group[HEADER_KEY] = dict(header)
    return state_dict


# ------------------------------------------------------------------ checking


def _is_dcp_flattened(sd: dict) -> bool:
    """True for what DCP's flatten_optimizer_state_dict=True path hands back to load.

    That path rebuilds each group from the live optimizer's group keys, so the
    header we saved in the groups is dropped; the state is keyed by names (str).
    """
    ids = [pid for group in sd["param_groups"] for pid in group.get("params", [])]
    return bool(ids) and all(isinstance(pid, str) for pid in ids)


def _check_header(opt, sd: dict) -> None:
    if not isinstance(sd, dict) or "state" not in sd or "param_groups" not in sd:
        _fail("expected a dict with 'state' and 'param_groups' (from optimizer.state_dict()).")
    groups = sd["param_groups"]
    if not isinstance(groups, list) or not all(isinstance(g, dict) for g in groups):
        _fail("'param_groups' must be a list of dicts.")
    headers = [sd.get(HEADER_KEY)] + [g.get(HEADER_KEY) for g in groups]
    headers = [h for h in headers if h is not None]
    if not headers:
        if _is_dcp_flattened(sd) and all(k in g for g in groups for k in _GROUP_MODE_KEYS):
            return  # checked structurally below: group keys, mode, every tensor's dtype/shape
        _fail(
            f"it was not written by a slimoptim optimizer (no '{HEADER_KEY}' entry); to start "
            f"{type(opt).__name__} from a torch.optim checkpoint use "
            "slimoptim.checkpoint.from_torch_state_dict."
        )
    for header in headers:
        if not isinstance(header, dict):
            _fail(f"the '{HEADER_KEY}' entry is a {type(header).__name__}, expected a dict.")
        if header.get("format_version") not in READABLE_FORMAT_VERSIONS:
            versions = " and ".join(str(v) for v in READABLE_FORMAT_VERSIONS)
            _fail(
                f"format_version {header.get('format_version')!r} is not supported "
                f"(this slimoptim reads versions {versions}); a checkpoint written by a newer "
                "slimoptim needs that version to load."
            )
        if header.get("optimizer") != type(opt).__name__:
            _fail(f"it belongs to a {header.get('optimizer')} optimizer, not {type(opt).__name__}.")


def _saved_version(sd: dict) -> int:
    """The format version the state_dict was written in (checked by _check_header). DCP's
    flattened form drops every header: it is read as the current version."""
    headers = [sd.get(HEADER_KEY)] + [g.get(HEADER_KEY) for g in sd["param_groups"]]
    versions = [h["format_version"] for h in headers if isinstance(h, dict)]
    return min(versions, default=FORMAT_VERSION)


def _saved_levels(version: int):
    """The level set a state_dict of ``version`` coded a signed state with: versions 1
    and 2 had square levels for every optimizer."""
    return (lambda spec: "square") if version < 3 else (lambda spec: spec.levels)


def _upgrade_momentum(opt, group: dict, state: dict, saved_levels) -> dict:
    """``state`` with signed 8-bit codes saved in other levels than the optimizer's moved
    to the nearest of its own, group by group."""
    if group["state_bits"] != 8:
        return state
    state = dict(state)
    size = group["group_size"]
    for spec in opt._specs_for(group):
        if spec.signed and spec.name in state and saved_levels(spec) != spec.levels:
            code, scale = state[spec.name], state[spec.scale_name]
            per_value_scale = formats.per_element(scale, size, code.numel())
            new_code, new_scale = requantize(
                spec, code.reshape(-1), per_value_scale, size, saved_levels
            )
            state[spec.name] = new_code.view(code.shape)
            state[spec.scale_name] = new_scale.view(scale.shape)
    return state


def _check_groups(opt, sd: dict) -> list[tuple[torch.Tensor, dict, object]]:
    """Pair each saved param id with the live parameter and group, checking the layout."""
    saved_groups = sd["param_groups"]
    if len(saved_groups) != len(opt.param_groups):
        _fail(
            f"it has {len(saved_groups)} parameter groups, the optimizer has "
            f"{len(opt.param_groups)}."
        )
    pairs = []
    for i, (group, saved) in enumerate(zip(opt.param_groups, saved_groups, strict=True)):
        missing = [k for k in ("params", *opt.defaults) if k not in saved and k not in _LATER_FLAGS]
        if missing:
            _fail(f"parameter group {i} has no {missing} (a {type(opt).__name__} group has them).")
        if len(group["params"]) != len(saved["params"]):
            _fail(
                f"parameter group {i} has {len(saved['params'])} parameters in the "
                f"checkpoint and {len(group['params'])} in the optimizer."
            )
        for key in _GROUP_MODE_KEYS:
            if saved[key] != group[key]:
                _fail(
                    f"parameter group {i} was saved with {key}={saved[key]!r} but the "
                    f"optimizer uses {key}={group[key]!r}; build the optimizer with the same "
                    "mode."
                )
        # The layout follows the group as it will be after loading (e.g. SGD's
        # momentum decides whether a buffer is kept), as torch.optim's load does.
        loaded_group = {**group, **_group_values(opt, saved)}
        pairs += [
            (p, loaded_group, saved_id)
            for p, saved_id in zip(group["params"], saved["params"], strict=True)
        ]
    return pairs


def _group_values(opt, saved: dict) -> dict:
    """What a saved group sets in the live one: its hyper-parameters, later flags
    defaulted as torch does, no implementation keywords and no header."""
    values = {k: _LATER_FLAGS[k] for k in _LATER_FLAGS if k in opt.defaults}
    skip = ("params", HEADER_KEY, *_IMPLEMENTATION_KEYS)
    values.update({k: copy.deepcopy(v) for k, v in saved.items() if k not in skip})
    return values


def _step_as_tensor(value, saved_id):
    """torch.optim loads a Python-number ``step`` (older checkpoints) as a float32 tensor."""
    if isinstance(value, torch.Tensor) or isinstance(value, bool):
        return value
    if isinstance(value, int | float) and math.isfinite(value) and value >= 0:
        return torch.tensor(float(value), dtype=torch.float32)
    _fail(f"state 'step' of parameter {saved_id!r} is {value!r}, expected a count >= 0.")


def _check_state(opt, p, group, saved_id, saved_state) -> None:
    if not isinstance(saved_state, dict):
        _fail(f"state of parameter {saved_id!r} is a {type(saved_state).__name__}, not a dict.")
    expected = opt._expected_state(p, group)
    unexpected = set(saved_state) - set(expected)
    if unexpected:
        _fail(f"state of parameter {saved_id!r} has unexpected entries {sorted(unexpected)}.")
    # A stepped parameter holds every tensor; a partial state would silently
    # restart the missing ones at zero.
    missing = set(expected) - set(saved_state)
    if saved_state and missing:
        _fail(f"state of parameter {saved_id!r} (shape {tuple(p.shape)}) has no {sorted(missing)}.")
    for name, value in saved_state.items():
        if name == "step":
            value = _step_as_tensor(value, saved_id)
        dtype, shape = expected[name]
        if not isinstance(value, torch.Tensor):
            _fail(
                f"state '{name}' of parameter {saved_id!r} is a {type(value).__name__}, "
                "expected a tensor."
            )
        if value.dtype != dtype or tuple(value.shape) != tuple(shape):
            _fail(
                f"state '{name}' of parameter {saved_id!r} is {value.dtype} of shape "
                f"{tuple(value.shape)}, expected {dtype} of shape {tuple(shape)} for a "
                f"parameter of shape {tuple(p.shape)} ({p.dtype})."
            )


def _version3_master(b: torch.Tensor, code: torch.Tensor, code_bits: int) -> torch.Tensor:
    """The float32 master a format-3 (or older) bf16 correction held: ``b`` plus ``code``
    units of ulp(b) / 2**code_bits, b's exponent clamped at 2**-100 (tiny b had code 0)."""
    unit = formats.code_units(b, code_bits, formats.VERSION3_BF16_UNITS)[0]
    return b + code.float() * unit


def _upgrade_corrections(state: dict) -> bool:
    """Re-code format-3 bf16 corrections in place against their params' present values:
    the same masters exactly (both codes count the same steps within a binade, and the
    new ones are finer just below a power of two), but for a master on the rounding
    midpoint below a power of two, which moves by one (new) code unit towards it.
    Returns whether any was converted."""
    converted = False
    for p, entry in state.items():
        code = entry.get("correction")
        if code is None or p.dtype != torch.bfloat16:
            continue
        bits = 8 if code.dtype == torch.int8 else 16
        b = local_tensor(p).detach().reshape(-1).float()
        master = _version3_master(b, code.reshape(-1).to(b.device), bits)
        entry["correction"] = formats.split_master(master, torch.bfloat16, bits)[1].view(code.shape)
        converted = True
    return converted


@dataclass
class LoadPlan:
    """A checked state_dict, ready to swap in: new per-param state and group values."""

    optimizer: torch.optim.Optimizer
    state: dict
    group_values: list[dict]
    saved_version: int = FORMAT_VERSION


def check(opt, state_dict: dict) -> LoadPlan:
    """Check ``state_dict`` against ``opt`` and prepare it; changes nothing in ``opt``."""
    _check_header(opt, state_dict)
    pairs = _check_groups(opt, state_dict)
    saved = state_dict["state"]
    if not isinstance(saved, dict):
        _fail(f"'state' is a {type(saved).__name__}, expected a dict.")
    known = {saved_id for _, _, saved_id in pairs}
    unknown = set(saved) - known
    if unknown:
        _fail(f"state for unknown parameter ids {sorted(unknown, key=str)}.")
    # Version 3 moved SGD's and Muon's signed codes to new levels: older codes convert.
    version = _saved_version(state_dict)
    saved_levels = _saved_levels(version)
    rows = saved
    saved = localize(opt, pairs, saved, saved_levels)  # FSDP2's row form -> local tensors
    for p, group, saved_id in pairs:
        if saved_id in saved:
            _check_state(opt, p, group, saved_id, saved[saved_id])
            if saved[saved_id] is rows[saved_id]:  # localize converts row-form states
                upgraded = _upgrade_momentum(opt, group, saved[saved_id], saved_levels)
                saved = {**saved, saved_id: upgraded}
    # Copies go to the parameter's device with their own dtype: torch.optim's
    # load_state_dict would cast them to the param dtype and lose the codes.
    new_state = {}
    for p, _, saved_id in pairs:
        if saved.get(saved_id):
            device = local_tensor(p).device
            new_state[p] = {
                k: (_step_as_tensor(v, saved_id) if k == "step" else v)
                .detach()
                .to(device=device, copy=True)
                for k, v in saved[saved_id].items()
            }
    group_values = [_group_values(opt, saved) for saved in state_dict["param_groups"]]
    return LoadPlan(opt, new_state, group_values, version)


def apply(plan: LoadPlan, weights_loaded: bool = False) -> None:
    """Swap a checked plan into its optimizer (cannot fail half-way). A format-3 bf16
    correction is converted here, against the param's value at this moment: the model's
    weights must be loaded first (``load_checkpoint`` does: ``weights_loaded``); otherwise
    a warning says so, since a wrong order cannot be detected."""
    opt = plan.optimizer
    if plan.saved_version < 4 and _upgrade_corrections(plan.state) and not weights_loaded:
        warnings.warn(
            f"slimoptim: this state_dict is format version {plan.saved_version}; its bf16 "
            "master corrections were converted against the parameters' current values. "
            "Load the model's weights before the optimizer's state_dict (as "
            "slimoptim.checkpoint.load_checkpoint does), or the masters are off by up to a "
            "bf16 ulp; saving the optimizer again writes version 4.",
            stacklevel=3,
        )
    for group, values in zip(opt.param_groups, plan.group_values, strict=True):
        group.update(values)
    opt.state.clear()
    opt.state.update(plan.state)
    kernels.drop_plans(opt)  # they hold the old state: free it now


def load_into(opt, state_dict: dict) -> None:
    apply(check(opt, state_dict))
