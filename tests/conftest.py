"""Test-session setup shared by all modules."""

import os

import torch

# Without a GPU the Triton kernels run in Triton's CPU interpreter; the flag must be
# set before Triton is first imported. Only fused=True paths on CPU use it.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_terminal_summary(terminalreporter):
    """A line on the torch.optim drop-in contract tests (tests/test_torch_contract*.py):
    what ran, passed and was skipped, and why."""
    import collections
    import sys

    counts, reasons = collections.Counter(), collections.Counter()
    for outcome in ("passed", "failed", "skipped", "error"):
        for report in terminalreporter.stats.get(outcome, []):
            if "test_torch_contract" not in getattr(report, "nodeid", ""):
                continue
            counts[outcome] += 1
            if outcome == "skipped" and isinstance(report.longrepr, tuple):
                reasons[report.longrepr[2].removeprefix("Skipped: ").split(":")[0]] += 1
    if not counts:
        return
    ran = counts["passed"] + counts["failed"] + counts["error"]
    why = ", ".join(f"{reason} {n}" for reason, n in sorted(reasons.items()))
    terminalreporter.write_line(
        f"torch drop-in contract: {ran} ran, {counts['passed']} passed, "
        f"{counts['failed'] + counts['error']} failed, {counts['skipped']} skipped"
        + (f" ({why})" if why else "")
    )
    infos = sys.modules.get("torch_optim_infos")
    if infos is not None:
        terminalreporter.write_line(infos.generic_suite_summary())
