"""An index on disk: its file names and format, the strict reader of ``index.json`` (every field
the loader relies on, checked and named), and the verified reading of its FAISS files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import torch

from imram.errors import ConfigError, DataError
from imram.files import sha256_file

FORMAT = "imram-index/1"
META_NAME = "index.json"
GALLERIES = ("images", "captions")
FILES = {"images": "images.faiss", "captions": "captions.faiss"}
KINDS = ("flat", "ivf")


def check_count(name: str, value: Any, low: int = 1) -> int:
    """``value`` if it is an integer of at least ``low``, else a ConfigError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"{name} must be an integer >= {low}, got {value!r}")
    return value


def _get(section: Any, key: str, kinds: type | tuple[type, ...], source: Path, prefix: str) -> Any:
    """``section[key]`` checked against ``kinds`` (bool is not an int); errors name the field."""
    name = f"{prefix}{key}"
    if not isinstance(section, dict) or key not in section:
        raise DataError(f"{source}: field {name!r} is missing")
    value = section[key]
    kinds = kinds if isinstance(kinds, tuple) else (kinds,)
    if (isinstance(value, bool) and bool not in kinds) or not isinstance(value, kinds):
        expected = " or ".join("null" if k is type(None) else k.__name__ for k in kinds)
        raise DataError(f"{source}: field {name!r} is {value!r:.60}, expected {expected}")
    return value


def _get_list(section: Any, key: str, kind: type, count: int, source: Path, prefix: str) -> list:
    values = _get(section, key, list, source, prefix)
    if len(values) != count:
        raise DataError(
            f"{source}: field '{prefix}{key}' has {len(values)} entries but '{prefix}count' is "
            f"{count}; the metadata was edited or is corrupt, rebuild the index"
        )
    for position, value in enumerate(values):
        if isinstance(value, bool) or not isinstance(value, kind):
            raise DataError(
                f"{source}: field '{prefix}{key}'[{position}] is {value!r:.60}, "
                f"expected {kind.__name__}"
            )
    return values


def read_index_meta(path: Path) -> dict[str, Any]:
    """Read ``index.json`` and check every field the loader relies on."""
    source = path / META_NAME
    try:
        meta = json.loads(source.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise DataError(f"{source}: unreadable index metadata ({err})") from None
    found = meta.get("format") if isinstance(meta, dict) else None
    if not isinstance(found, str) or not found.startswith("imram-index/"):
        raise DataError(f"{source}: not an imram index (no format {FORMAT!r})")
    if found != FORMAT:
        raise DataError(
            f"{source}: index format {found!r}, this imram reads {FORMAT!r}; rebuild the index"
        )
    _get(meta, "model", str, source, "")
    if _get(meta, "dim", int, source, "") < 1:
        raise DataError(f"{source}: field 'dim' must be at least 1, got {meta['dim']}")
    kind = _get(meta, "kind", str, source, "")
    if kind not in KINDS:
        raise DataError(f"{source}: field 'kind' is {kind!r}, expected one of {', '.join(KINDS)}")
    checkpoint = _get(meta, "checkpoint", dict, source, "")
    _get(checkpoint, "path", str, source, "checkpoint.")
    weights = _get(checkpoint, "weights_sha256", dict, source, "checkpoint.")
    if not weights or not all(isinstance(v, str) for v in weights.values()):
        raise DataError(f"{source}: field 'checkpoint.weights_sha256' must map files to hashes")
    _get(checkpoint, "vocab_fingerprint", (str, type(None)), source, "checkpoint.")
    data = _get(meta, "data", dict, source, "")
    for key in ("root", "split"):
        _get(data, key, str, source, "data.")
    _get(data, "extractor", (dict, type(None)), source, "data.")
    for gallery in GALLERIES:
        entry = _get(meta, gallery, dict, source, "")
        prefix = f"{gallery}."
        if _get(entry, "count", int, source, prefix) < 1:
            raise DataError(f"{source}: field '{prefix}count' must be at least 1")
        if _get(entry, "file", str, source, prefix) != FILES[gallery]:
            raise DataError(f"{source}: field '{prefix}file' must be {FILES[gallery]!r}")
        _get(entry, "sha256", str, source, prefix)
        _get(entry, "bytes", int, source, prefix)
        nlist = _get(entry, "nlist", (int, type(None)), source, prefix)
        nprobe = _get(entry, "nprobe", (int, type(None)), source, prefix)
        if kind == "flat" and (nlist is not None or nprobe is not None):
            raise DataError(f"{source}: a flat index has no '{prefix}nlist' or '{prefix}nprobe'")
        if kind == "ivf" and not (
            nlist is not None and nprobe is not None and 1 <= nprobe <= nlist <= entry["count"]
        ):
            raise DataError(
                f"{source}: an IVF index needs 1 <= '{prefix}nprobe' <= '{prefix}nlist' <= "
                f"'{prefix}count', found {nprobe}, {nlist}, {entry['count']}"
            )
    n_images, n_captions = meta["images"]["count"], meta["captions"]["count"]
    _get_list(meta["images"], "names", str, n_images, source, "images.")
    _get_list(meta["captions"], "texts", str, n_captions, source, "captions.")
    cap2img = _get_list(meta["captions"], "cap2img", int, n_captions, source, "captions.")
    bad = next((j for j, i in enumerate(cap2img) if not 0 <= i < n_images), None)
    if bad is not None:
        raise DataError(
            f"{source}: field 'captions.cap2img'[{bad}] = {cap2img[bad]} is outside the "
            f"{n_images} images"
        )
    return meta


def read_gallery_file(path: Path, meta: dict[str, Any], gallery: str) -> faiss.Index:
    """Read one FAISS file after checking its size and SHA-256, then its count, dim and kind."""
    entry = meta[gallery]
    file = path / entry["file"]
    if not file.is_file():
        raise DataError(f"{file}: missing from the index; rebuild the index")
    size = file.stat().st_size
    if size != entry["bytes"]:
        raise DataError(
            f"{file}: {size} bytes, {META_NAME} says {entry['bytes']}: truncated or replaced; "
            "rebuild the index"
        )
    if sha256_file(file)[0] != entry["sha256"]:
        raise DataError(
            f"{file}: contents do not match the SHA-256 in {META_NAME} (corrupt or modified); "
            "rebuild the index"
        )
    try:
        index = faiss.read_index(str(file))
    except RuntimeError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DataError(f"{file}: not a readable FAISS index ({first})") from None
    if index.ntotal != entry["count"]:
        raise DataError(
            f"{file}: holds {index.ntotal} vectors, {META_NAME} says {entry['count']} {gallery}"
        )
    if index.d != meta["dim"]:
        raise DataError(f"{file}: holds {index.d}-d vectors, {META_NAME} says {meta['dim']}-d")
    if index.metric_type != faiss.METRIC_INNER_PRODUCT:
        raise DataError(f"{file}: not an inner-product index")
    if meta["kind"] == "flat" and not isinstance(index, faiss.IndexFlat):
        raise DataError(f"{file}: {META_NAME} says kind flat, the file is {type(index).__name__}")
    if meta["kind"] == "ivf" and not (
        isinstance(index, faiss.IndexIVFFlat) and index.nlist == entry["nlist"]
    ):
        raise DataError(
            f"{file}: {META_NAME} says an IVF index of {entry['nlist']} lists, the file is "
            f"{type(index).__name__}"
        )
    return index


def is_index(path: Path) -> bool:
    """Whether ``path`` holds an imram index (an ``index.json`` of this format family)."""
    try:
        meta = json.loads((path / META_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and str(meta.get("format", "")).startswith("imram-index/")


def as_numpy(vectors: torch.Tensor) -> np.ndarray:
    """Embeddings as the contiguous float32 array FAISS takes."""
    return np.ascontiguousarray(vectors.detach().float().cpu().numpy())
