"""The repository stands alone: every design section the code cites exists in docs/design.md."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CITED = re.compile(r"§([a-z]+)")
HEADING = re.compile(r"^## §([a-z]+) · ", re.MULTILINE)


def _sources() -> list[Path]:
    files = [ROOT / "README.md", *(ROOT / "docs").glob("*.md")]
    for folder in ("src/imram", "benchmarks", "tests"):
        files += [p for p in (ROOT / folder).rglob("*") if p.suffix in (".py", ".yaml", ".md")]
    return files


def test_every_cited_design_section_has_a_heading():
    headings = set(HEADING.findall((ROOT / "docs" / "design.md").read_text(encoding="utf-8")))
    assert {"attention", "memory", "matching", "cost", "mining"} <= headings
    cited = {}
    for path in _sources():
        for name in CITED.findall(path.read_text(encoding="utf-8")):
            cited.setdefault(name, path.relative_to(ROOT))
    missing = {name: str(path) for name, path in cited.items() if name not in headings}
    assert not missing, f"cited but not in docs/design.md: {missing}"
    assert len(cited) >= 8  # the code does cite it


def test_nothing_points_outside_the_repository():
    for path in _sources():
        if path == Path(__file__).resolve():
            continue
        text = path.read_text(encoding="utf-8")
        assert "SPEC §" not in text and "../shared" not in text, path
