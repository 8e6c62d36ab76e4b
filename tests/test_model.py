"""cast_model: low-precision params with chosen layers kept in float32."""

import pytest
import torch
from torch import nn

import slimoptim


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.bn = nn.BatchNorm2d(8)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(8 * 6 * 6, 10))
        self.norm = nn.LayerNorm(10)

    def forward(self, x):
        return self.norm(self.head(torch.relu(self.bn(self.conv(x)))))


def test_defaults_keep_batchnorm_fp32_and_still_run():
    model = slimoptim.cast_model(Net(), torch.bfloat16)
    assert model.conv.weight.dtype == torch.bfloat16
    assert model.bn.weight.dtype == torch.float32 and model.bn.running_mean.dtype == torch.float32
    assert model.bn.num_batches_tracked.dtype == torch.int64  # integer buffers untouched
    out = model(torch.randn(2, 3, 8, 8, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16 and out.shape == (2, 10)
    out.float().sum().backward()
    assert model.bn.weight.grad.dtype == torch.float32


def test_name_patterns_and_module_types_add_to_the_batchnorm_default():
    model = slimoptim.cast_model(Net(), torch.float16, keep_fp32=("head.*", nn.LayerNorm))
    assert model.head[1].weight.dtype == torch.float32
    assert model.norm.weight.dtype == torch.float32
    assert model.bn.weight.dtype == torch.float32  # the default still applies
    assert model.conv.weight.dtype == torch.float16
    assert model(torch.randn(2, 3, 8, 8, dtype=torch.float16)).dtype == torch.float16


def test_batchnorm_default_can_be_turned_off():
    model = slimoptim.cast_model(Net(), torch.bfloat16, keep_batchnorm_fp32=False)
    assert model.bn.weight.dtype == torch.bfloat16 and model.bn.running_var.dtype == torch.bfloat16
    model = slimoptim.cast_model(Net(), keep_fp32="norm", keep_batchnorm_fp32=False)  # bare
    assert model.norm.weight.dtype == torch.float32 and model.bn.weight.dtype == torch.bfloat16


@pytest.mark.parametrize(
    "keep, named",
    [
        (("*.2",), "'\\*\\.2'"),
        ((nn.LayerNorm,), "LayerNorm"),
        ((nn.Linear(2, 2),), r"Linear\(in_features=2"),
    ],
)
def test_keep_fp32_entry_that_matches_nothing_is_refused(keep, named):
    # A top-level module is named "2", not "*.2"; this model has no LayerNorm; the Linear
    # given is not one of its modules.
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.BatchNorm1d(4))
    with pytest.raises(ValueError, match=f"keep_fp32 entry {named}.* matches no module"):
        slimoptim.cast_model(model, keep_fp32=keep)
    assert model[0].weight.dtype == torch.float32  # refused before casting anything
    slimoptim.cast_model(model, keep_fp32=("2",))  # the right name works
    assert model[2].weight.dtype == torch.float32 and model[0].weight.dtype == torch.bfloat16


def test_optimizer_over_a_mixed_model_matches_reference_per_dtype():
    model = slimoptim.cast_model(Net(), torch.bfloat16)
    opt = slimoptim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(2, 3, 8, 8, dtype=torch.bfloat16)).float().sum().backward()
    opt.step()
    assert "correction" in opt.state[model.conv.weight]
    assert "correction" not in opt.state[model.bn.weight]  # fp32 params are their own master


def test_bad_arguments():
    with pytest.raises(ValueError, match="dtype"):
        slimoptim.cast_model(Net(), torch.int8)
    with pytest.raises(TypeError, match="keep_fp32"):
        slimoptim.cast_model(Net(), keep_fp32=(3,))
