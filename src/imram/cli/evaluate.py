"""``imram evaluate``: R@K of a checkpoint on a split, optionally re-ranked by a second model."""

from __future__ import annotations

import argparse

from imram.cli.common import load_model, write_json


def _evaluate_rerank(args: argparse.Namespace) -> int:
    """``evaluate --rerank``: the --checkpoint shortlists, the --rerank checkpoint re-ranks."""
    from imram.checkpoint import load_checkpoint
    from imram.devices import default_device
    from imram.metrics import format_table
    from imram.retrieval.fusion import FUSION_WEIGHTS, Fusion, load_fusion, save_fusion
    from imram.retrieval.two_stage import rerank_split

    device = args.device or default_device()
    first = load_model(args)
    second = load_checkpoint(args.rerank)
    given = None if args.fusion is None else load_fusion(args.fusion, first, second)
    results = rerank_split(
        first.model.to(device),
        first.open_split(args.data, args.split),
        second.model.to(device),
        second.open_split(args.data, args.split),
        [None if k == 0 else k for k in args.shortlist],
        args.protocol,
        device,
        progress=not args.no_progress,
        fusion_weights=FUSION_WEIGHTS if args.fit_fusion else (),
        fusion=given,
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
        if given is not None:
            print(format_table(metrics["fused_given"], title=f"fused by {args.fusion}"))
        if "fusion" in metrics:
            rsums = {w: m["rsum"] for w, m in metrics["fused"].items()}
            print("fused rsum by weight: " + ", ".join(f"{w} {r:.1f}" for w, r in rsums.items()))
    if args.fit_fusion:
        fitted = results[0]
        fusion = Fusion(**fitted["fusion"])
        save_fusion(
            args.fit_fusion,
            fusion,
            first,
            second,
            split=args.split,
            protocol=args.protocol,
            shortlist=fitted["shortlist"],
            rsum_by_weight={w: m["rsum"] for w, m in fitted["fused"].items()},
        )
        rsum = fitted["fused"][str(fusion.weight)]["rsum"]
        print(
            f"fusion weight {fusion.weight:g} (fused rsum {rsum:.1f} at shortlist "
            f"{fitted['shortlist']}) written to {args.fit_fusion}"
        )
    payload = {"checkpoint": str(first.path), "rerank": str(second.path), "split": args.split}
    write_json(args.json, {**payload, "protocol": args.protocol, "results": results})
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    import numpy as np

    if args.rerank:
        return _evaluate_rerank(args)

    from imram.devices import default_device, local_device
    from imram.distributed import process_group
    from imram.evaluation import evaluate_model
    from imram.metrics import format_table

    with process_group() as (rank, world):
        device = args.device or (local_device() if world > 1 else default_device())
        checkpoint = load_model(args)
        dataset = checkpoint.open_split(args.data, args.split)
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
    write_json(args.json, {**payload, **metrics})
    if args.save_sims:
        from imram.files import atomic_output

        with atomic_output(args.save_sims) as tmp, open(tmp, "wb") as handle:
            np.save(handle, sims)
    return 0


def add_command(commands: argparse._SubParsersAction) -> None:
    """Add ``evaluate`` to the ``imram`` command."""
    from imram.config import PRECISIONS
    from imram.metrics import PROTOCOLS

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
    evaluate.add_argument(
        "--fusion",
        help="with --rerank: also rank the shortlists by both models' fused scores, as this "
        "fusion file says",
    )
    evaluate.add_argument(
        "--fit-fusion",
        metavar="OUT.json",
        help="with --rerank: choose the fusion weight on this split (first --shortlist size) "
        "and write the fusion file for search and serve",
    )
    evaluate.add_argument("--device", help="cpu or cuda (default: cuda when present)")
    evaluate.add_argument("--no-progress", action="store_true", help="no progress bar")
    evaluate.set_defaults(func=_evaluate)
