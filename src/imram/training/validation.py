"""How a run scores its validation split: every pair of the first ``data.val_captions``
captions, or, for a cross-attention model with ``train.val_rerank``, the shortlists of a trained
embedding run re-ranked by the model (the ranking a two-stage search serves).

Scoring every pair picks a cross-attention checkpoint by a ranking it is never used for, and
on a few hundred captions (what a full scoring of a cross-attention model affords) it ranked
Flickr8k checkpoints in another order than the two-stage figures on all of dev did.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from imram.checkpoint import load_checkpoint
from imram.config import Config
from imram.data import PrecompDataset
from imram.errors import ConfigError, DataError
from imram.evaluation import encode_split, evaluate_model
from imram.models.interface import CrossAttentionModel, EmbeddingModel, RetrievalModel
from imram.retrieval.two_stage import evaluate_two_stage, model_pair_scorer

Validation = Callable[[RetrievalModel], dict[str, Any]]


def every_pair(config: Config, val_set: PrecompDataset, device: torch.device) -> Validation:
    """Every pair of the first ``data.val_captions`` captions and their images, 1K protocol."""

    def validate(model: RetrievalModel) -> dict[str, Any]:
        metrics, _, _ = evaluate_model(
            model,
            val_set,
            "1k",
            config.data.val_captions,
            budget_mb=config.train.score_budget_mb,
            device=device,
        )
        return metrics

    return validate


class Reranking:
    """The first stage's scores of the validation captions, computed once; each call re-ranks
    their top ``k`` per query (both directions) with the model being trained."""

    def __init__(
        self,
        first: np.ndarray,
        cap2img: np.ndarray,
        images: np.ndarray,
        val_set: PrecompDataset,
        k: int,
        budget_mb: float,
        device: torch.device,
    ) -> None:
        self.first, self.cap2img, self.images = first, cap2img, images
        self.val_set, self.k, self.budget_mb, self.device = val_set, k, budget_mb, device
        self.first_metrics: dict[str, Any] = {}

    @torch.no_grad()
    def __call__(self, model: RetrievalModel) -> dict[str, Any]:
        was_training = model.training
        model.eval()
        img, cap, lengths = encode_split(
            model, self.val_set, self.images.tolist(), range(len(self.cap2img)), device=self.device
        )
        scorer = model_pair_scorer(model, img, cap, lengths, self.budget_mb)
        metrics = evaluate_two_stage(self.first, scorer, self.cap2img, self.k)
        model.train(was_training)
        return metrics


def open_validation(
    config: Config,
    model: RetrievalModel,
    data: Path,
    val_set: PrecompDataset,
    device: torch.device,
) -> Validation:
    """The run's validation: :func:`every_pair`, or :class:`Reranking` when ``train.val_rerank``
    names an embedding run (a run folder means its ``best/``) trained on the same split."""
    path = config.train.val_rerank
    if not path:
        return every_pair(config, val_set, device)
    if not isinstance(model, CrossAttentionModel):
        raise ConfigError(
            f"train.val_rerank={path}: re-ranking validates a cross-attention model (IMRAM, "
            f"SCAN); {config.model.name} scores every pair by one dot product"
        )
    first = load_checkpoint(path, map_location=device)
    if not isinstance(first.model, EmbeddingModel):
        raise ConfigError(
            f"train.val_rerank={path}: a {first.config.model.name} checkpoint; the first stage "
            "must be an embedding model (VSE++, MEMBER)"
        )
    first_set = first.open_split(data, config.data.val_split)
    if (first_set.num_images, first_set.num_captions) != (
        val_set.num_images,
        val_set.num_captions,
    ):
        raise DataError(f"train.val_rerank={path}: its vocabulary reads another split")
    metrics, first_scores, cap2img = evaluate_model(
        first.model, first_set, "1k", config.data.val_captions, device=device
    )
    images = np.unique(first_set.cap2img[: len(cap2img)])
    reranking = Reranking(
        first_scores,
        cap2img,
        images,
        val_set,
        config.train.val_shortlist,
        config.train.score_budget_mb,
        device,
    )
    reranking.first_metrics = metrics
    return reranking
