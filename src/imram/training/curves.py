"""Training curves read back from a run's ``metrics.jsonl``: dev rsum against training time.

Training seconds count the optimisation steps only (validation excluded) and are summed over
resumes, so runs of different models on the same machine compare at equal training time.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def read_curve(run: str | Path) -> list[dict[str, Any]]:
    """Per epoch of a run: mean training loss, the loss mode (hardest negative or the warm-up's),
    dev rsum, the training seconds and iterations by that validation (the last record of an
    epoch wins, so a resumed epoch counts once)."""
    epochs: dict[int, dict[str, Any]] = {}
    for line in (Path(run) / "metrics.jsonl").read_text(encoding="utf-8").splitlines():
        event = json.loads(line)
        row = epochs.setdefault(event.get("epoch", -1), {"losses": []})
        if event["event"] == "train":
            row["losses"].append(event["loss"])
            row["hardest"] = event.get("hardest", True)
        elif event["event"] == "val":
            row["val_rsum"] = event["rsum"]
            row["train_seconds"] = event.get("train_seconds")
            row["iteration"] = event.get("iteration")
    return [
        {
            "epoch": epoch + 1,
            "loss": sum(r["losses"]) / len(r["losses"]) if r["losses"] else None,
            "hardest": r.get("hardest", True),
            "val_rsum": r.get("val_rsum"),
            "train_seconds": r.get("train_seconds"),
            "iteration": r.get("iteration"),
        }
        for epoch, r in sorted(epochs.items())
        if epoch >= 0
    ]


def _validated(curve: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [c for c in curve if c["val_rsum"] is not None and c["train_seconds"] is not None]


def best_by(curve: list[dict[str, Any]], seconds: float) -> float | None:
    """The best dev rsum a run had reached within ``seconds`` of training."""
    reached = [c["val_rsum"] for c in _validated(curve) if c["train_seconds"] <= seconds]
    return max(reached) if reached else None


def seconds_to_reach(curve: list[dict[str, Any]], rsum: float) -> float | None:
    """The training seconds at the first validation with dev rsum ≥ ``rsum`` (None: never)."""
    for c in _validated(curve):
        if c["val_rsum"] >= rsum:
            return c["train_seconds"]
    return None


def time_to_accuracy_section(rows: list[dict[str, Any]], reference: str) -> list[str]:
    """Markdown: each run's dev rsum against training minutes, its best, and the minutes it
    needed to reach the best dev rsum of ``reference`` (and 90 % of it). ``rows`` hold
    ``model`` (a label), ``curve`` (:func:`read_curve`) and ``train_samples``."""
    by_name = {r["model"]: r for r in rows}
    if reference not in by_name or not all(_validated(r["curve"]) for r in rows):
        return []
    target = max(c["val_rsum"] for c in _validated(by_name[reference]["curve"]))

    def minutes(seconds: float | None, total: float) -> str:
        return f"not reached in {total / 60:.1f}" if seconds is None else f"{seconds / 60:.1f}"

    lines = [
        f"Time to accuracy: dev rsum against training minutes (validation excluded), and the "
        f"minutes each run needed to reach {reference}'s best dev rsum ({target:.1f}).",
        "",
        f"| model | samples/s | dev rsum by training minute | best (min) | min to {target:.0f} "
        f"| min to 90% ({0.9 * target:.0f}) |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        curve = _validated(r["curve"])
        total = curve[-1]["train_seconds"]
        best = max(curve, key=lambda c: c["val_rsum"])
        points = ", ".join(f"{c['train_seconds'] / 60:.2f}: {c['val_rsum']:.0f}" for c in curve)
        lines.append(
            f"| {r['model']} | {r['train_samples'] / total:.0f} | {points} "
            f"| {best['val_rsum']:.1f} ({best['train_seconds'] / 60:.1f}) "
            f"| {minutes(seconds_to_reach(curve, target), total)} "
            f"| {minutes(seconds_to_reach(curve, 0.9 * target), total)} |"
        )
    return lines
