"""The release-style baseline: the published evaluation's scorer, which scores each caption against
a shard of images with the full ``2d → d`` memory linears on ``[x; c]`` for every pair and a memory
update after every step (including the unused last one)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from imram.models.encoders import EPS
from imram.models.memory import MemoryDistillation


def _release_attention(query: Tensor, context: Tensor, lam: float) -> Tensor:
    """One caption × a shard: query ``[N, n, d]``, context ``[N, m, d]`` → ``[N, n, d]``."""
    scores = torch.bmm(context, query.transpose(1, 2))  # [N, m, n]
    scores = F.leaky_relu(scores, 0.1)
    scores = scores / (scores.pow(2).sum(dim=2, keepdim=True).sqrt() + EPS)
    weights = torch.softmax(scores.transpose(1, 2) * lam, dim=2)  # [N, n, m]
    return torch.bmm(weights, context)


def _release_cosine(a: Tensor, b: Tensor) -> Tensor:
    return (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1)).clamp(min=EPS)


def release_style_similarity(
    model, image_emb: Tensor, caption_emb: Tensor, lengths: Tensor
) -> Tensor:
    """The published code's loop: captions one at a time against the whole image shard (its
    evaluation runs it without autograd, its training step with)."""
    cfg = model.config
    n_img = image_emb.shape[0]
    # The release updates the query after every step, even when K = 1 leaves it unused.
    spare = MemoryDistillation(cfg.embed_dim).to(image_emb.dtype)
    columns = []
    for j in range(caption_emb.shape[0]):
        words = caption_emb[j, : int(lengths[j])].unsqueeze(0).repeat(n_img, 1, 1)
        total = torch.zeros(n_img, dtype=image_emb.dtype)
        for branch, query0, context, memory in (
            ("text", words, image_emb, model.text_memory),
            ("image", image_emb, words, model.image_memory),
        ):
            if not model.uses(branch):
                continue
            memory = memory or spare
            query = query0
            for _ in range(cfg.steps):
                attended = _release_attention(query, context, cfg.lambda_softmax)
                total += _release_cosine(query0, attended).mean(dim=1)
                query = memory(query, attended)
        columns.append(total)
    return torch.stack(columns, dim=1)
