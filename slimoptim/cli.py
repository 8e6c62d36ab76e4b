"""The ``slimoptim`` command line: ``slimoptim demo`` and ``slimoptim plan``.

The subcommands live in :mod:`slimoptim.demo` and :mod:`slimoptim.plan`; this
module defines the arguments and turns expected failures (bad values, a missing
device or package, a closed output pipe) into one-line errors with exit status 2.
Dependencies point one way: this module imports the commands, never the reverse
(what they share is in :mod:`slimoptim.cli_common`).
"""

from __future__ import annotations

import argparse
import ast
import os
import re
import sys
import textwrap
from collections.abc import Sequence

from .cli_common import OPTIMIZERS, PLAN_OPTIMIZERS, CommandError

DEMO_EXAMPLES = """\
  slimoptim demo                     # < 3 min on a 2-core CPU: torch AdamW vs slimoptim AdamW
  slimoptim demo --device cuda --size medium --steps 2000
  slimoptim demo --optimizers adamw,lion --master-weight-bits 24,none --gradient-release
"""
PLAN_EXAMPLES = """\
  slimoptim plan 7B --gpu-memory 80GB
  slimoptim plan llama --optimizers adamw      # transformers' default LlamaConfig
  slimoptim plan --hf-config path/to/config.json --world-size 8
  slimoptim plan --module mypackage.models:build_model --module-arg layers=24
"""
# A negative number where a count or size goes: argparse would take "-5B" for an option.
_NEGATIVE = re.compile(r"-\d[\d.,]*(e[+-]?\d+)?\s*[a-z]*", re.IGNORECASE)


def _paragraphs(*texts: str) -> str:
    """Wrap prose to 88 columns for the raw help formatter, which keeps our example layout."""
    return "\n\n".join(textwrap.fill(t, 88) for t in texts)


def _comma_list(choices: Sequence[str]):
    """argparse type: a comma-separated list whose items are all in ``choices``."""

    def parse(text: str) -> list[str]:
        items = [item.strip().lower() for item in text.split(",") if item.strip()]
        bad = [item for item in items if item not in choices]
        if not items or bad:
            raise argparse.ArgumentTypeError(
                f"{text!r}: expected a comma-separated list of {', '.join(choices)}"
            )
        return list(dict.fromkeys(items))  # keep order, drop repeats

    return parse


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: must be at least 1")
    return value


def _keyword_argument(text: str) -> tuple[str, object]:
    """argparse type for --module-arg: KEY=VALUE, VALUE a Python literal or else a string."""
    key, equals, value = text.partition("=")
    if not equals or not key.strip().isidentifier():
        raise argparse.ArgumentTypeError(f"{text!r}: expected KEY=VALUE, e.g. layers=24")
    try:
        parsed = ast.literal_eval(value)
    except (ValueError, SyntaxError):
        parsed = value  # a bare word such as gelu
    return key.strip(), parsed


def _add_demo(subparsers) -> None:
    from .demo_model import SIZES

    demo = subparsers.add_parser(
        "demo",
        help="train a small byte-level GPT with torch AdamW and with slimoptim, then compare",
        description=_paragraphs(
            "Train a small GPT-style byte-level language model on the Python standard "
            "library's source files (already on this machine: nothing is downloaded), once "
            "with torch.optim.AdamW on float32 weights and once per slimoptim optimizer and "
            "mode on a bfloat16 model. Matmuls run in bf16 where that is faster than float32 "
            "(measured at start on a CPU) and in float32 elsewhere, for every run. Prints a "
            "line per evaluation, then validation loss, speed and memory, and writes "
            "results.json and results.png (losses, bytes/param) to --out.",
            "Same command, same machine: same losses.",
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n" + DEMO_EXAMPLES,
    )
    demo.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N")
    demo.add_argument(
        "--size",
        choices=list(SIZES),
        default="small",
        help="model and batch size: tiny (tests), small (CPU default), medium (GPU)",
    )
    demo.add_argument(
        "--steps",
        type=_positive_int,
        default=None,
        metavar="N",
        help="training steps per run (tiny 40, small 300, medium 2000)",
    )
    demo.add_argument(
        "--seed", type=int, default=0, metavar="N", help="seed for init and data order (0)"
    )
    demo.add_argument(
        "--out", default="slimoptim-demo", metavar="DIR", help="results folder (./slimoptim-demo)"
    )
    demo.add_argument(
        "--optimizers",
        metavar="LIST",
        type=_comma_list(list(OPTIMIZERS)),
        default=["adamw"],
        help=f"slimoptim optimizers to run, comma-separated: {','.join(OPTIMIZERS)} (adamw)",
    )
    demo.add_argument(
        "--master-weight-bits",
        metavar="LIST",
        type=_comma_list(["24", "32", "none"]),
        default=["24"],
        help="master weight bits, comma-separated: 24,32,none (24)",
    )
    demo.add_argument(
        "--state-bits",
        metavar="LIST",
        type=_comma_list(["8", "32"]),
        default=["8"],
        help="optimizer state bits, comma-separated: 8,32 (8)",
    )
    demo.add_argument(
        "--gradient-release",
        action="store_true",
        help="slimoptim runs step each parameter in backward and free its gradient "
        "(gradients clipped per tensor instead of by global norm)",
    )
    demo.add_argument(
        "--pure-bf16-baseline",
        action="store_true",
        help="also train torch AdamW directly on bf16 params (no master weights)",
    )
    demo.add_argument(
        "--compute-dtype",
        choices=["auto", "bfloat16", "float32"],
        default="auto",
        help="matmul dtype of every run; auto: bfloat16 where it is faster than float32 "
        "(GPUs, CPUs with bf16 instructions: measured at start), else float32",
    )
    demo.add_argument("--no-plot", action="store_true", help="skip the PNG plot")
    demo.set_defaults(handler="demo")


def _add_plan(subparsers) -> None:
    plan = subparsers.add_parser(
        "plan",
        help="how much memory training a model takes with torch AdamW and with slimoptim",
        description=_paragraphs(
            "Memory of the training state (weights, master-weight correction, gradients, "
            "optimizer states and their scales) for torch AdamW with float32 master weights, "
            "torch AdamW on pure bf16, and every slimoptim optimizer and mode, with and "
            "without gradient release. Activations, temporary buffers and the CUDA context "
            "are not included.",
            "MODEL is a parameter count (7e9, 1.1B, 350M) or, with transformers installed, a "
            "model type (llama, gpt2) or a hub id already in the local cache. Nothing is "
            "downloaded; models are built on the meta device, so no memory is used.",
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n" + PLAN_EXAMPLES,
    )
    source = plan.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "model", nargs="?", help="parameter count (7e9, 1.1B, 350M) or a transformers model"
    )
    source.add_argument(
        "--hf-config", metavar="PATH", help="a Hugging Face config.json (or its folder)"
    )
    source.add_argument(
        "--module", metavar="PKG.MOD:FACTORY", help="a callable returning an nn.Module"
    )
    plan.add_argument(
        "--module-arg",
        metavar="KEY=VALUE",
        type=_keyword_argument,
        action="append",
        default=[],
        help="keyword argument for the --module factory (repeatable); VALUE is a Python "
        "literal (24, 0.1, True, 'gelu') or else a string",
    )
    plan.add_argument(
        "--gpu-memory", metavar="SIZE", help="say whether each setup fits, e.g. 80GB, 24GiB"
    )
    plan.add_argument(
        "--world-size",
        type=_positive_int,
        metavar="N",
        default=1,
        help="GPUs sharing the state with FSDP (full sharding): per-GPU figures are / N",
    )
    plan.add_argument(
        "--optimizers",
        metavar="LIST",
        type=_comma_list(list(PLAN_OPTIMIZERS)),
        default=None,
        help=f"slimoptim optimizers to list ({','.join(PLAN_OPTIMIZERS)}; default: all; "
        "muon: Muon on the hidden matrices + AdamW on the rest, needs the model's shapes)",
    )
    plan.add_argument(
        "--all-modes",
        action="store_true",
        help="every mode (master weight bits 24/32/none x state bits 8/32) and every "
        "component, instead of the default modes (24/8 and none/8)",
    )
    plan.add_argument(
        "--group-size",
        type=_positive_int,
        default=32,
        metavar="N",
        help="values per 8-bit state scale (32)",
    )
    plan.add_argument("--json", action="store_true", help="print the plan as JSON instead")
    plan.set_defaults(handler="plan")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="slimoptim",
        description=_paragraphs(
            "slimoptim: memory-efficient drop-in PyTorch optimizers (bf16 weights + 8-bit "
            "master-weight correction + 8-bit states: ~7 bytes/param for AdamW instead of 16)."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
        + DEMO_EXAMPLES
        + PLAN_EXAMPLES
        + "\nRun 'slimoptim COMMAND --help' for a command's options.",
    )
    from . import __version__

    parser.add_argument("--version", action="version", version=f"slimoptim {__version__}")
    subparsers = parser.add_subparsers(title="commands", metavar="COMMAND")
    _add_demo(subparsers)
    _add_plan(subparsers)
    return parser


def _reject_negative_numbers(argv: Sequence[str]) -> None:
    """'plan -5B' would read as an unknown option '-5B': say what is wrong instead."""
    for token in argv:
        if _NEGATIVE.fullmatch(token):
            raise CommandError(
                f"{token!r}: counts and sizes must be positive (e.g. 7B, 350M, 80GB)"
            )


def _quiet_broken_pipe() -> None:
    """The reader went away (``slimoptim plan 1.5T | head -5``): stop without a traceback.
    Later writes, including the interpreter's final flush, go to /dev/null."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    command = argv[0] if argv else None
    try:
        if command == "plan":
            _reject_negative_numbers(argv[1:])
        args = parser.parse_args(argv)
        if not hasattr(args, "handler"):
            parser.print_help()
            return 2
        if args.handler == "demo":
            from .demo import run_demo

            run_demo(args)
        else:
            from .plan import run_plan

            run_plan(args)
        sys.stdout.flush()  # a closed pipe fails here, inside the handler below
    except CommandError as error:
        print(f"slimoptim {command}: error: {error}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        _quiet_broken_pipe()
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
