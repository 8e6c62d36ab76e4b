"""What save_checkpoint writes must load: every part is checked before the file replaces the
last good one, modules with extra state round-trip, and tensors of any layout (sparse,
lazily conjugated or negated) are checksummed by their values."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from checkpoint_common import assert_same_tensors, build, new_seed, train
from torch import nn

import slimoptim
from slimoptim import checkpoint, integrity


def trained(seed: int):
    model, opt, sched = build("AdamW", torch.bfloat16, 24, 8, seed=seed)
    train(model, opt, sched, range(2), seed)
    return model, opt, sched


def test_an_unloadable_optimizer_part_is_refused_and_the_last_good_file_kept(tmp_path):
    """An LR computed with numpy (np.float64 in a param group) cannot be read back with
    weights_only loading: the save names it and leaves the previous file in place."""
    seed = new_seed()
    model, opt, sched = trained(seed)
    path = tmp_path / "ckpt.pt"
    checkpoint.save_checkpoint(path, model, opt, sched, extra={"step": 2})
    before = path.read_bytes()
    opt.param_groups[0]["lr"] = np.linspace(2e-2, 0, 10)[3]
    with pytest.raises(TypeError, match=r"optimizer\['param_groups'\]\[0\]\['lr'\].*numpy"):
        checkpoint.save_checkpoint(path, model, opt, sched, extra={"step": 4})
    assert path.read_bytes() == before
    assert checkpoint.load_checkpoint(path, *build("AdamW", torch.bfloat16, 24, 8, seed)) == {
        "step": 2
    }


class Counted(nn.Module):
    """A layer with extra state that is not a tensor (a call counter, as in some libraries)."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(12, 40)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.linear(x)

    def get_extra_state(self):
        return {"calls": self.calls}

    def set_extra_state(self, state):
        self.calls = state["calls"]


def counted_model(seed: int):
    torch.manual_seed(seed)
    model = nn.Sequential(Counted(), nn.Tanh(), nn.Linear(40, 7)).to(torch.bfloat16)
    return model, slimoptim.AdamW(model.parameters(), lr=1e-2)


def step(model, opt, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(8, 12, generator=gen).to(torch.bfloat16)
    opt.zero_grad()
    model(x).float().pow(2).mean().backward()
    opt.step()


def test_a_module_with_extra_state_round_trips(tmp_path):
    """save_checkpoint / load_checkpoint keep a module's non-tensor extra state; the fp32
    export passes it through; safetensors, which cannot hold it, refuse it by name."""
    seed = new_seed()
    model, opt = counted_model(seed)
    for i in range(3):
        step(model, opt, seed + i)
    path = tmp_path / "ckpt.pt"
    checkpoint.save_checkpoint(path, model, opt)
    fresh, fresh_opt = counted_model(seed + 1)
    checkpoint.load_checkpoint(path, fresh, fresh_opt)
    assert fresh[0].calls == 3
    assert_same_tensors(
        {k: v for k, v in model.state_dict().items() if "extra" not in k},
        {k: v for k, v in fresh.state_dict().items() if "extra" not in k},
    )
    fp32 = checkpoint.fp32_state_dict(model, opt)
    assert fp32["0._extra_state"] == {"calls": 3}
    assert fp32["0.linear.weight"].dtype == torch.float32
    with pytest.raises(ValueError, match=r"0\._extra_state"):
        checkpoint.save_model(model, tmp_path / "w.safetensors")
    assert not (tmp_path / "w.safetensors").exists()


@pytest.mark.parametrize("kind", ["sparse", "conj", "neg"])
def test_tensors_of_any_layout_in_extra_are_saved_and_verified(tmp_path, kind):
    """Sparse tensors and lazy conjugate/negative views are checksummed by their values:
    they save, load equal, and a damaged value is still caught."""
    model, opt, sched = trained(new_seed())
    dense = torch.randn(5, 4, generator=torch.Generator().manual_seed(new_seed()))
    value = {
        "sparse": dense.masked_fill(dense.abs() < 0.8, 0).to_sparse(),
        "conj": torch.complex(dense, -dense).conj(),
        "neg": torch.complex(dense, dense).conj()._neg_view(),
    }[kind]
    path = tmp_path / "ckpt.pt"
    checkpoint.save_checkpoint(path, model, opt, sched, extra={"x": value})
    loaded = checkpoint.load_checkpoint(path, *trained(new_seed()))
    expect = value.to_dense() if kind == "sparse" else value.resolve_conj().resolve_neg()
    got = loaded["x"].to_dense() if kind == "sparse" else loaded["x"].resolve_conj()
    assert torch.equal(got.resolve_neg(), expect)
    # The digest is of the values: equal for a materialised copy, different for damage.
    digest = integrity.checksums({"x": value})["tensors"]["x"]
    same = value.coalesce() if kind == "sparse" else expect.clone()
    damaged = value * 2 if kind == "sparse" else expect * 2
    assert integrity.checksums({"x": same})["tensors"]["x"] == digest
    assert integrity.checksums({"x": damaged})["tensors"]["x"] != digest


def test_a_dtensor_model_is_refused_with_the_dcp_advice(tmp_path, monkeypatch):
    """A model whose state holds DTensors (FSDP2) cannot be saved whole from one process:
    the error says to use DCP, before anything is written."""
    model, opt, sched = trained(new_seed())

    class Sharded(torch.Tensor):  # stands in for DTensor: what save_checkpoint looks for
        def to_local(self):
            return self

    sd = model.state_dict()
    sd["0.weight"] = sd["0.weight"].as_subclass(Sharded)
    monkeypatch.setattr(model, "state_dict", lambda: sd)
    with pytest.raises(NotImplementedError, match="torch.distributed.checkpoint"):
        checkpoint.save_checkpoint(tmp_path / "ckpt.pt", model, opt, sched)
    assert not (tmp_path / "ckpt.pt").exists()
