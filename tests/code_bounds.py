"""Where momentum levels lie (formats.MOMENTUM_LEVEL_SETS), for error bounds in tests."""

from __future__ import annotations

import torch

from slimoptim import formats


def level_position(x: torch.Tensor, levels: str) -> torch.Tensor:
    """Continuous level index c of |x| (x relative to the group scale, float64): the root
    of c * (offset + c) = |x| * units."""
    offset, units = formats._LEVEL_OFFSET[levels], formats._LEVEL_UNITS[levels]
    t = x.double().abs() * units
    return ((offset**2 + 4 * t).sqrt() - offset) / 2


def momentum_gap(x: torch.Tensor, levels: str) -> torch.Tensor:
    """An upper bound on the gap between the two levels around |x|, relative to the scale."""
    offset, units = formats._LEVEL_OFFSET[levels], formats._LEVEL_UNITS[levels]
    c = torch.floor(level_position(x, levels))
    return (offset + 2 * c + 3) / units  # the gap above the next level: float rounding slack
