"""Scoring galleries with ``model.similarity``; the per-pair reference oracle lives here too."""

from imram.scoring.reference import reference_similarity

__all__ = ["reference_similarity"]
