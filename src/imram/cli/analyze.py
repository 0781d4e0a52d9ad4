"""``imram analyze``: the paper's analyses (steps, aggregators, attention maps, salient words)
and MEMBER's banks."""

from __future__ import annotations

import argparse

from imram.cli.common import pick


def _analyze(args: argparse.Namespace) -> int:
    """``analyze steps|aggregators|attention|salient|banks``: one library call, then its
    summary."""
    from imram import analysis

    if args.analysis in ("steps", "aggregators"):
        sweep = analysis.run_steps if args.analysis == "steps" else analysis.run_aggregators
        choice = args.steps if args.analysis == "steps" else args.aggregators
        result = sweep(
            args.config,
            args.data,
            args.out,
            args.set,
            choice,
            progress=not args.no_progress,
            **pick(args, "split", "protocol", "device"),
        )
    elif args.analysis == "attention":
        result = analysis.attention_maps(
            args.checkpoint,
            args.data,
            args.out,
            args.image,
            args.caption,
            **pick(args, "split", "max_words", "device"),
        )
    elif args.analysis == "banks":
        result = analysis.bank_analysis(
            args.checkpoint, args.data, args.out, **pick(args, "split", "device")
        )
    else:
        result = analysis.salient_analysis(
            args.checkpoint,
            args.data,
            args.split,
            args.out,
            progress=not args.no_progress,
            **pick(args, "max_pairs", "seed", "device"),
        )
    print(result.summary())
    return 0


def add_command(commands: argparse._SubParsersAction) -> None:
    """Add ``analyze`` to the ``imram`` command."""
    from imram.config import AGGREGATORS
    from imram.metrics import PROTOCOLS

    analyze = commands.add_parser(
        "analyze", help="the paper's analyses: steps K, aggregators, attention maps, salient words"
    )
    analyses = analyze.add_subparsers(dest="analysis", required=True, metavar="ANALYSIS")
    sweeps = {
        "steps": "train and evaluate K = 1, 2, 3 (Table 4)",
        "aggregators": "train and evaluate each memory aggregator (Table 5)",
    }
    for name, text in sweeps.items():
        sweep = analyses.add_parser(name, help=text)
        sweep.add_argument("--config", required=True, help="preset name or YAML file")
        sweep.add_argument("--data", required=True, help="precomp folder")
        sweep.add_argument("--out", required=True, help="folder for the runs, report and plot")
        sweep.add_argument(
            "--set",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="override a key of every variant, e.g. train.epochs=4 (repeatable)",
        )
        if name == "steps":
            sweep.add_argument("--steps", type=int, nargs="+", default=[1, 2, 3], help="K values")
        else:
            sweep.add_argument(
                "--aggregators", nargs="+", choices=AGGREGATORS, default=list(AGGREGATORS)
            )
        sweep.add_argument("--split", default="test", help="evaluation split (default test)")
        sweep.add_argument("--protocol", choices=PROTOCOLS, default="1k")
        sweep.add_argument("--device", help="cpu or cuda (default: cuda when present)")
        sweep.add_argument("--no-progress", action="store_true", help="no progress bars")
    attention = analyses.add_parser(
        "attention", help="per-step attention of a caption's words over an image (Figure 3)"
    )
    attention.add_argument("--checkpoint", required=True, help="IMRAM or SCAN t-i run/checkpoint")
    attention.add_argument(
        "--data", required=True, help="precomp folder: its split images, or its extractor"
    )
    attention.add_argument(
        "--image",
        required=True,
        metavar="FILE|INDEX|NAME",
        help="an image file, or an image of --split: its row index or its name in the ids file",
    )
    attention.add_argument("--caption", help="text to match (default: a split image's caption)")
    attention.add_argument("--split", default="test", help="split of --image (default test)")
    attention.add_argument("--out", required=True, help="folder for the figure and report")
    attention.add_argument("--max-words", type=int, default=12, help="rows of the figure")
    attention.add_argument("--device", help="cpu or cuda (default: cuda when present)")
    salient = analyses.add_parser(
        "salient", help="share of salient nouns, verbs, adjectives per step (Table 6)"
    )
    salient.add_argument("--checkpoint", required=True, help="IMRAM or SCAN t-i run/checkpoint")
    salient.add_argument("--data", required=True, help="precomp folder")
    salient.add_argument("--split", default="test", help="split (default test)")
    salient.add_argument("--out", required=True, help="folder for the table, plot and report")
    salient.add_argument("--max-pairs", type=int, help="sample this many captions (default all)")
    salient.add_argument("--seed", type=int, default=0, help="seed of the sample")
    salient.add_argument("--device", help="cpu or cuda (default: cuda when present)")
    salient.add_argument("--no-progress", action="store_true", help="no progress bar")
    banks = analyses.add_parser(
        "banks", help="what MEMBER's memory banks hold and how evenly fragments attend to them"
    )
    banks.add_argument("--checkpoint", required=True, help="MEMBER run/checkpoint")
    banks.add_argument("--data", required=True, help="precomp folder")
    banks.add_argument("--split", default="test", help="split (default test)")
    banks.add_argument("--out", required=True, help="folder for the report")
    banks.add_argument("--device", help="cpu or cuda (default: cuda when present)")
    analyze.set_defaults(func=_analyze)
