"""SCAN "precomp" folders (design §data): memory-mapped region features with their captions."""

from __future__ import annotations

import json
import operator
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from imram.data.text import Tokenizer, read_captions, read_lines
from imram.errors import DataError

FEATURE_NAMES = ("{split}_ims.npy", "{split}_feat.npy")
CAPTIONS_NAME = "{split}_caps.txt"
IDS_NAME = "{split}_ids.txt"
CAP2IMG_NAME = "{split}_cap2img.npy"
META_NAME = "meta.json"
# What enters a backbone's last N stages, per picture (``imram prepare folder --tower-stages``):
# the input of a model whose image tower is tuned (model.image_tower).
TRUNK_NAME = "{split}_trunk{stages}.npy"
TRUNK_DTYPES = ("float16", "float32")
# meta.json format_version; 2: each split lists the picture file behind every row ("files")
FORMAT_VERSION = 2

Item = tuple[Tensor, Tensor, int, int]


def _feature_candidates(root: Path, split: str) -> list[Path]:
    return [root / name.format(split=split) for name in FEATURE_NAMES]


def _missing_split(root: Path, split: str, missing: Sequence[str]) -> DataError:
    where = f"{root}" if root.is_dir() else f"{root} (no such folder)"
    return DataError(f"{where}: split {split!r} not found: {' and '.join(missing)} missing")


def read_folder_meta(root: str | Path) -> dict[str, Any] | None:
    """A prepared folder's ``meta.json`` (``imram prepare``) as a dict; None when the folder has
    none (e.g. SCAN's folders); a DataError naming the file when it is unreadable."""
    path = Path(root) / META_NAME
    if not path.is_file():
        return None
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise DataError(f"{path}: unreadable ({err})") from None
    if not isinstance(meta, dict):
        raise DataError(f"{path}: expected a JSON object")
    return meta


def find_features(root: str | Path, split: str) -> Path:
    """The features file of a split: SCAN's ``_ims.npy`` first, then IMRAM's ``_feat.npy``."""
    root = Path(root)
    candidates = _feature_candidates(root, split)
    for path in candidates:
        if path.is_file():
            return path
    raise _missing_split(root, split, [" or ".join(p.name for p in candidates)])


def _load_npy(path: Path, mmap: bool) -> np.ndarray:
    """``np.load`` that turns every way a file can fail to be one .npy array into a DataError."""
    try:
        array = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        raise DataError(f"{path}: not a readable .npy array ({err})") from None
    if not isinstance(array, np.ndarray):
        raise DataError(f"{path}: expected a single .npy array, found {type(array).__name__}")
    return array


def check_npy_size(path: Path) -> None:
    """Raise when a .npy file's size is not what its header declares: a truncated (or
    appended-to) file is reported as such instead of being mapped as garbage."""
    try:
        with open(path, "rb") as handle:
            version = np.lib.format.read_magic(handle)
            read_header = (
                np.lib.format.read_array_header_1_0
                if version == (1, 0)
                else np.lib.format.read_array_header_2_0
            )
            shape, _, dtype = read_header(handle)
            offset = handle.tell()
    except (ValueError, OSError, EOFError, SyntaxError):
        return  # not a .npy header: np.load's own error is reported by _load_npy
    if np.dtype(dtype).hasobject:
        return  # pickled objects have no fixed size; they are refused by _load_npy
    expected = offset + int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    actual = path.stat().st_size
    if actual < expected:
        raise DataError(
            f"{path}: truncated: its header declares {dtype} {tuple(shape)}, {expected} bytes, "
            f"but the file holds {actual}"
        )
    if actual > expected:
        raise DataError(
            f"{path}: {actual - expected} bytes after the {dtype} {tuple(shape)} array its "
            "header declares; the file was changed or appended to"
        )


def open_features(path: str | Path) -> np.ndarray:
    """Memory-map a float32 ``[images, regions, dim]`` array (never read whole), or raise;
    the file's size must match its header (see :func:`check_npy_size`)."""
    path = Path(path)
    check_npy_size(path)
    array = _load_npy(path, mmap=True)
    if array.dtype != np.float32:
        raise DataError(f"{path}: features must be float32, found {array.dtype}")
    if array.ndim != 3:
        raise DataError(
            f"{path}: features must be 3-D [images, regions, dim], found shape {array.shape}"
        )
    if 0 in array.shape:
        raise DataError(
            f"{path}: features must have at least one image, region and dimension, "
            f"found shape {array.shape}"
        )
    return array


def trunk_record(root: Path, stages: int) -> dict[str, Any] | None:
    """The ``meta.json`` record of a folder's trunk cache of ``stages`` stages, or None."""
    meta = read_folder_meta(root)
    record = (meta or {}).get("towers", {}).get(str(stages))
    return record if isinstance(record, dict) else None


def open_trunk(path: Path, num_images: int, stages: int) -> np.ndarray:
    """Memory-map a trunk cache ``[images, C, h, w]`` (float16 or float32) of ``num_images``
    rows, or raise naming the file and how to write it."""
    if not path.is_file():
        raise DataError(
            f"{path}: no trunk cache for {stages} tower stage(s), which a tuned image tower "
            f"reads; write it with imram prepare folder --out {path.parent} --tower-stages {stages}"
        )
    check_npy_size(path)
    array = _load_npy(path, mmap=True)
    if array.dtype.name not in TRUNK_DTYPES or array.ndim != 4:
        raise DataError(
            f"{path}: a trunk cache must be a 4-D [images, channels, h, w] array of "
            f"{' or '.join(TRUNK_DTYPES)}, found {array.dtype} {array.shape}"
        )
    if array.shape[0] != num_images:
        raise DataError(
            f"{path}: {array.shape[0]} rows for the split's {num_images} images; write it "
            f"again with --tower-stages {stages}"
        )
    return array


def _read_ids(path: Path, n_images: int, features_path: Path) -> list[str] | None:
    if not path.is_file():
        return None
    ids = read_lines(path, "id")
    if len(ids) != n_images:
        raise DataError(
            f"{path}: {len(ids)} ids but {features_path.name} has {n_images} images; "
            "expected one id per image"
        )
    return ids


def _caption_images(
    cap2img_path: Path, captions_path: Path, n_captions: int, n_images: int
) -> np.ndarray:
    """Image index of every caption: the ``_cap2img.npy`` file, or the 1- or 5-per-image rule."""
    if not cap2img_path.is_file():
        if n_captions == n_images:
            return np.arange(n_captions, dtype=np.int64)
        if n_captions == 5 * n_images:
            return np.arange(n_captions, dtype=np.int64) // 5
        raise DataError(
            f"{captions_path}: {n_captions} captions for {n_images} images is neither 1 nor 5 per "
            f"image; write {cap2img_path.name} (int64, the image of each caption) to say which"
        )
    cap2img = _load_npy(cap2img_path, mmap=False)
    if cap2img.dtype != np.int64 or cap2img.shape != (n_captions,):
        raise DataError(
            f"{cap2img_path}: expected int64 of shape ({n_captions},), one image per caption "
            f"of {captions_path.name}; found {cap2img.dtype} {cap2img.shape}"
        )
    bad = np.flatnonzero((cap2img < 0) | (cap2img >= n_images))
    if bad.size:
        j = int(bad[0])
        raise DataError(
            f"{cap2img_path}: caption {j} points to image {int(cap2img[j])}, "
            f"outside [0, {n_images})"
        )
    counts = np.bincount(cap2img, minlength=n_images)
    if not counts.all():
        raise DataError(
            f"{cap2img_path}: image {int(np.argmin(counts))} has no caption; "
            "expected every image to have at least one"
        )
    return cap2img


# Region features beyond this magnitude are refused: the encoder's projection and L2 norm
# would overflow float32 to inf and the image would score 0 against every caption. Real
# detector and CNN features stay below about 1e4.
FEATURE_LIMIT = 1e15


def _check_finite(values: np.ndarray, first: int, path: Path, indices: Any = None) -> None:
    """Raise naming the first image of ``values`` (rows ``[n, R, D]``) with NaN, inf or a
    value beyond ±:data:`FEATURE_LIMIT`."""
    rows = np.abs(values).reshape(len(values), -1)
    fine = (rows <= FEATURE_LIMIT).all(axis=1)  # False for NaN too
    if not fine.all():
        row = int(np.argmin(fine))
        bad = first + row if indices is None else int(indices[row])
        if np.isfinite(rows[row]).all():
            raise DataError(
                f"{path}: image {bad} has a feature of magnitude {rows[row].max():.3g}, beyond "
                f"{FEATURE_LIMIT:.0e}: the encoder would overflow float32 (rescale the features)"
            )
        raise DataError(f"{path}: image {bad} has NaN or inf features")


def _normalise_index(index: int, size: int, what: str) -> int:
    index = operator.index(index)
    if index < 0:
        index += size
    if not 0 <= index < size:
        raise IndexError(f"{what} index {index} is outside [0, {size})")
    return index


class PrecompDataset(Dataset[Item]):
    """One split of a precomp folder; item j is caption j with its image's region features,
    or with ``trunk_stages`` its image's trunk cache row (what enters a tuned image tower).

    Features stay memory-mapped (COCO train is ~33 GB) and are checked for NaN/inf as they are
    read. Captions are tokenised once at open into one flat array (not at all when ``vocab`` is
    None, for callers that need only the layout: counts, ``cap2img``, ids).
    """

    def __init__(
        self, root: str | Path, split: str, vocab: Tokenizer | None, trunk_stages: int = 0
    ) -> None:
        self.root = Path(root)
        self.split = split
        self.vocab = vocab
        self.captions_path = self.root / CAPTIONS_NAME.format(split=split)
        candidates = _feature_candidates(self.root, split)
        features_path = next((p for p in candidates if p.is_file()), None)
        missing = [] if self.captions_path.is_file() else [self.captions_path.name]
        if features_path is None:
            missing.append(" or ".join(p.name for p in candidates))
        if missing:
            raise _missing_split(self.root, split, missing)
        assert features_path is not None
        self.features_path = features_path
        self.features = open_features(features_path)
        self.trunk_stages = trunk_stages
        self.trunk_path: Path | None = None
        self.trunk: np.ndarray | None = None
        self.trunk_backbone: str | None = None
        if trunk_stages:
            self.trunk_path = self.root / TRUNK_NAME.format(split=split, stages=trunk_stages)
            self.trunk = open_trunk(self.trunk_path, self.num_images, trunk_stages)
            record = trunk_record(self.root, trunk_stages)
            self.trunk_backbone = None if record is None else record.get("backbone")
        self.captions = read_captions(self.captions_path)
        self.cap2img = _caption_images(
            self.root / CAP2IMG_NAME.format(split=split),
            self.captions_path,
            len(self.captions),
            self.num_images,
        )
        self.ids = _read_ids(
            self.root / IDS_NAME.format(split=split), self.num_images, features_path
        )
        self._token_ids = np.zeros(0, dtype=np.int32)
        self._token_offsets = np.zeros(1, dtype=np.int64)
        if vocab is not None:
            encoded = [vocab.encode(c) for c in self.captions]
            lengths = np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded))
            self._token_offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
            self._token_ids = np.fromiter(
                chain.from_iterable(encoded), dtype=np.int32, count=int(self._token_offsets[-1])
            )

    @property
    def num_images(self) -> int:
        return int(self.features.shape[0])

    @property
    def num_captions(self) -> int:
        return len(self.captions)

    @property
    def num_regions(self) -> int:
        return int(self.features.shape[1])

    @property
    def feature_dim(self) -> int:
        return int(self.features.shape[2])

    def require_feature_dim(self, img_dim: int, taker: str | Path) -> None:
        """Refuse features of another size than ``img_dim``, the region size that ``taker``
        (a checkpoint, a config) takes: a one-line error instead of a shape error deep inside
        a matrix product."""
        if self.feature_dim != img_dim:
            raise DataError(
                f"{self.features_path}: features are {self.feature_dim}-d but {taker} takes "
                f"{img_dim}-d regions (model.img_dim)"
            )

    def __len__(self) -> int:
        return self.num_captions

    def __repr__(self) -> str:
        return (
            f"PrecompDataset({str(self.root)!r}, {self.split!r}: {self.num_images} images x "
            f"{self.num_regions} regions x {self.feature_dim}, {self.num_captions} captions)"
        )

    def require_input(self, config: Any, taker: str | Path) -> None:
        """Refuse to feed ``taker``, a model of ``config`` (its model section), other inputs
        than it reads: region features of its size, or the trunk cache of its tuned tower;
        never the frozen grid to a tuned tower."""
        stages = config.trunk_stages
        if stages != self.trunk_stages:
            reads = f"the trunk cache of {stages} tower stage(s)" if stages else "region features"
            held = (
                f"the trunk cache of {self.trunk_stages} stage(s)"
                if self.trunk_stages
                else "region features"
            )
            raise DataError(
                f"{self.root}: split {self.split!r} was opened with {held}, but {taker} reads "
                f"{reads} (model.image_tower, model.tower_stages)"
            )
        if stages and self.trunk_backbone != config.tower_backbone:
            raise DataError(
                f"{self.trunk_path}: made by {self.trunk_backbone or 'an unrecorded backbone'} "
                f"(meta.json towers), but {taker} tunes {config.tower_backbone}'s last stages"
            )
        self.require_feature_dim(config.img_dim, taker)

    def image(self, i: int) -> Tensor:
        """Region features ``[R, D]`` of image i (its trunk row with ``trunk_stages``),
        checked for NaN/inf."""
        return self.images([_normalise_index(i, self.num_images, "image")])[0]

    def images(self, indices: Sequence[int]) -> Tensor:
        """Region features ``[len(indices), R, D]`` of several images (their trunk rows
        ``[n, C, h, w]`` with ``trunk_stages``), checked for NaN/inf."""
        index = np.asarray(indices, dtype=np.int64).reshape(-1)
        index = np.where(index < 0, index + self.num_images, index)
        if index.size and (index.min() < 0 or index.max() >= self.num_images):
            raise IndexError(f"image indices must lie in [0, {self.num_images})")
        if self.trunk is not None:
            assert self.trunk_path is not None
            values = np.array(self.trunk[index], dtype=np.float32)
            _check_finite(values, 0, self.trunk_path, index)
            return torch.from_numpy(values)
        values = np.array(self.features[index], dtype=np.float32)
        _check_finite(values, 0, self.features_path, index)
        return torch.from_numpy(values)

    def caption_tokens(self, j: int) -> list[int]:
        """Token ids of caption j, ``<start>`` and ``<end>`` included."""
        j = _normalise_index(j, self.num_captions, "caption")
        return self._tokens(j).tolist()

    def token_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """Every caption's token ids one after another, and ``offsets [N+1]`` where caption
        j's start (``ids[offsets[j]:offsets[j+1]]``)."""
        self._require_tokens()
        return self._token_ids, self._token_offsets

    def _require_tokens(self) -> None:
        if self.vocab is None:
            raise RuntimeError(
                f"{self.captions_path}: this dataset was opened without a vocabulary, so its "
                "captions have no token ids"
            )

    def _tokens(self, j: int) -> np.ndarray:
        self._require_tokens()
        return self._token_ids[self._token_offsets[j] : self._token_offsets[j + 1]]

    def __getitem__(self, j: int) -> Item:
        """``(image features [R, D], token ids [L], j, image index of caption j)``."""
        j = _normalise_index(j, self.num_captions, "caption")
        tokens = torch.from_numpy(self._tokens(j).astype(np.int64))
        i = int(self.cap2img[j])
        return self.image(i), tokens, j, i

    def check_finite(self, chunk_images: int = 1024) -> None:
        """Scan every feature in bounded chunks; raise naming the first image with NaN/inf."""
        if chunk_images < 1:
            raise ValueError(f"chunk_images must be at least 1, got {chunk_images}")
        for start in range(0, self.num_images, chunk_images):
            block = np.asarray(self.features[start : start + chunk_images])
            _check_finite(block, start, self.features_path)

    def __getstate__(self) -> dict[str, Any]:
        """Pickle without the memory maps (DataLoader workers reopen them instead of copying)."""
        state = self.__dict__.copy()
        del state["features"], state["trunk"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.features = open_features(self.features_path)
        self.trunk = None
        if self.trunk_path is not None:
            self.trunk = open_trunk(self.trunk_path, self.num_images, self.trunk_stages)


def pad_captions(token_lists: Sequence[Sequence[int]]) -> tuple[Tensor, Tensor]:
    """Zero-padded ``[B, L_max]`` ids and ``[B]`` lengths, in the given order."""
    if len(token_lists) == 0:
        raise ValueError("pad_captions needs at least one caption")
    lengths = torch.tensor([len(t) for t in token_lists], dtype=torch.long)
    if int(lengths.min()) == 0:
        raise ValueError(f"pad_captions: caption {int(lengths.argmin())} has no tokens")
    tokens = torch.zeros(len(token_lists), int(lengths.max()), dtype=torch.long)
    for row, ids in enumerate(token_lists):
        tokens[row, : len(ids)] = torch.as_tensor(ids, dtype=torch.long)
    return tokens, lengths


@dataclass
class PrecompBatch:
    """A collated batch: images ``[B, R, D]``, padded tokens ``[B, L]``, lengths and indices."""

    images: Tensor
    tokens: Tensor
    lengths: Tensor
    caption_index: Tensor
    image_index: Tensor


def collate(batch: Sequence[Item]) -> PrecompBatch:
    """Stack dataset items, keeping their order (packing handles unsorted lengths)."""
    if len(batch) == 0:
        raise ValueError("collate needs at least one item")
    images, token_lists, caption_index, image_index = zip(*batch, strict=True)
    tokens, lengths = pad_captions(token_lists)
    return PrecompBatch(
        torch.stack(images),
        tokens,
        lengths,
        torch.tensor(caption_index, dtype=torch.long),
        torch.tensor(image_index, dtype=torch.long),
    )
