"""Scoring throughput: the engine against the release-style loop, and low precision against fp32
(``imram bench scoring``)."""

from __future__ import annotations

import multiprocessing as mp
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from imram.bench.common import peak_mb, random_inputs
from imram.bench.release import release_style_similarity
from imram.evaluation import evaluate_model
from imram.metrics import format_duration
from imram.precision import autocast
from imram.scoring import block_similarity


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


def _measure(args: tuple) -> tuple[float, float, Tensor]:
    """Run one scorer in a fresh process on the first ``scored`` captions of the same inputs:
    (pairs/s of one timed run after a small warm-up, growth of peak RSS in MB, scores)."""
    which, name, steps, n_images, n_captions, scored, regions, dim, threads = args
    torch.set_num_threads(threads)
    model, img, cap, lengths = random_inputs(name, steps, n_images, n_captions, regions, dim)
    cap, lengths = cap[:scored], lengths[:scored]

    def run(images: Tensor, captions: Tensor, lens: Tensor) -> Tensor:
        if which == "baseline":
            return release_style_similarity(model, images, captions, lens)
        precision = which.removeprefix("engine-") if which.startswith("engine-") else "fp32"
        with autocast(precision, "cpu"):  # "engine-bf16": the engine under bf16 autocast
            return block_similarity(model, images, captions, lens, budget_mb=1024).float()

    before = peak_mb()
    with torch.no_grad():
        run(img[:8], cap[:4], lengths[:4])  # threads, kernels and buffers warm up
        start = time.perf_counter()
        scores = run(img, cap, lengths)
        seconds = time.perf_counter() - start
    return n_images * scored / seconds, peak_mb() - before, scores


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

    loaded = load_checkpoint(checkpoint)
    dataset = loaded.open_split(data, split)
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
