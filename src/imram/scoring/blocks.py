"""Scoring a gallery block by block with ``model.similarity`` (the only scorer)."""

from __future__ import annotations

import torch
from torch import Tensor, nn


def block_similarity(
    model: nn.Module, image_emb: Tensor, caption_emb: Tensor, lengths: Tensor, max_pairs: int
) -> Tensor:
    """``[n_images, n_captions]`` scores computed in blocks of at most ``max_pairs`` pairs.

    Every pair's score is independent, so the blocks give the same matrix as one call; the
    bound keeps the per-pair intermediates of cross-attention models in memory. Autograd flows
    through when enabled (training), and nothing is kept when it is not (evaluation).
    """
    n_img, n_cap = image_emb.shape[0], caption_emb.shape[0]
    img_step = max(1, min(n_img, max_pairs))
    cap_step = max(1, max_pairs // img_step)
    rows = []
    for i in range(0, n_img, img_step):
        img = image_emb[i : i + img_step]
        cols = [
            model.similarity(img, caption_emb[j : j + cap_step], lengths[j : j + cap_step])
            for j in range(0, n_cap, cap_step)
        ]
        rows.append(torch.cat(cols, dim=1))
    return torch.cat(rows, dim=0)
