"""Validated, all-or-nothing loading of slimoptim state_dicts."""

from __future__ import annotations

import copy

import torch

from .optimizers.base import FORMAT_VERSION

_GROUP_MODE_KEYS = ("master_weight_bits", "state_bits", "group_size")


def _fail(message: str):
    raise ValueError(f"cannot load optimizer state_dict: {message}")


def _check_header(opt, sd: dict) -> None:
    if not isinstance(sd, dict) or "state" not in sd or "param_groups" not in sd:
        _fail("expected a dict with 'state' and 'param_groups' (from optimizer.state_dict()).")
    header = sd.get("slimoptim")
    if header is None:
        _fail(
            f"it was not written by a slimoptim optimizer (no 'slimoptim' entry); to start "
            f"{type(opt).__name__} from a torch.optim checkpoint, convert it first."
        )
    if header.get("format_version") != FORMAT_VERSION:
        _fail(
            f"format_version {header.get('format_version')!r} is not supported "
            f"(this slimoptim reads version {FORMAT_VERSION})."
        )
    if header.get("optimizer") != type(opt).__name__:
        _fail(f"it belongs to a {header.get('optimizer')} optimizer, not {type(opt).__name__}.")


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
        if len(group["params"]) != len(saved["params"]):
            _fail(
                f"parameter group {i} has {len(saved['params'])} parameters in the "
                f"checkpoint and {len(group['params'])} in the optimizer."
            )
        for key in _GROUP_MODE_KEYS:
            if saved.get(key) != group[key]:
                _fail(
                    f"parameter group {i} was saved with {key}={saved.get(key)!r} but the "
                    f"optimizer uses {key}={group[key]!r}; build the optimizer with the same "
                    "mode."
                )
        pairs += [
            (p, group, saved_id)
            for p, saved_id in zip(group["params"], saved["params"], strict=True)
        ]
    return pairs


def _check_state(opt, p, group, saved_id, saved_state: dict) -> None:
    expected = opt._expected_state(p, group)
    unexpected = set(saved_state) - set(expected)
    if unexpected:
        _fail(f"state of parameter {saved_id} has unexpected entries {sorted(unexpected)}.")
    for name, value in saved_state.items():
        dtype, shape = expected[name]
        if not isinstance(value, torch.Tensor):
            _fail(
                f"state '{name}' of parameter {saved_id} is a {type(value).__name__}, "
                "expected a tensor."
            )
        if value.dtype != dtype or tuple(value.shape) != tuple(shape):
            _fail(
                f"state '{name}' of parameter {saved_id} is {value.dtype} of shape "
                f"{tuple(value.shape)}, expected {dtype} of shape {tuple(shape)} for a "
                f"parameter of shape {tuple(p.shape)} ({p.dtype})."
            )
    if saved_state and "step" not in saved_state:
        _fail(f"state of parameter {saved_id} has no 'step'.")


def load_into(opt, state_dict: dict) -> None:
    _check_header(opt, state_dict)
    pairs = _check_groups(opt, state_dict)
    saved = state_dict["state"]
    for p, group, saved_id in pairs:
        if saved_id in saved:
            _check_state(opt, p, group, saved_id, saved[saved_id])
    known = {saved_id for _, _, saved_id in pairs}
    if set(saved) - known:
        _fail(f"state for unknown parameter ids {sorted(set(saved) - known)}.")
    # Everything checked: now replace, copying tensors to the parameter's device as-is.
    new_state = {}
    for p, _, saved_id in pairs:
        if saved_id in saved:
            device = p.device if not hasattr(p, "to_local") else p.to_local().device
            new_state[p] = {k: v.detach().clone().to(device) for k, v in saved[saved_id].items()}
    for group, saved_group in zip(opt.param_groups, state_dict["param_groups"], strict=True):
        for key, value in saved_group.items():
            if key != "params":
                group[key] = copy.deepcopy(value)
    opt.state.clear()
    opt.state.update(new_state)
