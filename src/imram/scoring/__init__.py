"""Scoring galleries with ``model.similarity``; the per-pair reference oracle lives here too."""

from imram.scoring.blocks import (
    GalleryScores,
    TopK,
    block_similarity,
    distributed_similarity,
    pairs_per_block,
    score_gallery,
    score_pairs,
    shard,
)
from imram.scoring.reference import reference_similarity

__all__ = [
    "GalleryScores",
    "TopK",
    "block_similarity",
    "distributed_similarity",
    "pairs_per_block",
    "reference_similarity",
    "score_gallery",
    "score_pairs",
    "shard",
]
