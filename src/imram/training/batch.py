"""The loss of one global training batch: every pair with autograd, or mined (docs: Loss).

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

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from imram.data import PrecompBatch
from imram.distributed import gather_rows, sharded_batch, split_sizes, world
from imram.precision import at_least_fp32
from imram.scoring import block_similarity
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


def encode_batch(model: nn.Module, batch: PrecompBatch, device: torch.device) -> EncodedBatch:
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
    model: nn.Module,
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


def mined_batch_loss(
    model: nn.Module,
    batch: PrecompBatch,
    device: torch.device,
    budget_mb: float,
    checkpoint: bool,
    margin: float,
) -> Tensor:
    """The hardest-negative hinge loss of a global batch from 3·B re-scored pairs (see the
    module docstring), equal on every rank. ``checkpoint`` recomputes the re-scored pairs in
    the backward pass."""
    encoded = encode_batch(model, batch, device)
    n = encoded.images.shape[0]
    with torch.no_grad():
        columns = block_similarity(
            model, encoded.images, encoded.captions, encoded.lengths, budget_mb=budget_mb
        )
        sims = _gather_columns(at_least_fp32(columns), encoded)
        hardest = hardest_negatives(sims)
        every = torch.arange(n, device=sims.device)
        rows = torch.cat([every, every, hardest.image_of_caption])
        cols = torch.cat([every, hardest.caption_of_image, every])
        # Each pair is scored by the rank that holds its caption; pairs travel in rank order.
        bounds = torch.tensor(encoded.sizes, device=cols.device).cumsum(0)
        owner = torch.bucketize(cols, bounds, right=True)
        order = torch.argsort(owner, stable=True)
        counts = torch.bincount(owner, minlength=len(encoded.sizes)).tolist()
        start = sum(counts[: encoded.rank])
        local = order[start : start + counts[encoded.rank]]
    local_cols = cols[local] - encoded.mine.start
    # index_select, not ``x[idx]``: its backward (index_add_) sums the rows of repeated items in
    # a fixed order, where index_put_'s accumulation on CPU threads does not (resume stays bitwise).
    args = (
        encoded.images.index_select(0, rows[local]),
        encoded.captions.index_select(0, local_cols),
        encoded.lengths[local_cols],
    )
    if checkpoint and torch.is_grad_enabled():
        scores = torch.utils.checkpoint.checkpoint(
            model.pair_similarity, *args, use_reentrant=False
        )
    else:
        scores = model.pair_similarity(*args)
    scores = at_least_fp32(scores)  # fp16/bf16 pair scores widen; fp64 stays fp64
    if encoded.sharded:
        scores = gather_rows(scores[:, None], counts)[:, 0]
    scores = scores[torch.argsort(order)]  # back to (positives, caption negatives, image ones)
    positive, caption_negative, image_negative = scores.view(3, n)
    return hinge_from_pairs(positive, caption_negative, image_negative, margin, hardest)
