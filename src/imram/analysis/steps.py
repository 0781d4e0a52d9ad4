"""``imram analyze steps``: the number of matching steps K (the paper's Table 4).

One config is trained and evaluated once per K (``--set model.steps=K``), everything else equal,
and R@1 and R@10 both ways are plotted against K. The paper measured K = 1, 2, 3 for Image-,
Text- and Full-IMRAM on COCO 5K: every variant gained from K = 1 to 2, and a little more to 3.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from imram.analysis.plots import line_chart
from imram.analysis.sweep import (
    Sweep,
    SweepOptions,
    SweepResult,
    Variant,
    VariantResult,
    plotted_series,
    require_imram,
    run_sweep,
)
from imram.config import Config
from imram.errors import ConfigError

STEPS = (1, 2, 3)
PAPER_NOTE = (
    "For reference, the paper's Table 4 (COCO 5K, Full-IMRAM; i2t R@1 R@10 | t2i R@1 R@10): "
    "K=1 49.7 88.9 | 35.4 76.7; K=2 53.1 90.2 | 39.1 79.5; K=3 53.7 91.0 | 39.7 79.8. "
    "Other data and model sizes give other numbers; compare the rows above with each other."
)


def steps_variants(steps: Sequence[int] = STEPS) -> list[Variant]:
    """One variant per K, in increasing order; K must be distinct positive integers."""
    values = list(steps)
    if not values or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in values):
        raise ConfigError(f"--steps: expected positive integers, got {values}")
    if len(set(values)) != len(values):
        raise ConfigError(f"--steps: each K once, got {values}")
    return [Variant(f"K={k}", f"steps_{k}", (f"model.steps={k}",)) for k in sorted(values)]


def _check(config: Config, source: str) -> None:
    require_imram(config, source, "analyze steps")


def _plot(path: Path, rows: list[VariantResult]) -> Path:
    return line_chart(
        path,
        [int(r.label.removeprefix("K=")) for r in rows],
        plotted_series(rows),
        title="Recall against the number of matching steps K",
        xlabel="matching steps K",
        ylabel="recall (%)",
    )


def run_steps(
    config: str,
    data: str | Path,
    out: str | Path,
    overrides: Sequence[str] = (),
    steps: Sequence[int] = STEPS,
    *,
    split: str = "test",
    protocol: str = "1k",
    device: str | None = None,
    progress: bool = True,
) -> SweepResult:
    """Train ``config`` for every K of ``steps`` into ``out/steps_K``, evaluate each on ``split``
    and write ``out/report.md``, ``out/report.json`` and ``out/steps.png``."""
    extra = ["--steps", *(str(k) for k in sorted(steps))]
    title = "matching steps K (paper Table 4)"
    variants = steps_variants(steps)
    sweep = Sweep("steps", title, variants, _plot, extra, check=_check, notes=[PAPER_NOTE])
    options = SweepOptions(split, protocol, device, progress)
    return run_sweep(sweep, config, data, out, overrides, options)
