"""Median relative error of slimoptim's 8-bit codes vs linear int8 (docs/formats.md)."""

import torch

from slimoptim import formats

G, N = 32, 32 * 4096


def linear_int8(x, signed):
    if signed:
        s = formats.per_element(formats.group_view(x.abs(), G).amax(1), G, x.numel())
        return torch.round(x / s * 127) / 127 * s
    s = formats.per_element(formats.group_view(x, G).amax(1), G, x.numel())
    return (torch.round((x / s).sqrt() * 255) / 255) ** 2 * s


def median_rel(a, b):
    return ((a - b) / b).abs().median().item()


torch.manual_seed(0)
samples = {
    "Gaussian": torch.randn(N),
    "Student-t (2)": torch.distributions.StudentT(2.0).sample((N,)),
    "log-normal (2)": torch.randn(N).sign() * torch.exp(2 * torch.randn(N)),
}
print("| distribution | momentum ours / linear | v ours / linear | v zeros ours / linear |")
for name, m in samples.items():
    noise = formats.dither(N, torch.tensor(5.0))[0]
    code, scale = formats.quantize_momentum(m, G, noise, 0.1)  # AdamW's beta1 0.9
    m_ours = median_rel(formats.dequantize_momentum(code, scale, G), m)
    v = m * m
    code, scale = formats.quantize_variance(v, G)
    v_dec = formats.dequantize_variance(code, scale, G)
    v_lin = linear_int8(v, False)
    print(
        f"| {name} | {m_ours:.2%} / {median_rel(linear_int8(m, True), m):.2%} | "
        f"{median_rel(v_dec, v):.2%} / {median_rel(v_lin, v):.2%} | "
        f"{(v_dec == 0).float().mean():.2%} / {(v_lin == 0).float().mean():.2%} |"
    )


def group_l2(decoded, m):
    """Mean over groups of ||decoded - m|| / ||m||."""
    err = formats.group_view(decoded - m, G).norm(dim=1)
    return (err / formats.group_view(m, G).norm(dim=1)).mean().item()


def softsign_nearest(m):
    """The flashoptim momentum code (NUMERICS.md), rounded to nearest, bf16-free."""
    s = formats.per_element(formats.group_view(m.abs(), G).amax(1), G, m.numel())
    y = torch.round(2 * (m / s) / (1 + (m / s).abs()) * 127) / 127
    return y / (2 - y.abs()) * s


m = samples["Gaussian"]
noise = formats.dither(N, torch.tensor(5.0))[0]
print("\n| momentum levels, rounding (Gaussian groups) | L2 error / group |")
for levels, forget, label in [
    ("square", 1e-6, "square, stochastic (versions 1-2)"),
    ("square", 1.0, "square, nearest"),
    ("linear_square", 1.0, "linear-square, nearest"),
]:
    code, scale = formats.quantize_momentum(m, G, noise, forget, levels)
    print(f"| {label} | {group_l2(formats.dequantize_momentum(code, scale, G, levels), m):.4f} |")
print(f"| flashoptim softsign, nearest | {group_l2(softsign_nearest(m), m):.4f} |")
