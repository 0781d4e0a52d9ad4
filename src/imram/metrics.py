"""Retrieval metrics and the published evaluation protocols (SPEC §7).

Ranks are 1-based and ties count against the model: an item's rank is the number of candidates
scoring at least as high as it. Otherwise a collapsed model whose scores are all equal would
score R@1 = 100.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from imram.errors import DataError

PROTOCOLS = ("1k", "5fold", "5k")
RECALLS = (1, 5, 10)
METRIC_KEYS = tuple(
    f"{d}_{m}" for d in ("i2t", "t2i") for m in ("r1", "r5", "r10", "medr", "meanr")
) + ("rsum",)


def _check(sims: Any, cap2img: Any) -> tuple[np.ndarray, np.ndarray]:
    if hasattr(sims, "detach"):
        sims = sims.detach().cpu().numpy()
    sims = np.asarray(sims)
    cap2img = np.asarray(cap2img.cpu() if hasattr(cap2img, "cpu") else cap2img).astype(np.int64)
    if sims.ndim != 2:
        raise DataError(f"similarity matrix must be 2-D [n_images, n_captions], got {sims.shape}")
    n_img, n_cap = sims.shape
    if cap2img.shape != (n_cap,):
        raise DataError(f"cap2img has shape {cap2img.shape}, expected ({n_cap},): one per caption")
    if n_cap and (cap2img.min() < 0 or cap2img.max() >= n_img):
        bad = int(np.flatnonzero((cap2img < 0) | (cap2img >= n_img))[0])
        raise DataError(f"cap2img[{bad}] = {cap2img[bad]} is not an image index in [0, {n_img})")
    counts = np.bincount(cap2img, minlength=n_img)
    if n_img and counts.min() == 0:
        raise DataError(f"image {int(np.argmin(counts))} has no caption")
    if not np.isfinite(sims).all():
        raise DataError("similarity matrix holds NaN or inf")
    return sims, cap2img


def ranks_t2i(sims: Any, cap2img: Any, chunk: int = 4096) -> np.ndarray:
    """Rank of each caption's image among all images (1-based, ties against the model)."""
    sims, cap2img = _check(sims, cap2img)
    n_cap = sims.shape[1]
    ranks = np.empty(n_cap, dtype=np.int64)
    for start in range(0, n_cap, chunk):
        cols = np.arange(start, min(start + chunk, n_cap))
        block = sims[:, cols]
        true = block[cap2img[cols], np.arange(len(cols))]
        ranks[cols] = (block >= true[None, :]).sum(axis=0)
    return ranks


def ranks_i2t(sims: Any, cap2img: Any, chunk: int = 4096) -> np.ndarray:
    """Rank of each image's best caption among all captions (1-based, ties against the model)."""
    sims, cap2img = _check(sims, cap2img)
    n_img, n_cap = sims.shape
    caption_ranks = np.empty(n_cap, dtype=np.int64)
    for start in range(0, n_cap, chunk):
        cols = np.arange(start, min(start + chunk, n_cap))
        rows = sims[cap2img[cols]]
        true = rows[np.arange(len(cols)), cols]
        caption_ranks[cols] = (rows >= true[:, None]).sum(axis=1)
    ranks = np.full(n_img, n_cap, dtype=np.int64)
    np.minimum.at(ranks, cap2img, caption_ranks)
    return ranks


def _summary(ranks: np.ndarray, prefix: str) -> dict[str, float]:
    out = {f"{prefix}_r{k}": 100.0 * float(np.mean(ranks <= k)) for k in RECALLS}
    out[f"{prefix}_medr"] = float(np.floor(np.median(ranks - 1)) + 1)
    out[f"{prefix}_meanr"] = float(np.mean(ranks))
    return out


def recall_metrics(i2t: np.ndarray, t2i: np.ndarray) -> dict[str, float]:
    """R@1/5/10, medr (floor of the 0-based median, plus one), meanr and rsum from ranks."""
    out = {**_summary(np.asarray(i2t), "i2t"), **_summary(np.asarray(t2i), "t2i")}
    out["rsum"] = sum(out[f"{d}_r{k}"] for d in ("i2t", "t2i") for k in RECALLS)
    return out


def evaluate_sims(sims: Any, cap2img: Any, protocol: str = "1k") -> dict[str, Any]:
    """Metrics of a full similarity matrix under a protocol.

    ``1k`` and ``5k`` rank against the whole matrix; ``5fold`` (COCO 1K) evaluates five
    consecutive folds of images with their captions and averages every metric (rsum included),
    adding the per-fold results under ``folds``.
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; choose one of {', '.join(PROTOCOLS)}")
    sims, cap2img = _check(sims, cap2img)
    if protocol != "5fold":
        return recall_metrics(ranks_i2t(sims, cap2img), ranks_t2i(sims, cap2img))
    n_img = sims.shape[0]
    if n_img % 5:
        raise DataError(f"protocol 5fold needs a number of images divisible by 5, got {n_img}")
    size = n_img // 5
    folds = []
    for f in range(5):
        cols = np.flatnonzero((cap2img >= f * size) & (cap2img < (f + 1) * size))
        sub = sims[f * size : (f + 1) * size][:, cols]
        folds.append(evaluate_sims(sub, cap2img[cols] - f * size, "1k"))
    mean = {key: float(np.mean([fold[key] for fold in folds])) for key in METRIC_KEYS}
    return {**mean, "folds": folds}


def chance_metrics(n_images: int, n_captions: int, cap2img: Any = None) -> dict[str, float]:
    """Expected metrics of a random ranking: the floor any trained model must clear.

    An image with m of the n captions has its best caption within the top r with probability
    ``1 − C(n−r, m) / C(n, m)``; a caption's image is within the top r with probability r / N.
    Recalls are these probabilities at K, meanr the expected rank, medr the median rank of the
    mixture over images (t2i: of the uniform rank).
    """
    if cap2img is None:
        cap2img = np.arange(n_captions) * n_images // max(n_captions, 1)
    counts = np.bincount(np.asarray(cap2img, dtype=np.int64), minlength=n_images)
    r = np.arange(1, n_captions + 1, dtype=np.float64)
    miss = np.zeros(n_captions)
    for m, times in zip(*np.unique(counts, return_counts=True), strict=True):
        factors = [(n_captions - r - t) / (n_captions - t) for t in range(int(m))]
        miss += times * np.clip(np.prod(factors, axis=0), 0.0, 1.0)
    hit_i2t = 1.0 - miss / n_images
    out: dict[str, float] = {}
    for k in RECALLS:
        out[f"i2t_r{k}"] = 100.0 * float(hit_i2t[min(k, n_captions) - 1])
        out[f"t2i_r{k}"] = 100.0 * min(k, n_images) / n_images
    out["i2t_medr"] = float(np.searchsorted(hit_i2t, 0.5) + 1)
    out["i2t_meanr"] = float(np.mean((n_captions + 1) / (counts + 1)))
    out["t2i_medr"] = float(math.ceil(n_images / 2))
    out["t2i_meanr"] = (n_images + 1) / 2
    out["rsum"] = sum(out[f"{d}_r{k}"] for d in ("i2t", "t2i") for k in RECALLS)
    return out


def format_table(metrics: dict[str, Any], title: str | None = None) -> str:
    """A compact text table: recalls both ways, rsum, medr and meanr, one decimal."""
    header = f"{'':<10}{'R@1':>7}{'R@5':>7}{'R@10':>7}{'medr':>7}{'meanr':>8}"
    lines = [title] if title else []
    lines.append(header)
    for direction, label in (("i2t", "image→text"), ("t2i", "text→image")):
        values = [metrics[f"{direction}_{m}"] for m in ("r1", "r5", "r10", "medr", "meanr")]
        lines.append(
            f"{label:<10}{values[0]:>7.1f}{values[1]:>7.1f}{values[2]:>7.1f}"
            f"{values[3]:>7.0f}{values[4]:>8.1f}"
        )
    lines.append(f"{'rsum':<10}{metrics['rsum']:>7.1f}")
    return "\n".join(lines)
