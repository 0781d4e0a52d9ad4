"""``imram ensemble``: average saved similarity matrices and evaluate them."""

from __future__ import annotations

import argparse

from imram.cli.common import write_json


def _ensemble(args: argparse.Namespace) -> int:
    from imram.data import PrecompDataset
    from imram.evaluation import ensemble
    from imram.metrics import format_table

    dataset = PrecompDataset(args.data, args.split, None)
    metrics = ensemble(args.matrices, dataset, args.protocol)
    print(format_table(metrics, title=f"ensemble of {len(args.matrices)} on {args.split}"))
    write_json(
        args.json,
        {"matrices": args.matrices, "split": args.split, "protocol": args.protocol, **metrics},
    )
    return 0


def add_command(commands: argparse._SubParsersAction) -> None:
    """Add ``ensemble`` to the ``imram`` command."""
    from imram.metrics import PROTOCOLS

    ens = commands.add_parser("ensemble", help="average saved similarity matrices")
    ens.add_argument("matrices", nargs="+", help="matrices saved by evaluate --save-sims")
    ens.add_argument("--data", required=True, help="precomp folder")
    ens.add_argument("--split", default="test")
    ens.add_argument("--protocol", choices=PROTOCOLS, default="1k")
    ens.add_argument("--json", help="write the metrics here")
    ens.set_defaults(func=_ensemble)
