"""Captions → tokens → ids (SPEC §1): the tokenizer, caption files and the vocabulary."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

from nltk.tokenize import word_tokenize

from imram.errors import DataError

PAD, START, END, UNK = "<pad>", "<start>", "<end>", "<unk>"
SPECIALS = (PAD, START, END, UNK)


def tokenize(text: str) -> list[str]:
    """Lower-cased NLTK word tokens; ``preserve_line=True`` needs no punkt download."""
    return word_tokenize(text.lower(), preserve_line=True)


def read_captions(path: str | Path) -> list[str]:
    """One caption per line, strict UTF-8; an undecodable or empty line is an error naming it."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: captions file not found") from None
    lines = raw.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    captions = []
    for number, line in enumerate(lines, start=1):
        try:
            text = line.decode("utf-8").strip()
        except UnicodeDecodeError as err:
            raise DataError(
                f"{path}, line {number}: not valid UTF-8 (byte {line[err.start]:#04x} "
                f"at column {err.start + 1})"
            ) from None
        if not text:
            raise DataError(f"{path}, line {number}: empty caption")
        captions.append(text)
    return captions


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path``, then rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class Vocabulary:
    """Word ↔ id map, ``<pad>=0 <start>=1 <end>=2 <unk>=3``, saved in the release's JSON layout."""

    def __init__(self, words: Sequence[str]) -> None:
        if tuple(words[:4]) != SPECIALS:
            raise ValueError(f"a vocabulary starts with {SPECIALS}, got {tuple(words[:4])}")
        self.words = list(words)
        self.word2idx = {w: i for i, w in enumerate(self.words)}
        if len(self.word2idx) != len(self.words):
            raise ValueError("a vocabulary lists each word once")

    def __len__(self) -> int:
        return len(self.words)

    def __call__(self, word: str) -> int:
        return self.word2idx.get(word, 3)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Vocabulary) and self.words == other.words

    def __repr__(self) -> str:
        return f"Vocabulary({len(self)} words)"

    def word(self, idx: int) -> str:
        return self.words[idx]

    def encode(self, caption: str) -> list[int]:
        """``[<start>] + ids of the tokens + [<end>]``; unknown words map to ``<unk>``."""
        return [1, *(self(t) for t in tokenize(caption)), 2]

    def decode(self, ids: Iterable[int]) -> list[str]:
        return [self.words[i] for i in ids]

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
    def from_caption_files(cls, paths: Iterable[str | Path], threshold: int = 4) -> Vocabulary:
        captions = [c for path in paths for c in read_captions(path)]
        return cls.build(captions, threshold)

    def to_json(self) -> dict:
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
        if not isinstance(data, dict):
            raise DataError(f"{source}: a vocabulary is a JSON object with word2idx, idx2word, idx")
        missing = [k for k in ("word2idx", "idx2word", "idx") if k not in data]
        if missing:
            raise DataError(f"{source}: vocabulary JSON lacks key(s) {', '.join(missing)}")
        word2idx, idx2word, size = data["word2idx"], data["idx2word"], data["idx"]
        if not isinstance(size, int) or len(idx2word) != size or len(word2idx) != size:
            raise DataError(
                f"{source}: idx={size!r} but idx2word has {len(idx2word)} and word2idx "
                f"{len(word2idx)} entries"
            )
        words = []
        for i in range(size):
            word = idx2word.get(str(i))
            if word is None:
                raise DataError(f"{source}: idx2word has no id {i} (ids must be 0..{size - 1})")
            if word2idx.get(word) != i:
                raise DataError(
                    f"{source}: idx2word[{i}] = {word!r} but word2idx[{word!r}] = "
                    f"{word2idx.get(word)!r}"
                )
            words.append(word)
        if tuple(words[:4]) != SPECIALS:
            raise DataError(
                f"{source}: ids 0-3 must be {', '.join(SPECIALS)}, got {', '.join(words[:4])}"
            )
        return cls(words)

    @classmethod
    def load(cls, path: str | Path) -> Vocabulary:
        """Load ours or the original release's ``*_vocab.json``."""
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise DataError(f"{path}: vocabulary file not found") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise DataError(f"{path}: not a JSON vocabulary ({err})") from None
        return cls.from_json(data, str(path))
