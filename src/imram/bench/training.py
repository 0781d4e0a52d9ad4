"""Training steps: all-pairs, mined and shortlist-mined against the release-style step and VSE++,
and time to accuracy on a folder (``imram bench training``)."""

from __future__ import annotations

import math
import multiprocessing as mp
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from imram.bench.common import peak_mb
from imram.bench.release import release_style_similarity
from imram.models import EmbeddingModel, build_model
from imram.models.registry import model_class, model_config
from imram.precision import autocast


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
    rate, peak, recall = steps / (time.perf_counter() - start), peak_mb(), None
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
