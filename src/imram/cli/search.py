"""``imram search``: query an index by text or by image file."""

from __future__ import annotations

import argparse
import json

from imram.cli.common import pick


def _search(args: argparse.Namespace) -> int:
    from imram.retrieval import search_index
    from imram.retrieval.two_stage import two_stage_search

    query = pick(args, "text", "image", "k", "checkpoint", "nprobe", "device")
    if args.rerank:
        hits = two_stage_search(
            args.index, args.rerank, shortlist=args.shortlist, fusion=args.fusion, **query
        )
    else:
        hits = search_index(args.index, **query)
    _print_hits(args, hits)
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


def add_command(commands: argparse._SubParsersAction) -> None:
    """Add ``search`` to the ``imram`` command."""
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
    search.add_argument(
        "--fusion",
        help="with --rerank: rank the shortlist by both models' fused scores (a file from "
        "imram evaluate --rerank --fit-fusion)",
    )
    search.add_argument("--json", action="store_true", help="print JSON instead of a table")
    search.add_argument("--device", help="cpu or cuda (default: cuda when present)")
    search.set_defaults(func=_search)
