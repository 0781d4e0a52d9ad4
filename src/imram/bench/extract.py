"""Feature extraction against a plain loop (``imram bench extract``): pictures/s and the user and
system CPU seconds of ``extract_features`` and of decode → resize → forward with the same
backbone and batch, each in a fresh process, with glibc's allocator defaults and tuned
(:mod:`imram.allocator`)."""

from __future__ import annotations

import multiprocessing as mp
import resource
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

# (tuned allocator, imram's extractor rather than the plain loop), defaults first
VARIANTS = ((False, True), (False, False), (True, True), (True, False))


@dataclass
class ExtractTiming:
    """One variant at one input size: pictures/s and CPU seconds (user, system)."""

    tuned: bool
    extractor: bool
    input_size: int
    pictures_s: float
    user_s: float
    system_s: float

    @property
    def method(self) -> str:
        return "extract_features" if self.extractor else "plain loop"

    @property
    def label(self) -> str:
        return f"{self.method}, {'tuned allocator' if self.tuned else 'glibc defaults'}"


def generated_pictures(folder: Path, n: int, seed: int = 0) -> list[Path]:
    """``n`` PNG pictures of random shapes and sizes (150–640 px), written into ``folder``."""
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        w, h = (int(v) for v in rng.integers(150, 641, size=2))
        image = Image.new("RGB", (w, h), tuple(int(c) for c in rng.integers(0, 256, 3)))
        draw = ImageDraw.Draw(image)
        for _ in range(6):
            x0, y0 = int(rng.integers(0, w - 20)), int(rng.integers(0, h - 20))
            box = (x0, y0, x0 + int(rng.integers(10, w - x0)), y0 + int(rng.integers(10, h - y0)))
            draw.ellipse(box, fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
        path = folder / f"picture_{i:04d}.png"
        image.save(path)
        paths.append(path)
    return paths


def _time_variant(args: tuple) -> tuple[float, float, float]:
    """In a fresh process: (pictures/s, user s, system s) of one variant."""
    paths, size, backbone, batch, tuned, ours, threads = args
    if tuned:
        from imram.allocator import tune_allocator

        tune_allocator()
    import torch

    from imram.features.efficientnet_lite import load_efficientnet_lite
    from imram.features.extract import ExtractorConfig, extract_features, load_image

    torch.set_num_threads(threads)
    config = ExtractorConfig(backbone=backbone, input_size=size, batch_size=batch)
    network = load_efficientnet_lite(backbone)
    with tempfile.TemporaryDirectory() as tmp:
        before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        if ours:
            extract_features(paths, Path(tmp) / "ims.npy", config, progress=False, device="cpu")
        else:
            with torch.inference_mode():
                for s in range(0, len(paths), batch):
                    x = torch.stack([load_image(p, config) for p in paths[s : s + batch]])
                    network.forward_features(x)
        seconds = time.perf_counter() - start
        after = resource.getrusage(resource.RUSAGE_SELF)
    return (
        len(paths) / seconds,
        after.ru_utime - before.ru_utime,
        after.ru_stime - before.ru_stime,
    )


def bench_extract(
    n_pictures: int = 300,
    sizes: tuple[int, ...] = (224, 320),
    pictures: list[Path] | None = None,
    backbone: str = "efficientnet_lite0",
    batch: int = 32,
    threads: int | None = None,
) -> list[ExtractTiming]:
    """Time every variant of :data:`VARIANTS` at every input size on ``pictures`` (default:
    ``n_pictures`` generated ones), each in a fresh process."""
    import torch

    threads = threads or torch.get_num_threads()
    ctx = mp.get_context("spawn")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        paths = pictures or generated_pictures(Path(tmp), n_pictures)
        for size in sizes:
            for tuned, ours in VARIANTS:
                with ctx.Pool(1) as pool:
                    job = (paths, size, backbone, batch, tuned, ours, threads)
                    rate, user, system = pool.apply(_time_variant, (job,))
                results.append(ExtractTiming(tuned, ours, size, rate, user, system))
    return results


def format_extract(results: list[ExtractTiming], n_pictures: int) -> str:
    """One table of every variant and size, then each tuned variant's speed against the same
    variant with glibc's defaults."""
    lines = [f"feature extraction, {n_pictures} pictures, fresh process per row"]
    lines.append(f"{'variant':<36}{'px':>5}{'pictures/s':>12}{'user s':>9}{'system s':>10}")
    defaults = {(r.extractor, r.input_size): r for r in results if not r.tuned}
    for r in results:
        lines.append(
            f"{r.label:<36}{r.input_size:>5}{r.pictures_s:>12.1f}{r.user_s:>9.1f}{r.system_s:>10.1f}"
        )
    for r in results:
        if r.tuned:
            base = defaults[(r.extractor, r.input_size)]
            lines.append(
                f"{r.input_size} px {r.method}: tuned / defaults = "
                f"{r.pictures_s / base.pictures_s:.2f}x"
            )
    return "\n".join(lines)
