"""A prepared folder's trunk cache: for each split, what enters the backbone's last N stages,
the input of a model whose image tower is tuned (``imram prepare folder --tower-stages N``).

The pictures behind a split's rows are those ``meta.json`` lists, so a folder gains the cache
without extracting its region features again; the record in ``meta.json`` (``towers``) names
the backbone, input size, shape, dtype and each file's SHA-256.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from imram.data.precomp import META_NAME, TRUNK_DTYPES, TRUNK_NAME, read_folder_meta
from imram.errors import ConfigError, DataError
from imram.features.efficientnet_lite import HEAD_CHANNELS, STAGES
from imram.features.extract import TrunkOutput, extract_features, extractor_from_record
from imram.files import atomic_write_text, sha256_file

if TYPE_CHECKING:
    import torch


def _split_files(meta: dict[str, Any], path: Path) -> dict[str, list[str]]:
    splits = meta.get("splits")
    if not isinstance(splits, dict) or not splits:
        raise DataError(f"{path}: no splits listed")
    files = {}
    for split, entry in splits.items():
        listed = entry.get("files") if isinstance(entry, dict) else None
        if not isinstance(listed, list) or not listed:
            raise DataError(
                f"{path}: splits.{split}.files is missing, so the pictures behind its rows are "
                "unknown; prepare the folder again with this imram"
            )
        files[split] = listed
    return files


def add_trunk_cache(
    folder: str | Path,
    stages: int,
    dtype: str = "float16",
    progress: bool = True,
    device: str | torch.device | None = None,
) -> dict[str, Any]:
    """Write ``{split}_trunk{stages}.npy`` for every split of the prepared ``folder`` (a split
    whose file the record already describes is kept) and record it in ``meta.json``; returns
    the record. A picture that can no longer be read is an error naming it, and the folder
    keeps what it had."""
    folder = Path(folder)
    meta_path = folder / META_NAME
    if isinstance(stages, bool) or not isinstance(stages, int) or not 1 <= stages <= len(STAGES):
        raise ConfigError(f"--tower-stages {stages!r}: expected an integer in [1, {len(STAGES)}]")
    if dtype not in TRUNK_DTYPES:
        raise ConfigError(f"trunk dtype {dtype!r}: expected one of {', '.join(TRUNK_DTYPES)}")
    meta = read_folder_meta(folder)
    if meta is None:
        raise DataError(f"{meta_path}: not found; a trunk cache needs a folder imram prepared")
    extractor = extractor_from_record(meta.get("extractor"), HEAD_CHANNELS, str(meta_path))
    towers = meta.setdefault("towers", {})
    old = towers.get(str(stages)) or {}
    same = old.get("dtype") == dtype and old.get("backbone") == extractor.backbone
    record: dict[str, Any] = {
        "backbone": extractor.backbone,
        "input_size": extractor.input_size,
        "stages": stages,
        "dtype": dtype,
        "splits": {},
    }
    for split, files in _split_files(meta, meta_path).items():
        name = TRUNK_NAME.format(split=split, stages=stages)
        kept = (old.get("splits") or {}).get(split) if same else None
        if kept and (folder / name).is_file() and sha256_file(folder / name)[0] == kept["sha256"]:
            record["splits"][split] = kept
            continue
        result = extract_features(
            files, folder / name, extractor, progress, device, TrunkOutput(stages, dtype)
        )
        if result.skipped:
            (folder / name).unlink(missing_ok=True)
            path, reason = result.skipped[0]
            raise DataError(f"{path}: {reason}; it was read when {folder} was prepared")
        record["splits"][split] = {"file": name, "sha256": sha256_file(folder / name)[0]}
    first = next(iter(record["splits"].values()))["file"]
    record["shape"] = list(np.load(folder / first, mmap_mode="r").shape[1:])
    towers[str(stages)] = record
    atomic_write_text(meta_path, json.dumps(meta, indent=1, ensure_ascii=False) + "\n")
    return record
