"""The ``imram`` command: parses arguments and calls one library function per subcommand."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from imram.errors import ConfigError, ImramError, Interrupted


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


def _vocab(args: argparse.Namespace) -> int:
    from imram.data import Vocabulary

    files = [Path(args.data) / f"{split}_caps.txt" for split in args.splits]
    vocab = Vocabulary.from_caption_files(files, args.threshold)
    vocab.save(args.out)
    print(f"wrote {args.out}: {len(vocab)} words (threshold {args.threshold}, {len(files)} files)")
    return 0


def _train(args: argparse.Namespace) -> int:
    from imram.config import load_config
    from imram.devices import local_device
    from imram.distributed import process_group
    from imram.training import train

    source = args.config
    if source is None:
        if not args.resume:
            raise ConfigError("train needs --config (or --resume with an existing --out)")
        source = str(Path(args.out) / "config.yaml")
    config = load_config(source, args.set)
    with process_group() as (rank, world):  # torchrun: gloo on CPU, NCCL on GPU
        device = args.device or (local_device() if world > 1 else None)
        result = train(
            config, args.data, args.out, args.vocab, args.resume, device, not args.no_progress
        )
    if rank != 0:
        return 0
    if result.interrupted:
        state = "interrupted (checkpointed; continue with --resume)"
    elif result.stopped_early:
        state = "stopped at the time budget"
    else:
        state = "finished"
    skipped = (
        f", {result.nonfinite_steps} non-finite steps skipped" if result.nonfinite_steps else ""
    )
    print(
        f"{state}: epoch {result.epoch}, iteration {result.iteration}, "
        f"best validation rsum {result.best_rsum:.1f}{skipped}; checkpoints in {result.run_dir}"
    )
    return 0


def _load_model(args: argparse.Namespace):
    from imram.checkpoint import import_release_checkpoint, load_checkpoint
    from imram.data import Vocabulary
    from imram.errors import DataError

    path = Path(args.checkpoint)
    vocab = Vocabulary.load(args.vocab) if args.vocab else None
    if path.is_file():
        if vocab is None:
            raise DataError(f"{path}: a release checkpoint has no vocabulary; pass --vocab")
        return import_release_checkpoint(path, vocab)
    checkpoint = load_checkpoint(path)
    if vocab is not None and vocab != checkpoint.vocab:
        raise DataError(
            f"{args.vocab}: vocabulary does not match the checkpoint's "
            f"({len(vocab)} vs {len(checkpoint.vocab)} words)"
        )
    return checkpoint


def _write_json(path: str | None, payload: dict) -> None:
    if path:
        from imram.files import atomic_write_text

        atomic_write_text(path, json.dumps(payload, indent=1))


def _evaluate_rerank(args: argparse.Namespace) -> int:
    """``evaluate --rerank``: the --checkpoint shortlists, the --rerank checkpoint re-ranks."""
    from imram.checkpoint import load_checkpoint
    from imram.data import PrecompDataset
    from imram.devices import default_device
    from imram.metrics import format_table
    from imram.retrieval.two_stage import rerank_split

    device = args.device or default_device()
    first = _load_model(args)
    second = load_checkpoint(args.rerank)
    results = rerank_split(
        first.model.to(device),
        PrecompDataset(args.data, args.split, first.vocab),
        second.model.to(device),
        PrecompDataset(args.data, args.split, second.vocab),
        [None if k == 0 else k for k in args.shortlist],
        args.protocol,
        device,
        progress=not args.no_progress,
    )
    for metrics in results:
        title = (
            f"{first.config.model.name} shortlist {metrics['shortlist']} -> "
            f"{second.config.model.name} on {args.split} ({args.protocol})"
        )
        print(format_table(metrics, title=title))
        print(
            f"true match inside the shortlist: i2t {metrics['i2t_in_shortlist']:.1f}%, "
            f"t2i {metrics['t2i_in_shortlist']:.1f}% (the rest count as misses); "
            f"{metrics['pairs_scored']:,} pairs re-ranked in {metrics['rerank_seconds']:.1f} s"
        )
    payload = {"checkpoint": str(first.path), "rerank": str(second.path), "split": args.split}
    _write_json(args.json, {**payload, "protocol": args.protocol, "results": results})
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    import numpy as np

    if args.rerank:
        return _evaluate_rerank(args)

    from imram.data import PrecompDataset
    from imram.devices import default_device, local_device
    from imram.distributed import process_group
    from imram.evaluation import evaluate_model
    from imram.metrics import format_table

    with process_group() as (rank, world):
        device = args.device or (local_device() if world > 1 else default_device())
        checkpoint = _load_model(args)
        dataset = PrecompDataset(args.data, args.split, checkpoint.vocab)
        model = checkpoint.model.to(device)
        metrics, sims, _ = evaluate_model(
            model,
            dataset,
            args.protocol,
            batch_size=args.batch_size,
            device=device,
            precision=args.precision,
            against_fp32=args.against_fp32,
            progress=not args.no_progress and rank == 0,
        )
    if rank != 0:
        return 0
    title = f"{checkpoint.config.model.name} on {args.split} ({args.protocol}, {args.precision})"
    if world > 1:
        title += f", scored by {world} processes"
    print(format_table(metrics, title=title))
    if "fp32_rsum" in metrics:
        print(
            f"fp32 rsum {metrics['fp32_rsum']:.2f}: {args.precision} differs by "
            f"{metrics['rsum_vs_fp32']:+.2f} rsum, at most {metrics['max_score_diff_vs_fp32']:.2e} "
            "in a score"
        )
    payload = {
        "checkpoint": str(checkpoint.path),
        "split": args.split,
        "protocol": args.protocol,
        "precision": args.precision,
    }
    _write_json(args.json, {**payload, **metrics})
    if args.save_sims:
        from imram.files import atomic_output

        with atomic_output(args.save_sims) as tmp, open(tmp, "wb") as handle:
            np.save(handle, sims)
    return 0


def _ensemble(args: argparse.Namespace) -> int:
    from imram.data import PrecompDataset
    from imram.evaluation import ensemble
    from imram.metrics import format_table

    dataset = PrecompDataset(args.data, args.split, None)
    metrics = ensemble(args.matrices, dataset, args.protocol)
    print(format_table(metrics, title=f"ensemble of {len(args.matrices)} on {args.split}"))
    _write_json(
        args.json,
        {"matrices": args.matrices, "split": args.split, "protocol": args.protocol, **metrics},
    )
    return 0


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

    if args.what == "training" and args.time_to_accuracy:
        print(
            bench_time_to_accuracy(
                args.time_to_accuracy,
                tuple(args.presets or TIME_TO_ACCURACY_PRESETS),
                args.out,
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

    if args.what == "two-stage":
        if not (args.first and args.second and args.data):
            raise ConfigError("bench two-stage needs --first CKPT --second CKPT --data DIR")
        ks = tuple(None if k == 0 else k for k in args.shortlist)
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


def _extractor(args: argparse.Namespace):
    from imram.features.extract import ExtractorConfig

    return ExtractorConfig(
        backbone=args.backbone,
        input_size=args.input_size,
        batch_size=args.batch_size,
        resize=args.resize,
    )


def _prepare(args: argparse.Namespace) -> int:
    from imram.prepare import prepare_folder, prepare_tuxpaint

    common = dict(
        extractor=_extractor(args),
        dev_fraction=args.dev_fraction,
        test_fraction=args.test_fraction,
        seed=args.seed,
        progress=not args.no_progress,
        device=args.device,
        overwrite=args.overwrite,
    )
    if args.source == "tuxpaint":
        report = prepare_tuxpaint(args.out, cache=args.cache, **common)
    else:
        if not args.images or not args.captions:
            raise ConfigError("prepare folder needs --images DIR and --captions FILE")
        report = prepare_folder(
            args.images,
            args.captions,
            args.format,
            args.out,
            max_dev_images=args.max_dev_images,
            max_test_images=args.max_test_images,
            max_captions_per_image=args.max_captions_per_image,
            **common,
        )
    print(report.summary())
    return 0


def _quickstart(args: argparse.Namespace) -> int:
    from imram.quickstart import run_quickstart

    result = run_quickstart(
        args.out, overrides=args.set, device=args.device, progress=not args.no_progress
    )
    print(result.table)
    print(
        f"wrote {result.report_md} and {result.report_json} "
        f"(whole run {result.seconds / 60:.1f} min)"
    )
    return 0


def _index_build(args: argparse.Namespace) -> int:
    from imram.retrieval import build_index

    info = build_index(
        args.checkpoint,
        args.data,
        args.split,
        args.out,
        kind=args.kind,
        nlist=args.nlist,
        nprobe=args.nprobe,
        batch_size=args.batch_size,
        device=args.device,
        progress=not args.no_progress,
        overwrite=args.overwrite,
    )
    print(info.summary())
    return 0


def _search(args: argparse.Namespace) -> int:
    from imram.retrieval import search_index
    from imram.retrieval.two_stage import two_stage_search

    query = dict(
        text=args.text,
        image=args.image,
        k=args.k,
        checkpoint=args.checkpoint,
        nprobe=args.nprobe,
        device=args.device,
    )
    if args.rerank:
        hits = two_stage_search(args.index, args.rerank, shortlist=args.shortlist, **query)
    else:
        hits = search_index(args.index, **query)
    _print_hits(args, hits)
    return 0


def _serve(args: argparse.Namespace) -> int:
    from imram.serving import serve

    def announce(url: str) -> None:
        print(f"serving {args.index} on {url} (Ctrl-C to stop)", flush=True)

    serve(
        args.index,
        checkpoint=args.checkpoint,
        rerank=args.rerank,
        shortlist=args.shortlist,
        host=args.host,
        port=args.port,
        device=args.device,
        announce=announce,
        log_level=args.log_level,
    )
    return 0


def _analyze(args: argparse.Namespace) -> int:
    """``analyze steps|aggregators|attention|salient``: one library call, then its summary."""
    from imram import analysis

    common = dict(device=args.device)
    if args.analysis in ("steps", "aggregators"):
        sweep = analysis.run_steps if args.analysis == "steps" else analysis.run_aggregators
        choice = args.steps if args.analysis == "steps" else args.aggregators
        result = sweep(
            args.config,
            args.data,
            args.out,
            args.set,
            choice,
            split=args.split,
            protocol=args.protocol,
            progress=not args.no_progress,
            **common,
        )
    elif args.analysis == "attention":
        result = analysis.attention_maps(
            args.checkpoint,
            args.data,
            args.out,
            args.image,
            args.caption,
            split=args.split,
            max_words=args.max_words,
            **common,
        )
    else:
        result = analysis.salient_analysis(
            args.checkpoint,
            args.data,
            args.split,
            args.out,
            max_pairs=args.max_pairs,
            seed=args.seed,
            progress=not args.no_progress,
            **common,
        )
    print(result.summary())
    return 0


def _print_hits(args: argparse.Namespace, hits: list) -> None:
    """The ranked hits of ``search``: a table (rank, score, name) or, with --json, JSON."""
    query = {"text": args.text} if args.text is not None else {"image": args.image}
    if args.json:
        payload = {"index": args.index, "query": query, "hits": [vars(hit) for hit in hits]}
        print(json.dumps(payload, indent=1, ensure_ascii=False))
        return
    found = "images" if args.text is not None else "captions"
    print(f"top {len(hits)} {found} for {next(iter(query.values()))!r}")
    print(f"{'rank':>4}  {'score':>7}  name")
    for hit in hits:
        print(f"{hit.rank:>4}  {hit.score:>7.4f}  {hit.name}")


def build_parser() -> argparse.ArgumentParser:
    from imram.config import PRECISIONS
    from imram.metrics import PROTOCOLS

    parser = argparse.ArgumentParser(
        prog="imram", description="Cross-modal image-text retrieval: IMRAM, SCAN, VSE++."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = commands.add_parser("demo", help="build a model and score random features")
    demo.add_argument("--model", default="imram_full", help="registered model name")
    demo.add_argument("--images", type=int, default=16, help="images (5 captions each)")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=_demo)

    vocab = commands.add_parser("vocab", help="build a vocabulary from a precomp folder")
    vocab.add_argument("--data", required=True, help="precomp folder")
    vocab.add_argument("--out", required=True, help="output JSON (the release's layout)")
    vocab.add_argument("--threshold", type=int, default=4, help="minimum word count (default 4)")
    vocab.add_argument("--splits", nargs="+", default=["train", "dev"], help="caption splits")
    vocab.set_defaults(func=_vocab)

    train = commands.add_parser("train", help="train a model on a precomp folder")
    train.add_argument("--config", help="preset name or YAML file (default with --resume: RUN's)")
    train.add_argument("--data", required=True, help="precomp folder")
    train.add_argument("--out", required=True, help="run directory")
    train.add_argument("--vocab", help="vocabulary JSON (default: built from train+dev)")
    train.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. model.steps=1 (repeatable)",
    )
    train.add_argument("--resume", action="store_true", help="continue RUN/last exactly")
    train.add_argument("--device", help="cpu or cuda (default: cuda when present)")
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    train.set_defaults(func=_train)

    evaluate = commands.add_parser("evaluate", help="R@K of a checkpoint on a split")
    evaluate.add_argument(
        "--checkpoint",
        required=True,
        help="run dir, checkpoint dir, or the release's model_best.pth.tar",
    )
    evaluate.add_argument("--data", required=True, help="precomp folder")
    evaluate.add_argument("--split", default="test", help="split name (default test)")
    evaluate.add_argument("--protocol", choices=PROTOCOLS, default="1k")
    evaluate.add_argument("--vocab", help="vocabulary JSON (required for a release checkpoint)")
    evaluate.add_argument("--json", help="write the metrics here")
    evaluate.add_argument("--save-sims", help="save the similarity matrix (.npy)")
    evaluate.add_argument("--batch-size", type=int, default=128)
    evaluate.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="fp32",
        help="autocast dtype (auto: bf16 where the hardware has bf16 matrix units)",
    )
    evaluate.add_argument(
        "--against-fp32",
        action="store_true",
        help="with bf16/fp16: score again in fp32 and report the rsum difference",
    )
    evaluate.add_argument(
        "--rerank", help="an IMRAM/SCAN checkpoint that re-ranks --checkpoint's shortlists"
    )
    evaluate.add_argument(
        "--shortlist",
        type=int,
        nargs="+",
        default=[100],
        help="with --rerank: shortlist sizes, 0 = everything (default 100)",
    )
    evaluate.add_argument("--device", help="cpu or cuda (default: cuda when present)")
    evaluate.add_argument("--no-progress", action="store_true", help="no progress bar")
    evaluate.set_defaults(func=_evaluate)

    ens = commands.add_parser("ensemble", help="average saved similarity matrices")
    ens.add_argument("matrices", nargs="+", help="matrices saved by evaluate --save-sims")
    ens.add_argument("--data", required=True, help="precomp folder")
    ens.add_argument("--split", default="test")
    ens.add_argument("--protocol", choices=PROTOCOLS, default="1k")
    ens.add_argument("--json", help="write the metrics here")
    ens.set_defaults(func=_ensemble)
    prep = commands.add_parser("prepare", help="images and captions -> a precomp folder")
    prep.add_argument(
        "source", choices=["folder", "tuxpaint"], help="folder: your images; tuxpaint: the stamps"
    )
    prep.add_argument("--out", required=True, help="precomp folder to write")
    prep.add_argument("--images", help="folder the caption file's image names are relative to")
    prep.add_argument("--captions", help="caption file")
    prep.add_argument(
        "--format",
        choices=["flickr8k", "csv", "karpathy", "coco", "tsv"],
        help="caption format (default: detected from the file)",
    )
    prep.add_argument(
        "--backbone",
        choices=["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"],
        default="efficientnet_lite0",
    )
    prep.add_argument(
        "--input-size", type=int, default=224, help="pixels (224: a 7x7 grid of regions)"
    )
    prep.add_argument("--resize", choices=["pad", "stretch", "center_crop"], default="pad")
    prep.add_argument("--batch-size", type=int, default=32)
    prep.add_argument("--dev-fraction", type=float, default=0.1)
    prep.add_argument("--test-fraction", type=float, default=0.1)
    prep.add_argument("--max-dev-images", type=int, help="cap the hashed dev split")
    prep.add_argument("--max-test-images", type=int, help="cap the hashed test split")
    prep.add_argument("--max-captions-per-image", type=int, help="keep an image's first N captions")
    prep.add_argument("--seed", default="imram", help="mixed into the split hash")
    prep.add_argument("--cache", help="tuxpaint: cache folder (default ~/.cache/imram)")
    prep.add_argument("--overwrite", action="store_true", help="replace an existing precomp")
    prep.add_argument("--device", help="cpu or cuda (default: cuda when present)")
    prep.add_argument("--no-progress", action="store_true", help="no progress bar")
    prep.set_defaults(func=_prepare)

    quick = commands.add_parser(
        "quickstart", help="prepare Tux Paint, train Full-IMRAM, SCAN t-i and VSE++, compare"
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

    bench = commands.add_parser("bench", help="measure the engine against a baseline")
    bench.add_argument(
        "what",
        choices=["scoring", "memory", "two-stage", "training"],
        help="scoring: pairs/s; memory: top-k streaming; two-stage: shortlist + re-rank; "
        "training: steps/s",
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
        "presets of Full-IMRAM and VSE++)",
    )
    bench.add_argument(
        "--minutes", type=float, default=0.0, help="time to accuracy: training budget per preset"
    )
    bench.add_argument(
        "--out", default="runs/time_to_accuracy", help="time to accuracy: where the runs go"
    )
    bench.add_argument(
        "--set", action="append", default=[], help="time to accuracy: key=value for every preset"
    )
    bench.add_argument("--no-progress", action="store_true", help="no progress bars")
    bench.add_argument("--first", help="two-stage: the shortlisting (embedding) checkpoint")
    bench.add_argument("--second", help="two-stage: the re-ranking (IMRAM) checkpoint")
    bench.add_argument("--data", help="two-stage, training: precomp folder")
    bench.add_argument("--split", default="test", help="two-stage, training: split (default test)")
    bench.add_argument(
        "--shortlist",
        type=int,
        nargs="+",
        default=[10, 20, 50, 100, 200, 0],
        help="two-stage: shortlist sizes, 0 = everything",
    )
    bench.set_defaults(func=_bench)

    index = commands.add_parser("index", help="FAISS indexes of a split for fast search")
    index_commands = index.add_subparsers(dest="action", required=True, metavar="ACTION")
    build = index_commands.add_parser(
        "build", help="embed a split's images and captions with an embedding model (vsepp)"
    )
    build.add_argument("--checkpoint", required=True, help="run dir or checkpoint dir")
    build.add_argument("--data", required=True, help="precomp folder")
    build.add_argument("--split", required=True, help="split to index, e.g. test")
    build.add_argument("--out", required=True, help="index directory to write")
    build.add_argument(
        "--kind", choices=["flat", "ivf"], default="flat", help="flat: exact; ivf: approximate"
    )
    build.add_argument("--nlist", type=int, help="ivf: lists per gallery (default ~4*sqrt(n))")
    build.add_argument("--nprobe", type=int, help="ivf: lists searched (default nlist/8)")
    build.add_argument("--batch-size", type=int, default=128)
    build.add_argument("--overwrite", action="store_true", help="replace an existing index")
    build.add_argument("--device", help="cpu or cuda (default: cuda when present)")
    build.add_argument("--no-progress", action="store_true", help="no progress bar")
    build.set_defaults(func=_index_build)

    search = commands.add_parser("search", help="query an index by text or by image file")
    search.add_argument("--index", required=True, help="index directory (imram index build)")
    query = search.add_mutually_exclusive_group(required=True)
    query.add_argument("--text", help="find images for this text")
    query.add_argument("--image", help="find captions for this image file")
    search.add_argument("--k", type=int, default=10, help="results (default 10)")
    search.add_argument("--checkpoint", help="the index's checkpoint, if it has moved")
    search.add_argument("--nprobe", type=int, help="ivf: lists searched (default: the index's)")
    search.add_argument("--rerank", help="re-rank the shortlist with this IMRAM/SCAN checkpoint")
    search.add_argument(
        "--shortlist", type=int, default=100, help="with --rerank: items re-ranked (default 100)"
    )
    search.add_argument("--json", action="store_true", help="print JSON instead of a table")
    search.add_argument("--device", help="cpu or cuda (default: cuda when present)")
    search.set_defaults(func=_search)

    serve = commands.add_parser("serve", help="the search service and web page over HTTP")
    serve.add_argument("--index", required=True, help="index directory (imram index build)")
    serve.add_argument("--checkpoint", help="the index's checkpoint, if it has moved")
    serve.add_argument(
        "--rerank", help="an IMRAM/SCAN checkpoint: re-ranks shortlists, enables /explain"
    )
    serve.add_argument(
        "--shortlist", type=int, default=100, help="with --rerank: items re-ranked (default 100)"
    )
    serve.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine)"
    )
    serve.add_argument("--port", type=int, default=8000, help="port (default 8000, 0: any free)")
    serve.add_argument("--device", help="cpu or cuda (default: cuda when present)")
    serve.add_argument(
        "--log-level",
        choices=["critical", "error", "warning", "info", "debug"],
        default="info",
        help="server log level (default info: one line per request)",
    )
    serve.set_defaults(func=_serve)

    from imram.config import AGGREGATORS

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
    analyze.set_defaults(func=_analyze)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``imram`` and ``python -m imram``; user errors print one line, exit 2."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except Interrupted as err:
        print(f"imram {args.command}: {err}", file=sys.stderr)
        return 130
    except ImramError as err:
        print(f"imram {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
