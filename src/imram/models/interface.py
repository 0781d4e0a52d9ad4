"""The two kinds of model the library schedules, declared once (design §matching).

Every registered model is a :class:`RetrievalModel`: it encodes images and captions and scores
pairs. An :class:`EmbeddingModel` reduces each item to one unit vector, so a pair's score is a
dot product and a gallery is embedded once and searched by matrix products (VSE++, MEMBER). A
:class:`CrossAttentionModel` keeps each item's fragments and scores every pair by attention
between them (IMRAM, SCAN); it can prepare an item's per-item terms once for many pairs. The
scorer, the trainer, the index and the service dispatch on these classes, never on attributes
or tensor ranks, and the registry refuses a model that is neither.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

from torch import Tensor, nn

from imram.models.encoders import dot_scores, pair_dot_scores
from imram.schema import ModelConfig


class RetrievalModel(nn.Module, ABC):
    """Encodes images and captions and scores image-caption pairs."""

    config: ModelConfig

    @abstractmethod
    def encode_images(self, features: Tensor) -> Tensor:
        """``[N, R, img_dim]`` raw region features → the images' embeddings."""

    @abstractmethod
    def encode_captions(self, tokens: Tensor, lengths: Tensor) -> Tensor:
        """``[B, L]`` padded token ids with their lengths → the captions' embeddings."""

    @abstractmethod
    def similarity(self, image_emb: Any, caption_emb: Any, lengths: Tensor) -> Tensor:
        """Scores of every image against every caption → ``[n_images, n_captions]``."""

    @abstractmethod
    def pair_similarity(self, image_emb: Any, caption_emb: Any, lengths: Tensor) -> Tensor:
        """Scores ``[P]`` of image p with caption p: the diagonal of :meth:`similarity`."""


class EmbeddingModel(RetrievalModel):
    """One unit vector per image (``[N, d]``) and per caption (``[B, d]``), compared by dot
    product: what an index stores (:meth:`embed_images`, :meth:`embed_captions`)."""

    def embed_images(self, features: Tensor) -> Tensor:
        """The vectors an index stores for images: :meth:`encode_images`."""
        return self.encode_images(features)

    def embed_captions(self, tokens: Tensor, lengths: Tensor) -> Tensor:
        """The vectors an index stores for captions: :meth:`encode_captions`."""
        return self.encode_captions(tokens, lengths)

    def similarity(
        self, image_emb: Tensor, caption_emb: Tensor, lengths: Tensor | None = None
    ) -> Tensor:
        """``[n_images, n_captions]`` dot products (``lengths`` only keeps the common signature)."""
        return dot_scores(image_emb, caption_emb)

    def pair_similarity(
        self, image_emb: Tensor, caption_emb: Tensor, lengths: Tensor | None = None
    ) -> Tensor:
        """``[P]`` scores of image p with caption p (the diagonal of :meth:`similarity`)."""
        return pair_dot_scores(image_emb, caption_emb)


class CrossAttentionModel(RetrievalModel):
    """Fragments per item (regions ``[N, R, d]``, words ``[B, L, d]``), every pair scored by
    attention between them. Either side may be prepared once (:meth:`prepare_images`,
    :meth:`prepare_captions`) and passed to the scoring methods in place of its fragments."""

    @abstractmethod
    def prepare_images(self, image_emb: Tensor, steps: int | None = None) -> Any:
        """The images' per-item terms, computed once for scoring them against many captions."""

    @abstractmethod
    def prepare_captions(
        self, caption_emb: Tensor, lengths: Tensor, steps: int | None = None
    ) -> Any:
        """The captions' per-item terms, computed once for scoring them against many images."""

    @abstractmethod
    def step_scores(self, image_emb: Any, caption_emb: Any, lengths: Tensor) -> Tensor:
        """Per-step scores ``[n_images, n_captions, K]``; :meth:`similarity` is their sum."""

    @abstractmethod
    def first_step_similarity(self, image_emb: Any, caption_emb: Any, lengths: Tensor) -> Tensor:
        """Step-1 scores ``[n_images, n_captions]``, a cheap proxy of the full score."""

    @abstractmethod
    def explain(self, image_emb: Tensor, caption_emb: Tensor, lengths: Tensor) -> dict[str, Any]:
        """Per-branch attention weights and fragment scores of every step, for a block."""

    @abstractmethod
    def score_terms(self) -> int:
        """How many averaged cosines (each in [-1, 1]) a score sums: steps × branches."""
