"""Scoring galleries with ``model.similarity``; the per-pair reference oracle lives here too."""

from imram.scoring.blocks import block_similarity, pairs_per_block
from imram.scoring.reference import reference_similarity

__all__ = ["block_similarity", "pairs_per_block", "reference_similarity"]
