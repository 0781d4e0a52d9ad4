"""What several subcommands share: loading a checkpoint given on the command line, and
writing a JSON result atomically."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def load_model(args: argparse.Namespace):
    """``--checkpoint`` (a run, a checkpoint, or a release ``.pth.tar`` with ``--vocab``)."""
    from imram.checkpoint import import_release_checkpoint, load_checkpoint
    from imram.data.text import Vocabulary, load_tokenizer
    from imram.errors import DataError

    path = Path(args.checkpoint)
    vocab = load_tokenizer(args.vocab) if args.vocab else None
    if path.is_file():
        if vocab is None:
            raise DataError(f"{path}: a release checkpoint has no vocabulary; pass --vocab")
        if not isinstance(vocab, Vocabulary):
            raise DataError(f"{args.vocab}: a release checkpoint reads words, not word pieces")
        return import_release_checkpoint(path, vocab)
    checkpoint = load_checkpoint(path)
    if vocab is not None and vocab != checkpoint.vocab:
        raise DataError(
            f"{args.vocab}: vocabulary does not match the checkpoint's "
            f"({len(vocab)} vs {len(checkpoint.vocab)} words)"
        )
    return checkpoint


def pick(args: argparse.Namespace, *names: str) -> dict[str, Any]:
    """The arguments ``names`` as keywords of the same names, for a library call that takes
    them as they are."""
    return {name: getattr(args, name) for name in names}


def write_json(path: str | None, payload: dict) -> None:
    """Write ``payload`` to ``path`` atomically (nothing when no path was given)."""
    if path:
        from imram.files import atomic_write_text

        atomic_write_text(path, json.dumps(payload, indent=1))
