"""What an analysis wrote, shared by the sweeps and the salient-word analysis."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imram.files import atomic_write_text


def write_report_files(
    out: Path, json_name: str, payload: dict[str, Any], text: str
) -> dict[str, Path]:
    """Write ``text`` to ``out/report.md`` and ``payload`` to ``out/json_name``, each
    atomically; returns their paths as the ``report_md`` and ``report_json`` fields of an
    analysis result."""
    written = {"report_md": out / "report.md", "report_json": out / json_name}
    atomic_write_text(written["report_json"], json.dumps(payload, indent=1))
    atomic_write_text(written["report_md"], text + "\n")
    return written


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
