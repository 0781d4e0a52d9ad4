"""Accuracy on real photos: a captioned folder prepared once, presets trained one after another
in fresh processes (optionally under a wall-clock budget and over several seeds), each
evaluated on one split with the 1K protocol; cross-attention models also re-rank an embedding
model's shortlists (design §protocols, two-stage)."""

from __future__ import annotations

import json
import math
import statistics
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from imram.errors import ConfigError, DataError
from imram.metrics import METRIC_KEYS, format_duration
from imram.retrieval.fusion import FUSION_WEIGHTS

if TYPE_CHECKING:
    from imram.config import TrainConfig

SHORTLISTS = (10, 30, 100)
RECALL_KEYS = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10")


@dataclass
class AccuracyRow:
    """One line of the table: a trained run (``rerank`` None) or a two-stage re-ranking of
    ``rerank``'s top ``shortlist`` by ``preset``, with the share of true matches inside it."""

    preset: str
    seed: int
    minutes: float
    epochs: float
    best_epoch: int | None
    samples_per_s: float
    stopped: str
    metrics: dict[str, float]
    protocol: str = "1k, one stage"
    rerank: str | None = None
    shortlist: int | None = None
    in_shortlist: float | None = None
    t2i_ms: float | None = None
    i2t_ms: float | None = None

    @property
    def label(self) -> str:
        if self.rerank is None:
            return self.preset
        fused = "fused with" if "fused" in self.protocol else "on"
        return f"{self.preset} {fused} {self.rerank} top {self.shortlist}"


@dataclass
class AccuracyReport:
    """Every row, the settings that produced them, and the rendered table."""

    data: str
    split: str
    minutes: float
    seeds: list[int]
    rows: list[AccuracyRow] = field(default_factory=list)

    def table(self) -> str:
        return format_accuracy(self)

    def to_dict(self) -> dict[str, Any]:
        return {
            "data": self.data,
            "split": self.split,
            "minutes": self.minutes,
            "seeds": self.seeds,
            "rows": [asdict(r) for r in self.rows],
        }


def prepared_data(
    data: str | Path,
    images: str | Path | None = None,
    captions: str | Path | None = None,
    fmt: str | None = None,
    progress: bool = False,
) -> Path:
    """``data`` as a precomp folder: reused when it already holds one, else
    prepared from ``images`` and ``captions``; an error names whatever is missing."""
    from imram.data.precomp import META_NAME

    data = Path(data)
    if (data / META_NAME).is_file() or any(data.glob("*_caps.txt")):
        return data
    missing = [
        f"{flag} (not given)" if value is None else f"{flag} {value} (not found)"
        for flag, value, ok in (
            ("--photos", images, images is not None and Path(images).is_dir()),
            ("--caption-file", captions, captions is not None and Path(captions).is_file()),
        )
        if not ok
    ]
    if missing:
        raise ConfigError(
            f"bench accuracy: {data} holds no precomp folder (no {META_NAME}) and cannot be "
            f"prepared: {', '.join(missing)} (--photos: the images "
            "folder, --caption-file: their captions, e.g. Flickr8k's Flickr8k.token.txt)"
        )
    from imram.workflows.prepare import prepare_folder

    prepare_folder(images, captions, fmt, data, progress=progress)
    return data


def _last_state(run: Path) -> tuple[dict[str, Any], TrainConfig]:
    """The state and the train config of ``run/last``."""
    from imram.checkpoint import read_meta, saved_config
    from imram.config import Config

    meta = read_meta(run / "last")
    return meta["state"], Config.from_dict(saved_config(meta)).train


def _ended_by(state: dict[str, Any], train: TrainConfig, minutes: float) -> str | None:
    """Why a run with this last state needs no more training (None: it does)."""
    if train.patience and state.get("stale", 0) >= train.patience:
        return f"patience {train.patience}"
    if state["epoch"] >= train.epochs:
        return "all epochs"
    if minutes and state.get("train_seconds", 0.0) >= 60 * minutes:
        return "time budget"
    return None


def train_run(
    preset: str,
    data: Path,
    run: Path,
    seed: int,
    minutes: float,
    overrides: list[str],
    progress: bool = False,
) -> None:
    """Train ``preset`` into ``run`` in a fresh process (resuming an unfinished run, keeping
    a finished one): each preset starts from a clean interpreter, as a user's run would."""
    if (run / "last" / "checkpoint.json").is_file() and _ended_by(*_last_state(run), minutes):
        return
    sets = [*overrides, f"train.seed={seed}"]
    if minutes:
        sets.append(f"train.max_minutes={minutes}")
    command = [sys.executable, "-m", "imram", "train", "--config", preset, "--data", str(data)]
    command += ["--out", str(run), *(a for s in sets for a in ("--set", s))]
    if (run / "last" / "checkpoint.json").is_file():
        command.append("--resume")
    if not progress:
        command.append("--no-progress")
    done = subprocess.run(command, check=False)
    if done.returncode != 0:
        raise DataError(f"bench accuracy: training {preset} (seed {seed}) into {run} failed")


def run_summary(run: Path, n_train: int) -> dict[str, Any]:
    """Training minutes, epochs (fractional, of ``n_train`` captions), the epoch of the best
    validation, samples/s and how the run ended, from ``last/`` and ``metrics.jsonl``."""
    state, train = _last_state(run)
    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    vals = [e for e in events if e["event"] == "val"]
    best = max(vals, key=lambda e: e["rsum"]) if vals else None
    samples = state["epoch"] * n_train + min(state["batch"] * train.batch_size, n_train)
    seconds = state.get("train_seconds", 0.0)
    return {
        "minutes": seconds / 60,
        "epochs": samples / n_train,
        "best_epoch": None if best is None else best["epoch"] + 1,
        "samples_per_s": samples / seconds if seconds else math.nan,
        "stopped": _ended_by(state, train, 0.0) or "time budget",
    }


def evaluate_runs(
    runs: dict[str, Path],
    data: Path,
    split: str,
    rerank_with: str | None,
    shortlists: tuple[int, ...],
    one_stage: bool,
    device: str,
) -> dict[str, list[tuple[dict[str, Any], str, str | None, int | None]]]:
    """Each run's best checkpoint on ``split`` (1K protocol): an embedding model scores every
    pair; a cross-attention model re-ranks ``rerank_with``'s shortlists, and scores every pair
    with ``one_stage`` or without ``rerank_with`` (5 M pairs on a 1,000-photo split: most of an
    hour on 2 cores).
    Each metrics dict adds ``t2i_ms`` and ``i2t_ms``: one query's milliseconds against the
    split's gallery encoded in advance (:func:`imram.retrieval.latency.query_cost`, 50 each
    way), one stage or the two stages (fused where fused).
    Returns, per preset, (metrics, protocol, shortlisting preset, k) tuples."""
    from imram.checkpoint import load_checkpoint
    from imram.data import PrecompDataset
    from imram.evaluation import evaluate_model
    from imram.models.interface import CrossAttentionModel
    from imram.retrieval.fusion import Fusion
    from imram.retrieval.latency import GallerySearch, TwoStageSearch, query_cost
    from imram.retrieval.two_stage import rerank_split

    loaded = {preset: load_checkpoint(run) for preset, run in runs.items()}
    out: dict[str, list[tuple[dict[str, Any], str, str | None, int | None]]] = {}
    searches: dict[str, GallerySearch] = {}

    def timed(metrics: dict[str, Any], search: Any, dataset: PrecompDataset) -> dict[str, Any]:
        cost = query_cost(search, dataset)
        return {**metrics, "t2i_ms": cost.t2i_ms, "i2t_ms": cost.i2t_ms}

    for preset, ckpt in loaded.items():
        model = ckpt.model.to(device)
        dataset = ckpt.open_split(data, split)
        cross = isinstance(model, CrossAttentionModel)
        rows = out.setdefault(preset, [])
        searches[preset] = GallerySearch(model, dataset, device)
        if not cross or one_stage or rerank_with is None:
            metrics, _, _ = evaluate_model(model, dataset, "1k", device=device)
            rows.append((timed(metrics, searches[preset], dataset), "1k, one stage", None, None))
        if cross and rerank_with is not None:
            if rerank_with not in loaded:
                raise ConfigError(f"bench accuracy: --rerank-with {rerank_with} is not trained")
            first = loaded[rerank_with]
            first_data = first.open_split(data, split)
            results = rerank_split(
                first.model.to(device),
                first_data,
                model,
                dataset,
                list(shortlists),
                "1k",
                device,
                fusion_weights=FUSION_WEIGHTS,
            )
            if rerank_with not in searches:
                searches[rerank_with] = GallerySearch(first.model, first_data, device)
            pair = searches[rerank_with]
            for r in results:
                k = r["shortlist"]
                size = dataset.num_captions if k == "all" else k
                two = TwoStageSearch(pair, searches[preset], size)
                rows.append((timed(r, two, dataset), f"1k, two stage (top {k})", rerank_with, k))
                w = r["fusion"]["weight"]
                fused = {**r["fused"][str(w)], "fusion": r["fusion"]}
                two = TwoStageSearch(pair, searches[preset], size, Fusion(**r["fusion"]))
                label = f"1k, two stage fused (top {k}, w {w:g})"
                rows.append((timed(fused, two, dataset), label, rerank_with, k))
    return out


def bench_accuracy(
    presets: list[str],
    data: str | Path,
    out: str | Path = "runs/accuracy",
    *,
    images: str | Path | None = None,
    captions: str | Path | None = None,
    fmt: str | None = None,
    split: str = "dev",
    minutes: float = 0.0,
    seeds: list[int] | None = None,
    overrides: list[str] | None = None,
    rerank_with: str | None = None,
    shortlists: tuple[int, ...] = SHORTLISTS,
    one_stage: bool = False,
    device: str | None = None,
    progress: bool = False,
) -> AccuracyReport:
    """Prepare ``data`` once (from ``images`` and ``captions`` when it is not a precomp
    folder yet), train every preset for every seed into ``out/PRESET/seedN`` in a fresh
    process (``minutes`` > 0: a training budget each), evaluate each on ``split`` and write
    ``out/report.md`` and ``out/report.json``."""
    from imram.analysis.report import write_report_files
    from imram.data import PrecompDataset
    from imram.devices import default_device

    if not presets:
        raise ConfigError("bench accuracy: name at least one preset (--presets)")
    if rerank_with is not None and rerank_with not in presets:
        presets = [rerank_with, *presets]
    data = prepared_data(data, images, captions, fmt, progress)
    seeds = seeds or [0]
    device = device or str(default_device())
    out = Path(out)
    report = AccuracyReport(str(data), split, minutes, seeds)
    n_train: int | None = None
    for seed in seeds:
        runs = {p: out / p / f"seed{seed}" for p in presets}
        for preset, run in runs.items():
            train_run(preset, data, run, seed, minutes, overrides or [], progress)
        for preset, results in evaluate_runs(
            runs, data, split, rerank_with, shortlists, one_stage, device
        ).items():
            if n_train is None:
                from imram.config import load_config

                config = load_config(str(runs[preset] / "config.yaml"))
                n_train = PrecompDataset(data, config.data.train_split, None).num_captions
            summary = run_summary(runs[preset], n_train)
            for metrics, protocol, first, k in results:
                inside = None
                if k is not None:
                    inside = (metrics["i2t_in_shortlist"] + metrics["t2i_in_shortlist"]) / 2
                report.rows.append(
                    AccuracyRow(
                        preset,
                        seed,
                        summary["minutes"],
                        summary["epochs"],
                        summary["best_epoch"],
                        summary["samples_per_s"],
                        summary["stopped"],
                        {key: float(metrics[key]) for key in METRIC_KEYS},
                        protocol,
                        first,
                        k,
                        inside,
                        metrics.get("t2i_ms"),
                        metrics.get("i2t_ms"),
                    )
                )
    out.mkdir(parents=True, exist_ok=True)
    write_report_files(out, "report.json", report.to_dict(), report.table())
    return report


def _mean_spread(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"


def _milliseconds(rows: list[AccuracyRow]) -> str:
    timed = [r for r in rows if r.t2i_ms is not None and r.i2t_ms is not None]
    if not timed:
        return ""
    t2i = statistics.mean(r.t2i_ms for r in timed)
    return f"{t2i:.1f} / {statistics.mean(r.i2t_ms for r in timed):.1f}"


def format_accuracy(report: AccuracyReport) -> str:
    """Markdown: one row per run (or, over several seeds, the mean ± standard deviation of
    each column), recalls on ``report.split`` and how each figure was produced."""
    groups: dict[str, list[AccuracyRow]] = {}
    for row in report.rows:
        groups.setdefault(row.label, []).append(row)
    budget = f"{report.minutes:g} min budget each" if report.minutes else "the presets' epochs"
    seeds = ", ".join(str(s) for s in report.seeds)
    lines = [
        f"Accuracy on {report.data}, split {report.split} (1K protocol); {budget}; seeds {seeds}.",
        "",
        "| model | protocol | minutes | epochs | best epoch | ended by | samples/s "
        "| i2t R@1 | R@5 | R@10 | t2i R@1 | R@5 | R@10 | rsum | true match in shortlist "
        "| ms/query t2i / i2t |",
        "|---|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for label, rows in groups.items():
        first = rows[0]
        best = sorted({str(r.best_epoch) for r in rows})
        inside = "" if first.in_shortlist is None else _mean_spread([r.in_shortlist for r in rows])
        cells = [
            label,
            first.protocol,
            _mean_spread([r.minutes for r in rows]),
            _mean_spread([r.epochs for r in rows]),
            "/".join(best),
            "/".join(sorted({r.stopped for r in rows})),
            f"{statistics.mean(r.samples_per_s for r in rows):.0f}",
            *(_mean_spread([r.metrics[k] for r in rows]) for k in RECALL_KEYS),
            _mean_spread([r.metrics["rsum"] for r in rows]),
            f"{inside} %" if inside else "",
            _milliseconds(rows),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    trained = {(r.preset, r.seed): r.minutes for r in report.rows}
    lines += ["", f"Training time in all: {format_duration(60 * sum(trained.values()))}."]
    return "\n".join(lines)
