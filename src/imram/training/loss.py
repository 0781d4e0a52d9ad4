"""Hinge triplet ranking loss (SPEC §5), one implementation for every model."""

from __future__ import annotations

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
    if sims.dim() != 2 or sims.shape[0] != sims.shape[1]:
        raise ValueError(f"triplet_loss needs a square score matrix, got {tuple(sims.shape)}")
    diagonal = sims.diagonal()
    excluded = torch.eye(sims.shape[0], dtype=torch.bool, device=sims.device)
    if positives is not None:
        excluded = excluded | positives
    # Row i: captions j ranked against image i; column j: images i ranked against caption j.
    cost_caption = (margin + sims - diagonal[:, None]).clamp_min(0).masked_fill(excluded, 0)
    cost_image = (margin + sims - diagonal[None, :]).clamp_min(0).masked_fill(excluded, 0)
    if hardest:
        return cost_caption.amax(dim=1).sum() + cost_image.amax(dim=0).sum()
    return cost_caption.sum() + cost_image.sum()
