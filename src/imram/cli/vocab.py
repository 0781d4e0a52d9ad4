"""``imram vocab``: a vocabulary from a precomp folder's caption files."""

from __future__ import annotations

import argparse
from pathlib import Path


def _vocab(args: argparse.Namespace) -> int:
    from imram.data import Vocabulary

    files = [Path(args.data) / f"{split}_caps.txt" for split in args.splits]
    vocab = Vocabulary.from_caption_files(files, args.threshold)
    vocab.save(args.out)
    print(f"wrote {args.out}: {len(vocab)} words (threshold {args.threshold}, {len(files)} files)")
    return 0


def add_command(commands: argparse._SubParsersAction) -> None:
    """Add ``vocab`` to the ``imram`` command."""
    vocab = commands.add_parser("vocab", help="build a vocabulary from a precomp folder")
    vocab.add_argument("--data", required=True, help="precomp folder")
    vocab.add_argument("--out", required=True, help="output JSON (the release's layout)")
    vocab.add_argument("--threshold", type=int, default=4, help="minimum word count (default 4)")
    vocab.add_argument("--splits", nargs="+", default=["train", "dev"], help="caption splits")
    vocab.set_defaults(func=_vocab)
