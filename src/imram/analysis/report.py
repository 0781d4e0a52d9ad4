"""What an analysis wrote, shared by the sweeps and the salient-word analysis."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(kw_only=True)
class AnalysisReport:
    """The markdown table, the plot, ``report.md`` and ``report.json`` of one analysis."""

    table: str
    plot: Path
    report_md: Path
    report_json: Path

    def summary(self) -> str:
        """The table and the files written, for the command line."""
        return f"{self.table}\nwrote {self.report_md}, {self.report_json} and {self.plot}"
