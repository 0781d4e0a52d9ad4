"""Scoring a gallery block by block with ``model.similarity`` (the only scorer).

Blocks are image ranges × length-sorted caption groups, each cut to its longest caption, so
padding costs no work. Every pair's score is independent, so any blocking gives the same
matrix. Results go into a dense matrix (with autograd, for training), a caller's array such as
a ``np.memmap`` on disk, or straight into per-query top-k lists, which bounds memory at any
gallery size.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn
from tqdm import tqdm


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


def _blocks(
    n_images: int, lengths: Tensor, max_pairs: int, image_block: int | None = None
) -> Iterator[tuple[slice, Tensor]]:
    """Yield (image range, caption indices) covering every pair once, captions by length."""
    n_cap = lengths.shape[0]
    img_step = max(1, min(n_images, image_block or max_pairs))
    cap_step = max(1, max_pairs // img_step)
    order = torch.argsort(lengths.cpu(), stable=True).to(lengths.device)
    for i in range(0, n_images, img_step):
        for j in range(0, n_cap, cap_step):
            yield slice(i, min(i + img_step, n_images)), order[j : j + cap_step]


def _score(model: nn.Module, img: Tensor, caption_emb: Tensor, lengths: Tensor, idx: Tensor):
    lens = lengths[idx]
    cap = caption_emb[idx]
    if cap.dim() == 3:
        cap = cap[:, : int(lens.max())]
    return model.similarity(img, cap, lens)


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

    Autograd flows through when enabled (training); nothing is kept when it is not.
    """
    n_img = image_emb.shape[0]
    max_pairs = max_pairs or pairs_per_block(model, image_emb, caption_emb, budget_mb)
    rows: dict[int, list[Tensor]] = {}
    columns: list[Tensor] = []  # caption order of every row of blocks
    for images, idx in _blocks(n_img, lengths, max_pairs):
        if images.start == 0:
            columns.append(idx)
        rows.setdefault(images.start, []).append(
            _score(model, image_emb[images], caption_emb, lengths, idx)
        )
    sorted_scores = torch.cat([torch.cat(row, dim=1) for row in rows.values()], dim=0)
    return sorted_scores[:, torch.argsort(torch.cat(columns))]


@dataclass
class TopK:
    """Best ``k`` items per query, best first: ``scores`` and ``indices`` ``[n_queries, k]``."""

    scores: Tensor
    indices: Tensor


def _merge(best: TopK | None, scores: Tensor, indices: Tensor, k: int) -> TopK:
    """Keep the ``k`` highest of a running top-k and a new block of candidates (per row)."""
    if best is not None:
        scores = torch.cat([best.scores, scores], dim=1)
        indices = torch.cat([best.indices, indices], dim=1)
    top = torch.topk(scores, min(k, scores.shape[1]), dim=1)
    return TopK(top.values, torch.gather(indices, 1, top.indices))


@dataclass
class GalleryScores:
    """What :func:`score_gallery` kept: the matrix it wrote into, and/or the top-k both ways."""

    matrix: np.ndarray | None
    captions_per_image: TopK | None
    images_per_caption: TopK | None
    pairs_per_second: float


@torch.no_grad()
def score_gallery(
    model: nn.Module,
    image_emb: Tensor,
    caption_emb: Tensor,
    lengths: Tensor,
    out: np.ndarray | None = None,
    topk: int | None = None,
    budget_mb: float = 1024.0,
    image_block: int = 256,
    progress: bool = False,
) -> GalleryScores:
    """Score every image against every caption block by block, without autograd.

    ``out`` (e.g. ``np.lib.format.open_memmap(path, "w+", np.float32, (n_img, n_cap))``)
    receives the full matrix; ``topk`` keeps only the best ``k`` captions of each image and
    images of each caption, so memory stays bounded by one block plus the top-k lists.
    """
    n_img, n_cap = image_emb.shape[0], caption_emb.shape[0]
    if out is not None and tuple(out.shape) != (n_img, n_cap):
        raise ValueError(f"out has shape {tuple(out.shape)}, expected {(n_img, n_cap)}")
    max_pairs = pairs_per_block(model, image_emb, caption_emb, budget_mb)
    image_block = max(1, min(image_block, max_pairs // 16))  # at least 16 captions a block
    finished_rows: list[TopK] = []
    row_best: TopK | None = None
    row_start = 0
    k_img = min(topk or 1, n_img)
    cap_best = TopK(torch.full((n_cap, k_img), float("-inf")), torch.full((n_cap, k_img), -1))
    bar = tqdm(total=n_img * n_cap, unit="pair", unit_scale=True, disable=not progress)
    start = time.perf_counter()
    for images, idx in _blocks(n_img, lengths, max_pairs, image_block):
        block = _score(model, image_emb[images], caption_emb, lengths, idx).float().cpu()
        cols = idx.cpu()
        if out is not None:
            out[images, cols.numpy()] = block.numpy()
        if topk:
            if images.start != row_start and row_best is not None:
                finished_rows.append(row_best)
                row_best = None
            row_start = images.start
            row_best = _merge(row_best, block, cols.expand(block.shape[0], -1), topk)
            rows = torch.arange(images.start, images.stop).expand(block.shape[1], -1)
            merged = _merge(
                TopK(cap_best.scores[cols], cap_best.indices[cols]), block.T, rows, k_img
            )
            cap_best.scores[cols], cap_best.indices[cols] = merged.scores, merged.indices
        bar.update(block.numel())
    bar.close()
    seconds = time.perf_counter() - start
    if not topk:
        return GalleryScores(out, None, None, n_img * n_cap / seconds)
    finished_rows.append(row_best)
    per_image = TopK(
        torch.cat([r.scores for r in finished_rows]), torch.cat([r.indices for r in finished_rows])
    )
    return GalleryScores(out, per_image, cap_best, n_img * n_cap / seconds)


def shard(n_items: int, rank: int, world_size: int) -> slice:
    """The contiguous range of ``n_items`` that ``rank`` of ``world_size`` scores."""
    per_rank = -(-n_items // world_size)
    return slice(min(rank * per_rank, n_items), min((rank + 1) * per_rank, n_items))


@torch.no_grad()
def distributed_similarity(
    model: nn.Module,
    image_emb: Tensor,
    caption_emb: Tensor,
    lengths: Tensor,
    budget_mb: float = 1024.0,
) -> Tensor:
    """The full matrix on every rank, each rank scoring its own range of images.

    Needs an initialised ``torch.distributed`` process group (``torchrun``); every rank passes
    the same embeddings. Pair scores are independent, so the gathered matrix is identical to
    a single process's.
    """
    import torch.distributed as dist

    world, rank = dist.get_world_size(), dist.get_rank()
    n_img, n_cap = image_emb.shape[0], caption_emb.shape[0]
    mine = shard(n_img, rank, world)
    rows = -(-n_img // world)
    part = torch.zeros(rows, n_cap, dtype=torch.float32, device=image_emb.device)
    if mine.stop > mine.start:
        scores = block_similarity(model, image_emb[mine], caption_emb, lengths, budget_mb=budget_mb)
        part[: mine.stop - mine.start] = scores.float()
    parts = [torch.empty_like(part) for _ in range(world)]
    dist.all_gather(parts, part)
    return torch.cat(parts)[:n_img]
