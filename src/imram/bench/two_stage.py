"""Two-stage search: shortlist + re-rank against the engine's square blocks (``imram bench
two-stage``)."""

from __future__ import annotations

import time

import numpy as np
import torch

from imram.bench.common import random_inputs, torch_threads
from imram.evaluation import evaluate_model
from imram.metrics import format_duration
from imram.scoring import block_similarity


def bench_two_stage_synthetic(
    n_images: int = 5000,
    n_captions: int = 25000,
    ks: tuple[int, ...] = (10, 20, 50, 100, 200),
    name: str = "imram_full",
    steps: int = 3,
    timed: tuple[int, int, int] = (128, 640, 20),
    dim: int = 1024,
    regions: int = 36,
    threads: int | None = None,
) -> str:
    """Wall time of two-stage retrieval over a synthetic gallery at the paper's sizes.

    The first stage (every pair's dot product of random unit embeddings, then both top-k
    lists) runs in full, and the second stage's pair count is exact (the union of both
    shortlists). Its time comes from re-ranking, as :func:`two_stage_matrices` does, the union
    of the shortlists of a ``timed = (images, captions, largest k)`` corner of the gallery:
    the union holds about k·(1 + images/captions) pairs per caption and k·(1 + captions/images)
    per image whatever the gallery's size, so the corner reuses prepared items as the whole
    gallery would; a k above the largest timed one takes that one's rate (reuse only grows
    with k). It is printed beside the engine's rate on a square block of the same items.
    """
    from imram.retrieval.two_stage import model_pair_scorer, shortlist_masks, two_stage_matrices

    with torch_threads(threads):  # this process's setting, restored after
        rng = np.random.default_rng(0)

        def unit(n: int) -> np.ndarray:
            x = rng.standard_normal((n, 256), dtype=np.float32)
            return x / np.linalg.norm(x, axis=1, keepdims=True)

        img_vec, cap_vec = unit(n_images), unit(n_captions)
        start = time.perf_counter()
        first = img_vec @ cap_vec.T
        product_seconds = time.perf_counter() - start
        corner_images, corner_captions, largest = timed
        model, img, cap, lengths = random_inputs(
            name, steps, corner_images, corner_captions, regions, dim
        )
        scorer = model_pair_scorer(model, img, cap, lengths, budget_mb=1024)
        corner = first[:corner_images, :corner_captions]
        with torch.no_grad():
            block_similarity(model, img[:8], cap[:8], lengths[:8], budget_mb=1024)  # warm-up
            start = time.perf_counter()
            square = slice(0, corner_images)
            block_similarity(model, img, cap[square], lengths[square], budget_mb=1024)
            engine_rate = corner_images**2 / (time.perf_counter() - start)
            two_stage_matrices(corner, scorer, 1)  # warm-up: the pair path's buffers
        lines = [
            f"two-stage on a synthetic {n_images} x {n_captions} gallery: first stage 256-d "
            f"dot products ({product_seconds:.1f} s for every pair), re-rank {name} K={steps}, "
            f"d={dim}, {regions} regions; engine on a {corner_images} x {corner_images} block: "
            f"{engine_rate:,.0f} pairs/s",
            f"{'shortlist':>9}{'shortlist s':>13}{'pairs':>14}{'re-rank p/s':>13}{'/ engine':>10}"
            f"{'re-rank':>10}{'total':>10}",
        ]
        rate = 0.0
        for k in sorted(ks):
            start = time.perf_counter()
            in_i2t, in_t2i = shortlist_masks(first, k)
            pairs = int((in_i2t | in_t2i).sum())
            select_seconds = time.perf_counter() - start
            if k <= largest:
                result = two_stage_matrices(corner, scorer, k)
                rate = result.pairs_scored / result.rerank_seconds
            rerank = pairs / rate
            total = product_seconds + select_seconds + rerank
            lines.append(
                f"{k:>9}{select_seconds:>13.1f}{pairs:>14,}{rate:>13,.0f}"
                f"{rate / engine_rate:>9.2f}x{format_duration(rerank):>10}"
                f"{format_duration(total):>10}"
            )
        full = n_images * n_captions
        lines.append(
            f"re-rank rates timed on the shortlists of a {corner_images} x {corner_captions} "
            f"corner (k above {largest}: the k={largest} rate); one stage: {full:,} pairs "
            f"with {name}"
        )
        return "\n".join(lines)


def bench_two_stage(
    first: str,
    second: str,
    data: str,
    split: str = "test",
    ks: tuple[int | None, ...] = (10, 20, 50, 100, 200, None),
    device: str = "cpu",
) -> str:
    """Accuracy and wall time of two-stage retrieval on a real split: the ``first`` checkpoint
    (an embedding model) shortlists, the ``second`` (IMRAM) re-ranks; the last row is the
    second model alone, scoring every pair."""
    from imram.checkpoint import load_checkpoint
    from imram.retrieval.two_stage import rerank_split

    a, b = load_checkpoint(first), load_checkpoint(second)
    a_data = a.open_split(data, split)
    b_data = b.open_split(data, split)
    start = time.perf_counter()
    alone, _, _ = evaluate_model(b.model.to(device), b_data, device=device)
    alone_seconds = time.perf_counter() - start
    a_model, b_model = a.model.to(device), b.model.to(device)
    results = rerank_split(a_model, a_data, b_model, b_data, ks, device=device)
    n_img, n_cap = a_data.num_images, a_data.num_captions
    lines = [
        f"{split} of {data}: {n_img} images x {n_cap} captions; shortlist by "
        f"{a.config.model.name} ({first}), re-rank by {b.config.model.name} ({second})",
        f"{'shortlist':>9}{'rsum':>8}{'i2t in':>8}{'t2i in':>8}{'pairs':>10}{'seconds':>9}",
    ]
    for r in results:
        seconds = r["first_seconds"] + r["encode_seconds"] + r["rerank_seconds"]
        lines.append(
            f"{r['shortlist']!s:>9}{r['rsum']:>8.1f}{r['i2t_in_shortlist']:>7.1f}%"
            f"{r['t2i_in_shortlist']:>7.1f}%{r['pairs_scored']:>10,}{seconds:>9.2f}"
        )
    lines.append(
        f"{'one stage':>9}{alone['rsum']:>8.1f}{'':>8}{'':>8}{n_img * n_cap:>10,}"
        f"{alone_seconds:>9.2f}"
    )
    first_only, _, _ = evaluate_model(a.model.to(device), a_data, device=device)
    lines.append(f"first stage alone: rsum {first_only['rsum']:.1f}")
    return "\n".join(lines)
