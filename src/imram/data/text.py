"""Captions → tokens → ids (design §encoders): the tokenizer, caption files and the vocabulary."""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias

import torch
from nltk.tokenize import word_tokenize
from torch import Tensor

from imram.errors import DataError
from imram.files import atomic_write_text

if TYPE_CHECKING:
    from imram.data.wordpiece import WordPieces

PAD, START, END, UNK = "<pad>", "<start>", "<end>", "<unk>"
SPECIALS = (PAD, START, END, UNK)
# Words that mark a caption's ends: ours, and a word-piece tokenizer's (never shown as words).
MARKERS = frozenset({START, END, "[CLS]", "[SEP]"})
PAD_ID, START_ID, END_ID, UNK_ID = range(4)

_BOM = "\ufeff"


_SENTENCE_END = re.compile(r"^([^\W\d_][\w'-]+)\.$")


def tokenize(text: str) -> list[str]:
    """Lower-cased NLTK word tokens. ``preserve_line=True`` needs no punkt download, but then
    only the text's final period is split off; a word ending a sentence inside the text
    ("a rook. it moves") is split from its period too, as sentence splitting would."""
    tokens = []
    for token in word_tokenize(text.lower(), preserve_line=True):
        end = _SENTENCE_END.match(token)
        tokens.extend((end.group(1), ".") if end else (token,))
    return tokens


def read_lines(path: str | Path, what: str = "caption") -> list[str]:
    """Non-empty stripped lines of a strict UTF-8 file; errors name the file, line and ``what``.

    Line endings may be ``\\n`` or ``\\r\\n``, a final newline is optional and a leading UTF-8
    byte-order mark is dropped (it would otherwise glue itself to the first word).
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: {what}s file not found") from None
    except OSError as err:
        raise DataError(f"{path}: cannot read the {what}s file ({err.strerror or err})") from None
    if b"\r" in raw and b"\n" not in raw:
        raise DataError(
            f"{path}: lines end in a bare carriage return (CR, classic Mac OS); expected one "
            f"{what} per line ending in LF or CRLF (convert it, e.g. tr '\\r' '\\n')"
        )
    lines = raw.split(b"\n")
    if lines[-1] == b"":
        lines.pop()
    texts = []
    for number, line in enumerate(lines, start=1):
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as err:
            raise DataError(
                f"{path}, line {number}: not valid UTF-8 (byte {line[err.start]:#04x} "
                f"at column {err.start + 1}); expected one UTF-8 {what} per line"
            ) from None
        if number == 1 and text.startswith(_BOM):
            text = text[1:]
        text = text.strip()
        if not text:
            raise DataError(f"{path}, line {number}: empty {what}; expected one {what} per line")
        texts.append(text)
    return texts


def read_captions(path: str | Path) -> list[str]:
    """One caption per line, strict UTF-8; an undecodable or empty line is an error naming it."""
    return read_lines(path, "caption")


class Vocabulary:
    """Word ↔ id map, ``<pad>=0 <start>=1 <end>=2 <unk>=3``, saved in the release's JSON layout."""

    def __init__(self, words: Sequence[str]) -> None:
        words = list(words)
        if tuple(words[:4]) != SPECIALS:
            raise ValueError(f"a vocabulary starts with {SPECIALS}, got {tuple(words[:4])}")
        self.words = words
        self.word2idx = {w: i for i, w in enumerate(words)}
        if len(self.word2idx) != len(words):
            raise ValueError("a vocabulary lists each word once")

    def __len__(self) -> int:
        return len(self.words)

    def __call__(self, word: str) -> int:
        """Id of ``word``; words outside the vocabulary map to ``<unk>`` (3)."""
        return self.word2idx.get(word, UNK_ID)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Vocabulary):
            return NotImplemented
        return self.words == other.words

    def __repr__(self) -> str:
        return f"Vocabulary({len(self)} words)"

    def word(self, idx: int) -> str:
        """The word with id ``idx``; ids outside ``[0, len)`` raise IndexError."""
        if not 0 <= idx < len(self.words):
            raise IndexError(f"id {idx} is outside the vocabulary [0, {len(self.words)})")
        return self.words[idx]

    def encode(self, caption: str) -> list[int]:
        """``[<start>] + ids of the tokens + [<end>]``; unknown words map to ``<unk>``."""
        return [START_ID, *(self(t) for t in tokenize(caption)), END_ID]

    def decode(self, ids: Iterable[int]) -> list[str]:
        """Words of ``ids``, markers and padding included (the inverse of the id lookup)."""
        return [self.word(int(i)) for i in ids]

    def tokens(self, caption: str) -> list[str]:
        """The words ``encode`` reads, before the vocabulary: ``<start>``, tokens, ``<end>``."""
        return [START, *tokenize(caption), END]

    def word_groups(self, ids: Sequence[int]) -> list[list[int]]:
        """Positions of ``ids`` grouped by shown word: one word per id."""
        return [[position] for position in range(len(ids))]

    def shown_words(self, ids: Sequence[int]) -> list[str]:
        """The words ``ids`` show, markers included (``<unk>`` for words outside)."""
        return self.decode(ids)

    def unknown_words(self, ids: Sequence[int]) -> list[bool]:
        """Per id, whether it is ``<unk>``."""
        return [int(i) == UNK_ID for i in ids]

    def fingerprint(self) -> str:
        """SHA-256 of the ordered word list: equal fingerprints mean identical id assignments."""
        return hashlib.sha256("\n".join(self.words).encode("utf-8")).hexdigest()

    @classmethod
    def build(cls, captions: Iterable[str], threshold: int = 4) -> Vocabulary:
        """Keep words seen at least ``threshold`` times, most frequent first, ties alphabetical."""
        counts = Counter(token for caption in captions for token in tokenize(caption))
        kept = sorted(
            (w for w, n in counts.items() if n >= threshold and w not in SPECIALS),
            key=lambda w: (-counts[w], w),
        )
        return cls([*SPECIALS, *kept])

    @classmethod
    def from_caption_files(
        cls, paths: str | Path | Iterable[str | Path], threshold: int = 4
    ) -> Vocabulary:
        """Build from caption files (in practice train and dev), one caption per line."""
        if isinstance(paths, str | Path):
            paths = [paths]
        paths = [Path(p) for p in paths]
        captions = [c for path in paths for c in read_captions(path)]
        if not captions:
            names = ", ".join(str(p) for p in paths)
            raise DataError(f"{names}: no captions to build a vocabulary from")
        return cls.build(captions, threshold)

    def to_json(self) -> dict[str, Any]:
        """The release's layout: ``{"word2idx": …, "idx2word": {"0": "<pad>", …}, "idx": N}``."""
        return {
            "word2idx": dict(self.word2idx),
            "idx2word": {str(i): w for i, w in enumerate(self.words)},
            "idx": len(self.words),
        }

    def save(self, path: str | Path) -> None:
        """Write the release's layout ``{word2idx, idx2word, idx}``, atomically."""
        atomic_write_text(path, json.dumps(self.to_json(), ensure_ascii=False))

    @classmethod
    def from_json(cls, data: object, source: str = "<vocabulary>") -> Vocabulary:
        """Read and check the release's layout; ``source`` names the origin in errors."""
        expected = "a JSON object with word2idx, idx2word and idx"
        if not isinstance(data, dict):
            raise DataError(f"{source}: expected {expected}, found {type(data).__name__}")
        missing = [k for k in ("word2idx", "idx2word", "idx") if k not in data]
        if missing:
            raise DataError(f"{source}: vocabulary JSON lacks key(s) {', '.join(missing)}")
        word2idx, idx2word, size = data["word2idx"], data["idx2word"], data["idx"]
        if not isinstance(word2idx, dict) or not isinstance(idx2word, dict):
            raise DataError(f"{source}: word2idx and idx2word must be JSON objects")
        if type(size) is not int or len(idx2word) != size or len(word2idx) != size:
            raise DataError(
                f"{source}: idx={size!r} but idx2word has {len(idx2word)} and word2idx "
                f"{len(word2idx)} entries; expected idx to be the number of words"
            )
        words = []
        for i in range(size):
            word = idx2word.get(str(i))
            if word is None:
                raise DataError(f"{source}: idx2word has no id {i} (ids must be 0..{size - 1})")
            if not isinstance(word, str):
                raise DataError(f"{source}: idx2word[{i}] is {word!r}, expected a string")
            other = word2idx.get(word)
            if type(other) is not int or other != i:
                raise DataError(
                    f"{source}: idx2word[{i}] = {word!r} but word2idx[{word!r}] = {other!r}"
                )
            words.append(word)
        if tuple(words[:4]) != SPECIALS:
            raise DataError(
                f"{source}: ids 0-3 must be {', '.join(SPECIALS)}, got {', '.join(words[:4])}"
            )
        return cls(words)

    @classmethod
    def load(cls, path: str | Path) -> Vocabulary:
        """Load ours or the original release's ``*_vocab.json``, checking it is consistent."""
        vocab = load_tokenizer(path)
        if not isinstance(vocab, Vocabulary):
            raise DataError(f"{path}: a word-piece tokenizer, not a word vocabulary")
        return vocab


def tokenizer_from_json(data: object, source: str = "<vocabulary>") -> Tokenizer:
    """A run's saved tokenizer: a word-piece tokenizer (``"kind": "wordpiece"``) or a word
    vocabulary in the release's layout."""
    if isinstance(data, dict) and data.get("kind") == "wordpiece":
        from imram.data.wordpiece import WordPieces

        return WordPieces.from_json(data, source)
    return Vocabulary.from_json(data, source)


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Read a ``vocab.json``: :func:`tokenizer_from_json` of the file, errors naming it."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{path}: vocabulary file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: not a JSON vocabulary ({err})") from None
    except OSError as err:
        raise DataError(f"{path}: cannot read the vocabulary ({err.strerror or err})") from None
    return tokenizer_from_json(data, str(path))


def merge_words(values: Tensor, groups: list[list[int]], dim: int, reduce: str) -> Tensor:
    """Per-fragment ``values`` merged into shown words along ``dim`` by ``groups`` (from
    ``word_groups``): ``mean`` where fragments query (a word attends as its pieces do on
    average), ``sum`` where they are attended (a word's weight is its pieces' total, so a
    distribution over pieces stays one over words)."""
    if all(len(g) == 1 for g in groups):
        return values.index_select(dim, torch.tensor([g[0] for g in groups]))
    parts = [values.narrow(dim, g[0], len(g)) for g in groups]
    pooled = [
        p.mean(dim, keepdim=True) if reduce == "mean" else p.sum(dim, keepdim=True) for p in parts
    ]
    return torch.cat(pooled, dim=dim)


Tokenizer: TypeAlias = "Vocabulary | WordPieces"
