"""The rules' in-kernel scalars (kernels/{adamw,sgd,lion}.py ``*_scalars``) against the
reference path's: bit for bit, over random hyper-parameters and steps."""

from __future__ import annotations

import numpy as np
import pytest
import torch

triton = pytest.importorskip("triton")
tl = triton.language

from slimoptim.kernels.dispatch import RULES  # noqa: E402
from slimoptim.kernels.launch import rule_powers  # noqa: E402
from slimoptim.optimizers.adamw import adam_scalars  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(
    DEVICE == "cpu" and __import__("os").environ.get("TRITON_INTERPRET") != "1",
    reason="Triton kernels run on CUDA or under TRITON_INTERPRET=1",
)


@triton.jit
def _scalars_kernel(hyper, steps, powers, out, SCALARS: tl.constexpr, N_VALUES: tl.constexpr,
                    N_OUT: tl.constexpr):  # fmt: skip
    t = tl.program_id(0)
    k = SCALARS(hyper + t * N_VALUES, tl.load(steps + t), powers + t * 2)
    for i in tl.static_range(N_OUT):
        tl.store(out + t * N_OUT + i, k[i])


def _groups(rng, n: int) -> list[dict]:
    """Random param groups: hyper-parameters of every magnitude users set."""
    groups = []
    for _ in range(n):
        beta1, beta2 = 1 - 10 ** rng.uniform(-4, -0.3, size=2)
        groups.append(
            {
                "lr": float(10 ** rng.uniform(-6, -1)),
                "betas": (float(beta1), float(beta2)),
                "eps": float(10 ** rng.uniform(-10, -6)),
                "weight_decay": float(rng.choice([0.0, 10 ** rng.uniform(-3, 0)])),
                "momentum": float(rng.choice([0.0, rng.uniform(0.5, 0.99)])),
                "dampening": float(rng.choice([0.0, rng.uniform(0, 0.5)])),
            }
        )
    return groups


def _kernel_scalars(rule, groups, steps, n_out: int):
    hyper = torch.tensor([rule.values(g) for g in groups], dtype=torch.float64, device=DEVICE)
    steps = torch.tensor(steps, dtype=torch.float64, device=DEVICE)
    powers = rule_powers(rule, hyper, steps)
    out = torch.full((len(groups), n_out), float("nan"), device=DEVICE)
    _scalars_kernel[(len(groups),)](
        hyper, steps, powers, out, SCALARS=rule.scalars, N_VALUES=len(rule.group_values),
        N_OUT=n_out,
    )  # fmt: skip
    return out.cpu()


def _steps(rng, n: int) -> list[float]:
    return [1.0, 2.0, *rng.integers(1, 200_000, size=n - 2).astype(float)]


def test_adamw_scalars_are_the_references():
    rng = np.random.default_rng(0)
    groups, steps = _groups(rng, 300), _steps(rng, 300)
    k = _kernel_scalars(RULES["adamw"], groups, steps, n_out=9)
    for i, (group, step) in enumerate(zip(groups, steps, strict=True)):
        beta1, beta2 = group["betas"]
        ref = adam_scalars(group["lr"], beta1, beta2, torch.tensor(step, device=DEVICE))
        lr, wd = group["lr"], group["weight_decay"]
        expected = [step, 1 - lr * wd, wd, 1 - beta1, beta2, 1 - beta2, group["eps"]]
        expected = torch.tensor(expected, dtype=torch.float64).float().tolist()
        expected += [ref["step_size"].item(), ref["inv_bias_correction2_sqrt"].item()]
        assert k[i].tolist() == expected, (group, step)


@pytest.mark.parametrize("name", ["sgd", "lion"])
def test_sgd_and_lion_scalars_are_their_values(name):
    rng = np.random.default_rng(1)
    rule = RULES[name]
    groups, steps = _groups(rng, 200), _steps(rng, 200)
    k = _kernel_scalars(rule, groups, steps, n_out=7)
    values = torch.tensor([rule.values(g) for g in groups], dtype=torch.float64)
    steps = torch.tensor(steps, dtype=torch.float64)
    if name == "sgd":  # (step, lr, momentum, 1 - dampening, wd, first step, 1 - momentum)
        columns = [steps, *values[:, :4].T, (steps == 1).double(), values[:, 4]]
    else:  # (step, the group's values in order)
        columns = [steps, *values.T]
    expected = torch.stack(columns, dim=1).float()
    assert torch.equal(k, expected)
    if name == "sgd":
        assert k[0, 5] == 1 and k[1:, 5].eq(0).all()  # step 1 and later steps
