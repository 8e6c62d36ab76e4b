"""The ``slimoptim`` command line: demo, plan, and their errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import slimoptim
from slimoptim import plan
from slimoptim.cli import main

REPO = Path(__file__).resolve().parents[1]
TINY_DEMO = ["demo", "--size", "tiny", "--steps", "16"]


@pytest.fixture(autouse=True)
def one_thread():
    """One CPU thread here and in subprocesses: the tiny demo runs several times faster on
    a busy 2-core machine, and runs in and out of process compute the same way."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run_cli(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    """``python -m slimoptim ARGS`` in a fresh process, importing this checkout."""
    path = str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")
    env = dict(os.environ, PYTHONPATH=path, OMP_NUM_THREADS="1")
    return subprocess.run(
        [sys.executable, "-m", "slimoptim", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def run_main(capsys, *args: str) -> tuple[int, str, str]:
    """``main(args)`` in this process: (exit status, stdout, stderr); argparse exits too."""
    try:
        status = main(list(args))
    except SystemExit as exit_:
        status = exit_.code
    out, err = capsys.readouterr()
    return status, out, err


# ------------------------------------------------------------------- demo


def test_help_lists_both_commands():
    result = run_cli("--help")
    assert result.returncode == 0
    assert "demo" in result.stdout and "plan" in result.stdout
    assert "slimoptim plan 7B --gpu-memory 80GB" in result.stdout


def test_demo_learns_writes_results_and_repeats_exactly(tmp_path, capsys):
    first = run_cli(*TINY_DEMO, "--out", str(tmp_path / "a"))
    assert first.returncode == 0, first.stderr
    assert "torch AdamW fp32 + bf16 autocast" in first.stdout
    assert "slimoptim AdamW 24/8" in first.stdout
    assert (tmp_path / "a" / "loss_curves.png").stat().st_size > 10_000
    results = json.loads((tmp_path / "a" / "results.json").read_text())
    assert [r["label"] for r in results["runs"]] == [
        "torch AdamW fp32 + bf16 autocast",
        "slimoptim AdamW 24/8",
    ]
    for run in results["runs"]:
        start, end = run["validation_curve"][0][1], run["final_validation_loss"]
        assert start > 5.0 and end < start - 1.0  # from ~ln(256) = 5.5 down: it learns
        assert len(run["train_loss"]) == 16 and run["tokens_per_second"] > 0
    baseline, slim = (r["memory_report"] for r in results["runs"])
    assert baseline["total_bytes_per_param"] == pytest.approx(16, abs=0.1)
    assert slim["total_bytes_per_param"] == pytest.approx(7.13, abs=0.05)

    # Same command, same machine: the same losses, bit for bit (this time in-process).
    status, _, _ = run_main(capsys, *TINY_DEMO, "--out", str(tmp_path / "b"), "--no-plot")
    assert status == 0
    again = json.loads((tmp_path / "b" / "results.json").read_text())
    for one, two in zip(results["runs"], again["runs"], strict=True):
        assert one["train_loss"] == two["train_loss"]
        assert one["validation_curve"] == two["validation_curve"]
    assert not (tmp_path / "b" / "loss_curves.png").exists()


def test_demo_other_optimizers_modes_and_release(tmp_path, capsys):
    args = ["demo", "--size", "tiny", "--steps", "3", "--no-plot", "--out", str(tmp_path)]
    args += ["--optimizers", "sgd,lion", "--master-weight-bits", "none", "--state-bits", "32"]
    args += ["--gradient-release"]
    status, out, err = run_main(capsys, *args)
    assert status == 0, err
    runs = json.loads((tmp_path / "results.json").read_text())["runs"]
    assert [r["label"] for r in runs] == [
        "torch AdamW fp32 + bf16 autocast",
        "slimoptim SGD none/32 +release",
        "slimoptim Lion none/32 +release",
    ]
    for run in runs[1:]:
        bytes_ = run["memory_report"]["bytes"]
        assert bytes_["grads"] == 0 and bytes_["master_correction"] == 0  # released, no master
        assert run["memory_report"]["bytes_per_param"]["states"] == 4  # one fp32 state


def test_demo_seed_changes_the_run(tmp_path, capsys):
    base = ["demo", "--size", "tiny", "--steps", "2", "--no-plot"]
    run_main(capsys, *base, "--out", str(tmp_path / "a"))
    run_main(capsys, *base, "--out", str(tmp_path / "b"), "--seed", "1")
    losses = [
        json.loads((tmp_path / d / "results.json").read_text())["runs"][0]["train_loss"]
        for d in "ab"
    ]
    assert losses[0] != losses[1]


@pytest.mark.parametrize(
    "args, message",
    [
        (["demo", "--device", "tpu"], "unknown device 'tpu'"),
        (["demo", "--steps", "0"], "must be at least 1"),
        (["demo", "--size", "huge"], "invalid choice: 'huge'"),
        (["demo", "--optimizers", "adam"], "expected a comma-separated list of adamw, sgd, lion"),
        (["demo", "--master-weight-bits", "16"], "24, 32, none"),
        (["plan"], "one of the arguments"),
        (["plan", "lots"], "parameter count (7e9, 1.1B, 350M)"),
        (["plan", "7B", "--gpu-memory", "plenty"], "expected a size such as 80GB"),
        (["plan", "7B", "--world-size", "0"], "must be at least 1"),
        (["plan", "--module", "no_such_module:build"], "cannot import no_such_module"),
        (["plan", "--module", "torch"], "expected PKG.MOD:FACTORY"),
        (["plan", "--hf-config", "/no/such/config.json"], "no such file"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
        (["demo", "--out", str(Path(__file__))], "cannot create the output folder"),
    ],
)
def test_bad_arguments_fail_clearly(capsys, args, message):
    status, out, err = run_main(capsys, *args)
    assert status == 2
    assert message in err
    assert "Traceback" not in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_demo_on_cuda_without_a_gpu_says_so(capsys):
    status, _, err = run_main(capsys, "demo", "--device", "cuda")
    assert status == 2 and "CUDA is not available" in err


# ------------------------------------------------------------------- plan


@pytest.mark.parametrize(
    "text, count",
    [("7e9", 7_000_000_000), ("1.1B", 1_100_000_000), ("350M", 350_000_000), ("125k", 125_000)],
)
def test_parse_count(text, count):
    assert plan.parse_count(text) == count


def test_parse_memory():
    assert plan.parse_memory("80GB") == 80_000_000_000
    assert plan.parse_memory("24GiB") == 24 * 2**30
    assert plan.parse_memory("1.5e9") == 1_500_000_000


class Odd(nn.Module):
    """Tensor sizes that leave partial scale groups, a tied weight and a kept-fp32 BatchNorm."""

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


def _real_memory(setup: plan.Setup, group_size: int) -> tuple[dict, object]:
    """memory_report of a real optimizer after one step of ``setup`` on Odd."""
    torch.manual_seed(0)
    model = Odd()
    if setup.library == "slimoptim" or setup.pure_bf16:
        slimoptim.cast_model(model)
    params = [p for p in model.parameters() if p.requires_grad]
    if setup.library == "torch":
        optimizer = torch.optim.AdamW(params)
    else:
        cls = getattr(slimoptim, plan.OPTIMIZER_CLASSES[setup.optimizer])
        optimizer = cls(
            params,
            master_weight_bits=setup.master_weight_bits,
            state_bits=setup.state_bits,
            group_size=group_size,
            **plan.SLIM_EXTRA_ARGS[setup.optimizer],
        )
    release = None
    if setup.gradient_release:
        release = slimoptim.enable_gradient_release(model, optimizer)
    model(torch.randint(0, 37, (8,))).float().square().mean().backward()
    if release is None:
        optimizer.step()
    return slimoptim.memory_report(optimizer), release


@pytest.mark.parametrize("group_size", [32, 7])
def test_plan_matches_memory_report_byte_for_byte(group_size):
    with torch.device("meta"):
        meta = Odd()
    model = plan.tensors_from_module(meta, "Odd")
    assert model.num_params == sum(p.numel() for p in Odd().parameters() if p.requires_grad)
    assert model.frozen_params == 12
    assert any(dtype == torch.float32 for _, dtype in model.slim)  # BatchNorm kept fp32
    for setup in plan.all_setups():
        planned = plan.setup_bytes(setup, model, group_size)
        real, release = _real_memory(setup, group_size)
        if release is None:
            assert planned == real["bytes"], setup.label
        else:
            # Released gradients are gone after backward; the plan counts those in flight.
            assert {k: v for k, v in planned.items() if k != "grads"} == {
                k: v for k, v in real["bytes"].items() if k != "grads"
            }, setup.label
            assert real["bytes"]["grads"] == 0
            assert 0 < release.max_bucket_bytes <= planned["grads"]
            release.remove()


def test_plan_module_from_the_command_line(tmp_path):
    (tmp_path / "my_models.py").write_text(
        "from torch import nn\n\ndef build():\n    return nn.Sequential(nn.Linear(100, 300), "
        "nn.ReLU(), nn.Linear(300, 10))\n"
    )
    result = run_cli(
        "plan", "--module", "my_models:build", "--world-size", "2", "--json", cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["num_params"] == 100 * 300 + 300 + 300 * 10 + 10
    assert out["num_tensors"] == 4 and out["world_size"] == 2
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
    fp32 = rows["torch AdamW, fp32 master weights"]
    assert fp32[-7:] == ["112.00", "16.00", "-", "-", "no", "/", "-"]
    slim = rows["AdamW 24/8"]
    assert slim[-7:] == ["49.88", "7.13", "35.91", "5.13", "yes", "/", "yes"]
    assert "Not included: activations" in out


def test_plan_hf_config(tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
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
    assert row["bytes"] == slimoptim.memory_report(optimizer)["bytes"]


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
