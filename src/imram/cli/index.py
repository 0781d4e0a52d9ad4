"""``imram index build``: FAISS indexes of a split's embeddings."""

from __future__ import annotations

import argparse

from imram.cli.common import pick


def _index_build(args: argparse.Namespace) -> int:
    from imram.retrieval import build_index

    info = build_index(
        args.checkpoint,
        args.data,
        args.split,
        args.out,
        progress=not args.no_progress,
        **pick(args, "kind", "nlist", "nprobe", "batch_size", "device", "overwrite"),
    )
    print(info.summary())
    return 0


def add_command(commands: argparse._SubParsersAction) -> None:
    """Add ``index`` to the ``imram`` command."""
    from imram.retrieval.index_file import KINDS

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
        "--kind", choices=KINDS, default="flat", help="flat: exact; ivf: approximate"
    )
    build.add_argument("--nlist", type=int, help="ivf: lists per gallery (default ~4*sqrt(n))")
    build.add_argument("--nprobe", type=int, help="ivf: lists searched (default nlist/8)")
    build.add_argument("--batch-size", type=int, default=128)
    build.add_argument("--overwrite", action="store_true", help="replace an existing index")
    build.add_argument("--device", help="cpu or cuda (default: cuda when present)")
    build.add_argument("--no-progress", action="store_true", help="no progress bar")
    build.set_defaults(func=_index_build)
