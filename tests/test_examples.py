"""Every script in examples/ runs to completion on CPU, and its loss falls (it checks)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# example -> packages it needs beyond slimoptim's own dependencies
EXAMPLES = {
    "plain_loop.py": [],
    "accelerate_fsdp2.py": ["accelerate"],  # FSDP2 on GPUs; unsharded on a CPU
    "hf_trainer.py": ["transformers", "accelerate"],  # Trainer needs accelerate
    "lightning_module.py": ["lightning"],
    "muon_transformer.py": [],
}
# what each example prints about its optimizer's state (default: AdamW at 24/8)
STATE_LINE = {"muon_transformer.py": "Muon optimizer state: 2.06 bytes/param"}


def test_every_example_is_listed():
    assert sorted(p.name for p in (REPO / "examples").glob("*.py")) == sorted(EXAMPLES)


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_example_runs(name):
    for package in EXAMPLES[name]:
        pytest.importorskip(package)
    path = str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")
    # One thread: these tiny models run faster that way on a busy 2-core machine.
    env = dict(os.environ, PYTHONPATH=path, OMP_NUM_THREADS="1")
    result = subprocess.run(
        [sys.executable, str(REPO / "examples" / name)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert STATE_LINE.get(name, "optimizer state: 3.13 bytes/param") in result.stdout
    if name == "hf_trainer.py":  # Trainer's own no-decay grouping, checked by the script
        assert "weight decay on 10 tensors, none on 18 (biases and norms)" in result.stdout
