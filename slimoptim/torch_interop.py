"""torch.optim interop: optimizer states as torch.optim's float32 tensors, and back.

``to_torch_state_dict`` decodes a slimoptim optimizer's states to what the matching
torch.optim optimizer holds; ``from_torch_state_dict`` quantizes a torch.optim state_dict
into a slimoptim optimizer (docs/checkpoints.md gives the error this costs). Both are
re-exported by :mod:`slimoptim.checkpoint`.
"""

from __future__ import annotations

import copy

import torch

from . import formats, state_io
from .errors import CheckpointError
from .optimizers.sgd import SGD

_MODE_KEYS = state_io._GROUP_MODE_KEYS
# torch.optim group options that slimoptim has no use for (implementation choices).
_TORCH_ONLY_KEYS = ("foreach", "capturable", "differentiable", "fused", "decoupled_weight_decay")


def refuse_dtensor(p: torch.Tensor) -> None:
    if hasattr(p, "to_local"):
        raise NotImplementedError(
            "fp32 export/import and torch.optim interop work on whole (unsharded) tensors; for "
            "DTensor (FSDP2) parameters use torch.distributed.checkpoint (docs/checkpoints.md)."
        )


def _state_names(optimizer, group) -> list[str]:
    return [spec.name for spec in optimizer._specs_for(group)]


def _keeps_step(optimizer) -> bool:
    # torch.optim.SGD keeps only the momentum buffer; Adam-family and Lion a step.
    return not isinstance(optimizer, SGD)


def to_torch_state_dict(optimizer) -> dict:
    """The optimizer's state as a torch.optim state_dict: dequantized float32, param-shaped.

    ``torch.optim.AdamW/Adam/SGD(...).load_state_dict`` accepts it (for the
    matching type). Weights are not in it: load ``fp32_state_dict`` into the
    torch model to carry the master weights over.
    """
    index, state, groups = 0, {}, []
    for group in optimizer.param_groups:
        ids = []
        for p in group["params"]:
            ids.append(index)
            saved = optimizer.state.get(p)
            names = _state_names(optimizer, group)
            if saved and names:
                refuse_dtensor(p)
                values = optimizer._load_states(saved, group, p.numel())
                entry = {name: values[name].detach().clone().view(p.shape) for name in names}
                if _keeps_step(optimizer):
                    entry["step"] = saved["step"].detach().clone()
                state[index] = entry
            index += 1
        torch_group = {
            k: copy.deepcopy(v) for k, v in group.items() if k not in ("params", *_MODE_KEYS)
        }
        if hasattr(optimizer, "decoupled"):  # torch >= 2.6 Adam/AdamW carry this flag
            torch_group["decoupled_weight_decay"] = optimizer.decoupled
        torch_group["params"] = ids
        groups.append(torch_group)
    return {"state": state, "param_groups": groups}


def _torch_fail(message: str):
    raise CheckpointError(f"cannot load torch.optim state_dict: {message}")


def _check_torch_group(optimizer, i: int, group: dict, saved: dict) -> None:
    if state_io.HEADER_KEY in saved:
        _torch_fail("it is a slimoptim state_dict; load it with optimizer.load_state_dict.")
    needed = [k for k in optimizer.defaults if k not in _MODE_KEYS]
    missing = [k for k in needed if k not in saved]
    if missing:
        _torch_fail(
            f"parameter group {i} has no {missing}: it is not a {type(optimizer).__name__}-"
            "style optimizer's state_dict."
        )
    if saved.get("amsgrad"):
        _torch_fail("it uses amsgrad=True, which slimoptim does not support.")
    decoupled = getattr(optimizer, "decoupled", None)
    saved_decoupled = saved.get("decoupled_weight_decay")
    if decoupled is not None and saved_decoupled is not None and saved_decoupled != decoupled:
        kind = "AdamW (decoupled weight decay)" if saved_decoupled else "Adam (L2 weight decay)"
        _torch_fail(f"it is a torch {kind} state_dict, not one for {type(optimizer).__name__}.")
    if len(saved["params"]) != len(group["params"]):
        _torch_fail(
            f"parameter group {i} has {len(saved['params'])} parameters in the checkpoint and "
            f"{len(group['params'])} in the optimizer."
        )


def _torch_entry_values(optimizer, p, group, saved_id, entry: dict) -> dict:
    """Checked float32 flat values of one param's torch state (state name -> tensor)."""
    names = _state_names(optimizer, group)
    present = {k: v for k, v in entry.items() if v is not None and k != "step"}
    unexpected = sorted(set(present) - set(names))
    if unexpected:
        _torch_fail(
            f"state of parameter {saved_id} has entries {unexpected} that "
            f"{type(optimizer).__name__} does not keep (expected {names})."
        )
    missing = sorted(set(names) - set(present))
    if present and missing:
        _torch_fail(f"state of parameter {saved_id} has no {missing}.")
    values = {}
    for name, value in present.items():
        if not isinstance(value, torch.Tensor) or not value.is_floating_point():
            _torch_fail(f"state '{name}' of parameter {saved_id} is not a floating tensor.")
        if value.numel() != p.numel():
            _torch_fail(
                f"state '{name}' of parameter {saved_id} has shape {tuple(value.shape)}, the "
                f"parameter {tuple(p.shape)}."
            )
        values[name] = value.detach().to(device=p.device, dtype=torch.float32).reshape(-1)
    return values


def _quantized_state(optimizer, p, group, step: float, values: dict) -> dict:
    """A complete slimoptim state for ``p`` holding ``values``; keeps p's correction."""
    state = {
        name: torch.zeros(shape, dtype=dtype, device=p.device)
        for name, (dtype, shape) in optimizer._expected_state(p, group).items()
    }
    state["step"].fill_(step)
    if "correction" in optimizer.state.get(p, {}):
        state["correction"].copy_(optimizer.state[p]["correction"])
    size = group["group_size"]
    for spec in optimizer._specs_for(group):
        if spec.name not in values:
            continue
        value = values[spec.name]
        if group["state_bits"] == 32:
            state[spec.name].copy_(value)
            continue
        if spec.signed:  # one-off conversion: nearest level (noise = half range), not dithered
            code, scale = formats.quantize_momentum_nearest(value, size, spec.levels)
        else:
            code, scale = formats.quantize_variance(value, size)
        state[spec.name].copy_(code)
        state[spec.scale_name].copy_(scale)
    return state


def from_torch_state_dict(optimizer, torch_state_dict: dict) -> None:
    """Load a torch.optim (AdamW/Adam/SGD, float32 states) state_dict into ``optimizer``.

    States are quantized to the optimizer's format (8-bit: round to nearest;
    32-bit: exact); hyper-parameters come from the checkpoint's groups; each
    param's master-weight correction is kept (load the weights separately, e.g.
    with ``load_fp32_state_dict``). All is checked first; a failed load changes
    nothing.
    """
    sd = torch_state_dict
    if not isinstance(sd, dict) or "state" not in sd or "param_groups" not in sd:
        _torch_fail("expected a dict with 'state' and 'param_groups'.")
    if len(sd["param_groups"]) != len(optimizer.param_groups):
        _torch_fail(
            f"it has {len(sd['param_groups'])} parameter groups, the optimizer has "
            f"{len(optimizer.param_groups)}."
        )
    new_state, new_options = {}, []
    pairs = zip(optimizer.param_groups, sd["param_groups"], strict=True)
    for i, (live, saved) in enumerate(pairs):
        _check_torch_group(optimizer, i, live, saved)
        options = {
            k: copy.deepcopy(v)
            for k, v in saved.items()
            if k not in ("params", *_MODE_KEYS, *_TORCH_ONLY_KEYS)
        }
        new_options.append(options)
        # States follow the loaded options (SGD's momentum decides whether it keeps a buffer).
        group = {**live, **options}
        for p, saved_id in zip(group["params"], saved["params"], strict=True):
            refuse_dtensor(p)
            entry = sd["state"].get(saved_id)
            if not entry:
                continue
            values = _torch_entry_values(optimizer, p, group, saved_id, entry)
            if not values and "step" not in entry:
                continue
            # torch SGD keeps no step; any step >= 1 means "the buffer is started".
            step = float(entry.get("step", 1))
            new_state[p] = _quantized_state(optimizer, p, group, step, values)
    # Params without torch state keep only their correction (a zero state, as if fresh).
    for live, options in zip(optimizer.param_groups, new_options, strict=True):
        for p in live["params"]:
            if p not in new_state and "correction" in optimizer.state.get(p, {}):
                new_state[p] = _quantized_state(optimizer, p, {**live, **options}, 0.0, {})
    for live, options in zip(optimizer.param_groups, new_options, strict=True):
        live.update(options)
    optimizer.state.clear()
    optimizer.state.update(new_state)
