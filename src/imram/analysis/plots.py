"""PNG figures of the analyses, drawn with matplotlib's Agg canvas (no display, no pyplot state).

Every figure has a fixed size in pixels (``inches × DPI``, no tight bounding box), so callers and
tests know what they get, and is written atomically.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from matplotlib.figure import Figure

from imram.files import atomic_output

DPI = 100
CHART_INCHES = (6.4, 4.0)
# Bars: pairs of dark and light shades, R@1 and R@10 of one direction sharing a hue.
SERIES_COLOURS = ("#1f77b4", "#aec7e8", "#d62728", "#ff9896", "#2ca02c", "#98df8a")
# Lines: (colour, line style); paired, R@1 solid and R@10 dashed, or distinct.
PAIRED_LINES = (("#1f77b4", "-"), ("#1f77b4", "--"), ("#d62728", "-"), ("#d62728", "--"))
DISTINCT_LINES = (("#1f77b4", "-"), ("#d62728", "-"), ("#2ca02c", "-"), ("#ff7f0e", "-"))


def save_figure(figure: Figure, path: str | Path) -> Path:
    """Write ``figure`` as a PNG of exactly its size at :data:`DPI`, atomically."""
    path = Path(path)
    with atomic_output(path) as tmp, open(tmp, "wb") as handle:
        figure.savefig(handle, format="png", dpi=DPI)
    return path


def line_chart(
    path: str | Path,
    x: Sequence[float],
    series: dict[str, Sequence[float]],
    *,
    title: str,
    xlabel: str,
    ylabel: str,
    styles: Sequence[tuple[str, str]] = PAIRED_LINES,
) -> Path:
    """One line per series over ``x`` (e.g. R@1 and R@10 against K), values printed at the
    points (NaN: left out); a :data:`CHART_INCHES` PNG."""
    figure = Figure(figsize=CHART_INCHES, dpi=DPI)
    ax = figure.add_subplot()
    for (label, values), (colour, style) in zip(series.items(), styles, strict=False):
        ax.plot(list(x), list(values), marker="o", label=label, color=colour, linestyle=style)
        for xi, yi in zip(x, values, strict=True):
            if math.isfinite(yi):
                ax.annotate(
                    f"{yi:.1f}",
                    (xi, yi),
                    textcoords="offset points",
                    xytext=(0, 5),
                    ha="center",
                    fontsize=7,
                    color=colour,
                )
    ax.set_xticks(list(x))
    ax.margins(x=0.08, y=0.15)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    figure.subplots_adjust(left=0.1, right=0.97, bottom=0.13, top=0.9)
    return save_figure(figure, path)


def bar_chart(
    path: str | Path,
    groups: Sequence[str],
    series: dict[str, Sequence[float]],
    *,
    title: str,
    ylabel: str,
) -> Path:
    """Grouped bars: one group per entry of ``groups``, one bar per series, values on top;
    a :data:`CHART_INCHES` PNG."""
    figure = Figure(figsize=CHART_INCHES, dpi=DPI)
    ax = figure.add_subplot()
    width = 0.8 / max(1, len(series))
    for s, ((label, values), colour) in enumerate(
        zip(series.items(), SERIES_COLOURS, strict=False)
    ):
        offsets = [g + (s - (len(series) - 1) / 2) * width for g in range(len(groups))]
        bars = ax.bar(offsets, list(values), width, label=label, color=colour)
        ax.bar_label(bars, fmt="%.1f", fontsize=6, padding=1)
    ax.set_xticks(range(len(groups)), list(groups))
    ax.margins(y=0.25)  # room above the bars for the legend
    ax.set_title(title, fontsize=10)
    ax.set_ylabel(ylabel)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper center", ncol=max(1, len(series)))
    figure.subplots_adjust(left=0.1, right=0.97, bottom=0.1, top=0.9)
    return save_figure(figure, path)
