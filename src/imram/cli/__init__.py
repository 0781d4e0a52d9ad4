"""The ``imram`` command: one module per subcommand, each parsing its arguments and calling
one library function; user errors print one line."""

from __future__ import annotations

import argparse
import sys

from imram.allocator import tune_allocator
from imram.cli import (
    analyze,
    bench,
    demo,
    ensemble,
    evaluate,
    index,
    prepare,
    quickstart,
    search,
    serve,
    train,
    vocab,
)
from imram.errors import ImramError, Interrupted

SUBCOMMANDS = (
    demo,
    vocab,
    train,
    evaluate,
    ensemble,
    prepare,
    quickstart,
    bench,
    index,
    search,
    serve,
    analyze,
)


def build_parser() -> argparse.ArgumentParser:
    """The parser of every subcommand."""
    parser = argparse.ArgumentParser(
        prog="imram", description="Cross-modal image-text retrieval: IMRAM, SCAN, VSE++."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in SUBCOMMANDS:
        module.add_command(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``imram`` and ``python -m imram``: a user error prints one line and
    exits 2; an interrupted workflow says how to resume and exits 130."""
    args = build_parser().parse_args(argv)
    tune_allocator()  # every command that runs a network reuses freed buffers (imram.allocator)
    try:
        return args.func(args)
    except Interrupted as err:
        print(f"imram {args.command}: {err}", file=sys.stderr)
        return 130
    except ImramError as err:
        print(f"imram {args.command}: error: {err}", file=sys.stderr)
        return 2
