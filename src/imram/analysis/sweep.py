"""Train and evaluate variants of one config, then tabulate, plot and report them: the engine of
``imram analyze steps`` (the paper's Table 4) and ``imram analyze aggregators`` (Table 5).

Each variant trains into ``OUT/<folder>`` as an ordinary resumable run of
:func:`imram.training.trainer.train`: a finished run is reused, an interrupted one (Ctrl-C, or
``train.max_minutes``) continues from its ``last/`` checkpoint. The test metrics of a run's
checkpoint are kept in ``OUT/<folder>/analysis.json`` with the iteration they belong to, so a
re-run scores the split again only when the checkpoint changed.
"""

from __future__ import annotations

import json
import math
import shlex
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from tqdm import tqdm

from imram.analysis.report import AnalysisReport, write_report_files
from imram.checkpoint import load_checkpoint, read_meta, resolve_checkpoint
from imram.config import Config, load_config
from imram.data import PrecompDataset
from imram.data.text import SPECIALS
from imram.devices import default_device
from imram.errors import ConfigError, ImramError
from imram.evaluation import evaluate_model
from imram.files import atomic_write_text
from imram.metrics import METRIC_KEYS, chance_metrics, format_duration
from imram.models import IMRAM, SCAN, build_model
from imram.training import TrainResult, train

RECORD = "analysis.json"
TABLE_KEYS = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum")
PLOTTED = {"i2t R@1": "i2t_r1", "i2t R@10": "i2t_r10", "t2i R@1": "t2i_r1", "t2i R@10": "t2i_r10"}


class SweepInterrupted(ImramError):
    """A signal (Ctrl-C, SIGTERM) stopped a variant's training; its run is checkpointed."""


@dataclass(frozen=True)
class Variant:
    """One configuration of a sweep: its label in tables, its run folder, its ``--set`` items."""

    label: str
    folder: str
    overrides: tuple[str, ...]


@dataclass
class VariantResult:
    """A variant's run and its test metrics. ``status``: ``trained`` (new run), ``resumed``
    (continued an interrupted run) or ``reused`` (already finished); ``checkpoint``: the
    evaluated one (``best``, or ``last`` before any validation)."""

    label: str
    run: Path
    overrides: tuple[str, ...]
    status: str
    stopped_early: bool
    epochs_done: int
    epochs: int
    train_seconds: float
    checkpoint: str
    dev_rsum: float | None
    metrics: dict[str, float]


@dataclass(kw_only=True)
class SweepResult(AnalysisReport):
    """What a sweep wrote, and the variants behind it."""

    rows: list[VariantResult]


def require_imram(config: Config, source: str, what: str) -> None:
    """Refuse configs whose model has no memory unit to vary (SCAN, VSE++, MEMBER).

    The model is built with a four-word vocabulary: cheap, and it runs every check the
    constructor makes (e.g. SCAN's single step) before hours of training start.
    """
    model = build_model(replace(config.model, vocab_size=len(SPECIALS)))
    if not isinstance(model, IMRAM) or isinstance(model, SCAN):
        raise ConfigError(
            f"{source}: {what} needs an IMRAM model (model.name imram_full, imram_text or "
            f"imram_image), got model.name={config.model.name!r}"
        )


def _read_record(path: Path) -> dict[str, Any]:
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def _train_variant(
    config: Config, data: Path, run: Path, record: dict[str, Any], device: str, progress: bool
) -> tuple[str, TrainResult]:
    """Train a new run, resume an unfinished one or reuse a finished one (which ``train``
    returns at once, after checking the config); returns the status and the TrainResult."""
    last = run / "last"
    status = "trained"
    if (last / "checkpoint.json").is_file():
        state = read_meta(last)["state"]
        done = state.get("epoch", 0) >= config.train.epochs and not state.get("batch", 0)
        status = "reused" if done else "resumed"
    tick = time.monotonic()
    result = train(config, data, run, resume=status != "trained", device=device, progress=progress)
    if status != "reused":
        record["train_seconds"] = record.get("train_seconds", 0.0) + time.monotonic() - tick
    if result.interrupted:
        atomic_write_text(run / RECORD, json.dumps(record, indent=1))
        raise SweepInterrupted(
            f"{run}: training interrupted and checkpointed; run the same command again to "
            "resume it (finished runs are reused)"
        )
    return status, result


def _test_metrics(
    run: Path, record: dict[str, Any], data: Path, split: str, protocol: str, device: str
) -> tuple[Path, dict[str, Any], dict[str, float]]:
    """The run's checkpoint (``best``, else ``last``), its meta and its metrics on ``split``:
    from ``record`` when they were computed for this very checkpoint, else evaluated now."""
    where = resolve_checkpoint(run)
    meta = read_meta(where)
    stamp = {
        "checkpoint": where.name,
        "iteration": meta["state"].get("iteration"),
        "data": str(data.resolve()),
    }
    cached = record.get("eval", {}).get(f"{split}/{protocol}", {})
    if {k: cached.get(k) for k in stamp} == stamp and "metrics" in cached:
        return where, meta, cached["metrics"]
    checkpoint = load_checkpoint(where)
    dataset = checkpoint.open_split(data, split)
    found, _, _ = evaluate_model(checkpoint.model.to(device), dataset, protocol, device=device)
    metrics = {k: float(found[k]) for k in METRIC_KEYS}
    record.setdefault("eval", {})[f"{split}/{protocol}"] = {**stamp, "metrics": metrics}
    return where, meta, metrics


def _run_variant(
    variant: Variant,
    config: Config,
    data: Path,
    out: Path,
    split: str,
    protocol: str,
    device: str,
    progress: bool,
) -> VariantResult:
    """Train (or resume, or reuse) one variant's run, then evaluate its checkpoint on ``split``."""
    run = out / variant.folder
    record = _read_record(run / RECORD)
    status, result = _train_variant(config, data, run, record, device, progress)
    where, meta, metrics = _test_metrics(run, record, data, split, protocol, device)
    atomic_write_text(run / RECORD, json.dumps(record, indent=1))
    best = meta["state"].get("best_rsum")
    return VariantResult(
        label=variant.label,
        run=run,
        overrides=variant.overrides,
        status=status,
        stopped_early=result.stopped_early,
        epochs_done=result.epoch,
        epochs=config.train.epochs,
        train_seconds=float(record.get("train_seconds", 0.0)),
        checkpoint=where.name,
        dev_rsum=float(best) if isinstance(best, int | float) and math.isfinite(best) else None,
        metrics=metrics,
    )


def _row(label: str, metrics: dict[str, float], extra: Sequence[str]) -> str:
    cells = [f"{metrics[k]:.1f}" for k in TABLE_KEYS]
    return "| " + " | ".join([label, *cells, *extra]) + " |"


def markdown_table(rows: Sequence[VariantResult], chance: dict[str, float] | None) -> str:
    """One row per variant (R@1/5/10 both ways, rsum, dev rsum, epochs, time), then chance."""
    header = (
        "| variant | i2t R@1 | R@5 | R@10 | t2i R@1 | R@5 | R@10 | rsum | dev rsum | epochs "
        "| train time |\n|---|---|---|---|---|---|---|---|---|---|---|"
    )
    lines = [header]
    for r in rows:
        dev = f"{r.dev_rsum:.1f}" if r.dev_rsum is not None else "-"
        epochs = f"{r.epochs_done}/{r.epochs}" + (" (stopped)" if r.stopped_early else "")
        lines.append(_row(r.label, r.metrics, [dev, epochs, format_duration(r.train_seconds)]))
    if chance is not None:
        lines.append(_row("chance", chance, ["-", "-", "-"]))
    return "\n".join(lines)


def plotted_series(rows: Sequence[VariantResult]) -> dict[str, list[float]]:
    """The recalls the paper's Tables 4 and 5 list (R@1 and R@10 both ways), per variant."""
    return {name: [r.metrics[key] for r in rows] for name, key in PLOTTED.items()}


@dataclass(frozen=True)
class Sweep:
    """What one analysis sweeps: its ``name`` (the ``imram analyze`` subcommand, the plot's
    file name), the report's ``title``, the ``variants``, how to ``plot`` their rows, the
    command-line options that choose the variants (``extra``), a ``check`` of each variant's
    config before any training, and ``notes`` for the report."""

    name: str
    title: str
    variants: Sequence[Variant]
    plot: Callable[[Path, list[VariantResult]], Path]
    extra: Sequence[str] = ()
    check: Callable[[Config, str], None] | None = None
    notes: Sequence[str] = ()


@dataclass(frozen=True)
class SweepOptions:
    """How every variant is evaluated and run: test ``split`` and ``protocol``, ``device``,
    progress bars."""

    split: str = "test"
    protocol: str = "1k"
    device: str | None = None
    progress: bool = True


def analyze_command(
    sweep: Sweep,
    config: str,
    data: str | Path,
    out: str | Path,
    overrides: Sequence[str],
    options: SweepOptions,
) -> str:
    """The ``imram analyze`` command line equivalent to a call, for the report."""
    argv = ["imram", "analyze", sweep.name, "--config", config, "--data", str(data)]
    argv += ["--out", str(out)]
    for item in overrides:
        argv += ["--set", item]
    tail = ["--split", options.split, "--protocol", options.protocol]
    return shlex.join([*argv, *sweep.extra, *tail])


def _train_command(config: str, data: Path, run: Path, overrides: Sequence[str]) -> str:
    argv = ["imram", "train", "--config", config, "--data", str(data), "--out", str(run)]
    for item in overrides:
        argv += ["--set", item]
    return shlex.join(argv)


def _checked_configs(sweep: Sweep, config: str, overrides: Sequence[str]) -> list[Config]:
    """Every variant's config, built and checked before the first training starts, so that a
    bad combination fails in seconds, not after the first runs."""
    if not sweep.variants:
        raise ConfigError(f"analyze {sweep.name}: nothing to run (no variants given)")
    configs = []
    for variant in sweep.variants:
        source = f"{config} with --set {' '.join([*overrides, *variant.overrides])}"
        resolved = load_config(config, [*overrides, *variant.overrides])
        if sweep.check is not None:
            sweep.check(resolved, source)
        configs.append(resolved)
    return configs


def run_sweep(
    sweep: Sweep,
    config: str,
    data: str | Path,
    out: str | Path,
    overrides: Sequence[str] = (),
    options: SweepOptions = SweepOptions(),
) -> SweepResult:
    """Train and evaluate every variant of ``config`` (+ ``overrides``) into ``out``, then write
    ``out/report.md`` (table, plot, what was run), ``out/report.json`` and the plot."""
    data, out = Path(data), Path(out)
    configs = _checked_configs(sweep, config, overrides)
    split, protocol = options.split, options.protocol
    test = PrecompDataset(data, split, None)
    device = options.device or str(default_device())
    rows = []
    bar = tqdm(
        list(zip(sweep.variants, configs, strict=True)),
        desc=f"analyze {sweep.name}",
        unit="run",
        disable=not options.progress,
    )
    for variant, resolved in bar:
        bar.set_postfix_str(variant.label)
        rows.append(
            _run_variant(variant, resolved, data, out, split, protocol, device, options.progress)
        )
    bar.close()
    chance = None
    if protocol != "5fold":
        chance = chance_metrics(test.num_images, test.num_captions, test.cap2img)
    table = markdown_table(rows, chance)
    figure = sweep.plot(out / f"{sweep.name}.png", rows)
    command = analyze_command(sweep, config, data, out, overrides, options)
    payload = {
        "analysis": sweep.name,
        "command": command,
        "config": config,
        "overrides": list(overrides),
        "data": str(data),
        "split": split,
        "protocol": protocol,
        "test_images": test.num_images,
        "test_captions": test.num_captions,
        "chance": chance,
        "plot": figure.name,
        "variants": [{**asdict(r), "run": str(r.run)} for r in rows],
    }
    text = _report_text(sweep, command, config, data, overrides, options, test, table, rows, figure)
    written = write_report_files(out, "report.json", payload, text)
    return SweepResult(rows=rows, table=table, plot=figure, **written)


def _report_text(
    sweep: Sweep,
    command: str,
    config: str,
    data: Path,
    overrides: Sequence[str],
    options: SweepOptions,
    test: PrecompDataset,
    table: str,
    rows: list[VariantResult],
    figure: Path,
) -> str:
    """``report.md``: what was evaluated where, the table, the plot, what was run for each
    variant, and the sweep's notes."""
    ran = [
        f"- {r.label}: `{_train_command(config, data, r.run, [*overrides, *r.overrides])}` — "
        f"{r.status}, {r.epochs_done}/{r.epochs} epochs"
        + (", stopped at the time budget" if r.stopped_early else "")
        + f", {format_duration(r.train_seconds)} of training in all; evaluated `{r.checkpoint}/`"
        for r in rows
    ]
    return "\n".join(
        [
            f"# imram analyze {sweep.name}: {sweep.title}",
            "",
            f"`{command}`",
            "",
            f"Config `{config}`"
            + (f" with `{' '.join('--set ' + o for o in overrides)}`" if overrides else "")
            + f"; data `{data}`, evaluated on split `{options.split}` ({test.num_images} images, "
            f"{test.num_captions} captions), protocol {options.protocol}. R@K in %, rsum = sum "
            "of the six recalls; dev rsum = the best validation rsum, whose checkpoint is "
            "evaluated.",
            "",
            table,
            "",
            f"![{sweep.title}]({figure.name})",
            "",
            "## What was run",
            "",
            *ran,
            "",
            "A re-run of the same command reuses finished runs, resumes interrupted ones and "
            "evaluates a checkpoint only once.",
            *(["", "## Notes", "", *sweep.notes] if sweep.notes else []),
        ]
    )
