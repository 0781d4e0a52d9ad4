"""Cross-modal attention unit (CAU, design §attention), batched over every (query item,
context item) pair."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from imram.models.encoders import EPS, l2norm
from imram.precision import at_least_fp32


def per_pair(query_side: Tensor, item_dims: int) -> Tensor:
    """A query-side tensor on the pair axes ``[C, Q, …]``: one given per query item (``item_dims``
    axes, shared by every context item) gains a leading axis; one given per pair is kept."""
    return query_side[None] if query_side.dim() == item_dims else query_side


def raw_scores(query: Tensor, context: Tensor, sim: str = "dot") -> Tensor:
    """``s_ij = x_i · y_j`` (or their cosine) for every pair → ``[C, Q, n, m]``.

    ``query`` is ``[Q, n, d]`` (one set per query item, step 1) or ``[C, Q, n, d]`` (one set per
    pair, later steps); ``context`` is ``[C, m, d]``. Pair tensors are context-major ``[C, Q, …]``
    so every batched product writes its output contiguously.
    """
    if sim == "cosine":
        query, context = l2norm(query), l2norm(context)
    pattern = "cqnd,cmd->cqnm" if query.dim() == 4 else "qnd,cmd->cqnm"
    return torch.einsum(pattern, query, context)


def attention_from_scores(
    scores: Tensor,
    lam: float,
    norm: str = "clipped_l2norm",
    query_mask: Tensor | None = None,
    context_mask: Tensor | None = None,
) -> Tensor:
    """Normalise raw scores over the query axis, then softmax over the context axis.

    Masks are boolean, True on real fragments: ``query_mask [Q, n]`` (or ``[C, Q, n]`` per
    pair), ``context_mask [C, m]``.
    Padded queries are left out of the query-axis norm; padded context fragments get exactly
    zero weight. Returns weights ``[C, Q, n, m]``, in fp32 at least: scores from a bf16/fp16
    product are widened first, since the norm and the softmax decide the ranking.

    Without autograd two faster forms of the same values are used: the norm as a root of a
    sum of squares (``vector_norm`` over an inner axis is an order of magnitude slower), and,
    since each normalised score lies in [-1, 1] (it is divided by a norm that includes it), the
    softmax as ``exp(λ·s̄ − |λ|) / Σ exp(λ·s̄ − |λ|)``, which cannot overflow and is several
    times faster than ``softmax`` over the short context axis of captions.
    """
    scores = at_least_fp32(scores)
    if norm == "clipped_l2norm":
        scores = F.leaky_relu(scores, 0.1)
    else:
        scores = F.relu(scores)
    if query_mask is not None:
        scores = scores.masked_fill(~per_pair(query_mask, 2)[..., None], 0.0)
    fast = not torch.is_grad_enabled()
    if fast:
        column_norm = scores.square().sum(dim=2, keepdim=True).sqrt_()
    else:
        column_norm = torch.linalg.vector_norm(scores, dim=2, keepdim=True)
    scale = lam / (column_norm + EPS)
    if not fast or abs(lam) > 40:
        logits = scores * scale
        if context_mask is not None:
            logits = logits.masked_fill(~context_mask[:, None, None, :], float("-inf"))
        return torch.softmax(logits, dim=-1)
    weights = torch.exp(scores * scale - abs(lam))
    if context_mask is not None:
        weights = weights.masked_fill(~context_mask[:, None, None, :], 0.0)
    return weights / weights.sum(dim=-1, keepdim=True)


def attend(
    weights: Tensor, values: Tensor, add: Tensor | None = None, out: Tensor | None = None
) -> Tensor:
    """Weighted sums ``[C, Q, n, v]`` of per-context-item values ``[C, m, v]``, plus ``add``
    (``[Q, n, v]``, the same for every context item, or ``[C, Q, n, v]``) inside the same
    batched product; written into ``out`` (contiguous, ``[C, Q, n, v]``) when given."""
    c, q, n, m = weights.shape
    flat = weights.reshape(c, q * n, m)
    target = None if out is None else out.view(c, q * n, -1)
    if add is None:
        result = torch.bmm(flat, values, out=target)
    else:
        add = add.reshape(-1, q * n, add.shape[-1]).to(values.dtype)
        result = torch.baddbmm(add, flat, values, out=target)
    return result.view(c, q, n, -1)


def fragment_cosine(base: Tensor, weights: Tensor, gram: Tensor, query_norm: Tensor) -> Tensor:
    """Cosine of each original query fragment with its attended context → ``[C, Q, n]``.

    With ``c_i = Σ_j α_ij y_j``: ``x_i · c_i = Σ_j α_ij (x_i · y_j)`` from the step-1 raw scores
    ``base [C, Q, n, m]``, and ``‖c_i‖² = α_iᵀ G α_i`` with the context Gram matrices
    ``gram [C, m, m]`` — no ``[C, Q, n, d]`` tensor is formed. ``query_norm`` is ``[Q, n]``
    (or ``[C, Q, n]`` per pair).
    The denominator is clamped at EPS, as in the reference.
    """
    with torch.autocast(weights.device.type, enabled=False):  # the final score stays in fp32
        w = at_least_fp32(weights)
        dots = (w * at_least_fp32(base)).sum(dim=-1)
        squared = (torch.einsum("cqnm,cmk->cqnk", w, at_least_fp32(gram)) * w).sum(dim=-1)
    norms = per_pair(query_norm, 2) * squared.clamp_min(1e-30).sqrt()
    return dots / norms.clamp_min(EPS)


def pool_fragments(
    scores: Tensor, mask: Tensor | None, pooling: str = "avg", lambda_lse: float = 6.0
) -> Tensor:
    """Pool per-fragment scores ``[C, Q, n]`` over real fragments (``mask [Q, n]`` or
    ``[C, Q, n]``) → ``[C, Q]``.

    ``avg`` is the mean; ``lse`` is SCAN's ``log Σ exp(λ·s) / λ``.
    """
    if mask is not None:
        mask = per_pair(mask, 2)
    if pooling == "lse":
        logits = lambda_lse * scores
        if mask is not None:
            logits = logits.masked_fill(~mask, float("-inf"))
        return torch.logsumexp(logits, dim=-1) / lambda_lse
    if mask is None:
        return scores.mean(dim=-1)
    masked = scores.masked_fill(~mask, 0.0)
    return masked.sum(dim=-1) / mask.sum(dim=-1).to(scores.dtype)
