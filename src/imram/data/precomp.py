"""SCAN "precomp" folders (SPEC §6): memory-mapped region features with their captions."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from imram.data.text import Vocabulary, read_captions
from imram.errors import DataError

FEATURE_NAMES = ("{split}_ims.npy", "{split}_feat.npy")


def find_features(root: str | Path, split: str) -> Path:
    """The features file of a split: SCAN's ``_ims.npy`` first, then IMRAM's ``_feat.npy``."""
    root = Path(root)
    candidates = [root / name.format(split=split) for name in FEATURE_NAMES]
    for path in candidates:
        if path.is_file():
            return path
    names = " or ".join(p.name for p in candidates)
    raise DataError(f"{root}: split {split!r} has no image features ({names} not found)")


def open_features(path: Path) -> np.ndarray:
    """Memory-map a float32 ``[N, R, D]`` array, refusing anything else by name."""
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        raise DataError(f"{path}: not a readable .npy array ({err})") from None
    if array.dtype != np.float32:
        raise DataError(f"{path}: features must be float32, found {array.dtype}")
    if array.ndim != 3:
        raise DataError(
            f"{path}: features must be 3-D [images, regions, dim], found shape {array.shape}"
        )
    return array


def _read_ids(path: Path, n_images: int) -> list[str] | None:
    if not path.is_file():
        return None
    ids = read_captions(path)
    if len(ids) != n_images:
        raise DataError(f"{path}: {len(ids)} ids for {n_images} images in the features file")
    return ids


def _caption_images(
    cap2img_path: Path, captions_path: Path, n_captions: int, n_images: int
) -> np.ndarray:
    """Image index of every caption: the ``_cap2img.npy`` file, or the 1- or 5-per-image rule."""
    if cap2img_path.is_file():
        try:
            cap2img = np.load(cap2img_path, allow_pickle=False)
        except (ValueError, OSError, EOFError) as err:
            raise DataError(f"{cap2img_path}: not a readable .npy array ({err})") from None
        if cap2img.dtype != np.int64 or cap2img.shape != (n_captions,):
            raise DataError(
                f"{cap2img_path}: expected int64 of shape ({n_captions},), one image per caption "
                f"of {captions_path.name}; found {cap2img.dtype} {cap2img.shape}"
            )
        bad = np.flatnonzero((cap2img < 0) | (cap2img >= n_images))
        if bad.size:
            raise DataError(
                f"{cap2img_path}: caption {int(bad[0])} points to image {int(cap2img[bad[0]])}, "
                f"outside [0, {n_images})"
            )
    elif n_captions == n_images:
        cap2img = np.arange(n_captions, dtype=np.int64)
    elif n_captions == 5 * n_images:
        cap2img = np.arange(n_captions, dtype=np.int64) // 5
    else:
        raise DataError(
            f"{captions_path}: {n_captions} captions for {n_images} images is neither 1 nor 5 per "
            f"image; write {cap2img_path.name} (int64, the image of each caption) to say which"
        )
    counts = np.bincount(cap2img, minlength=n_images)
    if counts.min(initial=1) == 0:
        raise DataError(f"{captions_path}: image {int(np.argmin(counts))} has no caption")
    return cap2img


class PrecompDataset(Dataset):
    """One split of a precomp folder; item j is caption j with its image's region features.

    Features stay memory-mapped (COCO train is ~33 GB); captions are tokenised once at open
    (not at all without a vocabulary, for callers that need only the layout).
    """

    def __init__(self, root: str | Path, split: str, vocab: Vocabulary | None) -> None:
        self.root = Path(root)
        self.split = split
        self.vocab = vocab
        self.captions_path = self.root / f"{split}_caps.txt"
        if not self.captions_path.is_file():
            raise DataError(
                f"{self.root}: split {split!r} has no captions "
                f"({self.captions_path.name} not found)"
            )
        self.features_path = find_features(self.root, split)
        self.features = open_features(self.features_path)
        self.captions = read_captions(self.captions_path)
        self.tokens = [vocab.encode(c) for c in self.captions] if vocab is not None else []
        self.cap2img = _caption_images(
            self.root / f"{split}_cap2img.npy",
            self.captions_path,
            len(self.captions),
            self.num_images,
        )
        self.ids = _read_ids(self.root / f"{split}_ids.txt", self.num_images)

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

    def __len__(self) -> int:
        return self.num_captions

    def image(self, i: int) -> Tensor:
        """Region features ``[R, D]`` of image i (a copy), checked for NaN/inf."""
        values = np.array(self.features[i], dtype=np.float32)
        if not np.isfinite(values).all():
            raise DataError(f"{self.features_path}: image {i} has NaN or inf features")
        return torch.from_numpy(values)

    def images(self, indices: Sequence[int]) -> Tensor:
        """Region features ``[len(indices), R, D]`` of several images, checked for NaN/inf."""
        values = np.array(self.features[np.asarray(indices, dtype=np.int64)], dtype=np.float32)
        finite = np.isfinite(values).reshape(len(values), -1).all(axis=1)
        if not finite.all():
            bad = int(np.asarray(indices)[np.argmin(finite)])
            raise DataError(f"{self.features_path}: image {bad} has NaN or inf features")
        return torch.from_numpy(values)

    def caption_tokens(self, j: int) -> list[int]:
        return self.tokens[j]

    def __getitem__(self, j: int) -> tuple[Tensor, Tensor, int, int]:
        i = int(self.cap2img[j])
        return self.image(i), torch.tensor(self.tokens[j], dtype=torch.long), j, i

    def check_finite(self, chunk_images: int = 1024) -> None:
        """Scan every feature in bounded chunks; raise naming the first image with NaN/inf."""
        for start in range(0, self.num_images, chunk_images):
            block = np.asarray(self.features[start : start + chunk_images])
            finite = np.isfinite(block).reshape(len(block), -1).all(axis=1)
            if not finite.all():
                bad = start + int(np.argmin(finite))
                raise DataError(f"{self.features_path}: image {bad} has NaN or inf features")


def pad_captions(token_lists: Sequence[Sequence[int]]) -> tuple[Tensor, Tensor]:
    """Zero-padded ``[B, L_max]`` ids and ``[B]`` lengths, in the given order."""
    lengths = torch.tensor([len(t) for t in token_lists], dtype=torch.long)
    if len(token_lists) == 0 or int(lengths.min()) == 0:
        raise ValueError("pad_captions needs at least one caption and no empty caption")
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


def collate(batch: Sequence[tuple[Tensor, Tensor, int, int]]) -> PrecompBatch:
    """Stack dataset items, keeping their order (packing handles unsorted lengths)."""
    images, token_lists, caption_index, image_index = zip(*batch, strict=True)
    tokens, lengths = pad_captions(token_lists)
    return PrecompBatch(
        torch.stack(images),
        tokens,
        lengths,
        torch.tensor(caption_index, dtype=torch.long),
        torch.tensor(image_index, dtype=torch.long),
    )
