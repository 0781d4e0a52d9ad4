"""Cross-modal attention unit (CAU, SPEC §2), batched over every (query item, context item) pair."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from imram.models.encoders import EPS, l2norm


def attention_weights(
    query: Tensor,
    context: Tensor,
    lam: float,
    norm: str = "clipped_l2norm",
    sim: str = "dot",
    query_mask: Tensor | None = None,
    context_mask: Tensor | None = None,
) -> Tensor:
    """Attention of every query fragment over the context fragments of every context item.

    ``query`` is ``[Q, n, d]`` (one set per query item, step 1) or ``[Q, C, n, d]`` (one set per
    pair, later steps); ``context`` is ``[C, m, d]``. Masks are boolean, True on real fragments:
    ``query_mask [Q, n]``, ``context_mask [C, m]``. Padded queries are left out of the
    query-axis norm; padded context fragments get exactly zero weight. Returns ``[Q, C, n, m]``.
    """
    if sim == "cosine":
        query, context = l2norm(query), l2norm(context)
    pattern = "qcnd,cmd->qcnm" if query.dim() == 4 else "qnd,cmd->qcnm"
    scores = torch.einsum(pattern, query, context)
    if norm == "clipped_l2norm":
        scores = F.leaky_relu(scores, 0.1)
    else:
        scores = F.relu(scores)
    if query_mask is not None:
        scores = scores.masked_fill(~query_mask[:, None, :, None], 0.0)
    scores = scores / (torch.linalg.vector_norm(scores, dim=2, keepdim=True) + EPS)
    logits = lam * scores
    if context_mask is not None:
        logits = logits.masked_fill(~context_mask[None, :, None, :], float("-inf"))
    return torch.softmax(logits, dim=-1)


def attend(weights: Tensor, values: Tensor) -> Tensor:
    """Weighted sums ``[Q, C, n, v]`` of per-context-item values ``[C, m, v]``."""
    return torch.einsum("qcnm,cmv->qcnv", weights, values)


def fragment_cosine(original: Tensor, attended: Tensor) -> Tensor:
    """Cosine of each original query fragment ``[Q, n, d]`` with its attended context
    ``[Q, C, n, d]`` → ``[Q, C, n]``; the denominator is clamped at EPS."""
    dots = torch.einsum("qnd,qcnd->qcn", original, attended)
    norms = torch.linalg.vector_norm(original, dim=-1)[:, None, :] * torch.linalg.vector_norm(
        attended, dim=-1
    )
    return dots / norms.clamp_min(EPS)


def pool_fragments(
    scores: Tensor, mask: Tensor | None, pooling: str = "avg", lambda_lse: float = 6.0
) -> Tensor:
    """Pool per-fragment scores ``[Q, C, n]`` over real fragments (``mask [Q, n]``) → ``[Q, C]``.

    ``avg`` is the mean; ``lse`` is SCAN's ``log Σ exp(λ·s) / λ``.
    """
    if pooling == "lse":
        logits = lambda_lse * scores
        if mask is not None:
            logits = logits.masked_fill(~mask[:, None, :], float("-inf"))
        return torch.logsumexp(logits, dim=-1) / lambda_lse
    if mask is None:
        return scores.mean(dim=-1)
    masked = scores.masked_fill(~mask[:, None, :], 0.0)
    return masked.sum(dim=-1) / mask.sum(dim=-1, keepdim=True).to(scores.dtype)
