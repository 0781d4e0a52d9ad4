"""Hinge triplet ranking loss (design §loss), one implementation for every model, and the
contrastive (InfoNCE) alternative."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


def triplet_loss(
    sims: Tensor,
    margin: float = 0.2,
    hardest: bool = True,
    positives: Tensor | None = None,
) -> Tensor:
    """Both-direction hinge loss over a batch's square score matrix (image b ↔ caption b).

    ``sims[i, j]`` scores image i against caption j; the diagonal holds the matching pairs.
    ``hardest`` keeps only the hardest negative per query (VSE++ max-violation); otherwise every
    negative's violation is summed (the warm-up mode). ``positives`` (bool ``[B, B]``) marks other
    pairs that must not count as negatives (e.g. two captions of one image); by default, as in the
    reference, only the diagonal is positive.
    """
    excluded = _not_negatives(sims, positives)
    diagonal = sims.diagonal()
    # Row i: captions j ranked against image i; column j: images i ranked against caption j.
    cost_caption = (margin + sims - diagonal[:, None]).clamp_min(0).masked_fill(excluded, 0)
    cost_image = (margin + sims - diagonal[None, :]).clamp_min(0).masked_fill(excluded, 0)
    if hardest:
        return cost_caption.amax(dim=1).sum() + cost_image.amax(dim=0).sum()
    return cost_caption.sum() + cost_image.sum()


def contrastive_loss(sims: Tensor, temperature: float, terms: int = 1) -> Tensor:
    """InfoNCE in both directions over a batch's square score matrix: the cross-entropy of
    each image's softmax over the batch's captions and each caption's over its images, the
    match on the diagonal, summed over the batch (as the hinge is). Scores that sum ``terms``
    cosines (a cross-attention model's) are divided by that count first, so that one
    ``temperature`` fits every model."""
    _not_negatives(sims, None)  # the shape check
    logits = sims.float() / (terms * temperature)
    target = torch.arange(sims.shape[0], device=sims.device)
    rows = torch.nn.functional.cross_entropy(logits, target, reduction="sum")
    cols = torch.nn.functional.cross_entropy(logits.T, target, reduction="sum")
    return rows + cols


def _not_negatives(sims: Tensor, positives: Tensor | None) -> Tensor:
    """The pairs of a square score matrix that are not negatives: the diagonal, ``positives``."""
    if sims.dim() != 2 or sims.shape[0] != sims.shape[1]:
        raise ValueError(f"triplet_loss needs a square score matrix, got {tuple(sims.shape)}")
    excluded = torch.eye(sims.shape[0], dtype=torch.bool, device=sims.device)
    return excluded | positives if positives is not None else excluded


@dataclass
class HardestNegatives:
    """Per image the columns of its ``m`` highest-scoring negative captions, per caption the
    rows of its ``m`` highest-scoring negative images (``[B, m]`` each, best first), and
    whether each is a negative at all (a batch may hold fewer than ``m``)."""

    caption_of_image: Tensor
    image_of_caption: Tensor
    image_has_negative: Tensor
    caption_has_negative: Tensor


def hardest_negatives(
    sims: Tensor, positives: Tensor | None = None, count: int = 1
) -> HardestNegatives:
    """The negatives that :func:`triplet_loss` with ``hardest`` charges, from ``sims [B, B]``
    (for mining: the loss needs only these pairs and the positives); with ``count`` = m, each
    query's m hardest (m ≥ B − 1: every negative, the warm-up's sum)."""
    masked = sims.masked_fill(_not_negatives(sims, positives), float("-inf"))
    m = max(1, min(count, sims.shape[0] - 1))
    best_caption, caption_of_image = masked.topk(m, dim=1)
    best_image, image_of_caption = masked.topk(m, dim=0)
    return HardestNegatives(
        caption_of_image,
        image_of_caption.T,
        best_caption > -math.inf,
        best_image.T > -math.inf,
    )


def hinge_from_pairs(
    positive: Tensor,
    caption_negative: Tensor,
    image_negative: Tensor,
    margin: float,
    hardest: HardestNegatives,
) -> Tensor:
    """:func:`triplet_loss` from the scores it depends on: ``positive[b]`` of pair b,
    ``caption_negative[b, k]`` of image b with its k-th hardest caption and
    ``image_negative[b, k]`` of caption b with its k-th hardest image
    (:func:`hardest_negatives`): with one negative each, ``hardest``; with every negative, the
    sum."""
    cost_caption = (margin + caption_negative - positive[:, None]).clamp_min(0)
    cost_image = (margin + image_negative - positive[:, None]).clamp_min(0)
    cost_caption = cost_caption.masked_fill(~hardest.image_has_negative, 0)
    cost_image = cost_image.masked_fill(~hardest.caption_has_negative, 0)
    return cost_caption.sum() + cost_image.sum()
