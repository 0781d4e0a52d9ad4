"""Data layer: tokenizer and vocabulary, caption files, precomp feature folders."""

from imram.data.precomp import (
    PrecompBatch,
    PrecompDataset,
    collate,
    find_features,
    open_features,
    pad_captions,
)
from imram.data.text import (
    SPECIALS,
    Vocabulary,
    read_captions,
    read_lines,
    tokenize,
)

__all__ = [
    "SPECIALS",
    "PrecompBatch",
    "PrecompDataset",
    "Vocabulary",
    "collate",
    "find_features",
    "open_features",
    "pad_captions",
    "read_captions",
    "read_lines",
    "tokenize",
]
