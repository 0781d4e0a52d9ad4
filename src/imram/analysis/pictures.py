"""A precomp folder's pictures as the feature extractor saw them, from its ``meta.json``.

``imram prepare`` records the extractor (backbone, input size, resizing, grid) and, per split,
the name of the picture behind every feature row (and, since format 2, its file). That is what
an attention map needs: the region grid, and the picture resized exactly as the network read
it, so that cell (r, c) of the grid covers the same pixels in the drawing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from imram.data.precomp import META_NAME, read_folder_meta
from imram.data.tuxpaint import cache_dir
from imram.features.extract import ExtractorConfig, extractor_from_record, load_image

read_meta = read_folder_meta


def extractor_config(data: str | Path, img_dim: int) -> ExtractorConfig:
    """How the folder's features were made, to make an image file's features the same way.

    Raises DataError naming ``meta.json`` and the field when the folder has no such record or
    it does not fit a model taking ``img_dim``-d regions.
    """
    meta = read_meta(data)
    entry = meta.get("extractor") if meta is not None else None
    return extractor_from_record(entry, img_dim, str(Path(data) / META_NAME))


def region_grid(meta: dict[str, Any] | None, split: str, regions: int) -> tuple[int, int] | None:
    """The ``(rows, cols)`` grid of a split's regions, None when they are not a grid (detector
    boxes, or no record) or the record does not match ``regions``."""
    if meta is None:
        return None
    candidates = [
        (meta.get("splits", {}).get(split, {}).get("features") or {}).get("grid"),
        (meta.get("extractor") or {}).get("grid"),
    ]
    for grid in candidates:
        if (
            isinstance(grid, list)
            and len(grid) == 2
            and all(type(g) is int and g > 0 for g in grid)
            and grid[0] * grid[1] == regions
        ):
            return grid[0], grid[1]
    return None


def _tuxpaint_candidates(source: dict[str, Any], name: str) -> list[Path]:
    """The stamp itself, or for an SVG the PNG ``prepare`` rasterised into the cache."""
    root = Path(str(source.get("stamps", "")))
    if not name.endswith(".svg"):
        return [root / name]
    caches = [cache_dir()]
    if len(root.parents) > 4:  # <cache>/tuxpaint/usr/share/tuxpaint/stamps
        caches.insert(0, root.parents[4])
    return [cache / "tuxpaint-png" / f"{name}.png" for cache in caches]


def picture_file(meta: dict[str, Any] | None, split: str, index: int) -> Path | None:
    """The picture file behind row ``index`` of ``split``, if meta.json says where it is and
    it is still there: the recorded ``files``, else the image name under the source folder."""
    if meta is None:
        return None
    entry = meta.get("splits", {}).get(split, {})
    candidates: list[Path] = []
    files = entry.get("files")
    if isinstance(files, list) and index < len(files) and isinstance(files[index], str):
        candidates.append(Path(files[index]))
    names = entry.get("images")
    source = meta.get("source") or {}
    if isinstance(names, list) and index < len(names) and isinstance(names[index], str):
        name = names[index]
        if source.get("format") == "tuxpaint":
            candidates += _tuxpaint_candidates(source, name)
        elif source.get("images"):
            candidates.append(Path(str(source["images"])) / name)
    return next((path for path in candidates if path.is_file()), None)


def network_view(path: str | Path, extractor: ExtractorConfig) -> np.ndarray:
    """The picture as the network read it: ``[S, S, 3]`` uint8 after the extractor's resizing
    and background compositing (the inverse of its ``(rgb - 127) / 128``)."""
    pixels = load_image(path, extractor).mul(128.0).add(127.0).round().clamp(0, 255)
    return pixels.byte().permute(1, 2, 0).numpy()
