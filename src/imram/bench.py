"""Benchmarks that measure the engine against a baseline in the same run (``imram bench``).

The scoring baseline mirrors the published evaluation: for each caption, score it against a
shard of images at once, with the full ``2d → d`` memory linears on ``[x; c]`` for every pair and
a memory update after every step (including the unused last one).
"""

from __future__ import annotations

import math
import multiprocessing as mp
import resource
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from imram.evaluation import encode_in_batches, evaluate_model
from imram.metrics import format_duration
from imram.models import EmbeddingModel, build_model
from imram.models.encoders import EPS
from imram.models.memory import MemoryDistillation
from imram.models.registry import model_class, model_config
from imram.precision import autocast
from imram.scoring import block_similarity, score_gallery


def _release_attention(query: Tensor, context: Tensor, lam: float) -> Tensor:
    """One caption × a shard: query ``[N, n, d]``, context ``[N, m, d]`` → ``[N, n, d]``."""
    scores = torch.bmm(context, query.transpose(1, 2))  # [N, m, n]
    scores = F.leaky_relu(scores, 0.1)
    scores = scores / (scores.pow(2).sum(dim=2, keepdim=True).sqrt() + EPS)
    weights = torch.softmax(scores.transpose(1, 2) * lam, dim=2)  # [N, n, m]
    return torch.bmm(weights, context)


def _release_cosine(a: Tensor, b: Tensor) -> Tensor:
    return (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1)).clamp(min=EPS)


def release_style_similarity(
    model, image_emb: Tensor, caption_emb: Tensor, lengths: Tensor
) -> Tensor:
    """The published code's loop: captions one at a time against the whole image shard (its
    evaluation runs it without autograd, its training step with)."""
    cfg = model.config
    n_img = image_emb.shape[0]
    # The release updates the query after every step, even when K = 1 leaves it unused.
    spare = MemoryDistillation(cfg.embed_dim).to(image_emb.dtype)
    columns = []
    for j in range(caption_emb.shape[0]):
        words = caption_emb[j, : int(lengths[j])].unsqueeze(0).repeat(n_img, 1, 1)
        total = torch.zeros(n_img, dtype=image_emb.dtype)
        for branch, query0, context, memory in (
            ("text", words, image_emb, model.text_memory),
            ("image", image_emb, words, model.image_memory),
        ):
            if not model.uses(branch):
                continue
            memory = memory or spare
            query = query0
            for _ in range(cfg.steps):
                attended = _release_attention(query, context, cfg.lambda_softmax)
                total += _release_cosine(query0, attended).mean(dim=1)
                query = memory(query, attended)
        columns.append(total)
    return torch.stack(columns, dim=1)


@dataclass
class ScoringResult:
    name: str
    steps: int
    engine_pairs_s: float
    baseline_pairs_s: float
    engine_peak_mb: float
    baseline_peak_mb: float
    max_abs_diff: float

    @property
    def ratio(self) -> float:
        return self.engine_pairs_s / self.baseline_pairs_s


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _inputs(name: str, steps: int, n_images: int, n_captions: int, regions: int, dim: int):
    torch.manual_seed(0)
    model = build_model(name, steps=steps, embed_dim=dim).eval()
    lengths = torch.randint(8, 21, (n_captions,))
    tokens = torch.randint(4, 1000, (n_captions, 20))
    with torch.no_grad():  # in batches of 128, as evaluation encodes
        img = encode_in_batches(
            lambda s: model.encode_images(
                torch.randn(s.stop - s.start, regions, model.config.img_dim)
            ),
            n_images,
        )
        cap = encode_in_batches(
            lambda s: model.encode_captions(tokens[s], lengths[s]), n_captions, length=20
        )
    return model, img, cap, lengths


def _measure(args: tuple) -> tuple[float, float, Tensor]:
    """Run one scorer in a fresh process on the first ``scored`` captions of the same inputs:
    (pairs/s of one timed run after a small warm-up, growth of peak RSS in MB, scores)."""
    which, name, steps, n_images, n_captions, scored, regions, dim, threads = args
    torch.set_num_threads(threads)
    model, img, cap, lengths = _inputs(name, steps, n_images, n_captions, regions, dim)
    cap, lengths = cap[:scored], lengths[:scored]

    def run(images: Tensor, captions: Tensor, lens: Tensor) -> Tensor:
        if which == "baseline":
            return release_style_similarity(model, images, captions, lens)
        precision = which.removeprefix("engine-") if which.startswith("engine-") else "fp32"
        with autocast(precision, "cpu"):  # "engine-bf16": the engine under bf16 autocast
            return block_similarity(model, images, captions, lens, budget_mb=1024).float()

    before = _peak_mb()
    with torch.no_grad():
        run(img[:8], cap[:4], lengths[:4])  # threads, kernels and buffers warm up
        start = time.perf_counter()
        scores = run(img, cap, lengths)
        seconds = time.perf_counter() - start
    return n_images * scored / seconds, _peak_mb() - before, scores


def bench_scoring(
    configs: tuple[tuple[str, int], ...] = (
        ("imram_full", 1),
        ("imram_full", 3),
        ("imram_text", 1),
        ("imram_text", 3),
        ("imram_image", 1),
        ("imram_image", 3),
    ),
    n_images: int = 128,
    n_captions: int = 128,
    baseline_captions: int | None = None,
    regions: int = 36,
    dim: int = 1024,
    threads: int | None = None,
    repeats: int = 3,
) -> list[ScoringResult]:
    """Pairs/s of the engine (``block_similarity`` with a 1 GB block budget, which calls
    ``model.similarity`` on length-sorted blocks) and of the release-style loop, each run in a
    fresh process, the two alternating ``repeats`` times so that both see the same state of
    the machine; the best run of each counts (a busy machine only ever slows a run).

    The baseline's cost is the same for every caption, so ``baseline_captions`` may time it on
    the first captions only; the engine always scores the whole block. Scores are compared on
    the pairs both computed.
    """
    threads = threads or torch.get_num_threads()
    base_caps = baseline_captions or n_captions
    ctx = mp.get_context("spawn")
    results = []
    for name, steps in configs:
        common = (name, steps, n_images, n_captions)
        runs: dict[str, list[tuple[float, float, Tensor]]] = {"engine": [], "baseline": []}
        for _ in range(repeats):
            for which, scored in (("engine", n_captions), ("baseline", base_caps)):
                with ctx.Pool(1) as pool:
                    job = (which, *common, scored, regions, dim, threads)
                    runs[which].append(pool.apply(_measure, (job,)))
        engine, base = (max(runs[w], key=lambda r: r[0]) for w in ("engine", "baseline"))
        engine_mb, base_mb = (max(r[1] for r in runs[w]) for w in ("engine", "baseline"))
        diff = (engine[2][:, :base_caps] - base[2]).abs().max().item()
        results.append(ScoringResult(name, steps, engine[0], base[0], engine_mb, base_mb, diff))
    return results


@dataclass
class LowPrecisionResult:
    name: str
    steps: int
    precision: str
    low_pairs_s: float
    fp32_pairs_s: float
    max_abs_diff: float

    @property
    def ratio(self) -> float:
        return self.low_pairs_s / self.fp32_pairs_s


def bench_low_precision_scoring(
    configs: tuple[tuple[str, int], ...] = (("imram_full", 3),),
    precision: str = "bf16",
    n_images: int = 128,
    n_captions: int = 128,
    regions: int = 36,
    dim: int = 1024,
    threads: int | None = None,
    repeats: int = 3,
) -> list[LowPrecisionResult]:
    """Pairs/s of the engine under ``precision`` autocast against the same engine in fp32,
    fresh processes alternating, best of ``repeats`` each; with the largest score difference."""
    threads = threads or torch.get_num_threads()
    ctx = mp.get_context("spawn")
    results = []
    for name, steps in configs:
        runs: dict[str, list[tuple[float, float, Tensor]]] = {"low": [], "fp32": []}
        for _ in range(repeats):
            for key, which in (("low", f"engine-{precision}"), ("fp32", "engine")):
                job = (which, name, steps, n_images, n_captions, n_captions, regions, dim, threads)
                with ctx.Pool(1) as pool:
                    runs[key].append(pool.apply(_measure, (job,)))
        low, exact = (max(runs[k], key=lambda r: r[0]) for k in ("low", "fp32"))
        diff = (low[2] - exact[2]).abs().max().item()
        results.append(LowPrecisionResult(name, steps, precision, low[0], exact[0], diff))
    return results


def format_low_precision(results: list[LowPrecisionResult], n_images: int, n_captions: int) -> str:
    lines = [
        f"scoring under autocast against the fp32 engine, block {n_images} x {n_captions}, "
        "36 regions, d=1024",
        f"{'model':<12}{'K':>2}{'precision':>10}{'low p/s':>10}{'fp32 p/s':>10}{'ratio':>8}"
        f"{'max|diff|':>11}",
    ]
    for r in results:
        lines.append(
            f"{r.name:<12}{r.steps:>2}{r.precision:>10}{r.low_pairs_s:>10,.0f}"
            f"{r.fp32_pairs_s:>10,.0f}{r.ratio:>7.2f}x{r.max_abs_diff:>11.1e}"
        )
    return "\n".join(lines)


def low_precision_rsum(
    checkpoint: str | Path, data: str | Path, split: str = "test", precision: str = "bf16"
) -> str:
    """One line: the rsum of a checkpoint on a split under ``precision`` and in fp32."""
    from imram.checkpoint import load_checkpoint
    from imram.data import PrecompDataset

    loaded = load_checkpoint(checkpoint)
    dataset = PrecompDataset(data, split, loaded.vocab)
    metrics, _, _ = evaluate_model(
        loaded.model, dataset, "1k", precision=precision, against_fp32=True
    )
    return (
        f"{loaded.config.model.name} on {Path(data).name}/{split}: rsum {precision} "
        f"{metrics['rsum']:.2f}, fp32 {metrics['fp32_rsum']:.2f}, difference "
        f"{metrics['rsum_vs_fp32']:+.2f}; largest score difference "
        f"{metrics['max_score_diff_vs_fp32']:.1e}"
    )


def format_scoring(results: list[ScoringResult], n_images: int, n_captions: int) -> str:
    """The benchmark table plus the extrapolated time of Flickr30K test and COCO 5K."""
    lines = [
        f"block {n_images} images x {n_captions} captions, 36 regions, d=1024, lengths 8-20",
        f"{'model':<12}{'K':>2}{'engine p/s':>12}{'baseline p/s':>14}{'ratio':>8}"
        f"{'engine MB':>11}{'base MB':>9}{'max|diff|':>11}{'F30K test':>11}{'COCO 5K':>10}",
    ]
    for r in results:
        f30k = 1000 * 5000 / r.engine_pairs_s
        coco = 5000 * 25000 / r.engine_pairs_s
        lines.append(
            f"{r.name:<12}{r.steps:>2}{r.engine_pairs_s:>12,.0f}{r.baseline_pairs_s:>14,.0f}"
            f"{r.ratio:>7.1f}x{r.engine_peak_mb:>11.0f}{r.baseline_peak_mb:>9.0f}"
            f"{r.max_abs_diff:>11.1e}{format_duration(f30k):>11}{format_duration(coco):>10}"
        )
    return "\n".join(lines)


def _topk_peak(args: tuple) -> tuple[float, float, float]:
    """In a fresh process: (peak RSS growth in MB, seconds, MB held by the embeddings)."""
    name, steps, n_images, n_captions, budget_mb, threads = args
    torch.set_num_threads(threads)
    before = _peak_mb()
    model, img, cap, lengths = _inputs(name, steps, n_images, n_captions, 36, 1024)
    held = (img.numel() + cap.numel()) * 4 / 2**20
    start = time.perf_counter()
    score_gallery(model, img, cap, lengths, topk=10, budget_mb=budget_mb)
    return _peak_mb() - before, time.perf_counter() - start, held


def bench_topk_memory(
    sizes: tuple[tuple[int, int], ...] = ((50, 250), (100, 500), (200, 1000)),
    name: str = "imram_full",
    steps: int = 3,
    budget_mb: float = 128.0,
    threads: int | None = None,
) -> str:
    """Peak memory of top-k streaming at growing gallery sizes, and its linear extrapolation.

    Memory is the embeddings and the top-k lists (linear in the gallery) plus one block and
    one chunk of prepared captions (both fixed by ``budget_mb``; every size here holds more
    than one chunk, so the fixed part is reached); the fit over the measured sizes is
    extrapolated to COCO 5K.
    """
    threads = threads or torch.get_num_threads()
    ctx = mp.get_context("spawn")
    rows = []
    for n_img, n_cap in sizes:
        with ctx.Pool(1) as pool:
            peak, seconds, held = pool.apply(
                _topk_peak, ((name, steps, n_img, n_cap, budget_mb, threads),)
            )
        rows.append((n_img, n_cap, peak, seconds, held))
    items = [n_img + n_cap for n_img, n_cap, *_ in rows]
    peaks = [peak for _, _, peak, *_ in rows]
    slope, intercept = np.polyfit(items, peaks, 1)
    lines = [
        f"top-10 streaming, {name} K={steps}, d=1024, 36 regions, lengths 8-20, "
        f"block budget {budget_mb:.0f} MB",
        f"{'images':>8}{'captions':>10}{'peak MB':>10}{'embeddings MB':>15}{'seconds':>9}",
    ]
    for n_img, n_cap, peak, seconds, held in rows:
        lines.append(f"{n_img:>8}{n_cap:>10}{peak:>10.0f}{held:>15.0f}{seconds:>9.1f}")
    coco = slope * (5000 + 25000) + intercept
    lines.append(
        f"linear fit: {intercept:.0f} MB + {slope * 1000:.0f} MB per 1000 items; "
        f"5000 x 25000 gallery -> {coco / 1024:.2f} GB"
    )
    return "\n".join(lines)


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

    with _threads(threads):  # this process's setting, restored after
        rng = np.random.default_rng(0)

        def unit(n: int) -> np.ndarray:
            x = rng.standard_normal((n, 256), dtype=np.float32)
            return x / np.linalg.norm(x, axis=1, keepdims=True)

        img_vec, cap_vec = unit(n_images), unit(n_captions)
        start = time.perf_counter()
        first = img_vec @ cap_vec.T
        product_seconds = time.perf_counter() - start
        corner_images, corner_captions, largest = timed
        model, img, cap, lengths = _inputs(
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
    from imram.data import PrecompDataset
    from imram.evaluation import evaluate_model
    from imram.retrieval.two_stage import rerank_split

    a, b = load_checkpoint(first), load_checkpoint(second)
    a_data = PrecompDataset(data, split, a.vocab)
    b_data = PrecompDataset(data, split, b.vocab)
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


@contextmanager
def _threads(n: int | None) -> Iterator[None]:
    """Run with ``n`` torch threads (None: as set), then restore the caller's setting."""
    previous = torch.get_num_threads()
    torch.set_num_threads(n or previous)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def is_embedding(name: str) -> bool:
    """Whether registry ``name`` scores by a dot product: no mined or release-style step to
    time."""
    return issubclass(model_class(name), EmbeddingModel)


@dataclass
class TrainingResult:
    """Training steps/s and peak RSS (MB, the whole process) of one model at one precision:
    the all-pairs engine step, the mined step (``train.mining: exact``), the release-style
    baseline, and optionally the all-pairs step with activation checkpointing."""

    name: str
    precision: str
    engine_steps_s: float
    baseline_steps_s: float | None
    engine_peak_mb: float
    baseline_peak_mb: float | None
    checkpointed_steps_s: float | None = None
    checkpointed_peak_mb: float | None = None
    mined_steps_s: float | None = None
    mined_peak_mb: float | None = None
    shortlist_steps_s: float | None = None
    shortlist_peak_mb: float | None = None
    # the share of hardest negatives (both directions) the shortlist held, on the bench batch
    shortlist_recall: float | None = None

    @property
    def ratio(self) -> float:
        """The fastest exact step against the release-style baseline."""
        return self.best_steps_s / (self.baseline_steps_s or math.nan)

    @property
    def best_steps_s(self) -> float:
        """The fastest exact step (all pairs or mined)."""
        return max(self.engine_steps_s, self.mined_steps_s or 0.0)


@dataclass(frozen=True)
class TrainingShape:
    """The inputs a training benchmark step sees: batch, K, regions × d, caption lengths."""

    batch: int = 32
    steps_k: int = 3
    regions: int = 36
    dim: int = 1024
    min_length: int = 8
    max_length: int = 20
    img_dim: int = 2048
    shortlist: int = 4

    def describe(self) -> str:
        return (
            f"batch {self.batch}, K={self.steps_k}, {self.regions} regions x {self.img_dim}, "
            f"d={self.dim}, caption lengths {self.min_length}-{self.max_length}"
        )


def _steps_of(name: str, shape: TrainingShape) -> int:
    """The K a model trains with in the benchmark: the shape's, unless the registry fixes one
    step (SCAN)."""
    return shape.steps_k if model_config(name).steps > 1 else 1


def _training_step(args: tuple) -> tuple[float, float, float | None]:
    """In a fresh process: (training steps/s over ``steps`` timed steps after one warm-up,
    peak RSS in MB, shortlist recall or None) of the all-pairs engine (``engine``, or
    ``checkpointed`` with activation checkpointing), the mined step (``mined``), the
    shortlist-mined step (``shortlist``) or the release-style loop (``baseline``)."""
    from imram.data import PrecompBatch
    from imram.precision import autocast
    from imram.training.batch import batch_scores, encode_batch, mined_batch_loss, mining_scores
    from imram.training.loss import hardest_negatives, triplet_loss

    which, name, shape, precision, steps, threads = args
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = build_model(
        name, steps=_steps_of(name, shape), embed_dim=shape.dim, img_dim=shape.img_dim
    ).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-4)
    n = shape.batch
    lengths = torch.randint(shape.min_length, shape.max_length + 1, (n,))
    tokens = torch.randint(4, 1000, (n, shape.max_length))
    features = torch.randn(n, shape.regions, model.config.img_dim)
    batch = PrecompBatch(features, tokens, lengths, torch.arange(n), torch.arange(n))
    cpu = torch.device("cpu")

    def step() -> None:
        with autocast(precision, "cpu"):
            if which in ("mined", "shortlist"):
                shortlist = shape.shortlist if which == "shortlist" else None
                loss = mined_batch_loss(model, batch, cpu, 1024.0, False, 0.2, shortlist)
            elif which == "baseline":
                img = model.encode_images(features)
                cap = model.encode_captions(tokens, lengths)
                sims = release_style_similarity(model, img, cap, lengths)
                loss = triplet_loss(sims.float(), 0.2, True)
            else:
                sims = batch_scores(model, batch, cpu, 1024.0, which == "checkpointed")
                loss = triplet_loss(sims.float(), 0.2, True)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 2.0)
        optimizer.step()

    step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    rate, peak, recall = steps / (time.perf_counter() - start), _peak_mb(), None
    if which == "shortlist":
        with torch.no_grad():
            encoded = encode_batch(model, batch, cpu)
            exact = hardest_negatives(mining_scores(model, encoded, 1024.0))
            short = hardest_negatives(mining_scores(model, encoded, 1024.0, shape.shortlist))
        found = (exact.caption_of_image[:, 0] == short.caption_of_image[:, 0]).sum() + (
            exact.image_of_caption[:, 0] == short.image_of_caption[:, 0]
        ).sum()
        recall = found.item() / (2 * n)
    return rate, peak, recall


def bench_training(
    names: tuple[str, ...] = ("imram_full", "imram_text", "imram_image"),
    precisions: tuple[str, ...] = ("fp32", "bf16"),
    shape: TrainingShape = TrainingShape(),
    steps: int = 3,
    repeats: int = 2,
    threads: int | None = None,
    checkpointed: bool = False,
    baseline: bool = True,
) -> list[TrainingResult]:
    """Training steps/s (forward, backward, Adam) of the engine's all-pairs step, its mined
    step and a loop mirroring the release's training step (captions one at a time against
    the batch's images, full 2d→d memory linears per pair, an update after every step), each
    in fresh processes that alternate ``repeats`` times; the best run of each counts.
    ``checkpointed`` also runs the all-pairs step with activation checkpointing; embedding
    models (``vsepp``) get the all-pairs step only."""
    threads = threads or torch.get_num_threads()
    ctx = mp.get_context("spawn")
    results = []
    for name in names:
        cross = not is_embedding(name)
        for precision in precisions:
            kinds = ["engine"]
            if cross:
                kinds += ["mined"] + (["shortlist"] if _steps_of(name, shape) > 1 else [])
                kinds += ["baseline"] if baseline else []
                kinds += ["checkpointed"] if checkpointed else []
            runs: dict[str, list[tuple[float, float, float | None]]] = {k: [] for k in kinds}
            for _ in range(repeats):
                for which in runs:
                    job = (which, name, shape, precision, steps, threads)
                    with ctx.Pool(1) as pool:
                        runs[which].append(pool.apply(_training_step, (job,)))
            best = {w: max(r[0] for r in runs[w]) for w in runs}
            peak = {w: max(r[1] for r in runs[w]) for w in runs}
            results.append(
                TrainingResult(
                    name,
                    precision,
                    best["engine"],
                    best.get("baseline"),
                    peak["engine"],
                    peak.get("baseline"),
                    best.get("checkpointed"),
                    peak.get("checkpointed"),
                    best.get("mined"),
                    peak.get("mined"),
                    best.get("shortlist"),
                    peak.get("shortlist"),
                    runs["shortlist"][0][2] if "shortlist" in runs else None,
                )
            )
    return results


def _cell(value: float | None, spec: str, width: int) -> str:
    return f"{'-':>{width}}" if value is None else f"{value:>{width}{spec}}"


def format_training(results: list[TrainingResult], shape: TrainingShape) -> str:
    """The training benchmark's table: steps/s of each step kind, the mined step against
    the all-pairs one and against the baseline, samples/s, peak RSS; then each model's
    samples/s against VSE++'s when VSE++ was measured in the same run."""
    extra = any(r.checkpointed_steps_s is not None for r in results)
    lines = [
        f"training step, {shape.describe()} (forward + backward + Adam; peak RSS of the process)",
        f"{'model':<12}{'precision':>10}{'all-pairs':>11}{'mined':>9}{'baseline':>10}"
        f"{'mined/all':>10}{'vs base':>9}{'samples/s':>11}{'all MB':>8}{'mined MB':>9}"
        f"{'shortlist':>11}{'recall':>8}{'short MB':>9}"
        + (f"{'ckpt st/s':>11}{'ckpt MB':>9}" if extra else ""),
    ]
    for r in results:
        mined_ratio = None if r.mined_steps_s is None else r.mined_steps_s / r.engine_steps_s
        line = (
            f"{r.name:<12}{r.precision:>10}{r.engine_steps_s:>11.3f}"
            + _cell(r.mined_steps_s, ".3f", 9)
            + _cell(r.baseline_steps_s, ".3f", 10)
            + (f"{'-':>10}" if mined_ratio is None else f"{mined_ratio:>9.2f}x")
            + (f"{'-':>9}" if r.baseline_steps_s is None else f"{r.ratio:>8.1f}x")
            + f"{r.best_steps_s * shape.batch:>11.1f}{r.engine_peak_mb:>8.0f}"
            + _cell(r.mined_peak_mb, ".0f", 9)
            + _cell(r.shortlist_steps_s, ".3f", 11)
            + (f"{'-':>8}" if r.shortlist_recall is None else f"{100 * r.shortlist_recall:>7.1f}%")
            + _cell(r.shortlist_peak_mb, ".0f", 9)
        )
        if r.checkpointed_steps_s is not None:
            line += f"{r.checkpointed_steps_s:>11.3f}{r.checkpointed_peak_mb:>9.0f}"
        lines.append(line)
    for precision in dict.fromkeys(r.precision for r in results):
        vsepp = [r for r in results if r.name == "vsepp" and r.precision == precision]
        for r in results:
            if vsepp and r.precision == precision and r.name != "vsepp":
                ratio = r.best_steps_s / vsepp[0].best_steps_s
                line = f"{precision}: {r.name} samples/s / VSE++ samples/s = {ratio:.3f}"
                if r.shortlist_steps_s is not None:
                    short = r.shortlist_steps_s / vsepp[0].best_steps_s
                    line += f" (shortlist mining, m={shape.shortlist}: {short:.3f})"
                lines.append(line)
    return "\n".join(lines)


TIME_TO_ACCURACY_PRESETS = ("cpu_full_imram", "cpu_vsepp")


def bench_time_to_accuracy(
    data: str | Path,
    presets: tuple[str, ...] = TIME_TO_ACCURACY_PRESETS,
    out: str | Path = "runs/time_to_accuracy",
    minutes: float = 0.0,
    overrides: list[str] | None = None,
    device: str | None = None,
    progress: bool = True,
) -> str:
    """Train each preset on ``data`` into ``out/<preset>`` (a finished run is kept, an
    interrupted one resumed; ``minutes`` > 0: a training budget each), then the markdown of
    dev rsum against training minutes, with the minutes each needed to reach the best dev
    rsum of the last preset (the baseline)."""
    from imram.config import load_config
    from imram.devices import default_device
    from imram.training import train
    from imram.training.curves import read_curve, time_to_accuracy_section

    device = device or str(default_device())
    budget = [f"train.max_minutes={minutes}"] if minutes else []
    rows = []
    for preset in presets:
        config = load_config(preset, [*(overrides or []), *budget])
        run = Path(out) / preset
        resume = (run / "last" / "checkpoint.json").is_file()
        train(config, data, run, resume=resume, device=device, progress=progress)
        curve = read_curve(run)
        steps = max((c["iteration"] or 0 for c in curve), default=0)
        rows.append(
            {"model": preset, "curve": curve, "train_samples": steps * config.train.batch_size}
        )
    section = time_to_accuracy_section(rows, presets[-1])
    header = f"time to accuracy on {data} (runs in {out}; training budget "
    header += f"{minutes:g} min each)" if minutes else "the presets' epochs)"
    return "\n".join([header, "", *section])
