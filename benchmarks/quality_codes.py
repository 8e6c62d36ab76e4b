"""State-code study: 8-bit codes measured on the real AdamW states of a training run.

During the fp32 reference run (torch AdamW on float32 weights), its float32
``exp_avg`` / ``exp_avg_sq`` are the shadow states: every N steps each 8-bit
format encodes and decodes them, and we measure

* the normalised error ``||decoded - x|| / ||x||`` of momentum and variance (set by
  the large elements) and the median per-element relative error (set by the typical,
  small ones),
* the normalised error of the AdamW update built from the decoded states, and of the
  one built from the exact momentum and the decoded variance (the variance code's share),
* on heavy-tailed groups (32 values whose largest and smallest v differ by more
  than 1e4), the largest ``|update| / lr`` (the float32 states' own largest
  value is the yardstick) and how many elements' decoded v is 0 while their
  decoded momentum is not (the update is then ``m / eps``).

Two ways to put a format on the same states:

* a snapshot: the float32 states are encoded and decoded once (the error of one code),
* carried: each format keeps its own states from the first step, updated with the
  run's own gradients exactly as torch's AdamW updates its float32 states and re-coded
  after every step, as an optimizer holding that format does (``CarriedStates``). Here
  a rounding that loses small increments, or freezes a decaying value, adds up; a
  stochastic rounding's errors average out instead.

Formats, all with groups of 32:

* ``slimoptim``: the library's codes (``slimoptim.formats``): signed square-root
  momentum and logarithmic variance, bf16 scales, stochastic rounding, and the
  floor on the decoded sqrt(v) that the optimizer applies.
* ``slimoptim_nearest``: the same codes rounded to nearest (for comparison only).
* ``linear``: absmax-scaled int8 momentum and max-scaled uint8 variance, float32
  scales, round to nearest (the plain 8-bit baseline).
* ``flashoptim``: the published format as shared/design/NUMERICS.md describes it:
  softsign-companded int8 momentum ``y = 2x / (1 + |x|)``, uint8 of sqrt(v) linear
  below the group max, fp16 scales, round to nearest. Written here from that
  description; it is not the flashoptim package.
"""

from __future__ import annotations

import torch

from slimoptim import formats

GROUP = 32
HEAVY_RATIO = 1e4  # max v / min v within a group above which the group is heavy-tailed
FORMATS = ("slimoptim", "slimoptim_nearest", "linear", "flashoptim")


# ------------------------------------------------------------ the three codes


def _groupwise(x: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
    return formats.group_view(x, GROUP, fill)


def _broadcast(per_group: torch.Tensor, numel: int) -> torch.Tensor:
    return formats.per_element(per_group, GROUP, numel)


def _divide_or_zero(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x / scale, 0 where the scale is 0 (a flushed fp16 scale loses its group)."""
    ok = scale > 0
    return torch.where(ok, x / torch.where(ok, scale, 1.0), 0.0)


BETA1 = 0.9  # the study's AdamW: its momentum forgets 1 - beta1 per step


def slimoptim_codes(
    m: torch.Tensor, v: torch.Tensor, step: int, beta1: float = BETA1, nearest: bool = False
):
    """Decoded (m, v, floor on sqrt(v)) through slimoptim's own formats and dithers.

    ``nearest`` rounds to the nearest level instead (not what the optimizer does): it
    shows how much of one snapshot's error is the stochastic rounding, whose errors
    average out over steps instead of accumulating."""
    noise_m, noise_v = formats.dither(m.numel(), torch.tensor(float(step)), m.device)
    if nearest:
        noise_m, noise_v = torch.full_like(noise_m, formats.DITHER_LEVELS / 2), None
    code, scale = formats.quantize_momentum(m, GROUP, noise_m, 1 - beta1)
    m_hat = formats.dequantize_momentum(code, scale, GROUP)
    code, scale = formats.quantize_variance(v, GROUP, noise_v)
    v_hat = formats.dequantize_variance(code, scale, GROUP)
    return m_hat, v_hat, formats.variance_floor(scale, GROUP, v.numel())


def linear_codes(m: torch.Tensor, v: torch.Tensor, step: int, beta1: float = BETA1):
    n = m.numel()
    m_scale = _broadcast(_groupwise(m.abs()).amax(1), n)
    m_hat = torch.round(_divide_or_zero(m, m_scale) * 127) / 127 * m_scale
    v_scale = _broadcast(_groupwise(v).amax(1), n)
    v_hat = torch.round(_divide_or_zero(v, v_scale) * 255) / 255 * v_scale
    return m_hat, v_hat, None


def _fp16_scale(group_max: torch.Tensor, numel: int) -> torch.Tensor:
    # Stored in float16: values under 6e-8 flush to 0, values over 65504 become inf.
    return _broadcast(group_max.to(torch.float16).float(), numel)


def flashoptim_codes(m: torch.Tensor, v: torch.Tensor, step: int, beta1: float = BETA1):
    n = m.numel()
    m_scale = _fp16_scale(_groupwise(m.abs()).amax(1), n)
    x = torch.clamp(_divide_or_zero(m, m_scale), -1, 1)
    y = torch.round(2 * x / (1 + x.abs()) * 127) / 127
    m_hat = y / (2 - y.abs()) * m_scale
    root = v.sqrt()
    v_scale = _fp16_scale(_groupwise(root).amax(1), n)
    r = torch.round(torch.clamp(_divide_or_zero(root, v_scale), 0, 1) * 255) / 255
    v_hat = (r * v_scale) ** 2
    # An inf scale decodes to inf * 0 = nan: that state is lost, count it as 0.
    return torch.nan_to_num(m_hat), torch.nan_to_num(v_hat), None


CODECS = {
    "slimoptim": slimoptim_codes,
    "slimoptim_nearest": lambda m, v, step, beta1=BETA1: slimoptim_codes(
        m, v, step, beta1, nearest=True
    ),
    "linear": linear_codes,
    "flashoptim": flashoptim_codes,
}
# Carried step by step: the library's code and the peer's (each costs ~100 full-size
# tensor operations per step).
CARRIED_FORMATS = ("slimoptim", "flashoptim")
MEDIAN_SAMPLE = 1 << 24  # elements kept for the median relative errors (a strided sample)


# ------------------------------------------------------------ the measurement


def adam_direction(m, v, *, step: int, beta1: float, beta2: float, eps: float, floor=None):
    """``update / lr`` of AdamW without weight decay: m_hat / (sqrt(v_hat) + eps)."""
    root = v.sqrt()
    if floor is not None:
        root = torch.maximum(root, floor)
    bias1 = 1 - beta1**step
    bias2 = 1 - beta2**step
    return (m / bias1) / (root / bias2**0.5 + eps)


def heavy_groups(v: torch.Tensor) -> torch.Tensor:
    """Per element: does its group's v span more than HEAVY_RATIO (zeros count as 0)?"""
    groups = _groupwise(v, fill=float("nan"))
    top = groups.nan_to_num(-1.0).amax(1)
    bottom = groups.nan_to_num(float("inf")).amin(1)
    heavy = (top > 0) & (top > bottom * HEAVY_RATIO)
    return _broadcast(heavy, v.numel())


class Accumulator:
    """Sums over tensors for the normalised errors, maxima and medians of one measurement."""

    def __init__(self):
        self.sums: dict[str, float] = {}
        self.maxima: dict[str, float] = {}
        self.samples: dict[str, list[torch.Tensor]] = {}

    def relative(self, key: str, decoded: torch.Tensor, exact: torch.Tensor) -> None:
        """Keep |decoded - exact| / |exact| of the non-zero elements for a median."""
        nonzero = exact != 0
        error = ((decoded - exact).abs() / exact.abs())[nonzero]
        self.samples.setdefault(key, []).append(error)

    def median(self, key: str) -> float:
        errors = torch.cat(self.samples.pop(key, [torch.zeros(1)]))
        stride = max(1, errors.numel() // MEDIAN_SAMPLE)
        return errors[::stride].median().item()

    def add(self, key: str, value: torch.Tensor) -> None:
        self.sums[key] = self.sums.get(key, 0.0) + float(value)

    def top(self, key: str, value: torch.Tensor) -> None:
        self.maxima[key] = max(self.maxima.get(key, 0.0), float(value))

    def ratio(self, num: str, den: str) -> float:
        den_value = self.sums.get(den, 0.0)
        return self.sums.get(num, 0.0) / den_value if den_value > 0 else 0.0


class CarriedStates:
    """Every format's AdamW states carried step by step on a run's own gradients, with a
    float32 shadow carried the same way: the exact states for these betas.

    ``betas`` None takes each param group's (the shadow is then torch's own states);
    other betas ask what the codes would hold in a run with them (torch's default beta2
    0.999 moves v by 0.1% per step). Call ``observe(optimizer, step)`` after the
    gradients are final (clipped) and before ``optimizer.step()``: each state takes the
    float32 update torch's AdamW applies (``lerp``, ``mul`` + ``addcmul``), and each
    format's is coded again.

    A param group's states live in one flat buffer, each param's slot padded with zeros
    to whole groups of 32, so that a format codes a whole param group in one call (per
    param, the launches of ~150 tensors x 5 formats made a GPT-2 step take seconds) and
    every group of 32 still lies in one param; zeros change no group's scale."""

    def __init__(self, betas: tuple[float, float] | None = None, formats: tuple = CARRIED_FORMATS):
        self.betas, self.formats = betas, formats
        self.slots: list[list[tuple]] = []  # per param group: (param, offset, numel)
        self.grads: list[torch.Tensor] = []  # per param group: the flat gradient
        self.states: dict[tuple[str, int], tuple] = {}  # (format, group) -> (m, v, floor)

    def label(self) -> str:
        return "group betas" if self.betas is None else f"betas {self.betas}"

    def betas_of(self, group: dict) -> tuple[float, float]:
        return self.betas or group["betas"]

    def _lay_out(self, optimizer: torch.optim.Optimizer) -> None:
        for group in optimizer.param_groups:
            slots, offset = [], 0
            for p in group["params"]:
                if p.grad is not None:
                    slots.append((p, offset, p.numel()))
                    offset += -(-p.numel() // GROUP) * GROUP
            device = slots[0][0].device if slots else None
            self.slots.append(slots)
            self.grads.append(torch.zeros(offset, device=device))

    @torch.no_grad()
    def observe(self, optimizer: torch.optim.Optimizer, step: int) -> None:
        if not self.slots:
            self._lay_out(optimizer)
        for i, group in enumerate(optimizer.param_groups):
            beta1, beta2 = self.betas_of(group)
            g = self.grads[i]
            for p, offset, numel in self.slots[i]:
                if p.grad is None:
                    raise ValueError("CarriedStates: every param needs a gradient every step")
                g[offset : offset + numel].copy_(p.grad.reshape(-1))
            for name in ("fp32", *self.formats):
                m, v, _ = self.states.get((name, i), (torch.zeros_like(g),) * 3)
                m = m.lerp(g, 1 - beta1)
                v = v.mul(beta2).addcmul_(g, g, value=1 - beta2)
                codec = CODECS.get(name, lambda m, v, step, beta1: (m, v, None))
                self.states[name, i] = codec(m, v, step, beta1)

    def measure(self, optimizer: torch.optim.Optimizer, step: int) -> dict:
        """Errors of every format's carried states against the shadow, param by param."""

        def tensors():
            for i, group in enumerate(optimizer.param_groups):
                beta1, beta2 = self.betas_of(group)
                hyper = dict(step=step, beta1=beta1, beta2=beta2, eps=group["eps"])
                for _, offset, numel in self.slots[i] if self.states else []:
                    cut = slice(offset, offset + numel)
                    m, v, _ = self.states["fp32", i]
                    decoded = {
                        n: tuple(None if x is None else x[cut] for x in self.states[n, i])
                        for n in self.formats
                    }
                    yield m[cut], v[cut], hyper, decoded

        return measure_states(tensors(), step) | {"betas": self.label()}


@torch.no_grad()
def measure_adamw_states(optimizer: torch.optim.Optimizer, step: int) -> dict:
    """Errors of every format on the float32 AdamW states ``optimizer`` holds now, each
    coded from them (a snapshot)."""

    def tensors():
        for group in optimizer.param_groups:
            beta1, beta2 = group["betas"]
            hyper = dict(step=step, beta1=beta1, beta2=beta2, eps=group["eps"])
            for p in group["params"]:
                state = optimizer.state.get(p, {})
                if "exp_avg" in state:
                    m = state["exp_avg"].detach().float().reshape(-1)
                    v = state["exp_avg_sq"].detach().float().reshape(-1)
                    yield m, v, hyper, {n: c(m, v, step, beta1) for n, c in CODECS.items()}

    return measure_states(tensors(), step)


@torch.no_grad()
def measure_states(tensors, step: int) -> dict:
    """Errors of decoded states against exact ones: ``tensors`` yields, per param, float32
    (m, v), its AdamW hyper-parameters and {format: (m_hat, v_hat, floor)}."""
    acc = Accumulator()
    for m, v, hyper, decoded in tensors:
        exact = adam_direction(m, v, **hyper)
        heavy = heavy_groups(v)
        acc.add("m_norm", m.square().sum())
        acc.add("v_norm", v.square().sum())
        acc.add("u_norm", exact.square().sum())
        acc.add("elements", m.numel())
        acc.add("heavy_elements", heavy.sum())
        acc.top("fp32_max_update", exact.abs().max())
        acc.top("fp32_max_update_heavy", torch.where(heavy, exact.abs(), 0.0).max())
        for name, (m_hat, v_hat, floor) in decoded.items():
            update = adam_direction(m_hat, v_hat, floor=floor, **hyper)
            # the variance code's own share: the update from exact m and decoded v
            update_v = adam_direction(m, v_hat, floor=floor, **hyper)
            acc.relative(f"{name}_m_rel", m_hat, m)
            acc.relative(f"{name}_v_rel", v_hat, v)
            acc.add(f"{name}_m_err", (m_hat - m).square().sum())
            acc.add(f"{name}_v_err", (v_hat - v).square().sum())
            acc.add(f"{name}_u_err", (update - exact).square().sum())
            acc.add(f"{name}_uv_err", (update_v - exact).square().sum())
            acc.add(f"{name}_zero_v", ((v_hat == 0) & (m_hat != 0)).sum())
            acc.top(f"{name}_max_update", update.abs().max())
            acc.top(f"{name}_max_update_heavy", torch.where(heavy, update.abs(), 0.0).max())
    out = {
        "step": step,
        "elements": int(acc.sums.get("elements", 0)),
        "heavy_group_fraction": acc.ratio("heavy_elements", "elements"),
        "fp32": {
            "max_update_over_lr": acc.maxima.get("fp32_max_update", 0.0),
            "max_update_over_lr_heavy": acc.maxima.get("fp32_max_update_heavy", 0.0),
        },
    }
    for name in (n for n in FORMATS if f"{n}_m_err" in acc.sums):
        out[name] = {
            "momentum_error": acc.ratio(f"{name}_m_err", "m_norm") ** 0.5,
            "momentum_median_relative_error": acc.median(f"{name}_m_rel"),
            "variance_median_relative_error": acc.median(f"{name}_v_rel"),
            "variance_error": acc.ratio(f"{name}_v_err", "v_norm") ** 0.5,
            "update_error": acc.ratio(f"{name}_u_err", "u_norm") ** 0.5,
            "update_error_v_only": acc.ratio(f"{name}_uv_err", "u_norm") ** 0.5,
            "zero_v_nonzero_m": int(acc.sums.get(f"{name}_zero_v", 0)),
            "max_update_over_lr": acc.maxima.get(f"{name}_max_update", 0.0),
            "max_update_over_lr_heavy": acc.maxima.get(f"{name}_max_update_heavy", 0.0),
        }
    return out
