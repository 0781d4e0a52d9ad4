"""Retrieval over a gallery: FAISS indexes of an embedding model's vectors, searched by query."""

from imram.retrieval.index import (
    FORMAT,
    GalleryIndex,
    Hit,
    IndexInfo,
    build_index,
    checkpoint_weights,
    default_nlist,
    load_index,
    search_index,
)

__all__ = [
    "FORMAT",
    "GalleryIndex",
    "Hit",
    "IndexInfo",
    "build_index",
    "checkpoint_weights",
    "default_nlist",
    "load_index",
    "search_index",
]
