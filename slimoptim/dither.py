"""The stochastic-rounding dither of the 8-bit codes and the 24-bit master (formats.py).

Integer noise that is a fixed function of (element index, step), so every backend draws
the same values: the Triton kernels compute it with the same integer operations.
"""

from __future__ import annotations

import torch


def _mix32(x: torch.Tensor) -> torch.Tensor:
    # Integer hash on 32-bit values held in int64 (the step's key: one per step and
    # tensor). Multipliers stay below 2**31 so products fit in int64 exactly; Triton uses
    # uint32 and gets the same bits.
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x = x ^ (x >> 15)
    x = (x * 0x1B873593) & 0xFFFFFFFF
    return x ^ (x >> 16)


def _mix_element(x: torch.Tensor) -> torch.Tensor:
    # The per-element hash: multiply, xor-shift, multiply (4 GPU instructions where
    # _mix32 takes 8). On 2**21 elements its halves pass the same pairwise uniformity
    # checks as _mix32's (neighbours at lags 1 to 65536, halves against each other,
    # steps against steps; benchmarks/NOTES.md v19).
    x = ((x & 0xFFFFFFFF) * 0x7FEB352D) & 0xFFFFFFFF  # index + key may pass 2**32: wrap
    x = x ^ (x >> 16)
    return (x * 0x046CA68B) & 0xFFFFFFFF


DITHER_LEVELS = 65536  # each state's dither: integers in [0, DITHER_LEVELS)


# The sequenced dither's steps per element and step: 65536 / golden ratio and
# 65536 * (sqrt(2) - 1), rounded to odd integers, added as one 32-bit word: the second
# half visits every value of [0, 65536) in 65536 steps; the first, which also takes the
# second's carry, steps by 40503 or 40504 (~59,300 distinct values per 65536 steps).
SEQUENCE_STEPS = (40503, 27145)
SEQUENCE_WORD = (SEQUENCE_STEPS[0] << 16) | SEQUENCE_STEPS[1]
SEQUENCE_KEY = 0x2545F491


def dither(
    numel: int, step: torch.Tensor, device=None, sequenced: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Two uniform integer dithers in [0, 65536) (as float32), one for each 8-bit state
    (or the master's code), a fixed function of (element index, step): the top and bottom
    halves of one 32-bit word.

    Hashed (default): the word is a hash of the element index plus a hash of the step,
    independent from step to step. ``sequenced``: each element walks a Weyl sequence from
    a hashed start, start + step * SEQUENCE_WORD mod 2**32 (the bottom half advances by
    SEQUENCE_STEPS[1], the top by SEQUENCE_STEPS[0] plus the bottom's carry), so
    successive dithers of one element are spread evenly over the range: a state coded
    again at every step collects rounding errors that cancel instead of adding up as a
    random walk (Lion's slow EMA, docs/formats.md).
    """
    index = torch.arange(numel, device=device, dtype=torch.int64)
    if sequenced:
        s = step.to(torch.int64)
        h = (_mix_element(index + SEQUENCE_KEY) + s * SEQUENCE_WORD) & 0xFFFFFFFF
    else:
        key = _mix32((step.to(torch.int64) * 0x9E3779B1) & 0xFFFFFFFF)
        h = _mix_element(index + key)
    return (h >> 16).to(torch.float32), (h & 0xFFFF).to(torch.float32)
