"""A bad gradient beside fusable ones raises before anything is stepped."""

from __future__ import annotations

import pytest
import torch

import slimoptim

pytest.importorskip("triton")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def test_a_sparse_gradient_raises_before_the_kernels_step_the_others():
    a = torch.nn.Parameter(torch.randn(64, device=DEVICE).bfloat16())
    b = torch.nn.Parameter(torch.randn(8, 4, device=DEVICE))
    opt = slimoptim.AdamW([a, b], lr=1e-2, fused=True)
    a.grad = torch.randn_like(a)
    b.grad = torch.randn(8, 4, device=DEVICE).to_sparse()
    before = a.detach().clone()
    with pytest.raises(TypeError, match="sparse"):
        opt.step()
    assert torch.equal(a.detach().view(torch.int16), before.view(torch.int16))
    assert "step" not in opt.state[a] or opt.state[a]["step"].item() == 0
    b.grad = torch.randn(8, 4, device=DEVICE)  # fixed: the next step steps both once
    opt.step()
    assert opt.state[a]["step"].item() == 1 and opt.state[b]["step"].item() == 1
