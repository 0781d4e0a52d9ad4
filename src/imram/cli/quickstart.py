"""``imram quickstart``: prepare the Tux Paint stamps, train four models, report them beside
chance."""

from __future__ import annotations

import argparse


def _quickstart(args: argparse.Namespace) -> int:
    from imram.workflows.quickstart import run_quickstart

    result = run_quickstart(
        args.out, overrides=args.set, device=args.device, progress=not args.no_progress
    )
    print(result.table)
    print(
        f"wrote {result.report_md} and {result.report_json} "
        f"(whole run {result.seconds / 60:.1f} min)"
    )
    return 0


def add_command(commands: argparse._SubParsersAction) -> None:
    """Add ``quickstart`` to the ``imram`` command."""
    quick = commands.add_parser(
        "quickstart",
        help="prepare Tux Paint, train Full-IMRAM, SCAN t-i, VSE++ and MEMBER, compare",
    )
    quick.add_argument("--out", default="runs/quickstart", help="default runs/quickstart")
    quick.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a key of every preset, e.g. train.epochs=2 (repeatable)",
    )
    quick.add_argument("--device", help="cpu or cuda (default: cuda when present)")
    quick.add_argument("--no-progress", action="store_true", help="no progress bars")
    quick.set_defaults(func=_quickstart)
