"""``slimoptim plan``: its figures against real optimizers, frozen weights, the table."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_cli import run_main  # main(args) in this process: (status, stdout, stderr)
from torch import nn

import slimoptim
from slimoptim import plan
from slimoptim.cli_common import PLAN_OPTIMIZERS, CommandError, optimizer_class

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "text, count",
    [("7e9", 7_000_000_000), ("1.1B", 1_100_000_000), ("350M", 350_000_000), ("125k", 125_000)],
)
def test_parse_count(text, count):
    assert plan.parse_count(text) == count


def test_parse_count_refuses_numbers_that_are_no_count():
    assert plan.parse_count("llama") is None  # a model name: not a number at all
    for text in ("0", "0.4", "-5B", "1e400", "2e15"):
        with pytest.raises(CommandError, match="parameter"):
            plan.parse_count(text)


def test_parse_memory():
    assert plan.parse_memory("80GB") == 80_000_000_000
    assert plan.parse_memory("24GiB") == 24 * 2**30
    assert plan.parse_memory("1.5e9B") == 1_500_000_000


class Odd(nn.Module):
    """Tensor sizes that leave partial scale groups, a tied weight, a kept-fp32 BatchNorm
    and a frozen layer."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(37, 19)
        self.hidden = nn.Linear(19, 45)
        self.norm = nn.BatchNorm1d(45)
        self.back = nn.Linear(45, 19)
        self.out = nn.Linear(19, 37, bias=False)
        self.out.weight = self.embed.weight  # tied: counted once
        self.frozen = nn.Linear(3, 3)
        self.frozen.requires_grad_(False)

    def forward(self, tokens):
        x = self.embed(tokens)
        return self.out(self.back(torch.relu(self.norm(self.hidden(x)))))


def _real_optimizers(setup: plan.Setup, model: nn.Module, group_size: int) -> list:
    """The optimizers ``setup`` trains ``model`` with (cast as the setup casts it): one, or
    for Muon, Muon on the hidden matrices and AdamW on the rest, as a user would split."""
    if setup.library == "slimoptim" or setup.pure_bf16:
        slimoptim.cast_model(model)
    params = [p for p in model.parameters() if p.requires_grad]
    if setup.library == "torch":
        return [torch.optim.AdamW(params)]
    mode = dict(
        master_weight_bits=setup.master_weight_bits,
        state_bits=setup.state_bits,
        group_size=group_size,
    )
    if setup.optimizer == "muon":
        split = slimoptim.muon_param_groups(model)
        parts = [("muon", split.muon), ("adamw", split.adamw)]
    else:
        parts = [(setup.optimizer, params)]
    return [
        optimizer_class(name)(tensors, **mode, **PLAN_OPTIMIZERS[name].plan_arguments)
        for name, tensors in parts
        if tensors
    ]


def _real_memory(setup: plan.Setup, group_size: int, make_model=None, batch=None):
    """memory_report of each real optimizer after one step of ``setup`` on the model
    (default: Odd), the gradient-release handles (one per optimizer, or none) and the
    bytes of the frozen weights."""
    torch.manual_seed(0)
    model = (make_model or Odd)()
    optimizers = _real_optimizers(setup, model, group_size)  # casts the model first
    frozen = sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad)
    releases = []
    if setup.gradient_release:
        releases = [slimoptim.enable_gradient_release(model, o) for o in optimizers]
    tokens = batch if batch is not None else torch.randint(0, 37, (8,))
    model(tokens).float().square().mean().backward()
    if not releases:
        for optimizer in optimizers:
            optimizer.step()
    return [slimoptim.memory_report(o) for o in optimizers], releases, frozen


def _summed(reports: list[dict]) -> dict:
    return {k: sum(r["bytes"][k] for r in reports) for k in reports[0]["bytes"]}


def _assert_plan_is_real(planned: dict, reports: list, releases: list, label: str) -> None:
    """Every component byte for byte; with gradient release, the gradients still held
    (none after backward) and those in flight, at most the planned ones."""
    real = _summed(reports)
    if not releases:
        assert planned == real, label
        return
    assert {k: v for k, v in planned.items() if k != "grads"} == {
        k: v for k, v in real.items() if k != "grads"
    }, label
    assert real["grads"] == 0
    in_flight = sum(r.max_bucket_bytes for r in releases)
    assert 0 < in_flight <= planned["grads"], label
    for r in releases:
        r.remove()


@pytest.mark.parametrize("group_size", [32, 7])
def test_plan_matches_memory_report_byte_for_byte(group_size):
    """Every setup, Muon (+ AdamW) included: Odd's tied head and embedding and its BatchNorm
    go to AdamW, its two hidden matrices to Muon."""
    with torch.device("meta"):
        meta = Odd()
    model = plan.tensors_from_module(meta, "Odd")
    assert model.num_params == sum(p.numel() for p in Odd().parameters() if p.requires_grad)
    assert model.frozen_params == 12
    assert any(dtype == torch.float32 for _, dtype in model.slim)  # BatchNorm kept fp32
    assert sorted(s for s, m in zip(model.shapes, model.muon, strict=True) if m) == [
        (19, 45),
        (45, 19),
    ]
    setups = plan.all_setups()
    assert {s.optimizer for s in setups} == {"adamw", "sgd", "lion", "muon"}
    for setup in setups:
        planned = plan.setup_bytes(setup, model, group_size)
        reports, releases, frozen = _real_memory(setup, group_size)
        assert len(reports) == (2 if setup.optimizer == "muon" else 1)
        assert planned.pop(plan.FROZEN) == frozen, setup.label  # 12 x 4 or 12 x 2 bytes
        _assert_plan_is_real(planned, reports, releases, setup.label)


def lora_like(hidden: int = 512, layers: int = 4) -> nn.Module:
    """A frozen base and a small trainable head, as in LoRA-style fine-tuning."""
    base = nn.Sequential(*[nn.Linear(hidden, hidden) for _ in range(layers)])
    base.requires_grad_(False)
    return nn.Sequential(base, nn.Linear(hidden, 8))


def test_frozen_weights_count_in_the_totals_and_the_verdict():
    with torch.device("meta"):
        model = plan.tensors_from_module(lora_like(), "lora")
    frozen = 4 * (512 * 512 + 512)
    assert model.frozen_params == frozen and model.num_params == 512 * 8 + 8
    # The frozen bf16 weights alone are 2 bytes x 1.05M = 2.1 MB: nothing fits in 2 MB.
    planned = plan.build_plan(model, plan.all_setups(), gpu_memory=2_000_000)
    assert planned["num_params"] == frozen + model.num_params
    for row in planned["setups"]:
        weight_bytes = 4 if row["setup"]["label"] == "torch AdamW, fp32" else 2
        assert row["bytes"][plan.FROZEN] == weight_bytes * frozen, row["setup"]["label"]
        assert row["total_bytes"] > weight_bytes * frozen
        assert row["fits"] is False, row["setup"]["label"]


def test_frozen_and_trainable_shown_in_the_header(tmp_path, capsys, monkeypatch):
    (tmp_path / "lora_models.py").write_text(
        "from torch import nn\n\n"
        "def build(hidden, layers=1):\n"
        "    base = nn.Sequential(*[nn.Linear(hidden, hidden) for _ in range(layers)])\n"
        "    base.requires_grad_(False)\n"
        "    return nn.Sequential(base, nn.Linear(hidden, 8))\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    args = ["plan", "--module", "lora_models:build", "--module-arg", "hidden=1024"]
    status, out, err = run_main(capsys, *args, "--module-arg", "layers=2", "--gpu-memory", "4MB")
    assert status == 0, err
    frozen, trainable = 2 * (1024 * 1024 + 1024), 1024 * 8 + 8
    assert f"{frozen + trainable:,} parameters in 6 tensors: {trainable:,} trainable, " in out
    assert f"{frozen:,} frozen." in out and "counted in weights, total and fits" in out
    assert "lora_models:build(hidden=1024, layers=2)" in out
    rows = [line.split() for line in out.splitlines() if line.startswith("  AdamW 24/8")]
    assert rows and rows[0][2] == "4.21"  # MB of weights, mostly the frozen ones in bf16
    assert rows[0][-3:] == ["no", "/", "no"]


def test_plan_module_from_the_command_line(tmp_path):
    (tmp_path / "my_models.py").write_text(
        "from torch import nn\n\ndef build():\n    return nn.Sequential(nn.Linear(100, 300), "
        "nn.ReLU(), nn.Linear(300, 10))\n"
    )
    path = str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")
    result = subprocess.run(
        [sys.executable, "-m", "slimoptim", "plan", "--module", "my_models:build"]
        + ["--world-size", "2", "--json"],
        cwd=tmp_path,
        env=dict(os.environ, PYTHONPATH=path),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["num_params"] == out["trainable_params"] == 100 * 300 + 300 + 300 * 10 + 10
    assert out["num_tensors"] == 4 and out["world_size"] == 2 and out["frozen_params"] == 0
    adamw = next(r for r in out["setups"] if r["setup"]["label"] == "AdamW 24/8")
    # 2 (bf16 weight) + 1 (int8 correction) + 2 (bf16 grad) + 2 (m, v) = 7 B/param, plus
    # one bf16 scale per 32 values for m and v (groups per tensor) and 4 B of step counters.
    groups = sum(-(-n // 32) for n in (30_000, 300, 3000, 10))
    expected = 7 * out["num_params"] + 2 * 2 * groups + 4 * 4
    assert adamw["total_bytes"] * 2 == expected
    assert adamw["bytes_per_param"] == pytest.approx(expected / out["num_params"])


def test_plan_table_and_fit(capsys):
    status, out, _ = run_main(capsys, "plan", "7B", "--gpu-memory", "80GB")
    assert status == 0
    rows = {line.strip().split("  ")[0]: line.split() for line in out.splitlines()}
    fp32 = rows["torch AdamW, fp32"]
    assert fp32[-6:] == ["112.00", "16.00", "-", "no", "/", "-"]
    slim = rows["AdamW 24/8"]
    assert slim[-6:] == ["49.88", "7.13", "35.91", "yes", "/", "yes"]
    assert "Not included: activations" in out
    assert "7,000,000,000 parameters, all trainable." in out
    # Default modes only; the full matrix behind --all-modes.
    assert "AdamW 32/32" not in rows and "AdamW none/8" in rows
    status, out, _ = run_main(capsys, "plan", "7B", "--all-modes", "--optimizers", "adamw")
    modes = [line.split()[1] for line in out.splitlines() if line.startswith("  AdamW ")]
    assert modes == ["24/8", "24/32", "32/8", "32/32", "none/8", "none/32"]


@pytest.mark.parametrize(
    "args",
    [
        ["7B", "--gpu-memory", "80GB"],
        ["1.5T", "--gpu-memory", "24GiB", "--world-size", "1024"],
        ["350M", "--all-modes", "--gpu-memory", "123.5GiB"],
        ["--module", "test_plan:lora_like", "--gpu-memory", "1GB", "--all-modes"],
    ],
)
def test_plan_fits_in_100_columns(capsys, monkeypatch, args):
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    status, out, err = run_main(capsys, "plan", *args)
    assert status == 0, err
    assert max(len(line) for line in out.splitlines()) <= 100


@pytest.mark.skipif(
    __import__("importlib").util.find_spec("transformers") is None,
    reason="needs transformers (a Hugging Face config)",
)
def test_plan_hf_config(tmp_path, capsys):
    import transformers

    config = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=500, n_positions=64)
    config.save_pretrained(tmp_path)
    status, out, err = run_main(capsys, "plan", "--hf-config", str(tmp_path), "--json")
    assert status == 0, err
    planned = json.loads(out)
    real = transformers.GPT2LMHeadModel(config)  # ties lm_head to the token embedding
    assert planned["num_params"] == sum(p.numel() for p in real.parameters())
    assert planned["num_tensors"] == len(list(real.parameters()))
    # Byte-exact against a real slimoptim AdamW after a step on the real model.
    slimoptim.cast_model(real)
    optimizer = slimoptim.AdamW(real.parameters())
    real(torch.randint(0, 500, (2, 16)), labels=torch.randint(0, 500, (2, 16))).loss.backward()
    optimizer.step()
    row = next(r for r in planned["setups"] if r["setup"]["label"] == "AdamW 24/8")
    assert {k: v for k, v in row["bytes"].items() if k != plan.FROZEN} == (
        slimoptim.memory_report(optimizer)["bytes"]
    )


def test_plan_world_size_shards_all_but_the_release_bucket():
    model = plan.tensors_from_count(7_000_000_000)
    adamw, released = (
        plan.Setup("a", "slimoptim", "adamw"),
        plan.Setup("b", "slimoptim", "adamw", gradient_release=True),
    )
    one, eight = plan.setup_bytes(adamw, model), plan.setup_bytes(adamw, model, world_size=8)
    assert eight == pytest.approx({k: v / 8 for k, v in one.items()})
    assert one["grads"] == 2 * 7_000_000_000
    for world_size in (1, 8):
        grads = plan.setup_bytes(released, model, world_size=world_size)["grads"]
        assert grads == plan.RELEASE_BUCKET_BYTES  # one bucket per GPU, not sharded
