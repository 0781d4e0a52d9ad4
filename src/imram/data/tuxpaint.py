"""The embedded real dataset: Tux Paint's default stamps, each a picture with a human description.

Debian's ``tuxpaint-stamps-default`` (GPL-2, never committed here) holds about 950 stamps: a
``.txt`` whose first line is the English description, beside a PNG or an SVG. The package is
used where installed (``/usr/share/tuxpaint/stamps``) or fetched once into a cache with
``apt-get download`` and unpacked with ``dpkg -x``, which needs no root.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from imram.errors import DataError
from imram.files import atomic_output

PACKAGE = "tuxpaint-stamps-default"
INSTALLED = Path("/usr/share/tuxpaint/stamps")
_STAMPS_IN_PACKAGE = Path("usr/share/tuxpaint/stamps")
_COMPLETE = ".imram-complete"


def cache_dir() -> Path:
    """imram's cache: ``$IMRAM_CACHE``, else ``$XDG_CACHE_HOME/imram``, else ``~/.cache/imram``."""
    if os.environ.get("IMRAM_CACHE"):
        return Path(os.environ["IMRAM_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "imram"


def _has_stamps(root: Path) -> bool:
    return root.is_dir() and next(root.rglob("*.txt"), None) is not None


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False)
    except FileNotFoundError:
        raise DataError(
            f"{cmd[0]} not found: fetching {PACKAGE} needs Debian's apt-get and dpkg "
            f"(or install the package and use {INSTALLED})"
        ) from None


def _download(into: Path) -> Path:
    """``apt-get download`` the package into ``into``; on a stale package list, update it first
    when running as root. Returns the ``.deb``."""
    result = _run(["apt-get", "download", PACKAGE], into)
    if result.returncode != 0 and hasattr(os, "geteuid") and os.geteuid() == 0:
        _run(["apt-get", "update", "-qq"], into)
        result = _run(["apt-get", "download", PACKAGE], into)
    debs = sorted(into.glob(f"{PACKAGE}_*.deb"))
    if result.returncode != 0 or not debs:
        raise DataError(
            f"apt-get download {PACKAGE} failed: {result.stderr.strip() or result.stdout.strip()}"
            " (run 'apt-get update' first, or install the package)"
        )
    return debs[0]


def stamps_root(cache: str | Path | None = None, fetch: bool = True) -> Path:
    """The folder of the Tux Paint stamps: the installed package, else the cached copy, else
    (with ``fetch``) the package downloaded and unpacked into ``cache`` (default
    :func:`cache_dir`). The unpacked copy is moved into place whole, so a failed fetch leaves
    nothing half-written."""
    if _has_stamps(INSTALLED):
        return INSTALLED
    cache = Path(cache) if cache is not None else cache_dir()
    target = cache / "tuxpaint"
    if (target / _COMPLETE).is_file():
        return target / _STAMPS_IN_PACKAGE
    if not fetch:
        raise DataError(f"{PACKAGE} is neither installed nor cached in {target}")
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache, prefix=".tuxpaint-") as tmp:
        tmp = Path(tmp)
        deb = _download(tmp)
        unpacked = tmp / "unpacked"
        result = _run(["dpkg", "-x", str(deb), str(unpacked)], tmp)
        if result.returncode != 0 or not _has_stamps(unpacked / _STAMPS_IN_PACKAGE):
            raise DataError(f"dpkg -x {deb.name} failed: {result.stderr.strip()}")
        (unpacked / _COMPLETE).write_text(deb.name + "\n", encoding="utf-8")
        shutil.rmtree(target, ignore_errors=True)
        os.replace(unpacked, target)
    return target / _STAMPS_IN_PACKAGE


@dataclass(frozen=True)
class Stamp:
    """One stamp: its path relative to the stamps folder (the image name), the picture file
    (PNG, or SVG to rasterise) and the English description."""

    name: str
    picture: Path
    caption: str


def read_stamps(root: str | Path) -> tuple[list[Stamp], list[tuple[str, str]]]:
    """Every stamp under ``root`` in sorted order, and the ``(txt path, reason)`` of descriptions
    that were skipped: no picture beside them, or an empty or undecodable first line. A PNG is
    preferred to an SVG of the same stamp."""
    root = Path(root)
    stamps, skipped = [], []
    for txt in sorted(root.rglob("*.txt")):
        rel = txt.relative_to(root).with_suffix("")
        picture = next(
            (p for p in (txt.with_suffix(".png"), txt.with_suffix(".svg")) if p.is_file()), None
        )
        if picture is None:
            skipped.append((str(rel), "no .png or .svg beside the description"))
            continue
        try:
            first = txt.read_bytes().split(b"\n", 1)[0].decode("utf-8")
        except UnicodeDecodeError:
            skipped.append((str(rel), "the description's first line is not UTF-8"))
            continue
        caption = " ".join(first.lstrip("\ufeff").split())
        if not caption:
            skipped.append((str(rel), "the description's first line is empty"))
            continue
        stamps.append(Stamp(str(rel.with_suffix(picture.suffix)), picture, caption))
    return stamps, skipped


def rasterise_svg(svg: str | Path, png: str | Path, size: int = 448) -> Path:
    """Render an SVG to a PNG whose longer side is ``size`` pixels (transparent background),
    written atomically; an existing PNG is reused. Raises DataError naming the file when the
    SVG cannot be rendered."""
    import cairosvg
    from PIL import Image

    svg, png = Path(svg), Path(png)
    if png.is_file():
        return png
    try:
        with atomic_output(png) as tmp:
            cairosvg.svg2png(url=str(svg), write_to=str(tmp), output_width=size)
            with Image.open(tmp) as image:
                width, height = image.size
            if height > width:
                cairosvg.svg2png(url=str(svg), write_to=str(tmp), output_height=size)
    except Exception as err:
        raise DataError(f"{svg}: cannot rasterise the SVG ({type(err).__name__}: {err})") from None
    return png
