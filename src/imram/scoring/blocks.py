"""Scoring a gallery block by block with ``model.similarity`` (the only scorer).

Blocks are image ranges × length-sorted caption groups, each cut to its longest caption, so
padding costs no work. Every pair's score is independent, so any blocking gives the same
matrix. Results go into a dense matrix (with autograd, for training), a caller's array such as
a ``np.memmap`` on disk, or straight into per-query top-k lists, which bounds memory at any
gallery size.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.utils.checkpoint
from torch import Tensor
from tqdm import tqdm

from imram.distributed import split_sizes
from imram.models.interface import CrossAttentionModel, EmbeddingModel, RetrievalModel

# On CPU, one-step models score fastest in blocks of 64-128 MB (their score tensors stay in
# cache) and K=3 models are flat from 64 to 512 MB (measured on 2 cores, d=1024), so inference
# blocks there are capped at this size whatever the memory budget allows.
CPU_BLOCK_MB = 128.0


def pairs_per_block(
    model: RetrievalModel, image_emb: Tensor, caption_emb: Tensor, budget_mb: float = 1024.0
) -> int:
    """How many pairs one block may hold so its pair-sized intermediates fit ``budget_mb``
    (at most :data:`CPU_BLOCK_MB` for inference on CPU).

    Cross-attention models with a memory update keep about ``4·d`` values per query fragment
    per pair (the query, its update and the attended memory terms); one-step models only a few
    fragment × fragment score tensors; several times that when autograd keeps them for the
    backward pass. Embedding models score a block with one matrix product.
    """
    if isinstance(model, EmbeddingModel):
        return max(1, image_emb.shape[0] * caption_emb.shape[0])
    grad = torch.is_grad_enabled()
    if image_emb.device.type == "cpu" and not grad:
        budget_mb = min(budget_mb, CPU_BLOCK_MB)
    regions, words = image_emb.shape[1], caption_emb.shape[1]
    if model.config.steps > 1:
        per_pair = 4 * (regions + words) * 4 * image_emb.shape[-1]
    else:
        per_pair = 8 * regions * words * 4
    return max(1, int(budget_mb * 2**20 // (per_pair * (6 if grad else 1))))


def _chunk_captions(model: RetrievalModel, caption_emb: Tensor, budget_mb: float) -> int:
    """Captions whose prepared per-item terms (about ``5·L·d`` values each) fit half the
    budget: they are computed once per chunk, in one product of many rows."""
    if not isinstance(model, CrossAttentionModel):
        return caption_emb.shape[0]
    per_caption = 5 * caption_emb.shape[1] * caption_emb.shape[2] * caption_emb.element_size()
    return max(1, int(budget_mb * 2**20 / 2 // per_caption))


@dataclass
class Block:
    """One block of pairs: an image range and caption indices, with each side as the model
    scores it (prepared once per image row and per caption chunk where the model can)."""

    images: slice
    captions: Tensor
    image_side: object
    caption_side: object
    lengths: Tensor


def image_rows(n_images: int, max_pairs: int, image_block: int | None = None) -> int:
    """Images per row of blocks: ``image_block``, by default about ``√max_pairs``."""
    return max(1, min(n_images, image_block or math.isqrt(max_pairs)))


def _blocks(
    model: RetrievalModel,
    image_emb: Tensor,
    caption_emb: Tensor,
    lengths: Tensor,
    max_pairs: int,
    image_block: int | None = None,
    chunk: int | None = None,
    only: slice | None = None,
) -> Iterator[Block]:
    """Blocks covering every pair once: captions in length order, in chunks of ``chunk``;
    within a chunk, image rows of ``image_block``, then caption blocks filling ``max_pairs``.
    By default blocks are about square (``√max_pairs`` images): each block re-reads its
    images' and captions' prepared terms, and a square block re-reads least per pair (on 2 CPU
    cores it scores 4-8% faster than a block of one caption against many images).

    Every image row visits the captions in the same order (``argsort(lengths)``). ``only``
    keeps the rows that start inside that image range, with the blocks of the whole plan.
    """
    n_img, n_cap = image_emb.shape[0], lengths.shape[0]
    img_step = image_rows(n_img, max_pairs, image_block)
    cap_step = max(1, max_pairs // img_step)
    chunk = max(cap_step, -(-(chunk or n_cap) // cap_step) * cap_step)
    order = torch.argsort(lengths.cpu(), stable=True).to(lengths.device)
    cross = isinstance(model, CrossAttentionModel)
    for c in range(0, n_cap, chunk):
        members = order[c : c + chunk]
        prepared = None
        if cross:
            prepared = model.prepare_captions(caption_emb[members], lengths[members])
        for i in range(0, n_img, img_step):
            if only is not None and not only.start <= i < only.stop:
                continue
            images = slice(i, min(i + img_step, n_img))
            image_side = image_emb[images]
            if cross:
                image_side = model.prepare_images(image_side)
            for j in range(0, len(members), cap_step):
                rows = torch.arange(j, min(j + cap_step, len(members)), device=members.device)
                idx = members[rows]
                lens = lengths[idx]
                side = prepared.take(rows) if cross else caption_emb[idx]
                yield Block(images, idx, image_side, side, lens)


def block_similarity(
    model: RetrievalModel,
    image_emb: Tensor,
    caption_emb: Tensor,
    lengths: Tensor,
    max_pairs: int | None = None,
    budget_mb: float = 1024.0,
    checkpoint: bool = False,
) -> Tensor:
    """``[n_images, n_captions]`` scores computed in blocks of at most ``max_pairs`` pairs
    (default: as many as ``budget_mb`` allows, see :func:`pairs_per_block`).

    Autograd flows through when enabled (training); nothing is kept when it is not. Under
    autograd every block's intermediates live until the backward pass, so memory grows with the
    batch whatever the budget; ``checkpoint`` keeps only each block's scores and recomputes the
    block in the backward pass (activation checkpointing: about one more forward, and memory
    bounded by one block).
    """
    recompute = checkpoint and torch.is_grad_enabled()
    max_pairs = max_pairs or pairs_per_block(model, image_emb, caption_emb, budget_mb)
    chunk = _chunk_captions(model, caption_emb, budget_mb)
    rows: dict[int, list[Tensor]] = {}
    columns: list[Tensor] = []  # the caption order, the same in every row of blocks
    for b in _blocks(model, image_emb, caption_emb, lengths, max_pairs, chunk=chunk):
        if b.images.start == 0:
            columns.append(b.captions)
        if recompute:
            scores = torch.utils.checkpoint.checkpoint(
                model.similarity, b.image_side, b.caption_side, b.lengths, use_reentrant=False
            )
        else:
            scores = model.similarity(b.image_side, b.caption_side, b.lengths)
        rows.setdefault(b.images.start, []).append(scores)
    sorted_scores = torch.cat([torch.cat(row, dim=1) for row in rows.values()], dim=0)
    return sorted_scores[:, torch.argsort(torch.cat(columns))]


@dataclass
class TopK:
    """Best ``k`` items per query, best first: ``scores`` and ``indices`` ``[n_queries, k]``."""

    scores: Tensor
    indices: Tensor


def _merge_into(best: TopK, queries: Tensor, scores: Tensor, items: Tensor) -> None:
    """Merge a block of candidates (``scores [len(queries), len(items)]``) into the running
    top-k lists of ``queries``, in place."""
    k = best.scores.shape[1]
    cand_scores = torch.cat([best.scores[queries], scores], dim=1)
    cand_items = torch.cat([best.indices[queries], items.expand(len(queries), -1)], dim=1)
    top = torch.topk(cand_scores, k, dim=1)
    best.scores[queries] = top.values
    best.indices[queries] = torch.gather(cand_items, 1, top.indices)


@dataclass
class GalleryScores:
    """What :func:`score_gallery` kept: the matrix it wrote into, and/or the top-k both ways."""

    matrix: np.ndarray | None
    captions_per_image: TopK | None
    images_per_caption: TopK | None
    pairs_per_second: float


@torch.no_grad()
def score_gallery(
    model: RetrievalModel,
    image_emb: Tensor,
    caption_emb: Tensor,
    lengths: Tensor,
    out: np.ndarray | None = None,
    topk: int | None = None,
    budget_mb: float = 1024.0,
    image_block: int | None = None,
    progress: bool = False,
    only: slice | None = None,
) -> GalleryScores:
    """Score every image against every caption block by block, without autograd.

    ``out`` (e.g. ``np.lib.format.open_memmap(path, "w+", np.float32, (n_img, n_cap))``)
    receives the full matrix; ``topk`` keeps only the best ``k`` captions of each image and
    images of each caption, so memory stays bounded by one block plus the top-k lists.
    ``only`` scores just the rows of blocks that start inside that image range (a rank's
    share, :func:`distributed_similarity`); the rest of ``out`` is left as it was.
    """
    n_img, n_cap = image_emb.shape[0], caption_emb.shape[0]
    if out is not None and tuple(out.shape) != (n_img, n_cap):
        raise ValueError(f"out has shape {tuple(out.shape)}, expected {(n_img, n_cap)}")
    max_pairs = pairs_per_block(model, image_emb, caption_emb, budget_mb)
    chunk = _chunk_captions(model, caption_emb, budget_mb)
    k_cap, k_img = min(topk or 1, n_cap), min(topk or 1, n_img)
    img_best = TopK(torch.full((n_img, k_cap), float("-inf")), torch.full((n_img, k_cap), -1))
    cap_best = TopK(torch.full((n_cap, k_img), float("-inf")), torch.full((n_cap, k_img), -1))
    bar = tqdm(total=n_img * n_cap, unit="pair", unit_scale=True, disable=not progress)
    start, pairs = time.perf_counter(), 0
    for b in _blocks(model, image_emb, caption_emb, lengths, max_pairs, image_block, chunk, only):
        block = model.similarity(b.image_side, b.caption_side, b.lengths).float().cpu()
        cols, images = b.captions.cpu(), b.images
        if out is not None:
            out[images, cols.numpy()] = block.numpy()
        if topk:
            _merge_into(img_best, torch.arange(images.start, images.stop), block, cols)
            _merge_into(cap_best, cols, block.T, torch.arange(images.start, images.stop))
        bar.update(block.numel())
        pairs += block.numel()
    bar.close()
    seconds = time.perf_counter() - start
    if not topk:
        return GalleryScores(out, None, None, pairs / seconds)
    return GalleryScores(out, img_best, cap_best, pairs / seconds)


def _bytes_held(prepared: object) -> int:
    """Bytes of the distinct tensors a prepared side (a dataclass of tensors) holds."""
    seen: dict[int, int] = {}

    def walk(x: object) -> None:
        if isinstance(x, Tensor):
            seen[x.untyped_storage().data_ptr()] = x.untyped_storage().nbytes()
        elif dataclasses.is_dataclass(x):
            for field in dataclasses.fields(x):
                walk(getattr(x, field.name))

    walk(prepared)
    return sum(seen.values())


@torch.no_grad()
def score_pairs(
    model: RetrievalModel,
    image_emb: Tensor,
    caption_emb: Tensor,
    lengths: Tensor,
    rows: Tensor,
    cols: Tensor,
    budget_mb: float = 1024.0,
    cache_mb: float = 4096.0,
    progress: bool = False,
) -> Tensor:
    """Scores ``[P]`` of the pairs (image ``rows[p]``, caption ``cols[p]``) without autograd,
    by ``model.pair_similarity``: a shortlist's pairs at the cost of those pairs alone.

    A cross-attention model spends about one pair's work preparing an item's terms, and a
    shortlist holds few pairs per item, so every item is prepared once where memory allows:
    the images in groups whose prepared terms fit ``cache_mb`` (one group unless the gallery
    is large), and within a group the pairs in caption-length order, a caption's pairs together
    in chunks whose pair-sized terms fit ``budget_mb``, each chunk preparing its captions.
    """
    out = torch.empty(rows.shape[0], dtype=torch.promote_types(caption_emb.dtype, torch.float32))
    if rows.numel() == 0:
        return out
    cross = isinstance(model, CrossAttentionModel)
    images = torch.unique(rows)
    group = len(images)
    if cross:
        per_image = _bytes_held(model.prepare_images(image_emb[images[:1]]))
        group = max(1, min(group, int(cache_mb * 2**20 // max(per_image, 1))))
    chunk = pairs_per_block(model, image_emb, caption_emb, budget_mb)
    position = torch.searchsorted(images, rows.contiguous())
    which = (position // group).cpu()
    key = (which * (int(lengths.max()) + 1) + lengths.cpu()[cols.cpu()]) * caption_emb.shape[0]
    order = torch.argsort(key + cols.cpu(), stable=True)
    ends = torch.bincount(which, minlength=-(-len(images) // group)).cumsum(0).tolist()
    bar = tqdm(total=len(order), unit="pair", unit_scale=True, disable=not progress)
    begin = 0
    for g, end in enumerate(ends):
        members = images[g * group : (g + 1) * group]
        image_side = image_emb[members]
        if cross:
            image_side = model.prepare_images(image_side)
        for start in range(begin, end, chunk):
            idx = order[start : min(start + chunk, end)].to(rows.device)
            local = position[idx] - g * group
            pair_cols = cols[idx]
            captions, caption_of = torch.unique(pair_cols, return_inverse=True)
            if cross:
                prepared = model.prepare_captions(caption_emb[captions], lengths[captions])
                side = prepared.take(caption_of, slot="pairs.captions")
                pair_images = image_side.take(local, slot="pairs.images")
            else:
                side, pair_images = caption_emb[pair_cols], image_side[local]
            scores = model.pair_similarity(pair_images, side, lengths[pair_cols])
            out[idx.cpu()] = scores.to(out.dtype).cpu()
            bar.update(len(idx))
        begin = end
    bar.close()
    return out


def shard(n_items: int, rank: int, world_size: int, step: int = 1) -> slice:
    """The contiguous range of ``n_items`` that ``rank`` of ``world_size`` scores: whole
    groups of ``step`` items (the last group possibly short), shared out by the one rank
    partition rule, :func:`~imram.distributed.split_sizes` (the first ranks one group more)."""
    sizes = split_sizes(-(-n_items // step), world_size)
    start = sum(sizes[:rank]) * step
    return slice(min(start, n_items), min(start + sizes[rank] * step, n_items))


@torch.no_grad()
def distributed_similarity(
    model: RetrievalModel,
    image_emb: Tensor,
    caption_emb: Tensor,
    lengths: Tensor,
    budget_mb: float = 1024.0,
) -> Tensor:
    """The full matrix on every rank, each rank scoring its own range of images.

    Needs an initialised ``torch.distributed`` process group (``torchrun``); every rank passes
    the same embeddings. The ranks share out whole rows of the blocks one process would score
    (:func:`score_gallery` with the same budget), so every block is the same computation on
    the same shapes as there: the gathered matrix is bitwise the single process's when the
    processes run the same number of threads (``torchrun`` gives each rank one), and every
    rank holds the same copy. With other thread counts a CPU may pick other kernels, and
    scores agree to float32 rounding.
    """
    import torch.distributed as dist

    world, rank = dist.get_world_size(), dist.get_rank()
    n_img, n_cap = image_emb.shape[0], caption_emb.shape[0]
    step = image_rows(n_img, pairs_per_block(model, image_emb, caption_emb, budget_mb))
    mine, width = shard(n_img, rank, world, step), shard(n_img, 0, world, step).stop
    scores = np.zeros((world * width, n_cap), dtype=np.float32)
    score_gallery(
        model, image_emb, caption_emb, lengths, scores[:n_img], budget_mb=budget_mb, only=mine
    )
    part = torch.from_numpy(scores[mine.start : mine.start + width]).to(image_emb.device)
    parts = [torch.empty_like(part) for _ in range(world)]
    dist.all_gather(parts, part)
    return torch.cat(parts)[:n_img]
