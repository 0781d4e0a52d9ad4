"""``imram serve``: the search service and its web page."""

from __future__ import annotations

import argparse

from imram.cli.common import pick


def _serve(args: argparse.Namespace) -> int:
    from imram.serving import serve

    def announce(url: str) -> None:
        print(f"serving {args.index} on {url} (Ctrl-C to stop)", flush=True)

    serve(
        args.index,
        announce=announce,
        **pick(
            args,
            "checkpoint",
            "rerank",
            "shortlist",
            "fusion",
            "host",
            "port",
            "device",
            "log_level",
        ),
    )
    return 0


def add_command(commands: argparse._SubParsersAction) -> None:
    """Add ``serve`` to the ``imram`` command."""
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
        "--fusion",
        help="with --rerank: rank shortlists by both models' fused scores (a file from "
        "imram evaluate --rerank --fit-fusion)",
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
