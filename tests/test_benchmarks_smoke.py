"""Smoke tests of the quality and memory benchmarks on tiny settings on the CPU.

The real studies run on a GPU (docs/quality.md); these check that the scripts run end to
end, write what they promise, and that the state-code study's own codes behave as the
formats they stand for.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import quality_codes  # noqa: E402

LN_256 = math.log(256)  # the loss of a uniform guess over bytes
NEEDS_SKLEARN = pytest.mark.skipif(
    importlib.util.find_spec("sklearn") is None,
    reason="the vision study needs scikit-learn (pip install scikit-learn)",
)
# matplotlib is in the slimoptim[cli] extra, not a dependency of the library.
NEEDS_MATPLOTLIB = pytest.mark.skipif(
    importlib.util.find_spec("matplotlib") is None,
    reason="the quality report's plots need matplotlib (pip install 'slimoptim[cli]')",
)
NEEDS_TRANSFORMERS = pytest.mark.skipif(
    importlib.util.find_spec("transformers") is None,
    reason="the Llama memory benchmark needs transformers (pip install transformers)",
)


def spiked_states(groups: int = 64, steps: int = 30, seed: int = 0):
    """AdamW states (betas 0.9, 0.95) after one large gradient on the first element of each
    group of 32 at step 1, then ``steps`` steps of small gradients everywhere: v of the
    spiked element stays large long after its momentum has decayed (a heavy-tailed group)."""
    gen = torch.Generator().manual_seed(seed)
    m = torch.zeros(groups * 32)
    v = torch.zeros(groups * 32)
    for step in range(steps + 1):
        g = torch.randn(groups * 32, generator=gen) * 1e-3
        if step == 0:
            g[::32] = 30.0
        m = 0.9 * m + 0.1 * g
        v = 0.95 * v + 0.05 * g * g
    return m, v, steps + 1


def test_flashoptim_format_explodes_where_slimoptim_stays_bounded():
    m, v, step = spiked_states()
    hyper = dict(step=step, beta1=0.9, beta2=0.95, eps=1e-8)
    exact = quality_codes.adam_direction(m, v, **hyper).abs().max()
    assert exact < 5  # float32 states: a bounded Adam update
    m_hat, v_hat, floor = quality_codes.slimoptim_codes(m, v, step)
    slim = quality_codes.adam_direction(m_hat, v_hat, floor=floor, **hyper).abs().max()
    m_hat, v_hat, _ = quality_codes.flashoptim_codes(m, v, step)
    flash = quality_codes.adam_direction(m_hat, v_hat, **hyper).abs().max()
    # The small elements' sqrt(v) is under 1/510 of their group's (the spike's): the
    # linear root code decodes it to 0 while their momentum keeps a code: update m / eps.
    assert flash > 1e3
    assert slim < 2 * exact
    assert quality_codes.heavy_groups(v).all()


def test_codes_reconstruct_gaussian_states():
    gen = torch.Generator().manual_seed(1)
    m = torch.randn(32 * 512, generator=gen) * 1e-3
    v = (torch.randn(32 * 512, generator=gen) * 1e-3) ** 2 + 1e-8
    for name, codec in quality_codes.CODECS.items():
        m_hat, v_hat, _ = codec(m, v, 7)
        m_err = ((m_hat - m).norm() / m.norm()).item()
        v_err = ((v_hat - v).norm() / v.norm()).item()
        assert m_err < 0.05, (name, m_err)
        assert v_err < 0.1, (name, v_err)
        # Each code is a different function of the state: never the identity.
        assert m_err > 1e-4, (name, m_err)


def _adamw_steps(params, steps: int, betas, seed: int):
    """Yield (optimizer, step) with fresh random gradients set, before each torch AdamW step."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(params, lr=1e-3, betas=betas, eps=1e-8, weight_decay=0.0)
    for step in range(1, steps + 1):
        for p in params:
            # heavy-tailed gradients: a few elements a thousand times the rest
            p.grad = torch.randn(p.shape, generator=gen) * 1e-3
            p.grad[torch.rand(p.shape, generator=gen) < 0.01] *= 1000
        yield opt, step
        opt.step()


def test_carried_states_follow_torch_adamw_and_code_every_step():
    params = [torch.nn.Parameter(torch.zeros(32 * 40)), torch.nn.Parameter(torch.zeros(7, 33))]
    own = quality_codes.CarriedStates()  # the run's betas: the shadow is torch's states
    default = quality_codes.CarriedStates((0.9, 0.999))
    for opt, step in _adamw_steps(params, 12, (0.9, 0.95), seed=3):
        own.observe(opt, step)
        default.observe(opt, step)
    m, v, _ = own.states["fp32", 0]
    other_v = default.states["fp32", 0][1]
    for p, offset, numel in own.slots[0]:
        state, cut = opt.state[p], slice(offset, offset + numel)
        # the same float32 operations as torch's AdamW: the same bits
        assert torch.equal(m[cut], state["exp_avg"].reshape(-1))
        assert torch.equal(v[cut], state["exp_avg_sq"].reshape(-1))
        assert not torch.equal(other_v[cut], v[cut])  # other betas, other v
    assert own.slots[0][1][1] == 32 * 40  # whole groups of 32 per param
    assert m.numel() == 32 * 40 + 8 * 32 and (m[32 * 40 + 231 :] == 0).all()  # 7 x 33 padded
    for carried in (own, default):
        result = carried.measure(opt, 12)
        assert result["elements"] == sum(p.numel() for p in params)
        assert [n for n in quality_codes.FORMATS if n in result] == ["slimoptim", "flashoptim"]
        for name in quality_codes.CARRIED_FORMATS:
            errors = result[name]
            # carried codes drift from the shadow but stay close; never exact
            assert 1e-4 < errors["momentum_error"] < 0.2, (carried.label(), name, errors)
            assert 0 < errors["variance_error"] < 0.3, (carried.label(), name, errors)
        assert result["slimoptim"]["zero_v_nonzero_m"] == 0


def test_flashoptim_fp16_scale_flushes_tiny_states():
    m = torch.full((32,), 1e-9)  # below fp16's smallest subnormal (6e-8)
    v = torch.full((32,), 1e-20)
    m_hat, v_hat, _ = quality_codes.flashoptim_codes(m, v, 1)
    assert (m_hat == 0).all() and (v_hat == 0).all()
    m_hat, v_hat, _ = quality_codes.slimoptim_codes(m, v, 1)  # bf16 scales keep them
    assert torch.allclose(m_hat, m, rtol=0.02) and torch.allclose(v_hat, v, rtol=0.15)


@NEEDS_MATPLOTLIB
def test_quality_study_tiny_runs_merges_and_reports(tmp_path):
    import quality

    out, plots = tmp_path / "quality.json", tmp_path / "plots"
    common = ["--size", "tiny", "--steps", "4", "--finetune-steps", "2", "--out", str(out)]
    common += ["--plots", str(plots), "--code-every", "2"]
    quality.main([*common, "--seeds", "0", "--only", "adamw_24_8,lion_24_8,sgd_24_8,ft_24_8"])
    summary = quality.main([*common, "--seeds", "1", "--only", "adamw_24_8"])
    runs = {(r["name"], r["seed"]): r for r in summary["runs"]}
    # ft_24_8 starts from a pre-trained adamw_fp32, which the study trains first.
    expected = {"adamw_fp32", "adamw_24_8", "lion_24_8", "sgd_24_8"}
    assert {name for name, _ in runs} == expected | {"ft_24_8"}
    assert ("adamw_24_8", 1) in runs and ("adamw_24_8", 0) in runs  # merged, not replaced
    for run in summary["runs"]:
        assert math.isfinite(run["final_validation_loss"])
        assert (
            run["final_validation_loss"] < run["validation_curve"][0][1] or run["name"] == "ft_24_8"
        )
    assert runs[("adamw_fp32", 0)]["validation_curve"][0][1] < LN_256 + 0.5  # a fresh model
    # Fine-tuning is scored on the slice it trains on; the other half is recorded beside.
    ft = runs[("ft_24_8", 0)]
    assert ft["improvement"] == ft["validation_curve"][0][1] - ft["validation_curve"][-1][1]
    assert len(ft["heldout_loss_start_end"]) == 2
    assert ft["heldout_loss_start_end"][0] != ft["validation_curve"][0][1]  # other windows
    codes = runs[("adamw_fp32", 0)]["state_codes"]
    assert [c["step"] for c in codes] == [2, 4]
    for c in codes:
        assert 0 < c["slimoptim"]["momentum_error"] < 0.1
        assert c["slimoptim"]["max_update_over_lr"] < 10 * max(1.0, c["fp32"]["max_update_over_lr"])
        # carried with the run's betas and with torch's default ones
        assert [k["betas"] for k in c["carried"]] == ["group betas", "betas (0.9, 0.999)"]
        assert all(0 < k["slimoptim"]["momentum_error"] < 0.5 for k in c["carried"])
    saved = json.loads(out.read_text())
    assert saved["environment"]["commit"] and saved["settings"]["steps"] == 4
    report = out.with_suffix(".md").read_text()
    assert "slimoptim AdamW 24/8" in report and "8-bit codes" in report
    assert (plots / "quality_adamw.png").stat().st_size > 1000
    assert (plots / "quality_state_codes.png").exists()
    assert (plots / "quality_state_codes_carried1.png").exists()
    assert "carried step by step" in report


def test_quality_budget_skips_runs(tmp_path, capsys):
    import quality

    argv = ["--size", "tiny", "--steps", "3", "--seeds", "0,1", "--only", "adamw_fp32"]
    summary = quality.main([*argv, "--budget-s", "1e-6", "--out", str(tmp_path / "q.json"),
                            "--no-report"])  # fmt: skip
    # The first run has no estimate and runs; the second would pass the budget.
    assert [(r["name"], r["seed"]) for r in summary["runs"]] == [("adamw_fp32", 0)]
    assert "state_codes" in summary["runs"][0]  # the first fp32 AdamW run is probed
    argv += ["--seeds", "0", "--no-codes", "--out", str(tmp_path / "q2.json"), "--no-report"]
    assert "state_codes" not in quality.main(argv)["runs"][0]
    assert "skip adamw_fp32 seed 1" in capsys.readouterr().out


@NEEDS_SKLEARN
def test_vision_study_two_epochs(tmp_path):
    import quality_vision

    argv = "--seeds 0 --epochs 2 --only sgd_fp32,sgd_24_8 --no-plot".split()
    summary = quality_vision.main([*argv, "--out", str(tmp_path / "v.json")])
    fp32, slim = summary["runs"]
    assert fp32["test_accuracy"] > 0.7 and slim["test_accuracy"] > 0.7  # 10 classes: 0.1 by chance
    assert slim["test_loss"] == pytest.approx(fp32["test_loss"], rel=0.25)


@NEEDS_TRANSFORMERS
def test_llama_memory_dry_run_matches_planner(tmp_path):
    import llama8b_memory

    argv = "--dry-run --configs torch_adamw_bf16,slim_24_8_release --steps 2".split()
    summary = llama8b_memory.main([*argv, "--out", str(tmp_path / "l.json")])
    rows = {r["config"]: r for r in summary["rows"]}
    assert set(rows) == {"torch_adamw_bf16", "slim_24_8_release"}
    for name, row in rows.items():
        assert row["fits"] is True and math.isfinite(row["loss"])
        planned = summary["planned_bytes"][name]
        assert row["held_bytes"] == pytest.approx(planned, rel=0.02), name
    # torch AdamW on bf16 holds 8 bytes/param (param, grad, two states), slimoptim ~7.1 here
    # (the tiny model's gradients fit in one release bucket, so all are held at once).
    assert rows["slim_24_8_release"]["held_bytes"] < 0.92 * rows["torch_adamw_bf16"]["held_bytes"]
    assert (tmp_path / "l.md").read_text().count("| yes |") == 2


def test_muon_quality_setups_tiny(tmp_path):
    """The Muon comparison's four setups train (3 steps, tiny model) and are summarised
    against torch's."""
    import muon_quality  # noqa: PLC0415

    setups = ",".join(muon_quality.SETUPS)
    argv = ["--device", "cpu", "--size", "tiny", "--steps", "3", "--seeds", "0"]
    summary = muon_quality.main([*argv, "--setups", setups, "--out", str(tmp_path)])
    for setup in muon_quality.SETUPS:
        assert math.isfinite(summary[setup]["mean"]) and summary[setup]["mean"] < 6.0
        if setup != "torch":
            gap = summary[f"{setup}_minus_torch"]
            assert gap == summary[setup]["mean"] - summary["torch"]["mean"]
    assert (tmp_path / "muon_quality_tiny.json").exists()


def test_lion_sign_flips_three_steps(tmp_path):
    import lion_sign_flips

    result = lion_sign_flips.main(["--steps", "3", "--out", str(tmp_path)])
    rates = result["flip_rate"]
    assert set(rates) == set(lion_sign_flips.VARIANTS)
    for series in rates.values():
        assert len(series) == 3 and series[0] == 0.0  # step 1: every state starts at zero
        assert all(0.0 <= r < 0.5 for r in series)
    assert (tmp_path / "lion_sign_flips_lr0.001.json").exists()


def test_end_to_end_interleaved_on_cpu(tmp_path):
    """The end-to-end benchmark builds every optimizer and times them round by round."""
    import subprocess

    only = "torch_adamw_bf16,slimoptim_adamw,slimoptim_adamw_release"
    subprocess.run(
        [sys.executable, "end_to_end.py", "--only", only, "--out", str(tmp_path)],
        cwd=BENCHMARKS,
        check=True,
        capture_output=True,
    )
    (report,) = tmp_path.glob("end_to_end_*.json")
    runs = json.loads(report.read_text())["runs"]
    assert list(runs) == only.split(",")
    for run in runs.values():
        assert len(run["step_ms_all"]) == 2 and all(ms > 0 for ms in run["step_ms_all"])


def test_host_time_runs_every_case_on_the_cpu_with_launches_stubbed(monkeypatch):
    """benchmarks/host_time.py --cpu, small: every gradient case times slimoptim's host
    path (the kernels' plan built, not the reference path), and --parts names its pieces."""
    pytest.importorskip("triton")
    import host_time  # noqa: PLC0415

    import slimoptim.kernels.dispatch as dispatch  # noqa: PLC0415
    import slimoptim.optimizers.base as base  # noqa: PLC0415

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    launched = []
    monkeypatch.setattr(dispatch, "launch_plan", lambda plan, *a, **k: launched.append(plan))
    monkeypatch.setattr(base, "check_fused_devices", lambda items: None)
    out = host_time.host_time(counts=(3, 5), numel=64, repeats=2, only="slimoptim", device="cpu")
    assert set(out) == {"slimoptim AdamW 24/8" + case for case in host_time.CASES}
    assert all(t > 0 for times in out.values() for t in times.values())
    assert len(launched) == 2 * len(host_time.CASES) * 5  # every step went to the kernels
    parts = host_time.check_parts(n=8, numel=64, device="cpu", repeats=2)
    assert parts["p.grad"] > 0 and parts["layout guard"] > 0


@pytest.mark.parametrize("pattern", ["SGD-m / Lion 24/8", "AdamW 32/8", "AdamW none/8"])
def test_stream_bound_twin_moves_every_stream(monkeypatch, pattern):
    """benchmarks/stream_bound.py's twin kernel (interpreter, CPU): every stream it claims
    to move is read and written as its docstring says, tile for tile, scales per group."""
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    import stream_bound  # noqa: PLC0415

    code_bytes, n_states = stream_bound.PATTERNS[pattern]
    n = 4 * 128  # 2 programs of 2 tiles of 128
    bufs = stream_bound.twin_buffers(n, code_bytes, n_states, "cpu")
    before = {k: v.clone() for k, v in bufs.items()}
    stream_bound.launch_twin(bufs, code_bytes, n_states, block=128, warps=1, tiles=2)
    g = before["g"]
    assert torch.equal(bufs["p"], before["p"] + g) and torch.equal(bufs["g"], g)
    if code_bytes:
        assert torch.equal(bufs["c"], (before["c"] ^ g.to(bufs["c"].dtype)) + 1)
    for i in range(n_states):
        for name in (f"s{i}", f"s{i}_scale"):
            assert torch.equal(bufs[name], before[name] + 1), name
    assert stream_bound.bytes_moved(n, 1, 2) == n * 12 + n // 32 * 8  # AdamW 24/8: 12.25 B
