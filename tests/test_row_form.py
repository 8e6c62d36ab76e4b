"""The row form's scale tables (slimoptim.distributed), shard layouts simulated in one process.

Each layout splits a parameter's rows as FSDP2 does (torch.chunk): the states of
every shard are quantized in their own groups, written as rows, and read back
under another layout. Decoding must give every value exactly what it decoded to
before; where the groups are the same, the scales must come back bit for bit.
"""

from __future__ import annotations

import random

import pytest
import torch

from slimoptim import distributed as sdist
from slimoptim import formats


def chunks(rows: int, shards: int) -> list[tuple[int, int]]:
    """(first row, rows) of each shard, as torch.chunk (and FSDP2's Shard(0)) splits."""
    size = -(-rows // shards)
    return [(min(i * size, rows), max(0, min(size, rows - i * size))) for i in range(shards)]


def quantize(values, signed, size):
    if signed:
        return formats.quantize_momentum_nearest(values, size)
    return formats.quantize_variance(values, size)


def decode(code, scale, signed, size):
    if signed:
        return formats.dequantize_momentum(code, scale, size)
    return formats.dequantize_variance(code, scale, size)


CASES = [
    (rows, cols, size, a, b)
    for rows, cols in [(1, 1), (5, 1), (13, 7), (9, 32), (4, 40), (7, 3), (2, 5)]
    for size in (1, 4, 8, 32)
    for a, b in [(1, 2), (2, 3), (3, 1), (2, 2), (4, 3)]
]


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("rows,cols,size,saved_shards,loaded_shards", CASES)
def test_rows_decode_exactly_under_any_layout(
    signed, rows, cols, size, saved_shards, loaded_shards
):
    seed = random.randrange(2**31)
    gen = torch.Generator().manual_seed(seed)
    values = torch.randn(rows, cols, generator=gen) * torch.rand(rows, 1, generator=gen)
    values = values if signed else values.square()
    codes, tables, decoded = [], [], []
    for start, n in chunks(rows, saved_shards):
        local = values[start : start + n].reshape(-1)
        code, scale = quantize(local, signed, size)
        codes.append(code)
        tables.append(sdist._scale_table(scale, n, cols, size))
        decoded.append(decode(code, scale, signed, size))
    code, table, decoded = torch.cat(codes), torch.cat(tables), torch.cat(decoded)
    for start, n in chunks(rows, loaded_shards):
        part = table[start : start + n]
        phase = sdist._phases(part)
        local_code = code[start * cols : (start + n) * cols]
        per_element = sdist._per_element_scales(part, phase, cols, size)
        got = decode(local_code, per_element, signed, 1)
        want = decoded[start * cols : (start + n) * cols]
        assert torch.equal(got, want), f"seed {seed}"
        if torch.equal(phase, sdist.shard_phases(n, cols, size, "cpu")):
            # The same groups: the scales come back exactly, as the shard would have them.
            _, own_scale = quantize(values[start : start + n].reshape(-1), signed, size)
            scales = sdist._gathered_scales(part, phase, n, cols, size)
            if saved_shards == loaded_shards:
                assert torch.equal(scales, own_scale), f"seed {seed}"
            assert torch.equal(decode(local_code, scales, signed, size), want)


def test_phase_digits_are_exact_up_to_the_largest_group():
    size = sdist.MAX_GROUP_SIZE
    scale = torch.rand(3).to(torch.bfloat16)
    table = sdist._scale_table(scale, n_rows=3, cols=size - 1, size=size)
    assert torch.equal(sdist._phases(table), torch.tensor([0, size - 1, size - 2]))


def test_a_table_with_impossible_phases_is_refused():
    """Loading checks the phases before decoding with them; the optimizer is left as it was."""
    import copy

    import slimoptim
    from slimoptim.state_io import CheckpointError

    model = torch.nn.Linear(7, 5).bfloat16()
    opt = slimoptim.AdamW(model.parameters(), lr=1e-2, group_size=4)
    model(torch.randn(3, 7).bfloat16()).float().sum().backward()
    opt.step()
    with sdist.row_form(opt):
        sd = copy.deepcopy(opt.state_dict())
    before = copy.deepcopy(opt.state_dict())
    sd["state"][0]["exp_avg_scale"][1, 1] = 9.0  # phase 9 in groups of 4
    with pytest.raises(CheckpointError, match=r"phases outside \[0, 4\)"):
        opt.load_state_dict(sd)
    for key, value in before["state"][0].items():
        assert torch.equal(value, opt.state_dict()["state"][0][key])
