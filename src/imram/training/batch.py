"""The loss of one global training batch: every pair with autograd, or mined (design §loss,
§mining).

With the hardest-negative hinge loss, the loss and its gradient depend on 3·B entries of the
``[B, B]`` score matrix only: each positive pair, each image's hardest caption and each caption's
hardest image. :func:`mined_batch_loss` therefore scores all B² pairs without autograd on the
fast inference path, picks the hardest negatives there, and re-scores just those 3·B pairs with
autograd (``model.pair_similarity``). Its loss and gradients are those of :func:`batch_scores`
followed by :func:`~imram.training.loss.triplet_loss` (up to exact ties and float rounding),
while autograd keeps O(B) pairs instead of O(B²).

Under ``torchrun`` each rank encodes its contiguous share of the batch and gathers every rank's
image embeddings with autograd; a rank scores (and back-propagates into) only pairs whose
caption is its own.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from imram.data import PrecompBatch
from imram.distributed import gather_rows, sharded_batch, split_sizes, world
from imram.models.interface import CrossAttentionModel, RetrievalModel
from imram.models.workspace import gather
from imram.precision import at_least_fp32
from imram.scoring import block_similarity, score_pairs
from imram.training.loss import hardest_negatives, hinge_from_pairs


@dataclass
class EncodedBatch:
    """A global batch as this rank holds it: every image embedding (gathered, with autograd),
    this rank's captions (global positions ``mine``) and their lengths, and each rank's caption
    count ``sizes`` (one entry when this process holds the whole batch)."""

    images: Tensor
    captions: Tensor
    lengths: Tensor
    mine: slice
    sizes: list[int]
    rank: int = 0

    @property
    def sharded(self) -> bool:
        return len(self.sizes) > 1


def encode_batch(model: RetrievalModel, batch: PrecompBatch, device: torch.device) -> EncodedBatch:
    """Encode a global batch with autograd: whole in one process (or when the batch is smaller
    than the world), else this rank's contiguous share, with every rank's images gathered."""
    rank, world_size = world()
    images, tokens, lengths = (
        batch.images.to(device),
        batch.tokens.to(device),
        batch.lengths.to(device),
    )
    n = len(lengths)
    if world_size == 1 or n < world_size:
        img, cap = model.encode_images(images), model.encode_captions(tokens, lengths)
        return EncodedBatch(img, cap, lengths, slice(0, n), [n])
    sizes = split_sizes(n, world_size)
    mine = slice(sum(sizes[:rank]), sum(sizes[: rank + 1]))
    local_lengths = lengths[mine]
    with sharded_batch():
        img = gather_rows(model.encode_images(images[mine]), sizes)
        cap = model.encode_captions(tokens[mine, : int(local_lengths.max())], local_lengths)
    return EncodedBatch(img, cap, local_lengths, mine, sizes, rank)


def _gather_columns(columns: Tensor, encoded: EncodedBatch) -> Tensor:
    return gather_rows(columns.T, encoded.sizes).T if encoded.sharded else columns


def batch_scores(
    model: RetrievalModel,
    batch: PrecompBatch,
    device: torch.device,
    budget_mb: float,
    checkpoint: bool,
) -> Tensor:
    """The ``[B, B]`` score matrix of a global batch with autograd, equal on every rank.

    Under ``torchrun`` each rank scores its captions against all the images and gathers the
    score columns: every rank holds the same matrix, equal to the single-process one to float32
    rounding (the encoders run on other shapes), and each rank's backward pass reaches only
    its share.
    """
    encoded = encode_batch(model, batch, device)
    columns = block_similarity(
        model,
        encoded.images,
        encoded.captions,
        encoded.lengths,
        budget_mb=budget_mb,
        checkpoint=checkpoint,
    )
    return _gather_columns(columns, encoded)


def _by_owner(cols: Tensor, encoded: EncodedBatch) -> tuple[Tensor, list[int], Tensor]:
    """Pairs (by caption column) in the order they travel: each is scored by the rank that
    holds its caption, ranks in turn. Returns that order, each rank's count, and the pairs
    this rank scores."""
    bounds = torch.tensor(encoded.sizes, device=cols.device).cumsum(0)
    owner = torch.bucketize(cols, bounds, right=True)
    order = torch.argsort(owner, stable=True)
    counts = torch.bincount(owner, minlength=len(encoded.sizes)).tolist()
    start = sum(counts[: encoded.rank])
    return order, counts, order[start : start + counts[encoded.rank]]


COARSE_ROWS = 16  # images per block of step-1 scores: 2.3x the rate of one [B, B] block


def _first_step_scores(model: RetrievalModel, encoded: EncodedBatch) -> Tensor:
    """Step-1 scores of every image against this rank's captions, in rows of
    :data:`COARSE_ROWS` images (the captions' step-1 terms prepared once)."""
    images, lengths = encoded.images, encoded.lengths
    captions = model.prepare_captions(encoded.captions, lengths, steps=1)
    rows = [
        model.first_step_similarity(images[i : i + COARSE_ROWS], captions, lengths)
        for i in range(0, images.shape[0], COARSE_ROWS)
    ]
    return torch.cat(rows)


def mining_scores(
    model: RetrievalModel, encoded: EncodedBatch, budget_mb: float, shortlist: int | None = None
) -> Tensor:
    """The ``[B, B]`` scores (no autograd, fp32 at least, equal on every rank) that choose the
    hardest negatives: every pair's, or with ``shortlist`` = m only the pairs among each
    image's m best captions and each caption's m best images by the step-1 score
    (``model.first_step_similarity``), the others −inf. The choice is exact whenever each
    query's hardest negative is among its candidates; models without a cheaper first step
    (K=1, embedding models) score every pair."""
    images, captions, lengths = encoded.images, encoded.captions, encoded.lengths
    n = images.shape[0]
    cheaper = isinstance(model, CrossAttentionModel) and model.config.steps > 1
    if shortlist is None or not cheaper or shortlist >= n - 1:
        columns = block_similarity(model, images, captions, lengths, budget_mb=budget_mb)
        return _gather_columns(at_least_fp32(columns), encoded)
    coarse = _gather_columns(at_least_fp32(_first_step_scores(model, encoded)), encoded)
    coarse = coarse.masked_fill(torch.eye(n, dtype=torch.bool, device=coarse.device), -math.inf)
    candidates = torch.zeros(n, n, dtype=torch.bool, device=coarse.device)
    candidates.scatter_(1, coarse.topk(shortlist, dim=1).indices, True)
    candidates.scatter_(0, coarse.topk(shortlist, dim=0).indices, True)
    rows, cols = torch.nonzero(candidates, as_tuple=True)
    order, counts, local = _by_owner(cols, encoded)
    scores = score_pairs(
        model, images, captions, lengths, rows[local], cols[local] - encoded.mine.start, budget_mb
    ).to(images.device)
    if encoded.sharded:
        scores = gather_rows(scores[:, None], counts)[:, 0]
    sims = torch.full((n, n), -math.inf, dtype=scores.dtype, device=coarse.device)
    sims[rows[order], cols[order]] = scores
    return sims


def _rescore(
    model: RetrievalModel,
    images: Tensor,
    captions: Tensor,
    lengths: Tensor,
    rows: Tensor,
    cols: Tensor,
) -> Tensor:
    """Scores (with autograd) of the pairs (image ``rows[p]``, caption ``cols[p]``): each item's
    terms prepared once, then gathered per pair by ``index_select``, whose backward sums the
    rows of repeated items in a fixed order (``x[idx]``'s index_put_ does not, on CPU threads),
    so that resume stays bitwise."""
    if not isinstance(model, CrossAttentionModel):
        return model.pair_similarity(
            gather(images, rows), gather(captions, cols), lengths.index_select(0, cols)
        )
    image_side = model.prepare_images(images).take(rows)
    caption_side = model.prepare_captions(captions, lengths).take(cols)
    return model.pair_similarity(image_side, caption_side, caption_side.lengths)


def mined_batch_loss(
    model: RetrievalModel,
    batch: PrecompBatch,
    device: torch.device,
    budget_mb: float,
    checkpoint: bool,
    margin: float,
    shortlist: int | None = None,
    negatives: int = 1,
) -> Tensor:
    """The hardest-negative hinge loss of a global batch from 3·B re-scored pairs (see the
    module docstring), equal on every rank. ``checkpoint`` recomputes the re-scored pairs in
    the backward pass; ``shortlist``: mine among each query's best candidates by the step-1
    score only (:func:`mining_scores`); ``negatives`` = m: charge each query's m hardest
    negatives, (2m + 1)·B pairs (m ≥ B − 1: every negative, the warm-up's sum)."""
    encoded = encode_batch(model, batch, device)
    n = encoded.images.shape[0]
    with torch.no_grad():
        sims = mining_scores(model, encoded, budget_mb, shortlist)
        hardest = hardest_negatives(sims, count=negatives)
        m = hardest.caption_of_image.shape[1]
        every = torch.arange(n, device=encoded.images.device)
        each = every.repeat_interleave(m)
        rows = torch.cat([every, each, hardest.image_of_caption.reshape(-1)])
        cols = torch.cat([every, hardest.caption_of_image.reshape(-1), each])
        order, counts, local = _by_owner(cols, encoded)
    local_cols = cols[local] - encoded.mine.start
    args = (encoded.images, encoded.captions, encoded.lengths, rows[local], local_cols)
    if checkpoint and torch.is_grad_enabled():
        scores = torch.utils.checkpoint.checkpoint(_rescore, model, *args, use_reentrant=False)
    else:
        scores = _rescore(model, *args)
    scores = at_least_fp32(scores)  # fp16/bf16 pair scores widen; fp64 stays fp64
    if encoded.sharded:
        scores = gather_rows(scores[:, None], counts)[:, 0]
    scores = scores[torch.argsort(order)]  # back to (positives, caption negatives, image ones)
    positive, caption_negative, image_negative = scores.split([n, n * m, n * m])
    return hinge_from_pairs(
        positive, caption_negative.view(n, m), image_negative.view(n, m), margin, hardest
    )
