"""Casting a model to low precision while keeping chosen layers in float32."""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable

import torch
from torch import nn

# Norm layers with running statistics accumulate them in their own dtype: keep float32.
DEFAULT_KEEP_FP32 = (nn.modules.batchnorm._BatchNorm,)


def _matches(name: str, module: nn.Module, keep) -> bool:
    for rule in keep:
        if isinstance(rule, str) and fnmatch.fnmatchcase(name, rule):
            return True
        if isinstance(rule, type) and isinstance(module, rule):
            return True
        if isinstance(rule, nn.Module) and module is rule:
            return True
    return False


def _cast_floats(obj, dtype):
    if isinstance(obj, torch.Tensor) and obj.is_floating_point():
        return obj.to(dtype)
    if isinstance(obj, (tuple, list)):
        return type(obj)(_cast_floats(x, dtype) for x in obj)
    if isinstance(obj, dict):
        return {k: _cast_floats(v, dtype) for k, v in obj.items()}
    return obj


def _check_rules(keep: tuple) -> None:
    for rule in keep:
        if not isinstance(rule, (str, type, nn.Module)):
            raise TypeError(
                f"keep_fp32 entries must be name patterns, module types or modules; got {rule!r}."
            )


def _check_every_rule_matches(model: nn.Module, keep: tuple) -> None:
    """A keep_fp32 entry that selects nothing is a typo or a wrong name: say which."""
    named = list(model.named_modules())
    for rule in keep:
        if any(_matches(name, module, (rule,)) for name, module in named):
            continue
        examples = ", ".join(repr(name) for name, _ in named[1:6])
        what = rule.__name__ if isinstance(rule, type) else repr(rule)
        raise ValueError(
            f"keep_fp32 entry {what} matches no module of this {type(model).__name__}. "
            f"Patterns match module names relative to the model, without a leading dot "
            f"(here: {examples}, ...); types match with isinstance."
        )


def cast_model(
    model: nn.Module,
    dtype: torch.dtype = torch.bfloat16,
    keep_fp32: Iterable = (),
    *,
    keep_batchnorm_fp32: bool = True,
) -> nn.Module:
    """Cast ``model``'s floating params and buffers to ``dtype`` in place; return it.

    BatchNorm layers stay float32 (``keep_batchnorm_fp32=False`` casts them too).
    ``keep_fp32`` adds name patterns (fnmatch on module names, e.g. ``"*.norm"`` or
    ``"head"``), module types or module objects to keep in float32; an entry that
    matches no module raises ``ValueError``. Each kept module gets hooks that cast its
    floating inputs to float32 and its outputs back to ``dtype``, so the model still
    runs end to end.
    """
    if dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(
            f"dtype must be torch.bfloat16, torch.float16 or torch.float32, got {dtype}."
        )
    if isinstance(keep_fp32, (str, type, nn.Module)):
        keep_fp32 = (keep_fp32,)  # one entry given bare
    extra = tuple(keep_fp32)
    _check_rules(extra)
    _check_every_rule_matches(model, extra)
    keep = (DEFAULT_KEEP_FP32 if keep_batchnorm_fp32 else ()) + extra
    kept = [m for name, m in model.named_modules() if keep and _matches(name, m, keep)]
    kept_ids = {id(m) for m in kept}
    for name, module in model.named_modules():
        inside_kept = any(id(m) in kept_ids for m in _ancestors(model, name))
        target = torch.float32 if inside_kept else dtype
        for tensors in (module._parameters, module._buffers):
            for key, t in tensors.items():
                if t is not None and t.is_floating_point():
                    tensors[key].data = t.data.to(target)
    if dtype != torch.float32:
        for module in _outermost(kept):
            module.register_forward_pre_hook(
                lambda m, args, kw: (
                    _cast_floats(args, torch.float32),
                    _cast_floats(kw, torch.float32),
                ),
                with_kwargs=True,
            )
            module.register_forward_hook(lambda m, args, out: _cast_floats(out, dtype))
    return model


def _ancestors(model: nn.Module, name: str):
    """The module called ``name`` and every module above it."""
    yield model
    module = model
    for part in name.split(".") if name else ():
        module = getattr(module, part)
        yield module


def _outermost(modules: list[nn.Module]) -> list[nn.Module]:
    inner = {id(c) for m in modules for c in m.modules() if c is not m}
    return [m for m in modules if id(m) not in inner]
