"""``imram analyze aggregators``: the memory unit's aggregating function (the paper's Table 5).

One config is trained and evaluated once per aggregator (``--set model.aggregator=A``): ``ours``
(the gated memory distillation unit), ``add`` (x + c), ``mlp`` (x + tanh(Wc + b)), ``att``
(scalar interpolation) and ``gate`` (vector interpolation); see
:class:`imram.models.memory.MemoryDistillation`. The aggregator only acts between steps, so the
config needs ``model.steps`` of at least 2 (the paper used Text-IMRAM with K = 3 on Flickr30K).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from imram.analysis.plots import bar_chart
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
from imram.config import AGGREGATORS, Config
from imram.errors import ConfigError

PAPER_NOTE = (
    "For reference, the paper's Table 5 (Flickr30K, Text-IMRAM K=3; i2t R@1 R@10 | t2i R@1 "
    "R@10): add 64.5 95.1 | 49.2 84.9; mlp 66.6 96.4 | 52.8 86.2; att 66.1 95.5 | 52.1 86.2; "
    "gate 66.2 96.4 | 52.5 86.1; ours 68.8 96.0 | 53.0 87.1. Other data and model sizes give "
    "other numbers; compare the rows above with each other."
)


def aggregator_variants(aggregators: Sequence[str] = AGGREGATORS) -> list[Variant]:
    """One variant per aggregator, in the order given; each must be a known one, once."""
    values = list(aggregators)
    unknown = [a for a in values if a not in AGGREGATORS]
    if not values or unknown:
        raise ConfigError(f"--aggregators: expected some of {', '.join(AGGREGATORS)}, got {values}")
    if len(set(values)) != len(values):
        raise ConfigError(f"--aggregators: each aggregator once, got {values}")
    return [Variant(a, f"aggregator_{a}", (f"model.aggregator={a}",)) for a in values]


def _check(config: Config, source: str) -> None:
    require_imram(config, source, "analyze aggregators")
    if config.model.steps < 2:
        raise ConfigError(
            f"{source}: aggregators only act between matching steps; model.steps="
            f"{config.model.steps} has none (use --set model.steps=3)"
        )


def _plot(path: Path, rows: list[VariantResult]) -> Path:
    return bar_chart(
        path,
        [r.label for r in rows],
        plotted_series(rows),
        title="Recall per memory aggregator",
        ylabel="recall (%)",
    )


def run_aggregators(
    config: str,
    data: str | Path,
    out: str | Path,
    overrides: Sequence[str] = (),
    aggregators: Sequence[str] = AGGREGATORS,
    *,
    split: str = "test",
    protocol: str = "1k",
    device: str | None = None,
    progress: bool = True,
) -> SweepResult:
    """Train ``config`` with every aggregator into ``out/aggregator_A``, evaluate each on
    ``split`` and write ``out/report.md``, ``out/report.json`` and ``out/aggregators.png``."""
    extra = ["--aggregators", *aggregators]
    title = "memory aggregators (paper Table 5)"
    variants = aggregator_variants(aggregators)
    sweep = Sweep("aggregators", title, variants, _plot, extra, check=_check, notes=[PAPER_NOTE])
    options = SweepOptions(split, protocol, device, progress)
    return run_sweep(sweep, config, data, out, overrides, options)
