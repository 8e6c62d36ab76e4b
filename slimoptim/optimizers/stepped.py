"""Which (group, param) pairs a step steps, read with a few C-level passes per step.

``step()`` runs this every step over every param, so its per-param cost is the optimizer's
host time per tensor: each pass below is one ``map`` of a C function (no Python frame per
param), and whatever depends only on the groups' params lists is cached on those lists.
"""

from __future__ import annotations

import operator
from itertools import compress, repeat

import torch

_grad_of = operator.attrgetter("grad")


def items_and_grads(opt) -> tuple[tuple, list]:
    """The (group, param) pairs whose param has a gradient, each param once, and those
    gradients (read once here: the kernels' dispatch takes them from step()).

    While the same params have gradients, the same tuple comes back step after step, so
    its identity stands for its params (the kernels' plan lookup relies on it).
    """
    # Traced by torch.compile (opt.step compiled): no caches, whose writes to the
    # optimizer's __dict__ older dynamo versions cannot trace (torch 2.11).
    compiling = torch.compiler.is_compiling()
    items, params = _snapshot(opt.param_groups)[1:] if compiling else _every_param_once(opt)
    grads = list(map(_grad_of, params))
    if not any(map(operator.is_, grads, repeat(None))):
        return items, grads
    present = list(map(operator.is_not, grads, repeat(None)))
    if compiling:
        return tuple(compress(items, present)), list(compress(grads, present))
    cached = opt.__dict__.get("_slimoptim_with_grads")
    if cached is None or cached[0] is not items or cached[1] != present:
        cached = (items, present, tuple(compress(items, present)))
        opt.__dict__["_slimoptim_with_grads"] = cached
    return cached[2], list(compress(grads, present))


def _every_param_once(opt) -> tuple[tuple, tuple]:
    """Every (group, param) pair, a param listed twice only at its first place, and the
    params alone. Cached on the groups and their params, compared by identity each step
    (one C-level pass): an in-place append or swap in a group's list is seen."""
    groups = opt.param_groups
    cached = opt.__dict__.get("_slimoptim_items")
    if cached is None or not _same_groups(cached[0], groups):
        cached = _snapshot(groups)
        opt.__dict__["_slimoptim_items"] = cached
    return cached[1], cached[2]


def _snapshot(groups: list) -> tuple[tuple, tuple, tuple]:
    """(the groups with their params lists, every (group, param) pair once, the params)."""
    snapshot = tuple((group, tuple(group["params"])) for group in groups)
    seen = set()
    items = tuple(
        (group, p)
        for group, params in snapshot
        for p in params
        if not (id(p) in seen or seen.add(id(p)))
    )
    return snapshot, items, tuple(map(operator.itemgetter(1), items))


def _same_groups(snapshot: tuple, groups: list) -> bool:
    # ``is`` throughout: list equality would call Tensor.__eq__ on the first two params
    # that differ (an elementwise compare, truthy for equal one-element params).
    return len(snapshot) == len(groups) and all(
        group is old_group
        and len(group["params"]) == len(old_params)
        and all(map(operator.is_, group["params"], old_params))
        for (old_group, old_params), group in zip(snapshot, groups, strict=True)
    )
