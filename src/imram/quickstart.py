"""The main job: prepare the Tux Paint stamps, train Full-IMRAM and its baselines, compare them.

Everything is real: human descriptions of real pictures, EfficientNet-Lite0 grid features from
ImageNet weights, GloVe word vectors. The presets are sized for a 2-core CPU; the report puts
chance level beside each model, since the test split is small.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imram.config import load_config
from imram.data import PrecompDataset
from imram.data.text import atomic_write_text
from imram.metrics import METRIC_KEYS, chance_metrics, format_table

MODELS = (
    ("Full-IMRAM", "quickstart_full_imram"),
    ("SCAN t-i", "quickstart_scan_t2i"),
    ("VSE++", "quickstart_vsepp"),
)


@dataclass
class QuickstartResult:
    report_md: Path
    report_json: Path
    table: str
    seconds: float


def _curve(run: Path) -> list[dict[str, Any]]:
    """Per epoch: mean training loss and validation rsum, from the run's ``metrics.jsonl``."""
    epochs: dict[int, dict[str, Any]] = {}
    for line in (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines():
        event = json.loads(line)
        row = epochs.setdefault(event.get("epoch", -1), {"losses": []})
        if event["event"] == "train":
            row["losses"].append(event["loss"])
        elif event["event"] == "val":
            row["val_rsum"] = event["rsum"]
    return [
        {
            "epoch": epoch + 1,
            "loss": sum(r["losses"]) / len(r["losses"]) if r["losses"] else None,
            "val_rsum": r.get("val_rsum"),
        }
        for epoch, r in sorted(epochs.items())
        if epoch >= 0
    ]


def _folder_version(data: Path) -> int | None:
    """The ``format_version`` of a prepared folder's ``meta.json``, or None without one."""
    try:
        return json.loads((data / "meta.json").read_text(encoding="utf-8")).get("format_version")
    except (OSError, ValueError):
        return None


def _row(label: str, metrics: dict[str, Any], extra: str = "") -> str:
    cells = " | ".join(
        f"{metrics[k]:.1f}"
        for k in ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum")
    )
    return f"| {label} | {cells} | {extra} |"


def run_quickstart(
    out: str | Path = "runs/quickstart",
    models: tuple[tuple[str, str], ...] = MODELS,
    overrides: list[str] | None = None,
    device: str | None = None,
    progress: bool = True,
) -> QuickstartResult:
    """Prepare the stamps into ``out/tuxpaint_precomp`` (once), train each preset into
    ``out/<preset>`` (a finished run is kept, an interrupted one resumed), evaluate the best
    checkpoints on the test split and write ``out/report.md`` and ``out/report.json``.
    ``overrides`` are ``--set`` items applied to every preset."""
    from imram.evaluation import evaluate_model
    from imram.prepare import FORMAT_VERSION, prepare_tuxpaint
    from imram.training.checkpoint import load_checkpoint
    from imram.training.trainer import default_device, train

    start = time.monotonic()
    out = Path(out)
    data = out / "tuxpaint_precomp"
    tick = time.monotonic()
    if _folder_version(data) != FORMAT_VERSION:  # missing, or made by an older imram
        report = prepare_tuxpaint(data, progress=progress, overwrite=True)
        print(report.summary())
    prepare_seconds = time.monotonic() - tick
    device = device or str(default_device())

    test = PrecompDataset(data, "test", None)
    chance = chance_metrics(test.num_images, test.num_captions, test.cap2img)
    rows: list[dict[str, Any]] = []
    for label, preset in models:
        config = load_config(preset, overrides)
        run = out / preset
        resume = (run / "last" / "checkpoint.json").is_file()
        tick = time.monotonic()
        if progress:
            print(f"training {label} ({preset}) into {run}")
        train(config, data, run, resume=resume, device=device, progress=progress)
        train_seconds = time.monotonic() - tick
        checkpoint = load_checkpoint(run / "best")
        dataset = PrecompDataset(data, "test", checkpoint.vocab)
        metrics, _, _ = evaluate_model(checkpoint.model.to(device), dataset, "1k", device=device)
        curve = _curve(run)
        rows.append(
            {
                "model": label,
                "preset": preset,
                "run": str(run),
                "train_seconds": train_seconds,
                "best_epoch": max(curve, key=lambda c: c["val_rsum"] or 0.0)["epoch"],
                "metrics": {k: metrics[k] for k in METRIC_KEYS},
                "curve": curve,
            }
        )
    seconds = time.monotonic() - start

    header = (
        "| model | i2t R@1 | R@5 | R@10 | t2i R@1 | R@5 | R@10 | rsum | train time |\n"
        "|---|---|---|---|---|---|---|---|---|"
    )
    lines = [_row(r["model"], r["metrics"], f"{r['train_seconds'] / 60:.1f} min") for r in rows]
    lines.append(_row("chance", chance, "-"))
    table = "\n".join([header, *lines])
    meta = json.loads((data / "meta.json").read_text(encoding="utf-8"))
    payload = {
        "data": str(data),
        "test_images": test.num_images,
        "test_captions": test.num_captions,
        "extractor": meta.get("extractor"),
        "chance": chance,
        "models": rows,
        "prepare_seconds": prepare_seconds,
        "seconds": seconds,
    }
    report_json = out / "report.json"
    atomic_write_text(report_json, json.dumps(payload, indent=1))
    curves = []
    for r in rows:
        cells = ", ".join(
            f"{c['epoch']}: {c['loss']:.2f} / {c['val_rsum']:.0f}"
            for c in r["curve"]
            if c["loss"] is not None and c["val_rsum"] is not None
        )
        curves.append(f"- {r['model']} (epoch: mean loss / dev rsum): {cells}")
    text = "\n".join(
        [
            "# imram quickstart: Tux Paint stamps",
            "",
            f"Test split: {test.num_images} pictures, {test.num_captions} human descriptions; "
            f"features {meta.get('extractor', {}).get('backbone', '?')} grids. "
            f"R@K in %, rsum = sum of the six recalls.",
            "",
            table,
            "",
            "Training curves:",
            *curves,
            "",
            f"Whole run {seconds / 60:.1f} min (data preparation {prepare_seconds:.0f} s).",
            "",
            *(f"```\n{format_table(r['metrics'], title=r['model'])}\n```" for r in rows),
        ]
    )
    report_md = out / "report.md"
    atomic_write_text(report_md, text + "\n")
    return QuickstartResult(report_md, report_json, table, seconds)
