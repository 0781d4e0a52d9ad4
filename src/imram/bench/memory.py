"""Peak memory of streaming a gallery's top-k (``imram bench memory``)."""

from __future__ import annotations

import multiprocessing as mp
import time

import numpy as np
import torch

from imram.bench.common import peak_mb, random_inputs
from imram.scoring import score_gallery


def _topk_peak(args: tuple) -> tuple[float, float, float]:
    """In a fresh process: (peak RSS growth in MB, seconds, MB held by the embeddings)."""
    name, steps, n_images, n_captions, budget_mb, threads = args
    torch.set_num_threads(threads)
    before = peak_mb()
    model, img, cap, lengths = random_inputs(name, steps, n_images, n_captions, 36, 1024)
    held = (img.numel() + cap.numel()) * 4 / 2**20
    start = time.perf_counter()
    score_gallery(model, img, cap, lengths, topk=10, budget_mb=budget_mb)
    return peak_mb() - before, time.perf_counter() - start, held


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
