"""``imram demo``: score random features at the paper's size and check a few pairs against
the reference scorer."""

from __future__ import annotations

import argparse


def _demo(args: argparse.Namespace) -> int:
    from imram.metrics import format_table
    from imram.workflows.demo import run_demo

    result = run_demo(args.model, n_images=args.images, seed=args.seed)
    print(
        f"{result.model}: scored {result.n_images} images x {result.n_captions} captions "
        f"in {result.seconds:.2f} s ({result.pairs_per_second:,.0f} pairs/s); "
        f"max |batched - reference| on 6 pairs = {result.max_reference_diff:.2e}"
    )
    print(format_table(result.metrics, title="random weights, random features"))
    print(format_table(result.chance, title="chance level"))
    return 0


def add_command(commands: argparse._SubParsersAction) -> None:
    """Add ``demo`` to the ``imram`` command."""
    demo = commands.add_parser("demo", help="build a model and score random features")
    demo.add_argument("--model", default="imram_full", help="registered model name")
    demo.add_argument("--images", type=int, default=16, help="images (5 captions each)")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=_demo)
