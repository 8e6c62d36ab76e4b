"""slimoptim's optimizers as OptimizerInfo-style entries, fed by torch's own test inputs.

torch ships its generic optimizer test inputs in ``torch.testing._internal.common_optimizers``
(``optim_db``: per optimizer, constructor inputs, inputs that must fail and LR-scheduler
sets). Each entry here pairs a slimoptim optimizer, a mode and a parameter dtype with
torch's entry for its twin (AdamW, Adam, SGD, Muon); Lion has no twin and gets inputs of
the same shape written here. Muon steps 2-D params only (as torch's): its entries get the
same problems with every tensor a matrix (``info.problem``, ``info.model``,
``info.shape``). ``tests/test_torch_contract*.py`` drive their tests from these.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch.optim.lr_scheduler import ConstantLR, ExponentialLR, ReduceLROnPlateau, StepLR

import slimoptim


def _import_torch_optim_db():
    """torch's module, imported without its test-suite side effect on torch.backends."""
    from torch.testing._internal import common_optimizers  # noqa: PLC0415 (needs expecttest)

    # common_utils freezes torch.backends flags for torch's own suite; other tests here
    # (Lightning's Trainer) set them, so unfreeze what the import froze.
    vars(torch.backends)["__allow_nonbracketed_mutation_flag"] = True
    return common_optimizers


common = _import_torch_optim_db()
OptimizerInput = common.OptimizerInput
ErrorOptimizerInput = common.ErrorOptimizerInput
TORCH_INFOS = {info.name: info for info in common.optim_db}

EXACT = {"master_weight_bits": 32, "state_bits": 32}
MODES = {"exact": EXACT, "default": {}}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def lion_inputs(device="cpu", dtype=None):
    """Lion's inputs in the shape torch gives the others (no torch twin to borrow from)."""
    return [
        OptimizerInput(params=None, kwargs={}, desc="default"),
        OptimizerInput(params=None, kwargs={"lr": 1e-3}, desc="non-default lr"),
        OptimizerInput(params=None, kwargs={"weight_decay": 0.1}, desc="nonzero weight_decay"),
        OptimizerInput(
            params=None, kwargs={"weight_decay": 0.1, "maximize": True}, desc="maximize"
        ),
        OptimizerInput(params=None, kwargs={"lr": torch.tensor(1e-3)}, desc="Tensor lr"),
        OptimizerInput(
            params=None,
            kwargs={"betas": (torch.tensor(0.95), torch.tensor(0.98))},
            desc="Tensor betas",
        ),
    ]


def lion_error_inputs(device="cpu", dtype=torch.float32):
    def bad(kwargs, desc, regex):
        return ErrorOptimizerInput(
            OptimizerInput(params=None, kwargs=kwargs, desc=desc),
            error_type=ValueError,
            error_regex=regex,
        )

    return common.get_error_inputs_for_all_optims(device, dtype) + [
        bad({"lr": -1e-3}, "negative lr", "Invalid learning rate: -0.001"),
        bad({"betas": (0.9, 1.5)}, "beta2 above 1", "Invalid beta parameter at index 1: 1.5"),
        bad({"weight_decay": -1}, "negative weight_decay", "Invalid weight_decay value: -1"),
        bad(
            {"betas": (0.9, torch.tensor(0.99))},
            "mixed betas",
            "betas must be either both floats or both Tensors",
        ),
    ]


LION_SCHEDULERS = (
    [lambda opt: StepLR(opt, gamma=0.9, step_size=10), lambda opt: ReduceLROnPlateau(opt)],
    [lambda opt: ExponentialLR(opt, gamma=0.9)],
    [lambda opt: ConstantLR(opt, factor=0.4, total_iters=4)],
)


@dataclasses.dataclass(frozen=True)
class SlimOptimizerInfo:
    """One slimoptim optimizer in one mode on one parameter dtype."""

    name: str
    mode: str
    dtype_name: str

    @property
    def id(self) -> str:
        return f"{self.name}-{self.mode}-{self.dtype_name}"

    @property
    def optim_cls(self):
        return getattr(slimoptim, self.name)

    @property
    def torch_cls(self):
        """The torch.optim twin, or None (Lion)."""
        return getattr(torch.optim, self.name, None)

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.dtype_name]

    @property
    def torch_info(self):
        return TORCH_INFOS.get(self.name)

    def inputs(self) -> list:
        """Fresh inputs (a tensor lr must not carry mutations between tests)."""
        if self.torch_info is None:
            return lion_inputs("cpu", self.dtype)
        return self.torch_info.optim_inputs_func(device="cpu", dtype=self.dtype)

    def error_inputs(self) -> list:
        if self.torch_info is None:
            return lion_error_inputs("cpu", self.dtype)
        return self.torch_info.optim_error_inputs_func(device="cpu", dtype=self.dtype)

    def scheduler_sets(self) -> tuple:
        return LION_SCHEDULERS if self.torch_info is None else self.torch_info.scheduler_inputs

    def make(self, params, **kwargs):
        return self.optim_cls(params, **MODES[self.mode], **kwargs)

    # ------------------------------------------- the problems, per optimizer

    @property
    def matrices_only(self) -> bool:
        """Muon refuses params that are not 2-D, as torch.optim.Muon does."""
        return self.name in MATRICES_ONLY

    def shape(self, n: int) -> tuple[int, ...]:
        """A shape of ``n`` values this optimizer takes: (n,), or a (1, n) row for Muon."""
        return (1, n) if self.matrices_only else (n,)

    def problem(self, seed=0, contiguous=True):
        return linear_problem(self.dtype, seed, contiguous, self.matrices_only)

    def model(self, seed=1):
        return small_model(seed, self.dtype, bias=not self.matrices_only)


def unsupported(kwargs: dict) -> str | None:
    """Why slimoptim does not run an input torch ships, or None when it does."""
    if kwargs.get("amsgrad"):
        return "amsgrad: refused by slimoptim (its running max would be a third full state)"
    if kwargs.get("capturable") or kwargs.get("foreach") or kwargs.get("fused"):
        return "CUDA-only/foreach-only input (capturable, foreach or fused=True)"
    return None


NAMES = ("AdamW", "Adam", "SGD", "Lion", "Muon")
MATRICES_ONLY = ("Muon",)
INFOS = [SlimOptimizerInfo(n, m, d) for n in NAMES for m in MODES for d in DTYPES]


def infos(mode=None, dtype=None, names=NAMES):
    return [
        i
        for i in INFOS
        if (mode is None or i.mode == mode)
        and (dtype is None or i.dtype_name == dtype)
        and i.name in names
    ]


def input_cases(selected):
    """(info, input index, desc) for every input of every selected entry, as pytest ids."""
    return [
        pytest.param(info, i, id=f"{info.id}-{inp.desc.replace(' ', '_')}")
        for info in selected
        for i, inp in enumerate(info.inputs())
    ]


def input_kwargs(info, index: int) -> dict:
    return dict(info.inputs()[index].kwargs)


def linear_problem(dtype, seed=0, contiguous=True, matrices_only=False):
    """torch's generic problem: a (10, 5) weight and a (10,) bias, loss (W x + b)^2 summed.
    ``matrices_only``: the same values with the bias as a (10, 1) column."""
    gen = torch.Generator().manual_seed(seed)
    bias_shape = (10, 1) if matrices_only else (10,)
    if contiguous:
        weight = torch.randn(10, 5, generator=gen)
        bias = torch.randn(bias_shape, generator=gen)
    else:
        weight = torch.randn(10, 5, 2, generator=gen)[..., 0]
        bias = torch.randn(*bias_shape, 2, generator=gen)[..., 0]
    x = torch.randn(5, generator=gen)
    params = [torch.nn.Parameter(weight.to(dtype)), torch.nn.Parameter(bias.to(dtype))]
    return params, x


def linear_loss(params, x):
    weight, bias = params
    return (weight.float().mv(x) + bias.float().reshape(-1)).pow(2).sum()


class LionFloat64(torch.optim.Optimizer):
    """Lion in float64 on float64 copies of the params: the reference slimoptim's exact
    mode is compared to (torch has no Lion). Reads lr/betas/weight_decay/maximize from
    the groups at every step, so every LR scheduler works on it."""

    def __init__(self, params, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0, maximize=False):
        super().__init__(
            params, dict(lr=lr, betas=betas, weight_decay=weight_decay, maximize=maximize)
        )

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            lr = float(group["lr"])
            beta1, beta2 = (float(b) for b in group["betas"])
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = -p.grad if group["maximize"] else p.grad
                m = self.state[p].setdefault("exp_avg", torch.zeros_like(p))
                p.mul_(1 - lr * group["weight_decay"])
                p.add_(torch.sign(m * beta1 + g * (1 - beta1)), alpha=-lr)
                m.mul_(beta2).add_(g, alpha=1 - beta2)


# torch's generic suite (test/test_optim.py, class TestOptimRenewed) test by test: the
# slimoptim test that checks the same behaviour, or why none applies.
NOT_APPLICABLE = ("CUDA-only", "foreach-only", "complex", "sparse", "closure-only")
TORCH_GENERIC_TESTS = {
    "test_optim_infos_do_not_specify_global_cliquey_kwargs": "test_entries_follow_torchs_rules",
    "test_errors": "test_error_inputs_raise_what_torch_raises",
    "test_forloop_goes_right_direction": "test_default_mode_goes_the_right_direction",
    "test_forloop_goes_right_direction_multigpu": "CUDA-only: needs two GPUs",
    "test_param_group_with_lrscheduler_goes_right_direction": (
        "test_param_group_lr_with_schedulers_goes_the_right_direction"
    ),
    "test_tensor_lr": "test_tensor_lr_of_any_shape_steps_as_the_float",
    "test_rosenbrock_sparse": "sparse: sparse gradients are refused (a clear TypeError)",
    "test_complex": "complex: complex params are refused (a clear TypeError)",
    "test_complex_2d": "complex: complex params are refused (a clear TypeError)",
    "test_foreach_matches_forloop": "foreach-only: slimoptim has no foreach path",
    "test_mixed_device_dtype": "CUDA-only: needs two GPUs",
    "test_set_default_dtype_works_with_foreach": "foreach-only: slimoptim has no foreach path",
    "test_foreach_large_tensor": "foreach-only: slimoptim has no foreach path",
    "test_peak_memory_foreach": "foreach-only: slimoptim has no foreach path",
    "test_fused_matches_forloop": "CUDA-only: tests/test_kernels.py checks kernel = reference",
    "test_fused_error_on_params_on_meta": (
        "test_fused_true_on_an_unsupported_device_says_what_torch_says"
    ),
    "test_fused_large_tensor": "CUDA-only: needs 64 GB of GPU memory",
    "test_fused_does_not_step_if_foundinf": "test_fused_step_does_not_move_anything_when_found_inf",
    "test_cpu_load_state_dict": "test_cpu_state_dict_loads_into_a_cuda_optimizer",
    "test_param_groups_weight_decay": "test_param_groups_lr_and_weight_decay",
    "test_param_groups_lr": "test_param_groups_lr_and_weight_decay",
    "test_step_is_noop_when_params_have_no_grad": (
        "test_zero_grads_and_params_without_grads_are_noops"
    ),
    "test_step_is_noop_for_zero_grads": "test_zero_grads_and_params_without_grads_are_noops",
    "test_optimizer_can_be_printed": "test_printing_and_non_empty_state",
    "test_state_dict_deterministic": "test_state_dict_round_trip_is_deterministic",
    "test_can_load_older_state_dict": "test_older_state_dicts_load",
    "test_can_load_from_to_named_state_dict": "test_state_dict_round_trip_is_deterministic",
    "test_save_load_equality_with_weights_only": "test_save_load_with_weights_only_is_equal",
    "test_load_nontensor_step": "test_older_state_dicts_load",
    "test_state_dict_with_cuda_params": "test_cpu_state_dict_loads_into_a_cuda_optimizer",
    "test_state_dict_pre_hook": "test_state_dict_and_load_state_dict_hooks",
    "test_state_dict_post_hook": "test_state_dict_and_load_state_dict_hooks",
    "test_state_dict_pre_post_hook": "test_state_dict_and_load_state_dict_hooks",
    "test_load_state_dict_pre_hook_and_prepend": "test_state_dict_and_load_state_dict_hooks",
    "test_load_state_dict_post_hook": "test_state_dict_and_load_state_dict_hooks",
    "test_load_state_dict_pre_post_hook": "test_state_dict_and_load_state_dict_hooks",
    "test_step_post_hook": "test_step_hooks_run_in_torchs_order",
    "test_step_pre_hook": "test_step_hooks_run_in_torchs_order",
    "test_step_all_hooks": "test_step_hooks_run_in_torchs_order",
    "test_deepcopy_copies_all_public_attrs": "test_copies_step_as_the_original",
    "test_second_order_optims_return_consistent_types": "closure-only: for LBFGS",
    "test_fused_cpu_matches_cuda": "CUDA-only: tests/test_kernels.py checks kernel = reference",
    "test_defaults_changed_to_foreach": "foreach-only: slimoptim has no foreach path",
    "test_non_empty_state": "test_printing_and_non_empty_state",
}


def generic_suite_summary() -> str:
    """One line: how many of torch's generic tests have a slimoptim test, and why not."""
    from collections import Counter  # noqa: PLC0415

    reasons = Counter(
        t.split(":")[0] for t in TORCH_GENERIC_TESTS.values() if not t.startswith("test_")
    )
    covered = len(TORCH_GENERIC_TESTS) - sum(reasons.values())
    why = ", ".join(f"{reason} {n}" for reason, n in sorted(reasons.items()))
    return (
        f"torch's generic optimizer tests: {covered} of {len(TORCH_GENERIC_TESTS)} have a "
        f"slimoptim counterpart; not applicable: {why}"
    )


# ------------------------------------------ helpers of the contract tests

CPU_INFOS = infos(dtype="bf16") + infos(mode="exact", dtype="fp32")
OLDER_INFOS = infos(mode="exact", dtype="fp32") + infos(mode="default", dtype="bf16")


def supported(info, index):
    kwargs = input_kwargs(info, index)
    reason = unsupported(kwargs)
    if reason:
        pytest.skip(reason)
    return kwargs


def small_model(seed=1, dtype=torch.bfloat16, bias=True):
    torch.manual_seed(seed)
    layers = torch.nn.Linear(5, 10, bias=bias), torch.nn.Linear(10, 1, bias=bias)
    return torch.nn.Sequential(*layers).to(dtype)


def train(model, opt, steps, seed=2):
    gen = torch.Generator().manual_seed(seed)
    dtype = next(model.parameters()).dtype
    for _ in range(steps):
        opt.zero_grad()
        model(torch.randn(3, 5, generator=gen).to(dtype)).float().pow(2).sum().backward()
        opt.step()


def bits_of(model, opt):
    return [(p.detach().clone(), opt.master_weight(p).clone()) for p in model.parameters()]


def assert_same_bits(a, b):
    for (pa, ma), (pb, mb) in zip(a, b, strict=True):
        assert torch.equal(pa, pb) and torch.equal(ma, mb)


def assert_state_dicts_equal(a, b):
    assert a.keys() == b.keys()
    assert a["param_groups"] == b["param_groups"]
    assert a["state"].keys() == b["state"].keys()
    for k, state in a["state"].items():
        assert state.keys() == b["state"][k].keys()
        for name, value in state.items():
            assert value.dtype == b["state"][k][name].dtype
            assert torch.equal(value, b["state"][k][name])
