"""``imram bench``: the benchmarks, each against a baseline measured in the same run."""

from __future__ import annotations

import argparse
from pathlib import Path

from imram.errors import ConfigError


def _bench(args: argparse.Namespace) -> int:
    from imram.bench import (
        TIME_TO_ACCURACY_PRESETS,
        TrainingShape,
        bench_low_precision_scoring,
        bench_scoring,
        bench_time_to_accuracy,
        bench_topk_memory,
        bench_training,
        bench_two_stage,
        bench_two_stage_synthetic,
        format_low_precision,
        format_scoring,
        format_training,
        is_embedding,
        low_precision_rsum,
    )

    if args.what == "accuracy":
        return _accuracy(args)
    args.split = args.split or "test"
    if args.what == "training" and args.time_to_accuracy:
        print(
            bench_time_to_accuracy(
                args.time_to_accuracy,
                tuple(args.presets or TIME_TO_ACCURACY_PRESETS),
                args.out or "runs/time_to_accuracy",
                args.minutes,
                args.set,
                progress=not args.no_progress,
            )
        )
        return 0
    if args.what == "training":
        names = tuple(args.models or ["imram_full", "imram_text", "imram_image", "vsepp"])
        steps_k = (args.steps or [3])[0]
        low, high = args.lengths
        for batch in args.batch:
            for dim in args.dims:
                shape = TrainingShape(
                    batch, steps_k, args.regions, dim, low, high, args.img_dim, args.shortlist_m
                )
                results = bench_training(
                    names,
                    precisions=tuple(args.precisions),
                    shape=shape,
                    repeats=args.repeats,
                    threads=args.threads,
                    checkpointed=args.activation_checkpointing,
                    baseline=not args.no_baseline,
                )
                print(format_training(results, shape), flush=True)
        low = [p for p in args.precisions if p != "fp32"]
        names = tuple(n for n in names if not is_embedding(n))
        if low and not args.no_scoring:
            scoring = bench_low_precision_scoring(
                tuple((name, steps_k) for name in names),
                low[0],
                threads=args.threads,
                repeats=args.repeats,
            )
            print(format_low_precision(scoring, 128, 128))
            checkpoint = args.checkpoint or "runs/quickstart/quickstart_full_imram"
            data = args.data or "runs/quickstart/tuxpaint_precomp"
            if Path(checkpoint).exists() and Path(data).is_dir():
                print(low_precision_rsum(checkpoint, data, args.split, low[0]))
            else:
                print(f"(no {checkpoint} with {data}: run imram quickstart for the rsum check)")
        return 0

    if args.what == "extract":
        from imram.bench.extract import bench_extract, format_extract

        timings = bench_extract(args.pictures, tuple(args.sizes), threads=args.threads)
        print(format_extract(timings, args.pictures))
        return 0
    if args.what == "two-stage":
        if not (args.first and args.second and args.data):
            raise ConfigError("bench two-stage needs --first CKPT --second CKPT --data DIR")
        shortlist = args.shortlist or [10, 20, 50, 100, 200, 0]
        ks = tuple(None if k == 0 else k for k in shortlist)
        print(bench_two_stage(args.first, args.second, args.data, args.split, ks))
        print(bench_two_stage_synthetic(ks=tuple(k for k in ks if k), threads=args.threads))
        return 0
    if args.what == "memory":
        for name in args.models or ["imram_full"]:
            for steps in args.steps or [3]:
                print(bench_topk_memory(name=name, steps=steps, threads=args.threads))
        return 0

    models = args.models or ["imram_full", "imram_text", "imram_image"]
    configs = tuple((name, steps) for name in models for steps in args.steps or [1, 3])
    results = bench_scoring(
        configs,
        args.images,
        args.captions,
        args.baseline_captions,
        threads=args.threads,
        repeats=args.repeats,
    )
    print(format_scoring(results, args.images, args.captions))
    return 0


def _accuracy(args: argparse.Namespace) -> int:
    from imram.bench.accuracy import SHORTLISTS, bench_accuracy

    shortlist = args.shortlist if args.shortlist is not None else SHORTLISTS
    report = bench_accuracy(
        args.presets or [],
        args.data or "runs/accuracy/data",
        args.out or "runs/accuracy",
        images=args.photos,
        captions=args.caption_file,
        fmt=args.format,
        split=args.split or "dev",
        minutes=args.minutes,
        seeds=args.seeds,
        overrides=args.set,
        rerank_with=args.rerank_with,
        shortlists=tuple(shortlist),
        one_stage=args.one_stage,
        progress=not args.no_progress,
    )
    print(report.table())
    return 0


def add_command(commands: argparse._SubParsersAction) -> None:
    """Add ``bench`` to the ``imram`` command."""
    from imram.config import PRECISIONS

    bench = commands.add_parser("bench", help="measure the engine against a baseline")
    bench.add_argument(
        "what",
        choices=["scoring", "memory", "two-stage", "training", "extract", "accuracy"],
        help="scoring: pairs/s; memory: top-k streaming; two-stage: shortlist + re-rank; "
        "training: steps/s; extract: feature extraction pictures/s; accuracy: train presets "
        "on real photos and compare their recalls",
    )
    bench.add_argument(
        "--models", nargs="+", help="default: all three IMRAM variants (memory: imram_full)"
    )
    bench.add_argument("--steps", nargs="+", type=int, help="K values (default 1 3; memory: 3)")
    bench.add_argument("--images", type=int, default=128)
    bench.add_argument("--captions", type=int, default=128)
    bench.add_argument(
        "--baseline-captions",
        type=int,
        help="time the baseline on the first N captions only (its cost per caption is constant)",
    )
    bench.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    bench.add_argument("--repeats", type=int, default=3, help="timed runs each; the best counts")
    bench.add_argument(
        "--batch", type=int, nargs="+", default=[32], help="training: batch sizes (default 32)"
    )
    bench.add_argument(
        "--dims", type=int, nargs="+", default=[1024], help="training: d values (default 1024)"
    )
    bench.add_argument(
        "--regions", type=int, default=36, help="training: regions per image (default 36)"
    )
    bench.add_argument(
        "--img-dim", type=int, default=2048, help="training: region feature size (default 2048)"
    )
    bench.add_argument(
        "--shortlist-m",
        type=int,
        default=4,
        help="training: candidates per query of the shortlist-mined step (default 4)",
    )
    bench.add_argument(
        "--lengths",
        type=int,
        nargs=2,
        default=[8, 20],
        metavar=("MIN", "MAX"),
        help="training: caption lengths drawn from MIN..MAX (default 8 20)",
    )
    bench.add_argument(
        "--no-baseline", action="store_true", help="training: skip the release-style loop"
    )
    bench.add_argument(
        "--precisions",
        nargs="+",
        choices=PRECISIONS[:3],
        default=["fp32", "bf16"],
        help="training: precisions to measure (default fp32 bf16)",
    )
    bench.add_argument(
        "--activation-checkpointing",
        action="store_true",
        help="training: also time the engine with activation checkpointing (memory column)",
    )
    bench.add_argument(
        "--checkpoint",
        help="training: checkpoint whose low-precision rsum is compared with fp32 on --data "
        "--split (default: the quickstart's Full-IMRAM run and data)",
    )
    bench.add_argument(
        "--no-scoring",
        action="store_true",
        help="training: skip the low-precision scoring section",
    )
    bench.add_argument(
        "--time-to-accuracy",
        metavar="DATA",
        help="training: train --presets on this precomp folder and report dev rsum against "
        "training minutes instead of steps/s",
    )
    bench.add_argument(
        "--presets",
        nargs="+",
        help="time to accuracy: presets to train, the baseline last (default: the CPU "
        "presets of Full-IMRAM and VSE++); accuracy: presets to train and compare",
    )
    bench.add_argument(
        "--minutes",
        type=float,
        default=0.0,
        help="time to accuracy, accuracy: training budget per preset (default: its epochs)",
    )
    bench.add_argument(
        "--out",
        help="time to accuracy, accuracy: where the runs go (default runs/time_to_accuracy, "
        "runs/accuracy)",
    )
    bench.add_argument(
        "--set",
        action="append",
        default=[],
        help="time to accuracy, accuracy: key=value for every preset",
    )
    bench.add_argument("--no-progress", action="store_true", help="no progress bars")
    bench.add_argument(
        "--pictures", type=int, default=300, help="extract: generated pictures (default 300)"
    )
    bench.add_argument(
        "--sizes", type=int, nargs="+", default=[224, 320], help="extract: input sizes in px"
    )
    bench.add_argument("--first", help="two-stage: the shortlisting (embedding) checkpoint")
    bench.add_argument("--second", help="two-stage: the re-ranking (IMRAM) checkpoint")
    bench.add_argument(
        "--data",
        help="two-stage, training, accuracy: precomp folder (accuracy: prepared there from "
        "--photos and --caption-file when it holds none; default runs/accuracy/data)",
    )
    bench.add_argument(
        "--split", help="two-stage, training: split (default test); accuracy: (default dev)"
    )
    bench.add_argument(
        "--shortlist",
        type=int,
        nargs="+",
        help="two-stage: shortlist sizes, 0 = everything (default 10 20 50 100 200 0); "
        "accuracy: the re-ranked shortlists (default 10 30 100)",
    )
    bench.add_argument("--photos", help="accuracy: the images folder to prepare --data from")
    bench.add_argument("--caption-file", help="accuracy: the caption file to prepare --data from")
    bench.add_argument("--format", help="accuracy: the caption file's format (default: detected)")
    bench.add_argument(
        "--seeds", type=int, nargs="+", help="accuracy: training seeds, for the spread (default 0)"
    )
    bench.add_argument(
        "--rerank-with",
        help="accuracy: an embedding preset whose shortlists the cross-attention presets re-rank",
    )
    bench.add_argument(
        "--one-stage",
        action="store_true",
        help="accuracy: also score every pair with the cross-attention presets (slow on a CPU)",
    )
    bench.set_defaults(func=_bench)
