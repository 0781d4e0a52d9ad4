"""The ``imram`` command: parses arguments and calls one library function per subcommand."""

from __future__ import annotations

import argparse
import sys

from imram.errors import ImramError


def _demo(args: argparse.Namespace) -> int:
    from imram.demo import run_demo
    from imram.metrics import format_table

    result = run_demo(args.model, n_images=args.images, seed=args.seed)
    print(
        f"{result.model}: scored {result.n_images} images x {result.n_captions} captions "
        f"in {result.seconds:.2f} s ({result.pairs_per_second:,.0f} pairs/s); "
        f"max |batched - reference| on 6 pairs = {result.max_reference_diff:.2e}"
    )
    print(format_table(result.metrics, title="random weights, random features"))
    print(format_table(result.chance, title="chance level"))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="imram", description="Cross-modal image-text retrieval: IMRAM, SCAN, VSE++."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo = commands.add_parser(
        "demo", help="build a model and score random features against the reference"
    )
    demo.add_argument("--model", default="imram_full", help="registered model name")
    demo.add_argument(
        "--images", type=int, default=16, help="images (5 captions each)"
    )
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``imram`` and ``python -m imram``; user errors print one line, exit 2."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ImramError as err:
        print(f"imram {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
