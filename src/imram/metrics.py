"""Retrieval metrics and the published evaluation protocols (design §protocols).

Ranks are 1-based and ties count against the model: an item's rank is the number of candidates
scoring at least as high as it, so a collapsed model whose scores are all equal ranks every query
last instead of first. Ranking is vectorised and works on bounded chunks of the similarity matrix,
so a COCO 5K matrix (5000 × 25000) needs no full-size temporaries.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from imram.errors import DataError

PROTOCOLS = ("1k", "5fold", "5k")
RECALLS = (1, 5, 10)
DIRECTIONS = ("i2t", "t2i")
METRIC_KEYS = tuple(
    f"{d}_{m}" for d in DIRECTIONS for m in ("r1", "r5", "r10", "medr", "meanr")
) + ("rsum",)
DEFAULT_CHUNK = 4096
N_FOLDS = 5


def _to_numpy(x: Any) -> np.ndarray:
    """A numpy view or copy of an array-like or torch tensor (bfloat16 widened exactly)."""
    if hasattr(x, "detach"):
        x = x.detach().cpu()
        if str(x.dtype) == "torch.bfloat16":
            x = x.float()
        return x.numpy()
    return np.asarray(x)


def _check_cap2img(cap2img: Any, n_img: int, n_cap: int) -> np.ndarray:
    """Validate caption→image indices: one per caption, in range, every image covered."""
    cap2img = _to_numpy(cap2img)
    if cap2img.shape != (n_cap,):
        raise DataError(
            f"cap2img has shape {cap2img.shape}, expected ({n_cap},): one image index per caption"
        )
    if cap2img.dtype.kind not in "iu":
        raise DataError(f"cap2img must hold integer image indices, got dtype {cap2img.dtype}")
    cap2img = cap2img.astype(np.int64, copy=False)
    out_of_range = (cap2img < 0) | (cap2img >= n_img)
    if out_of_range.any():
        bad = int(np.flatnonzero(out_of_range)[0])
        raise DataError(
            f"cap2img[{bad}] = {cap2img[bad]} is not an image index in [0, {n_img}) "
            f"(there are {n_img} images)"
        )
    counts = np.bincount(cap2img, minlength=n_img)
    if (counts == 0).any():
        missing = np.flatnonzero(counts == 0)
        raise DataError(
            f"image {int(missing[0])} has no caption ({len(missing)} image(s) without captions); "
            "every image needs at least one caption in cap2img"
        )
    return cap2img


def _check(sims: Any, cap2img: Any) -> tuple[np.ndarray, np.ndarray]:
    """Validate the inputs and return them as numpy (scores keep their dtype, so ties stay ties)."""
    sims = _to_numpy(sims)
    if sims.ndim != 2:
        raise DataError(
            f"similarity matrix must be 2-D [n_images, n_captions], got shape {sims.shape}"
        )
    if sims.dtype.kind not in "biuf":
        raise DataError(f"similarity matrix must hold real numbers, got dtype {sims.dtype}")
    n_img, n_cap = sims.shape
    if n_img == 0 or n_cap == 0:
        raise DataError(f"similarity matrix is empty: shape {sims.shape}")
    cap2img = _check_cap2img(cap2img, n_img, n_cap)
    # min propagates NaN without an n_images × n_captions temporary; locate it only on failure.
    if sims.dtype.kind == "f" and np.isnan(sims.min()):
        nans = np.argwhere(np.isnan(sims))
        i, j = (int(v) for v in nans[0])
        raise DataError(f"similarity matrix holds NaN ({len(nans)} entries, first at [{i}, {j}])")
    return sims, cap2img


def _check_chunk(chunk: int) -> None:
    if isinstance(chunk, bool) or not isinstance(chunk, int | np.integer) or chunk < 1:
        raise ValueError(f"chunk must be a positive integer, got {chunk!r}")


def _ranks_t2i(sims: np.ndarray, cap2img: np.ndarray, chunk: int) -> np.ndarray:
    n_cap = sims.shape[1]
    ranks = np.empty(n_cap, dtype=np.int64)
    for start in range(0, n_cap, chunk):
        stop = min(start + chunk, n_cap)
        block = sims[:, start:stop]
        true = sims[cap2img[start:stop], np.arange(start, stop)]
        ranks[start:stop] = np.count_nonzero(block >= true[None, :], axis=0)
    return ranks


def _ranks_i2t(sims: np.ndarray, cap2img: np.ndarray, chunk: int) -> np.ndarray:
    n_img, n_cap = sims.shape
    own = sims[cap2img, np.arange(n_cap)]
    best = np.empty(n_img, dtype=sims.dtype)
    best[cap2img] = own  # every image has a caption, so every entry is set
    np.maximum.at(best, cap2img, own)
    ranks = np.empty(n_img, dtype=np.int64)
    for start in range(0, n_img, chunk):
        stop = min(start + chunk, n_img)
        block = sims[start:stop]
        ranks[start:stop] = np.count_nonzero(block >= best[start:stop, None], axis=1)
    return ranks


def ranks_t2i(sims: Any, cap2img: Any, *, chunk: int = DEFAULT_CHUNK) -> np.ndarray:
    """Rank of each caption's true image in its column (1-based, ties against the model).

    ``chunk`` columns are compared at a time, bounding the temporary to n_images × chunk.
    """
    _check_chunk(chunk)
    sims, cap2img = _check(sims, cap2img)
    return _ranks_t2i(sims, cap2img, chunk)


def ranks_i2t(sims: Any, cap2img: Any, *, chunk: int = DEFAULT_CHUNK) -> np.ndarray:
    """Rank of each image's best caption in its row (1-based, ties against the model).

    A caption's rank counts the row's scores ≥ its own, which never grows as the score rises, so
    the minimum over an image's captions is the rank of its highest-scoring caption: one max per
    image, then ``chunk`` rows compared at a time (temporary chunk × n_captions).
    """
    _check_chunk(chunk)
    sims, cap2img = _check(sims, cap2img)
    return _ranks_i2t(sims, cap2img, chunk)


def _summary(ranks: np.ndarray, prefix: str) -> dict[str, float]:
    ranks = np.asarray(ranks)
    if ranks.ndim != 1 or ranks.size == 0:
        raise DataError(f"{prefix} ranks must be a non-empty 1-D array, got shape {ranks.shape}")
    if ranks.min() < 1:
        raise DataError(f"{prefix} ranks are 1-based, got a rank of {ranks.min()}")
    out = {f"{prefix}_r{k}": 100.0 * float(np.mean(ranks <= k)) for k in RECALLS}
    out[f"{prefix}_medr"] = float(np.floor(np.median(ranks - 1)) + 1)
    out[f"{prefix}_meanr"] = float(np.mean(ranks))
    return out


def _rsum(metrics: dict[str, float]) -> float:
    return float(sum(metrics[f"{d}_r{k}"] for d in DIRECTIONS for k in RECALLS))


def recall_metrics(ranks_i2t: np.ndarray, ranks_t2i: np.ndarray) -> dict[str, float]:
    """R@1/5/10, medr, meanr both ways and rsum from 1-based ranks.

    medr is the floor of the median 0-based rank, plus one (the convention of the field's code);
    meanr is the mean rank.
    """
    out = {**_summary(ranks_i2t, "i2t"), **_summary(ranks_t2i, "t2i")}
    out["rsum"] = _rsum(out)
    return out


def _evaluate(sims: np.ndarray, cap2img: np.ndarray) -> dict[str, float]:
    return recall_metrics(
        _ranks_i2t(sims, cap2img, DEFAULT_CHUNK), _ranks_t2i(sims, cap2img, DEFAULT_CHUNK)
    )


def evaluate_sims(sims: Any, cap2img: Any, protocol: str = "1k") -> dict[str, Any]:
    """Metrics of a similarity matrix [n_images, n_captions] under a published protocol.

    ``1k`` and ``5k`` rank every query against the whole matrix. ``5fold`` (COCO 1K) splits the
    images into five consecutive equal folds, keeps the captions of each fold's images, and
    averages every metric over the folds (rsum included), adding the per-fold dicts as ``folds``.
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; valid protocols: {', '.join(PROTOCOLS)}")
    sims, cap2img = _check(sims, cap2img)
    if protocol != "5fold":
        return _evaluate(sims, cap2img)
    n_img = sims.shape[0]
    if n_img % N_FOLDS:
        raise DataError(
            f"protocol 5fold needs a number of images divisible by {N_FOLDS}, got {n_img}"
        )
    size = n_img // N_FOLDS
    folds = []
    for f in range(N_FOLDS):
        lo, hi = f * size, (f + 1) * size
        cols = np.flatnonzero((cap2img >= lo) & (cap2img < hi))
        folds.append(_evaluate(sims[lo:hi][:, cols], cap2img[cols] - lo))
    mean: dict[str, Any] = {
        key: float(np.mean([fold[key] for fold in folds])) for key in METRIC_KEYS
    }
    mean["folds"] = folds
    return mean


def chance_metrics(n_images: int, n_captions: int, cap2img: Any = None) -> dict[str, float]:
    """Expected metrics of a uniformly random ranking: the floor a trained model must clear.

    t2i: a caption's image lands at each of the n_images ranks equally often, so R@K = 100·K/n.
    i2t: an image with m of the N captions has its best one outside the top K with probability
    C(N−m, K) / C(N, K) (computed exactly for the recalls); meanr is the expected rank
    (N+1)/(m+1) averaged over images. medr is the median of the rank distribution, floored like
    the metric, not an average of sample medians. Without ``cap2img`` the captions are spread
    evenly over the images (consecutive blocks whose sizes differ by at most one).
    """
    if n_images < 1 or n_captions < n_images:
        raise DataError(
            f"need 1 <= n_images <= n_captions, got n_images={n_images}, n_captions={n_captions}"
        )
    if cap2img is None:
        cap2img = np.arange(n_captions) * n_images // n_captions
    counts = np.bincount(_check_cap2img(cap2img, n_images, n_captions), minlength=n_images)
    sizes, times = np.unique(counts, return_counts=True)
    groups = [(int(m), int(t)) for m, t in zip(sizes, times, strict=True)]

    out: dict[str, float] = {}
    for k in RECALLS:
        kk = min(k, n_captions)
        total = math.comb(n_captions, kk)
        hits = sum(t * (total - math.comb(n_captions - m, kk)) for m, t in groups)
        out[f"i2t_r{k}"] = 100 * hits / (n_images * total)  # exact integers, one rounding
    # P(best of m > r) = C(N−r, m) / C(N, m) = prod_{s<r} (N−m−s) / (N−s), for every r at once.
    s = np.arange(n_captions, dtype=np.float64)
    miss_r = np.zeros(n_captions)
    for m, t in groups:
        miss_r += t * np.cumprod(np.clip((n_captions - m - s) / (n_captions - s), 0.0, None))
    cdf = 1.0 - miss_r / n_images
    out["i2t_medr"] = float(np.searchsorted(cdf, 0.5 - 1e-12) + 1)
    out["i2t_meanr"] = float(np.mean((n_captions + 1) / (counts + 1)))
    for k in RECALLS:
        out[f"t2i_r{k}"] = 100.0 * min(k, n_images) / n_images
    out["t2i_medr"] = float(math.ceil(n_images / 2))
    out["t2i_meanr"] = (n_images + 1) / 2
    out["rsum"] = _rsum(out)
    return {key: out[key] for key in METRIC_KEYS}


def format_duration(seconds: float) -> str:
    """``42 s`` under two minutes, ``3.5 min`` under two hours, else ``2.1 h``."""
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def format_table(metrics: dict[str, Any], title: str | None = None) -> str:
    """A compact text table in the papers' layout, one decimal throughout.

    Row one: i2t R@1 R@5 R@10 | t2i R@1 R@5 R@10 | rsum; row two: medr and meanr both ways.
    """
    missing = [key for key in METRIC_KEYS if key not in metrics]
    if missing:
        raise ValueError(f"metrics dict lacks {', '.join(missing)}")
    lines = []
    if title:
        n_folds = len(metrics.get("folds", ()))
        lines.append(f"{title} (mean of {n_folds} folds)" if n_folds else title)

    def cells(direction: str) -> str:
        return "".join(f"{metrics[f'{direction}_r{k}']:>7.1f}" for k in RECALLS)

    recall_head = "".join(f"{f'R@{k}':>7}" for k in RECALLS)
    lines.append(f"{'i2t':<5}{recall_head} | {'t2i':<5}{recall_head} | {'rsum':>7}")
    lines.append(f"{'':<5}{cells('i2t')} | {'':<5}{cells('t2i')} | {metrics['rsum']:>7.1f}")
    lines.append(
        "  ".join(
            f"{d} medr {metrics[f'{d}_medr']:.1f} meanr {metrics[f'{d}_meanr']:.1f}"
            for d in DIRECTIONS
        )
    )
    return "\n".join(lines)
