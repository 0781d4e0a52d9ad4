"""Retrieval over a gallery: FAISS indexes of an embedding model's vectors, searched by query."""

from imram.retrieval.build import IndexInfo, build_index, checkpoint_weights, default_nlist
from imram.retrieval.index import GalleryIndex, Hit, load_index, search_index
from imram.retrieval.index_file import FORMAT

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
