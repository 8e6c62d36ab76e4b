"""The drop-in contract, API: errors, keywords, hooks and printing, as torch.optim's.

Driven by ``torch_optim_infos`` (torch's ``optim_db`` inputs and error inputs). Issue 16's
defects 3, 5 and 7 have tests here that failed before the fix (named in their docstrings).
"""

import copy
import os
import warnings

import pytest
import torch
from torch.optim.optimizer import (
    register_optimizer_step_post_hook,
    register_optimizer_step_pre_hook,
)
from torch_optim_infos import (
    CPU_INFOS,
    NOT_APPLICABLE,
    TORCH_GENERIC_TESTS,
    infos,
    input_cases,
    input_kwargs,
    supported,
    train,
)

import slimoptim

# ------------------------------------------------------------------ errors


def _error_cases():
    return [
        pytest.param(info, i, id=f"{info.id}-{e.optimizer_error_input.desc[:40].replace(' ', '_')}")
        for info in infos(mode="exact", dtype="fp32")
        for i, e in enumerate(info.error_inputs())
    ]


@pytest.mark.parametrize("info,index", _error_cases())
def test_error_inputs_raise_what_torch_raises(info, index):
    """torch's error inputs: same exception type and a message matching torch's regex
    (defect 5: ``params=None`` with a bad lr raised TypeError before the lr was checked;
    a multi-element tensor lr and mixed float/Tensor betas got other messages or none).
    Inputs that set foreach=True get slimoptim's refusal of foreach=True instead."""
    error = info.error_inputs()[index]
    params, kwargs = error.optimizer_error_input.params, error.optimizer_error_input.kwargs
    if "complex" in error.optimizer_error_input.desc:
        # torch's Muon raises RuntimeError at its first step; every slimoptim optimizer
        # refuses complex params at construction with a TypeError (see
        # test_complex_and_sparse_are_refused_clearly).
        with pytest.raises(TypeError, match="complex"):
            info.make(params, **kwargs)
        return
    if kwargs.get("foreach"):
        with pytest.raises(ValueError, match="foreach=True .* is not supported"):
            info.make(params, **kwargs)
        return
    if issubclass(error.error_type, Warning):
        with pytest.warns(error.error_type, match=error.error_regex):
            info.make(params, **kwargs)
    else:
        with pytest.raises(error.error_type, match=error.error_regex):
            info.make(params, **kwargs)


@pytest.mark.parametrize("name", ["AdamW", "Adam", "SGD", "Lion"])
def test_neutral_implementation_keywords_are_accepted_and_others_refused(name):
    """Defect 3: foreach=None/False, capturable=False, differentiable=False raised TypeError."""
    cls = getattr(slimoptim, name)
    p = torch.nn.Parameter(torch.randn(4))
    neutral = dict(foreach=None, capturable=False, differentiable=False)
    opt = cls([p], **neutral)
    cls([p], foreach=False)
    p.grad = torch.randn(4)
    opt.step()  # and the optimizer works
    assert not {"foreach", "capturable", "differentiable"} & set(opt.param_groups[0])
    for key in ("foreach", "capturable", "differentiable"):
        with pytest.raises(ValueError, match=f"{key}=True .* is not supported"):
            cls([p], **{key: True})
        with pytest.raises(ValueError, match=f"{key}=True .* parameter group"):
            cls([{"params": [p], key: True}])
    with pytest.raises(TypeError, match="unexpected keyword"):
        cls([p], foreach_mode=True)


@pytest.mark.parametrize("name", ["AdamW", "SGD", "Lion", "Muon"])
def test_hyperparameters_are_checked_before_params_are_read(name):
    """Defect 5: AdamW(None, lr=-1) gave "'NoneType' object is not iterable"."""
    cls = getattr(slimoptim, name)
    with pytest.raises(ValueError, match="Invalid learning rate: -1"):
        cls(None, lr=-1)
    with pytest.raises(ValueError, match="Tensor lr must be 1-element"):
        cls(iter(()), lr=torch.tensor([1e-3, 1e-3]))
    with pytest.raises(ValueError, match="Invalid weight_decay value"):
        cls(None, weight_decay=-1)


def test_muon_takes_no_implementation_keywords_as_torchs_muon():
    """torch.optim.Muon has no foreach, capturable or differentiable keywords, so the test
    above does not apply: code written for it passes none, and both refuse them alike."""
    p = torch.nn.Parameter(torch.randn(4, 3))
    for key in ("foreach", "capturable", "differentiable"):
        for value in (None, False, True):
            for cls in (torch.optim.Muon, slimoptim.Muon):
                with pytest.raises(TypeError, match=f"unexpected keyword argument '{key}'"):
                    cls([p], **{key: value})


# Adam, SGD and Muon have no betas (SGD and Muon take a single float momentum).
@pytest.mark.parametrize("name", ["AdamW", "Lion"])
def test_betas_rules(name):
    """Defect 5: mixed float/Tensor betas were accepted; torch refuses them."""
    cls = getattr(slimoptim, name)
    p = [torch.nn.Parameter(torch.randn(3))]
    for betas in ((0.9, torch.tensor(0.99)), (torch.tensor(0.9), 0.99)):
        with pytest.raises(ValueError, match="betas must be either both floats or both Tensors"):
            cls(p, betas=betas)
    with pytest.raises(ValueError, match=r"Tensor betas\[1\] must be 1-element"):
        cls(p, betas=(torch.tensor(0.9), torch.tensor([0.9, 0.99])))
    # tensor betas of any 1-element shape step as the floats do
    results = []
    for betas in ((0.5, 0.75), (torch.tensor(0.5), torch.tensor(0.75))):
        for shape in ((), (1, 1)):
            q = torch.nn.Parameter(torch.linspace(-1, 1, 40).bfloat16())
            if isinstance(betas[0], torch.Tensor):
                betas = tuple(b.reshape(shape) for b in betas)
            opt = cls([q], betas=betas, lr=0.01)
            for step in range(3):
                q.grad = torch.cos(torch.arange(40.0) + step).bfloat16()
                opt.step()
            results.append(opt.master_weight(q))
    assert all(torch.equal(results[0], r) for r in results[1:])


def test_fused_true_on_an_unsupported_device_says_what_torch_says():
    """Defect 7: torch's message is searchable; ours said something else."""
    p = torch.nn.Parameter(torch.randn(8))
    before = p.detach().clone()
    opt = slimoptim.AdamW([p], fused=True)
    p.grad = torch.randn(8)
    old = os.environ.pop("TRITON_INTERPRET", None)  # the CPU runs kernels only when set
    try:
        with pytest.raises(
            RuntimeError,
            match="`fused=True` requires all the params to be floating point Tensors of "
            r"supported devices: \['cuda'\] but torch.float32 and cpu",
        ):
            opt.step()
    finally:
        if old is not None:
            os.environ["TRITON_INTERPRET"] = old
    meta = torch.nn.Parameter(torch.empty(8, device="meta"))
    meta.grad = torch.empty(8, device="meta")
    with pytest.raises(RuntimeError, match="`fused=True` requires all the params"):
        slimoptim.SGD([meta], fused=True).step()
    assert torch.equal(p.detach(), before) and not opt.state  # checked before any change


def test_complex_and_sparse_are_refused_clearly():
    """torch's complex and sparse tests have no slimoptim counterpart: both are refused."""
    with pytest.raises(TypeError, match="complex"):
        slimoptim.AdamW([torch.randn(3, dtype=torch.complex64, requires_grad=True)])
    p = torch.nn.Parameter(torch.randn(4, 3))
    opt = slimoptim.SGD([p])
    p.grad = torch.randn(4, 3).to_sparse()
    with pytest.raises(TypeError, match="sparse"):
        opt.step()


# -------------------------------------------------------------------- hooks


@pytest.mark.parametrize("info", CPU_INFOS, ids=lambda i: i.id)
def test_state_dict_and_load_state_dict_hooks(info):
    p = torch.nn.Parameter(torch.rand(2, 3).to(info.dtype))
    opt = info.make([p], lr=0.001)

    def pre(optimizer):
        optimizer.state["extra"] = 1

    def post(optimizer, sd):
        sd["ran_post"] = sd["state"].pop("extra", None) == 1
        return sd

    opt.register_state_dict_pre_hook(pre)
    opt.register_state_dict_post_hook(post)
    sd = opt.state_dict()
    assert sd["ran_post"] and "extra" not in sd["state"]
    del opt.state["extra"]

    def lr_to(value, returns):
        def hook(optimizer, sd):
            if returns:
                sd = copy.deepcopy(sd)
            sd["param_groups"][0]["lr"] = value
            return sd if returns else None

        return hook

    opt.register_load_state_dict_pre_hook(lr_to(0.002, returns=False))
    opt.load_state_dict(sd)
    assert opt.param_groups[0]["lr"] == 0.002
    opt.register_load_state_dict_pre_hook(lr_to(0.003, returns=True), prepend=True)
    opt.load_state_dict(sd)
    assert opt.param_groups[0]["lr"] == 0.002  # the prepended hook ran first
    seen = []
    opt.register_load_state_dict_post_hook(lambda o: seen.append(o.param_groups[0]["lr"]))
    opt.load_state_dict(sd)
    assert seen == [0.002]


@pytest.mark.parametrize("info", CPU_INFOS, ids=lambda i: i.id)
def test_step_hooks_run_in_torchs_order(info):
    params = [torch.ones(info.shape(2)).to(info.dtype)]  # no grad: hooks run all the same
    opt = info.make(params)
    other = torch.optim.SGD(params)
    calls = []
    handles = [
        register_optimizer_step_pre_hook(lambda *a: calls.append("global pre")),
        register_optimizer_step_post_hook(lambda *a: calls.append("global post")),
    ]
    try:
        for o in (opt, other):
            handles.append(o.register_step_pre_hook(lambda *a: calls.append("pre")))
            handles.append(o.register_step_post_hook(lambda *a: calls.append("post")))
        opt.step()
        other.step()
        assert calls == ["global pre", "pre", "post", "global post"] * 2
    finally:
        for h in handles:
            h.remove()
    opt.step()
    assert len(calls) == 8


@pytest.mark.parametrize("info,index", input_cases(CPU_INFOS))
def test_printing_and_non_empty_state(info, index):
    supported(info, index)
    model = info.model()
    opt = info.make(model.parameters(), **input_kwargs(info, index))
    assert repr(opt)
    train(model, opt, 1)
    assert len(opt.state) == len(list(model.parameters())) >= 2  # 4, or Muon's 2 matrices
    assert all(len(s) > 0 for s in opt.state.values())


# ------------------------------------------------------------------- CUDA


needs_cuda = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="CUDA-only: torch's device tests need a GPU"
)


@needs_cuda
@pytest.mark.parametrize("info", infos(dtype="bf16"), ids=lambda i: i.id)
def test_fused_step_does_not_move_anything_when_found_inf(info):
    """torch's test_fused_does_not_step_if_foundinf, with and without a grad_scale."""
    for grad_scale in (None, torch.ones((), device="cuda")):
        params = [torch.ones(info.shape(40), device="cuda", dtype=info.dtype) for _ in range(5)]
        before = [p.clone() for p in params]
        for p in params:
            p.grad = torch.ones_like(p)
        opt = info.make(params, fused=True)
        opt.grad_scale, opt.found_inf = grad_scale, torch.ones((), device="cuda")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opt.step()
        for p, b in zip(params, before, strict=True):
            assert torch.equal(p, b) and opt.state[p]["step"].item() == 0


# ------------------------------------------------------------ the catalogue


def test_entries_follow_torchs_rules():
    """Inputs never set the implementation flags (torch's rule for its own entries), and
    every torch generic test maps to a slimoptim test that exists or to a named reason."""
    import test_torch_contract  # noqa: PLC0415
    import test_torch_contract_state  # noqa: PLC0415

    for info in infos():
        assert info.inputs(), info.id
        for inp in info.inputs():
            assert not {"foreach", "fused", "differentiable"} & set(inp.kwargs), info.id
    ours = set(vars(test_torch_contract)) | set(vars(test_torch_contract_state)) | set(globals())
    for torch_test, target in TORCH_GENERIC_TESTS.items():
        if target.startswith("test_"):
            assert target in ours, (torch_test, target)
        else:
            assert target.split(":")[0] in NOT_APPLICABLE, (torch_test, target)
