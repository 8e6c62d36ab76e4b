"""What ``slimoptim demo`` and ``slimoptim plan`` share, below the command line itself.

:mod:`slimoptim.cli` imports the commands (:mod:`slimoptim.demo`, :mod:`slimoptim.plan`)
and they import this module, so the dependencies point one way. The optimizer table is
data: a new slimoptim optimizer becomes available to both commands with one more row.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field


class CommandError(Exception):
    """An expected failure the user can fix; printed as one line, exit status 2."""


@dataclass(frozen=True)
class OptimizerEntry:
    """A slimoptim optimizer as the commands know it."""

    class_name: str  # attribute of the slimoptim package
    demo_hyperparameters: dict  # what ``slimoptim demo`` trains it with
    # Arguments that make it hold its usual states (SGD keeps momentum only when asked).
    plan_arguments: dict = field(default_factory=dict)
    # The plan table's heading for its rows, when not "slimoptim <class_name>, bf16 weights:".
    plan_heading: str = ""


# --optimizers name -> entry. AdamW as for small GPTs; SGD and Lion picked by a short sweep
# on the demo's tiny size (SGD at lr 0.5 diverged early, Lion at 3e-4 crawled).
OPTIMIZERS = {
    "adamw": OptimizerEntry("AdamW", dict(lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)),
    "sgd": OptimizerEntry("SGD", dict(lr=0.1, momentum=0.9, weight_decay=0.0), dict(momentum=0.9)),
    "lion": OptimizerEntry("Lion", dict(lr=1.5e-3, betas=(0.9, 0.99), weight_decay=0.2)),
}
# ``slimoptim plan`` also plans Muon, which trains a model's hidden matrices only: its rows
# are Muon on those plus AdamW on the rest, split as slimoptim.muon_param_groups splits
# them. The demo has no Muon run (no demo hyper-parameters).
PLAN_OPTIMIZERS = {
    **OPTIMIZERS,
    "muon": OptimizerEntry(
        "Muon",
        demo_hyperparameters={},
        plan_heading="slimoptim Muon (hidden matrices) + AdamW (the rest), bf16 weights:",
    ),
}


def optimizer_class(name: str):
    import slimoptim

    return getattr(slimoptim, PLAN_OPTIMIZERS[name].class_name)


def format_table(
    header: Sequence[str], rows: Sequence[Sequence[object]], align: str | None = None
) -> str:
    """Plain-text table; ``align`` has one character per column, 'l' or 'r' (default:
    first column left, the rest right). A row that is a single string is printed as is."""
    align = align or "l" + "r" * (len(header) - 1)
    cells = [[str(c) for c in row] for row in rows if not isinstance(row, str)]
    widths = [max(len(r[i]) for r in [list(header), *cells]) for i in range(len(header))]

    def line(row: Sequence[str]) -> str:
        cells = zip(row, widths, align, strict=True)
        parts = [c.ljust(w) if a == "l" else c.rjust(w) for c, w, a in cells]
        return "  ".join(parts).rstrip()

    out = [line(header), "  ".join("-" * w for w in widths)]
    for row in rows:
        out.append(row if isinstance(row, str) else line([str(c) for c in row]))
    return "\n".join(out)


def require_cli_extra(module: str, purpose: str, alternative: str = ""):
    """Import an optional dependency of the commands, or explain how to install it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        hint = f", or {alternative}" if alternative else ""
        raise CommandError(
            f"{purpose} needs {module}, which is not installed: pip install 'slimoptim[cli]'{hint}"
        ) from None
