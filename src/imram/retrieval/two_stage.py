"""Two-stage retrieval: shortlist by embeddings (a dot product), re-rank the shortlist with IMRAM.

An embedding model (VSE++, MEMBER) scores every pair at the cost of one matrix product; the
cross-attention model then scores only each query's ``k`` best candidates. Candidates outside
the shortlist are never seen by the second stage: they score −inf, so a query whose true match
is outside its shortlist is a miss (its rank is the gallery size). With ``k`` = the gallery size
every pair is re-scored and the ranking is exactly the one-stage ranking.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor, nn

from imram.data import PrecompDataset, pad_captions
from imram.devices import resolve_device
from imram.errors import ConfigError, DataError
from imram.features.extract import image_features
from imram.metrics import METRIC_KEYS, N_FOLDS, PROTOCOLS, ranks_i2t, ranks_t2i, recall_metrics
from imram.retrieval.fusion import Fusion, best_weight, load_fusion
from imram.retrieval.index import GalleryIndex, Hit, load_index
from imram.scoring import score_pairs

if TYPE_CHECKING:
    from imram.checkpoint import Checkpoint

# Scores of the pairs (image rows[p], caption cols[p]), all of a shortlist in one call, so
# that the scorer can prepare each item once.
PairScorer = Callable[[np.ndarray, np.ndarray], np.ndarray]


def top_k(scores: np.ndarray, k: int, chunk: int = 1024) -> np.ndarray:
    """Indices of the ``k`` highest entries of each row, best first (``[rows, k]``), ``chunk``
    rows at a time so temporaries stay ``chunk × columns``."""
    k = min(k, scores.shape[1])
    out = np.empty((scores.shape[0], k), dtype=np.int64)
    for start in range(0, scores.shape[0], chunk):
        block = -np.ascontiguousarray(scores[start : start + chunk])
        part = np.argpartition(block, k - 1, axis=1)[:, :k] if k < block.shape[1] else None
        if part is None:
            part = np.broadcast_to(np.arange(block.shape[1]), block.shape)
        order = np.argsort(np.take_along_axis(block, part, axis=1), axis=1, kind="stable")
        out[start : start + chunk] = np.take_along_axis(part, order, axis=1)
    return out


def shortlist_masks(first: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The shortlists of a first-stage matrix ``[n_img, n_cap]`` as boolean masks of the same
    shape: each image's ``k`` best captions (i2t) and each caption's ``k`` best images (t2i).
    Their union is the set of pairs the second stage scores, each once."""
    n_img, n_cap = first.shape
    in_i2t = np.zeros((n_img, n_cap), dtype=bool)
    np.put_along_axis(in_i2t, top_k(first, k), True, axis=1)
    in_t2i = np.zeros((n_img, n_cap), dtype=bool)
    in_t2i[top_k(first.T, k), np.arange(n_cap)[:, None]] = True
    return in_i2t, in_t2i


@dataclass
class TwoStageResult:
    """Re-ranked matrices (−inf outside each query's shortlist) and what the stages cost."""

    i2t: np.ndarray
    t2i: np.ndarray
    pairs_scored: int
    rerank_seconds: float


def two_stage_matrices(
    first: np.ndarray, scorer: PairScorer, k: int, fusion: Fusion | None = None
) -> TwoStageResult:
    """Re-rank ``first`` (``[n_img, n_cap]``) with ``scorer(rows, cols) -> scores``:
    row ``i`` of ``i2t`` holds second-stage scores for image ``i``'s ``k`` shortlisted
    captions, column ``j`` of ``t2i`` for caption ``j``'s ``k`` shortlisted images; a pair in
    both shortlists is scored once. With ``fusion`` the shortlist is ranked by both stages'
    fused scores instead of the second stage's alone."""
    if k < 1:
        raise DataError(f"shortlist k={k} must be >= 1")
    in_i2t, in_t2i = shortlist_masks(first, k)
    n_img, n_cap = first.shape
    rows, cols = np.nonzero(in_i2t | in_t2i)
    start = time.perf_counter()
    scores = np.asarray(scorer(rows, cols), dtype=np.float32)
    seconds = time.perf_counter() - start
    if fusion is not None:
        scores = fusion.combine(first[rows, cols], scores)
    i2t = np.full((n_img, n_cap), -np.inf, dtype=np.float32)
    t2i = np.full((n_img, n_cap), -np.inf, dtype=np.float32)
    keep = in_i2t[rows, cols]
    i2t[rows[keep], cols[keep]] = scores[keep]
    keep = in_t2i[rows, cols]
    t2i[rows[keep], cols[keep]] = scores[keep]
    return TwoStageResult(i2t, t2i, len(rows), seconds)


def model_pair_scorer(
    model: nn.Module,
    image_emb: Tensor,
    caption_emb: Tensor,
    lengths: Tensor,
    budget_mb: float,
    progress: bool = False,
) -> PairScorer:
    """Score pairs with ``model.pair_similarity`` (:func:`imram.scoring.score_pairs`)."""

    def score(rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        device = caption_emb.device
        r, c = torch.as_tensor(rows, device=device), torch.as_tensor(cols, device=device)
        scores = score_pairs(
            model, image_emb, caption_emb, lengths, r, c, budget_mb, progress=progress
        )
        return scores.numpy()

    return score


def evaluate_two_stage(
    first: np.ndarray,
    scorer: PairScorer,
    cap2img: np.ndarray,
    k: int,
    protocol: str = "1k",
    fusion: Fusion | None = None,
) -> dict[str, Any]:
    """Metrics of the re-ranked shortlists under a protocol (``5fold``: shortlists within each
    fold, metrics averaged), plus ``shortlist`` = k, ``pairs_scored``, ``rerank_seconds`` and
    ``i2t_in_shortlist`` / ``t2i_in_shortlist``: the share of queries whose true match the
    shortlist holds (the ceiling of R@k, since the others are misses). ``fusion``: ranked by
    both stages' fused scores."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; valid protocols: {', '.join(PROTOCOLS)}")
    cap2img = np.asarray(cap2img, dtype=np.int64)
    n_img = first.shape[0]
    folds = [(0, n_img)]
    if protocol == "5fold":
        if n_img % N_FOLDS:
            raise DataError(f"protocol 5fold needs images divisible by {N_FOLDS}, got {n_img}")
        size = n_img // N_FOLDS
        folds = [(f * size, (f + 1) * size) for f in range(N_FOLDS)]
    results, pairs, seconds = [], 0, 0.0
    for lo, hi in folds:
        cols = np.flatnonzero((cap2img >= lo) & (cap2img < hi))

        def fold_scorer(rows: np.ndarray, captions: np.ndarray, lo=lo, cols=cols) -> np.ndarray:
            return scorer(lo + rows, cols[captions])

        result = two_stage_matrices(first[lo:hi][:, cols], fold_scorer, k, fusion)
        local = cap2img[cols] - lo
        r_i2t, r_t2i = ranks_i2t(result.i2t, local), ranks_t2i(result.t2i, local)
        metrics = recall_metrics(r_i2t, r_t2i)
        metrics["i2t_in_shortlist"] = 100.0 * float(
            np.mean(np.isfinite(_best_true(result.i2t, local)))
        )
        metrics["t2i_in_shortlist"] = 100.0 * float(
            np.mean(np.isfinite(result.t2i[local, np.arange(len(local))]))
        )
        results.append(metrics)
        pairs += result.pairs_scored
        seconds += result.rerank_seconds
    keys = (*METRIC_KEYS, "i2t_in_shortlist", "t2i_in_shortlist")
    out: dict[str, Any] = {key: float(np.mean([r[key] for r in results])) for key in keys}
    if protocol == "5fold":
        out["folds"] = results
    out.update(shortlist=k, pairs_scored=pairs, rerank_seconds=seconds)
    return out


def _best_true(i2t: np.ndarray, cap2img: np.ndarray) -> np.ndarray:
    """Each image's best score among its own captions (−inf when none is shortlisted)."""
    best = np.full(i2t.shape[0], -np.inf, dtype=i2t.dtype)
    np.maximum.at(best, cap2img, i2t[cap2img, np.arange(len(cap2img))])
    return best


def rerank_split(
    first_model: nn.Module,
    first_data: PrecompDataset,
    second_model: nn.Module,
    second_data: PrecompDataset,
    ks: Sequence[int | None],
    protocol: str = "1k",
    device: str | torch.device = "cpu",
    budget_mb: float = 1024.0,
    progress: bool = False,
    fusion_weights: Sequence[float] = (),
    fusion: Fusion | None = None,
) -> list[dict[str, Any]]:
    """Two-stage metrics of a split for each shortlist size in ``ks`` (None: every item).

    ``first_data`` and ``second_data`` are the same split opened with each checkpoint's
    vocabulary. Each result adds ``first_seconds`` (embedding and scoring every pair with the
    first model) and ``encode_seconds`` (the second model's fragment encoding, done once).
    With ``fusion_weights`` each result also holds ``fused`` (the metrics of the shortlists
    ranked by fused scores, per weight, the pairs scored once) and ``fusion``: the
    standardisation over this split's shortlisted pairs with the weight of the best rsum.
    A given ``fusion`` adds ``fused_given``: the metrics of the shortlists ranked by it.
    """
    from imram.evaluation import encode_split, evaluate_model

    if (first_data.num_images, first_data.num_captions) != (
        second_data.num_images,
        second_data.num_captions,
    ):
        raise DataError("the two stages must read the same split")
    start = time.perf_counter()
    _, first, cap2img = evaluate_model(first_model, first_data, protocol, device=device)
    first_seconds = time.perf_counter() - start
    start = time.perf_counter()
    second_model.eval()
    images = np.unique(first_data.cap2img)
    img, cap, lengths = encode_split(
        second_model, second_data, images.tolist(), range(first_data.num_captions), device=device
    )
    encode_seconds = time.perf_counter() - start
    scorer = _Remembered(model_pair_scorer(second_model, img, cap, lengths, budget_mb, progress))
    results = []
    for k in ks:
        size = k or max(first.shape)
        metrics = evaluate_two_stage(first, scorer, cap2img, size, protocol)
        metrics.update(
            shortlist=k or "all", first_seconds=first_seconds, encode_seconds=encode_seconds
        )
        if fusion_weights:
            rows, cols, second = scorer.seen()
            fused = Fusion.standardising(first[rows, cols], second)
            by_weight = {
                w: evaluate_two_stage(first, scorer, cap2img, size, protocol, fused.with_weight(w))
                for w in fusion_weights
            }
            weight = best_weight({w: m["rsum"] for w, m in by_weight.items()})
            metrics["fused"] = {str(w): m for w, m in by_weight.items()}
            metrics["fusion"] = asdict(fused.with_weight(weight))
        if fusion is not None:
            metrics["fused_given"] = evaluate_two_stage(
                first, scorer, cap2img, size, protocol, fusion
            )
        scorer.forget()
        results.append(metrics)
    return results


class _Remembered:
    """A pair scorer that answers a repeated question from memory (fusion re-ranks the same
    shortlists under several weights) and can list every pair it scored since ``forget``."""

    def __init__(self, scorer: PairScorer) -> None:
        self.scorer = scorer
        self.calls: dict[bytes, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}

    def __call__(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        key = hashlib.sha256(np.asarray(rows).tobytes() + np.asarray(cols).tobytes()).digest()
        if key not in self.calls:
            self.calls[key] = (np.asarray(rows), np.asarray(cols), self.scorer(rows, cols))
        return self.calls[key][2]

    def seen(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        rows, cols, scores = zip(*self.calls.values(), strict=True)
        return np.concatenate(rows), np.concatenate(cols), np.concatenate(scores)

    def forget(self) -> None:
        self.calls.clear()


@torch.no_grad()
def rerank_by_features(
    reranker: Checkpoint,
    hits: list[Hit],
    features: Tensor,
    texts: list[str],
    text_query: bool,
    device: str | torch.device = "cpu",
    fusion: Fusion | None = None,
) -> list[Hit]:
    """Re-order ``hits`` by the cross-attention model of ``reranker`` (already on ``device``):
    one text (``texts``) against the hits' region ``features``, or, with ``text_query``
    False, one image's ``features`` against the hits' captions (``texts``). With ``fusion``
    the order and the scores are the fused ones (the hits' scores are the first stage's)."""
    if not hits:
        return []
    vocab = reranker.vocab
    if vocab is None:
        raise DataError(f"{reranker.path}: the re-ranking checkpoint has no vocabulary")
    if features.shape[-1] != reranker.config.model.img_dim:
        raise DataError(
            f"{reranker.path}: the re-ranker takes {reranker.config.model.img_dim}-d regions, "
            f"the gallery's are {features.shape[-1]}-d"
        )
    model = reranker.model
    tokens, lengths = pad_captions([vocab.encode(text) for text in texts])
    lengths = lengths.to(device)
    img = model.encode_images(features.to(device))
    cap = model.encode_captions(tokens.to(device), lengths)
    scores = model.similarity(img, cap, lengths).float().cpu()
    scores = scores[:, 0] if text_query else scores[0]
    if fusion is not None:
        first = np.array([hit.score for hit in hits], dtype=np.float64)
        scores = torch.from_numpy(fusion.combine(first, scores.numpy()))
    order = torch.argsort(scores, descending=True, stable=True).tolist()
    return [
        Hit(rank, hits[i].id, float(scores[i]), hits[i].name)
        for rank, i in enumerate(order, start=1)
    ]


def rerank_hits(
    gallery: GalleryIndex,
    hits: list[Hit],
    reranker: Checkpoint,
    *,
    text: str | None = None,
    image: str | Path | None = None,
    device: str | torch.device = "cpu",
    fusion: Fusion | None = None,
) -> list[Hit]:
    """Re-order one query's shortlist ``hits`` by the cross-attention model ``reranker``
    (by both stages' fused scores with ``fusion``).

    A text query is scored against the region features of the shortlisted gallery images
    (read from the indexed precomp folder); an image file is turned into grid features as the
    gallery's were and scored against the shortlisted captions.
    """
    if not hits:
        return []
    reranker.model.to(device).eval()
    stages = reranker.config.model.trunk_stages
    if text is not None:
        data = gallery.meta["data"]
        dataset = PrecompDataset(data["root"], data["split"], None, stages)
        dataset.require_input(reranker.config.model, f"the re-ranker {reranker.path}")
        features = dataset.images([hit.id for hit in hits])
        return rerank_by_features(reranker, hits, features, [text], True, device, fusion)
    features = image_features([image], gallery.extractor_config(), device, trunk_stages=stages)
    texts = [h.name for h in hits]
    return rerank_by_features(reranker, hits, features, texts, False, device, fusion)


def two_stage_search(
    index: str | Path,
    rerank: str | Path,
    *,
    text: str | None = None,
    image: str | Path | None = None,
    k: int = 10,
    shortlist: int = 100,
    checkpoint: str | Path | None = None,
    nprobe: int | None = None,
    device: str | torch.device | None = None,
    fusion: str | Path | None = None,
) -> list[Hit]:
    """One query: the ``shortlist`` nearest items by the index's embeddings, re-ranked by the
    ``rerank`` checkpoint (by both stages' fused scores with a ``fusion`` file fitted for this
    pair); the best ``k`` are returned. A true match outside the shortlist is never seen."""
    from imram.checkpoint import load_checkpoint

    if shortlist < k:
        raise ConfigError(f"--shortlist {shortlist} must be at least --k {k}")
    device = resolve_device(device)
    gallery = load_index(index, checkpoint, device)
    hits = gallery.search(text=text, image=image, k=shortlist, nprobe=nprobe)
    reranker = load_checkpoint(rerank)
    fused = None if fusion is None else load_fusion(fusion, gallery.checkpoint, reranker)
    reranked = rerank_hits(
        gallery, hits, reranker, text=text, image=image, device=device, fusion=fused
    )
    return reranked[:k]
