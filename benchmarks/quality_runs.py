"""What the quality study trains: model sizes, hyper-parameters, the runs and their order.

Every run of one size starts from the same initial weights for a given seed (the
bf16 runs from their rounding) and sees the same batches in the same order, so
two runs of one seed differ only by optimizer and precision.
"""

from __future__ import annotations

from dataclasses import dataclass

from slimoptim.demo_model import ModelSize

# tiny: the CI smoke test; cpu: the CPU study (0.12M params, a few minutes per family on
# one shared core); small: GPT-2-small-sized (12 x 768, 85M params, 16 x 512 bytes per
# step), for the GPU.
SIZES = {
    "tiny": ModelSize(layers=1, width=32, heads=2, context=32, batch=4),
    "cpu": ModelSize(layers=2, width=64, heads=4, context=64, batch=16),
    "small": ModelSize(layers=12, width=768, heads=12, context=512, batch=16),
}
EVAL_BATCHES = {"tiny": 1, "cpu": 8, "small": 32}  # fixed validation windows, batch-sized
DEFAULT_STEPS = {"tiny": 20, "cpu": 200, "small": 1200}
DEFAULT_FINETUNE_STEPS = {"tiny": 10, "cpu": 100, "small": 300}
GRAD_CLIP = 1.0
FINETUNE_LR = 1e-5
FINETUNE_SEED_OFFSET = 1000  # fine-tuning batches use their own stream

# AdamW as the issue sets it for GPT-2 small. Lion: the same decay per step (lr * wd) at a
# smaller step, betas from the Lion paper. SGD: Nesterov momentum 0.9, no decay. The small
# models of the CPU sizes train at a larger AdamW / Lion step (as slimoptim demo does).
HYPERPARAMETERS = {
    "adamw": dict(betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1),
    "lion": dict(betas=(0.9, 0.99), weight_decay=0.3),
    "sgd": dict(momentum=0.9, nesterov=True, weight_decay=0.0),
}
LEARNING_RATES = {
    "adamw": {"tiny": 3e-3, "cpu": 3e-3, "small": 6e-4},
    "lion": {"tiny": 1e-3, "cpu": 1e-3, "small": 2e-4},
    "sgd": {"tiny": 0.1, "cpu": 0.1, "small": 0.1},
}
OPTIMIZER_CLASSES = {"adamw": "AdamW", "lion": "Lion", "sgd": "SGD"}


def hyperparameters(optimizer: str, size: str, finetune: bool) -> dict:
    hyper = dict(HYPERPARAMETERS[optimizer], lr=LEARNING_RATES[optimizer][size])
    if finetune:
        # Updates far below a bf16 ulp; no decay, so only the gradient moves the weights.
        hyper.update(lr=FINETUNE_LR, weight_decay=0.0)
    return hyper


@dataclass(frozen=True)
class Run:
    name: str
    label: str
    family: str  # adamw | lion | sgd | ft (fine-tuning with AdamW)
    optimizer: str  # adamw | lion | sgd
    library: str  # torch | slimoptim
    param_dtype: str  # float32 (with bf16 autocast) | bfloat16
    role: str  # reference | default | variant
    master_weight_bits: int | None = 24
    state_bits: int = 8
    autocast_bf16_params: bool = False  # bf16 autocast on bf16 params (fp32 norms and loss)

    @property
    def finetune(self) -> bool:
        return self.family == "ft"

    @property
    def autocast(self) -> bool:
        return self.param_dtype == "float32" or self.autocast_bf16_params


def _slim(family, optimizer, master, state, role, prefix=""):
    bits = f"{'none' if master is None else master}/{state}"
    name = f"{family}_{'none' if master is None else master}_{state}"
    label = f"{prefix}slimoptim {OPTIMIZER_CLASSES[optimizer]} {bits}"
    return Run(name, label, family, optimizer, "slimoptim", "bfloat16", role, master, state)


def _adamw_family(family: str, prefix: str = "") -> list[Run]:
    return [
        Run(
            f"{family}_fp32",
            f"{prefix}torch AdamW, fp32 master + bf16 autocast",
            family,
            "adamw",
            "torch",
            "float32",
            "reference",
        ),
        _slim(family, "adamw", 24, 8, "default", prefix),
        _slim(family, "adamw", 32, 8, "variant", prefix),
        _slim(family, "adamw", None, 8, "variant", prefix),
        Run(
            f"{family}_torch_bf16",
            f"{prefix}torch AdamW on bf16 params (no master)",
            family,
            "adamw",
            "torch",
            "bfloat16",
            "variant",
        ),
    ]


def _lion_family() -> list[Run]:
    # No torch Lion: the reference is slimoptim's own float32 Lion (tests check it against a
    # float64 Lion). 32/32 on bf16 params (an exact float32 master and states) isolates
    # training on bf16 params from the codes; 24/32 isolates the master from the momentum
    # code; autocast on bf16 params runs norms, softmax and the loss in float32.
    return [
        Run(
            "lion_fp32",
            "slimoptim Lion 32/32, fp32 params + bf16 autocast",
            "lion",
            "lion",
            "slimoptim",
            "float32",
            "reference",
            32,
            32,
        ),
        _slim("lion", "lion", 24, 8, "default"),
        _slim("lion", "lion", 32, 8, "variant"),
        _slim("lion", "lion", None, 8, "variant"),
        _slim("lion", "lion", 24, 32, "variant"),
        _slim("lion", "lion", 32, 32, "variant"),
        Run(
            "lion_24_8_autocast",
            "slimoptim Lion 24/8, bf16 params + bf16 autocast",
            "lion",
            "lion",
            "slimoptim",
            "bfloat16",
            "variant",
            autocast_bf16_params=True,
        ),
    ]


def _sgd_family() -> list[Run]:
    return [
        Run(
            "sgd_fp32",
            "torch SGD Nesterov, fp32 + bf16 autocast",
            "sgd",
            "sgd",
            "torch",
            "float32",
            "reference",
        ),
        _slim("sgd", "sgd", 24, 8, "default"),
        _slim("sgd", "sgd", 32, 8, "variant"),
        _slim("sgd", "sgd", None, 8, "variant"),
        Run(
            "sgd_torch_bf16",
            "torch SGD Nesterov on bf16 params (no master)",
            "sgd",
            "sgd",
            "torch",
            "bfloat16",
            "variant",
        ),
    ]


RUNS = [
    *_adamw_family("adamw"),
    *_lion_family(),
    *_sgd_family(),
    *_adamw_family("ft", prefix="fine-tune: "),
]
RUNS_BY_NAME = {run.name: run for run in RUNS}
FAMILIES = ("adamw", "lion", "sgd", "ft")


def select_runs(only: str | None) -> list[Run]:
    """Runs named by ``--only`` (run names or family names, comma-separated), in catalogue
    order; all of them when ``only`` is None."""
    if not only:
        return list(RUNS)
    wanted = [w.strip() for w in only.split(",") if w.strip()]
    unknown = [w for w in wanted if w not in RUNS_BY_NAME and w not in FAMILIES]
    if unknown:
        raise SystemExit(
            f"--only: unknown run or family {', '.join(unknown)}; families: "
            f"{', '.join(FAMILIES)}; runs: {', '.join(RUNS_BY_NAME)}"
        )
    return [r for r in RUNS if r.name in wanted or r.family in wanted]


def order_runs(runs: list[Run], seeds: list[int], all_seeds: bool) -> list[tuple[Run, int]]:
    """(run, seed) pairs, most useful first, so a time budget cuts the least useful.

    Reference and default runs get every seed, variants the first one (all with
    ``all_seeds``). Order: first seed of references/defaults, second seed, variants,
    remaining seeds; pre-training before fine-tuning (which starts from a pre-trained
    reference).
    """
    out = []
    for finetune in (False, True):
        chosen = [r for r in runs if r.finetune == finetune]
        main = [r for r in chosen if r.role != "variant"]
        variants = [r for r in chosen if r.role == "variant"]
        tiers = [
            [(r, s) for s in seeds[:1] for r in main],
            [(r, s) for s in seeds[1:2] for r in main],
            [(r, s) for s in seeds[:1] for r in variants],
            [(r, s) for s in seeds[2:] for r in main],
            [(r, s) for s in seeds[1:] for r in variants] if all_seeds else [],
        ]
        out += [pair for tier in tiers for pair in tier]
    return out
