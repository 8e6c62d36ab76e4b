"""``repr(optimizer)`` names slimoptim and the mode, then lists the groups as torch does."""

import torch

import slimoptim


def test_repr_names_the_library_and_the_mode():
    p = torch.nn.Parameter(torch.randn(3, dtype=torch.bfloat16))
    opt = slimoptim.AdamW([p], lr=1e-3)
    text = repr(opt)
    assert text.startswith("slimoptim.AdamW (master 24-bit, states 8-bit) (\nParameter Group 0\n")
    # The rest is torch's own listing of the same groups.
    assert text.removeprefix("slimoptim.AdamW (master 24-bit, states 8-bit) ") == (
        torch.optim.Optimizer.__repr__(opt).removeprefix("AdamW ")
    )
    assert "    lr: 0.001\n" in text and text.endswith("\n)")
    assert repr(torch.optim.AdamW([torch.nn.Parameter(torch.randn(3))])).startswith("AdamW (")


def test_repr_of_mixed_groups_lists_each_mode():
    a = torch.nn.Parameter(torch.randn(3, dtype=torch.bfloat16))
    b = torch.nn.Parameter(torch.randn(3, dtype=torch.bfloat16))
    opt = slimoptim.Lion(
        [{"params": [a]}, {"params": [b], "master_weight_bits": None, "state_bits": 32}]
    )
    assert repr(opt).startswith("slimoptim.Lion (master 24-bit/none, states 8-bit/32-bit) (")
    sgd = slimoptim.SGD([a], lr=0.1, master_weight_bits=32)
    assert str(sgd).startswith("slimoptim.SGD (master 32-bit, states 8-bit) (")
