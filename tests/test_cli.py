"""The ``slimoptim`` command line: the demo, the errors of both commands, and how the
command modules depend on each other (``tests/test_plan.py`` covers the plan)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import slimoptim
from slimoptim import demo
from slimoptim.cli import main
from slimoptim.demo_model import SIZES, ByteGPT

REPO = Path(__file__).resolve().parents[1]
TINY_DEMO = ["demo", "--size", "tiny", "--steps", "16"]
HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None


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
    plot = [] if HAS_MATPLOTLIB else ["--no-plot"]
    first = run_cli(*TINY_DEMO, *plot, "--out", str(tmp_path / "a"))
    assert first.returncode == 0, first.stderr
    results = json.loads((tmp_path / "a" / "results.json").read_text())
    compute = results["compute_dtype"]
    baseline = "torch AdamW fp32 + bf16 autocast" if compute == "bfloat16" else "torch AdamW fp32"
    assert [r["label"] for r in results["runs"]] == [baseline, "slimoptim AdamW 24/8"]
    assert f"compute: {compute} matmuls: " in first.stdout
    # Output to a pipe: a flushed line per evaluation (12 per run), not silence.
    for label in (baseline, "slimoptim AdamW 24/8"):
        progress = [line for line in first.stdout.splitlines() if line.startswith(f"  {label}:")]
        assert len(progress) == demo.EVAL_POINTS, first.stdout
        assert progress[-1].startswith(f"  {label}: step 16/16  validation loss ")
    for run in results["runs"]:
        start, end = run["validation_curve"][0][1], run["final_validation_loss"]
        assert start > 5.0 and end < start - 1.0  # from ~ln(256) = 5.5 down: it learns
        assert len(run["train_loss"]) == 16 and run["tokens_per_second"] > 0
        assert run["spec"]["compute_dtype"] == compute
    torch_report, slim = (r["memory_report"] for r in results["runs"])
    assert torch_report["total_bytes_per_param"] == pytest.approx(16, abs=0.1)
    assert slim["total_bytes_per_param"] == pytest.approx(7.13, abs=0.05)

    # Same command, same machine: the same losses, bit for bit (this time in-process; the
    # compute dtype as measured above, so that a noisy re-measurement cannot change it).
    again_args = [*TINY_DEMO, "--out", str(tmp_path / "b"), "--no-plot"]
    status, _, _ = run_main(capsys, *again_args, "--compute-dtype", compute)
    assert status == 0
    again = json.loads((tmp_path / "b" / "results.json").read_text())
    for one, two in zip(results["runs"], again["runs"], strict=True):
        assert one["train_loss"] == two["train_loss"]
        assert one["validation_curve"] == two["validation_curve"]
    assert not (tmp_path / "b" / "results.png").exists()


@pytest.mark.skipif(not HAS_MATPLOTLIB, reason="the plot needs matplotlib (slimoptim[cli])")
def test_demo_plot_has_loss_and_memory_panels(tmp_path, capsys):
    status, out, err = run_main(
        capsys,
        "demo",
        "--size",
        "tiny",
        "--steps",
        "4",
        "--out",
        str(tmp_path),
        "--compute-dtype",
        "float32",
    )
    assert status == 0, err
    image = tmp_path / "results.png"
    assert f"plot:    {image}" in out and image.stat().st_size > 10_000
    import matplotlib.image

    pixels = matplotlib.image.imread(image)
    assert pixels.shape[1] > 1.8 * pixels.shape[0]  # two panels side by side


def test_demo_without_matplotlib_says_what_to_install(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails as if absent
    status, out, err = run_main(capsys, "demo", "--size", "tiny", "--out", str(tmp_path))
    assert status == 2
    assert "pip install 'slimoptim[cli]'" in err and "--no-plot" in err
    assert "Traceback" not in err and out == ""  # refused before any training


def test_progress_without_tqdm_prints_lines(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "tqdm", None)
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)
    progress = demo.Progress("run", 40, bar=True)
    progress.step()
    progress.evaluated(20, 2.5, 1234.0)
    progress.close()
    assert "  run: step 20/40  validation loss 2.500  1,234 tokens/s" in capsys.readouterr().out


def test_compute_dtype_float32_where_bf16_matmuls_are_slow(monkeypatch):
    """A CPU without bf16 instructions (bf16 several times slower): float32 for both runs."""
    cpu, size = torch.device("cpu"), SIZES["tiny"]
    monkeypatch.setattr(demo, "bf16_matmul_ratio", lambda size: 8.0)
    dtype, why = demo.choose_compute_dtype("auto", cpu, size)
    assert dtype == torch.float32 and "8.0x the float32 time" in why
    monkeypatch.setattr(demo, "bf16_matmul_ratio", lambda size: 0.4)
    assert demo.choose_compute_dtype("auto", cpu, size)[0] == torch.bfloat16
    assert demo.choose_compute_dtype("float32", cpu, size)[0] == torch.float32
    ratio = demo.bf16_matmul_ratio(size)  # the real measurement: a finite positive ratio
    assert 0 < ratio < float("inf")


def test_bf16_model_computing_in_float32_matches_a_float32_copy():
    """bf16 weights with float32 matmuls: the loss of a float32 model holding the same
    (bf16-rounded) values, and bf16 gradients equal to that model's, rounded."""
    torch.manual_seed(0)
    size = SIZES["tiny"]
    slim = ByteGPT(size, compute_dtype=torch.float32)
    slimoptim.cast_model(slim)
    reference = ByteGPT(size)
    reference.load_state_dict({k: v.float() for k, v in slim.state_dict().items()})
    tokens = torch.randint(0, 256, (4, size.context + 1))
    loss, ref_loss = slim.loss(tokens), reference.loss(tokens)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-6)
    loss.backward()
    ref_loss.backward()
    for (name, p), ref in zip(slim.named_parameters(), reference.parameters(), strict=True):
        assert p.grad.dtype == torch.bfloat16, name
        if name in ("embed.weight", "position.weight"):
            # Embedding gradients accumulate repeated tokens in the weights' dtype (bf16).
            error = (p.grad.float() - ref.grad).norm() / ref.grad.norm()
            assert error < 1e-2, name
        else:  # the float32 gradient rounded once to bf16: within 2^-8 relative
            torch.testing.assert_close(p.grad.float(), ref.grad, rtol=2**-8, atol=1e-30)


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
        (["plan", "7B", "--gpu-memory", "80"], "has no unit: write 80GB (80e9 bytes) or 80GiB"),
        (["plan", "7B", "--gpu-memory", "0GB"], "must be a positive size"),
        (["plan", "1e400"], "too many parameters to plan for"),
        (["plan", "0"], "a parameter count must be at least 1"),
        (["plan", "-5B"], "counts and sizes must be positive"),
        (["plan", "7B", "--module-arg", "layers=2"], "--module-arg is for a --module factory"),
        (["plan", "--module", "torch.nn:Linear", "--module-arg", "24"], "expected KEY=VALUE"),
        (["plan", "--module", "torch.nn:Linear"], "pass its arguments with --module-arg"),
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
    assert err.strip().splitlines()[-1].startswith("slimoptim")  # ends in one clear line


def test_missing_hf_config_is_reported_as_such_without_transformers(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # as if not installed
    status, _, err = run_main(capsys, "plan", "--hf-config", "/no/such/config.json")
    assert status == 2 and "/no/such/config.json: no such file or folder" in err
    # An existing path still needs transformers, and says so.
    status, _, err = run_main(capsys, "plan", "--hf-config", os.devnull)
    assert status == 2 and "need transformers: pip install transformers" in err


def test_module_factory_that_raises_is_one_line(tmp_path, capsys, monkeypatch):
    (tmp_path / "broken_models.py").write_text("def build():\n    raise RuntimeError('boom')\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    status, _, err = run_main(capsys, "plan", "--module", "broken_models:build")
    assert status == 2 and "build() raised RuntimeError: boom" in err
    assert "Traceback" not in err


def test_closed_pipe_ends_quietly():
    """``slimoptim plan 1.5T --all-modes | head -1``: the reader leaves early."""
    path = str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")
    process = subprocess.Popen(
        [sys.executable, "-m", "slimoptim", "plan", "1.5T", "--all-modes"],
        cwd=REPO,
        env=dict(os.environ, PYTHONPATH=path),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    process.stdout.close()  # nobody reads: the first write fails with EPIPE
    err = process.stderr.read().decode()
    process.wait(timeout=120)
    assert "Traceback" not in err and "BrokenPipeError" not in err, err
    assert err == ""


def test_commands_do_not_import_the_command_line():
    """Dependencies point one way: cli imports demo and plan, never the reverse."""
    code = "import sys, slimoptim.demo, slimoptim.plan; print('slimoptim.cli' in sys.modules)"
    path = str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")
    result = subprocess.run(
        [sys.executable, "-c", code],
        env=dict(os.environ, PYTHONPATH=path),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.stdout.strip() == "False", result.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_demo_on_cuda_without_a_gpu_says_so(capsys):
    status, _, err = run_main(capsys, "demo", "--device", "cuda")
    assert status == 2 and "CUDA is not available" in err
