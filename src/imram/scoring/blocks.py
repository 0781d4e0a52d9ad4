"""Scoring a gallery block by block with ``model.similarity`` (the only scorer)."""

from __future__ import annotations

import torch
from torch import Tensor, nn


def pairs_per_block(
    model: nn.Module, image_emb: Tensor, caption_emb: Tensor, budget_mb: float = 1024.0
) -> int:
    """How many pairs one block may hold so its pair-sized intermediates fit ``budget_mb``.

    Cross-attention models keep about ``4·d`` values per query fragment per pair (the query,
    its update and the attended memory terms), several times that when autograd keeps them
    for the backward pass. Embedding models score a block with one matrix product.
    """
    if caption_emb.dim() != 3:
        return max(1, image_emb.shape[0] * caption_emb.shape[0])
    fragments = image_emb.shape[1] + caption_emb.shape[1]
    factor = 6 if torch.is_grad_enabled() else 1
    per_pair = 4 * fragments * 4 * image_emb.shape[-1] * factor
    return max(1, int(budget_mb * 2**20 // per_pair))


def block_similarity(
    model: nn.Module,
    image_emb: Tensor,
    caption_emb: Tensor,
    lengths: Tensor,
    max_pairs: int | None = None,
    budget_mb: float = 1024.0,
) -> Tensor:
    """``[n_images, n_captions]`` scores computed in blocks of at most ``max_pairs`` pairs
    (default: as many as ``budget_mb`` allows, see :func:`pairs_per_block`).

    Captions are grouped by length and each block is cut to its longest caption, so padding
    costs no work. Every pair's score is independent, so the blocks give the same matrix as one
    call. Autograd flows through when enabled (training); nothing is kept when it is not.
    """
    n_img, n_cap = image_emb.shape[0], caption_emb.shape[0]
    max_pairs = max_pairs or pairs_per_block(model, image_emb, caption_emb, budget_mb)
    img_step = max(1, min(n_img, max_pairs))
    cap_step = max(1, max_pairs // img_step)
    order = torch.argsort(lengths.cpu(), stable=True).to(lengths.device)
    per_word = caption_emb.dim() == 3
    rows = []
    for i in range(0, n_img, img_step):
        img = image_emb[i : i + img_step]
        cols = []
        for j in range(0, n_cap, cap_step):
            idx = order[j : j + cap_step]
            lens = lengths[idx]
            cap = caption_emb[idx]
            if per_word:
                cap = cap[:, : int(lens.max())]
            cols.append(model.similarity(img, cap, lens))
        rows.append(torch.cat(cols, dim=1))
    sorted_scores = torch.cat(rows, dim=0)
    return sorted_scores[:, torch.argsort(order)]
