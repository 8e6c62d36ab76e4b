"""``slimoptim plan``'s Muon rows: Muon on the hidden matrices and AdamW on the rest, against
real optimizer pairs split by ``slimoptim.muon_param_groups`` on the same models."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from test_cli import run_main  # main(args) in this process: (status, stdout, stderr)
from test_plan import _assert_plan_is_real, _real_memory
from torch import nn

from slimoptim import plan
from slimoptim.cli_common import CommandError

VOCAB, CONTEXT = 37, 8


class TinyLM(nn.Module):
    """Token and learned position embeddings, two encoder layers (attention holds a bare
    in_proj_weight matrix), a final norm and an untied head named lm_head."""

    def __init__(self, dim: int = 24):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, dim)
        self.positions = nn.Embedding(CONTEXT, dim)
        layer = nn.TransformerEncoderLayer(dim, 2, 40, dropout=0.0, batch_first=True)
        self.blocks = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.lm_head = nn.Linear(dim, VOCAB, bias=False)

    def forward(self, tokens):
        x = self.embed(tokens) + self.positions(torch.arange(tokens.shape[-1]))
        return self.lm_head(self.norm(self.blocks(x)))


def _tiny_lm_batch():
    return torch.randint(0, VOCAB, (2, CONTEXT))


def _muon_setups(modes=plan.ALL_MODES):
    return [s for s in plan.all_setups(["muon"], modes) if s.optimizer == "muon"]


def test_muon_split_follows_muon_param_groups():
    """The plan's marks are muon_param_groups' split: 4 matrices per layer to Muon; the
    embeddings, positions, head, norms and biases to AdamW."""
    with torch.device("meta"):
        model = plan.tensors_from_module(TinyLM(), "TinyLM")
    hidden = [s for s, m in zip(model.shapes, model.muon, strict=True) if m]
    assert sorted(hidden) == sorted([(72, 24), (24, 24), (40, 24), (24, 40)] * 2)
    assert len(model.shapes) == len(model.slim) == len(model.muon)
    assert all(len(s) == 2 for s in hidden)


@pytest.mark.parametrize("group_size", [32, 7])
def test_muon_rows_match_memory_report_on_a_transformer(group_size):
    """Every mode, with and without gradient release (one release per optimizer)."""
    with torch.device("meta"):
        model = plan.tensors_from_module(TinyLM(), "TinyLM")
    for setup in _muon_setups():
        planned = plan.setup_bytes(setup, model, group_size)
        reports, releases, frozen = _real_memory(setup, group_size, TinyLM, _tiny_lm_batch())
        assert len(reports) == 2  # Muon and AdamW
        assert planned.pop(plan.FROZEN) == frozen == 0
        _assert_plan_is_real(planned, reports, releases, setup.label)


def _hf_configs():
    transformers = pytest.importorskip("transformers", reason="needs transformers")
    small = dict(vocab_size=300)
    return {
        # GPT-2 ties lm_head to the token embedding; its matrices are Conv1D weights.
        "gpt2": transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, n_positions=64, **small),
        # Llama's head is untied (a separate lm_head), with grouped-query attention.
        "llama": transformers.LlamaConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
            **small,
        ),
    }


@pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="needs transformers")
@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_muon_rows_match_memory_report_on_hugging_face_models(name, tmp_path, capsys):
    """``plan --hf-config``'s Muon rows in every mode against a real Muon + AdamW pair
    after a step of the real model (a language-model loss)."""
    import transformers

    config = _hf_configs()[name]
    config.save_pretrained(tmp_path)
    args = ["plan", "--hf-config", str(tmp_path), "--json", "--all-modes"]
    status, out, err = run_main(capsys, *args, "--optimizers", "muon")
    assert status == 0, err
    rows = {r["setup"]["label"]: r for r in json.loads(out)["setups"]}
    assert len(rows) == 2 + 12  # the torch rows and six Muon modes, each +release

    def build():
        return transformers.AutoModelForCausalLM.from_config(config)

    tokens = torch.randint(0, 300, (2, 16))

    class LanguageModel(nn.Module):  # _real_memory's loss: the logits' mean square
        def __init__(self):
            super().__init__()
            self.model = build()

        def forward(self, tokens):
            return self.model(tokens).logits

    for setup in _muon_setups():
        planned = dict(rows[setup.label]["bytes"])
        reports, releases, _ = _real_memory(setup, 32, LanguageModel, tokens)
        assert planned.pop(plan.FROZEN) == 0
        _assert_plan_is_real(planned, reports, releases, f"{name} {setup.label}")


def test_a_bare_count_has_no_muon_row_and_says_why(capsys):
    """Muon's split needs shapes: asked for, it is an error naming the inputs that have
    them; by default its rows are left out with a note (table and JSON)."""
    status, _, err = run_main(capsys, "plan", "7B", "--optimizers", "muon,adamw")
    assert status == 2
    assert "--optimizers muon: Muon is not planned for a bare parameter count" in err
    assert "--module, --hf-config or a model name" in err
    status, out, _ = run_main(capsys, "plan", "7B")
    assert status == 0
    assert "  Muon " not in out and "AdamW 24/8" in out
    assert "Muon is not planned for a bare parameter count" in out
    assert max(len(line) for line in out.splitlines()) <= 100
    status, out, _ = run_main(capsys, "plan", "350M", "--json")
    planned = json.loads(out)
    assert planned["notes"] == [plan.MUON_NEEDS_SHAPES]
    assert not [r for r in planned["setups"] if r["setup"]["optimizer"] == "muon"]
    setup = plan.Setup("Muon 24/8", "slimoptim", "muon")
    with pytest.raises(CommandError, match="bare parameter count"):
        plan.setup_bytes(setup, plan.tensors_from_count(7_000_000_000))


def test_muon_over_gpus_keeps_the_matrices_whole():
    """FSDP shards the AdamW part over the GPUs; Muon's matrices (Newton-Schulz needs them
    whole) are held whole on each GPU. Muon +release has no row there (it would step
    before the data-parallel all-reduce)."""
    with torch.device("meta"):
        model = plan.tensors_from_module(TinyLM(), "TinyLM")
    world = 4
    for setup in _muon_setups(plan.DEFAULT_MODES):
        if setup.gradient_release:
            assert plan.unplanned(setup, model, world) == plan.MUON_RELEASE_SHARDED
            continue
        (muon, adamw), _, _ = _real_memory(setup, 32, TinyLM, _tiny_lm_batch())
        planned = plan.setup_bytes(setup, model, world_size=world)
        assert planned.pop(plan.FROZEN) == 0
        expected = {k: muon["bytes"][k] + adamw["bytes"][k] / world for k in muon["bytes"]}
        assert planned == pytest.approx(expected, rel=1e-12), setup.label
    built = plan.build_plan(model, _muon_setups(plan.DEFAULT_MODES), world_size=world)
    assert [r["setup"]["label"] for r in built["setups"]] == ["Muon 24/8", "Muon none/8"]
    assert built["notes"] == [plan.MUON_WHOLE, plan.MUON_RELEASE_SHARDED]
    one_gpu = plan.build_plan(model, _muon_setups(plan.DEFAULT_MODES))
    assert one_gpu["notes"] == [plan.MUON_TWO_BUCKETS] and len(one_gpu["setups"]) == 4


def test_muon_rows_in_the_table(capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    for extra in ([], ["--world-size", "4", "--gpu-memory", "1KB"]):
        status, out, err = run_main(capsys, "plan", "--module", "test_plan_muon:TinyLM", *extra)
        assert status == 0, err
        lines = out.splitlines()
        heading = lines.index("slimoptim Muon (hidden matrices) + AdamW (the rest), bf16 weights:")
        assert lines[heading + 1].startswith("  Muon 24/8 ")
        assert lines[heading + 2].startswith("  Muon none/8 ")
        assert max(len(line) for line in lines) <= 100
        row = lines[heading + 1].split()
        if extra:  # ... +release, "fits?" as "no / -": no release row over 4 GPUs
            assert row[-4:] == ["-", "no", "/", "-"]
            assert "Muon's matrices are not sharded" in out
        else:
            assert float(row[-1]) <= float(row[-3])  # +release total: a tiny model is one bucket
            assert "not sharded" not in out
