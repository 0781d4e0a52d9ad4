"""FAISS indexes of a split's image and caption embeddings, for search without scoring all pairs.

An index is a directory written atomically (built in a temporary sibling, fsynced, renamed):
``images.faiss`` and ``captions.faiss`` (inner product over the model's unit vectors, exact
``IndexFlatIP`` or ``IndexIVFFlat``) and ``index.json``, which names the checkpoint (with the
SHA-256 of its weights), the data split, the gallery's names and captions, and the size and
SHA-256 of each FAISS file. Loading checks all of it, so a corrupt file or a different
checkpoint is refused instead of returning wrong neighbours.

Only embedding models (:class:`~imram.models.interface.EmbeddingModel`: one vector per image and
per caption, e.g. vsepp) can be indexed; cross-attention models such as IMRAM score each
pair and re-rank a shortlist retrieved by an embedding model instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import torch
from torch import nn

from imram.checkpoint import Checkpoint, load_checkpoint
from imram.devices import resolve_device
from imram.errors import ConfigError, DataError
from imram.features.extract import (
    ExtractorConfig,
    extractor_from_record,
    image_features,
    load_efficientnet_lite,
)
from imram.files import (
    check_sealed,
    swapped_out,
)
from imram.retrieval.build import checkpoint_weights, embedding_model
from imram.retrieval.index_file import (
    GALLERIES,
    META_NAME,
    as_numpy,
    check_count,
    read_gallery_file,
    read_index_meta,
)


@dataclass(frozen=True)
class Hit:
    """One result: its rank (from 1), gallery id, inner-product score, and image name or caption."""

    rank: int
    id: int
    score: float
    name: str


def _short(weights: dict[str, str]) -> str:
    return ", ".join(f"{name} {sha[:12]}" for name, sha in sorted(weights.items()))


def _verified_checkpoint(
    path: Path, meta: dict[str, Any], checkpoint: str | Path | None
) -> Checkpoint:
    """Load the index's checkpoint (or ``checkpoint``), refusing one with other weights."""
    source = path / META_NAME
    stored = meta["checkpoint"]["path"]
    if checkpoint is None and not Path(stored).exists():
        raise DataError(
            f"{source}: the index's checkpoint {stored} is not there; pass the checkpoint it "
            "was built with (checkpoint=..., --checkpoint)"
        )
    resolved, weights = checkpoint_weights(stored if checkpoint is None else checkpoint)
    expected = meta["checkpoint"]["weights_sha256"]
    if sorted(weights.values()) != sorted(expected.values()):
        raise DataError(
            f"{path}: the index was built with checkpoint {stored} (weights sha256 "
            f"{_short(expected)}), but {resolved} has other weights ({_short(weights)}); search "
            "with the checkpoint the index was built with, or rebuild the index"
        )
    loaded = load_checkpoint(resolved)
    model = embedding_model(loaded)
    if loaded.config.model.name != meta["model"]:
        raise DataError(
            f"{resolved}: model {loaded.config.model.name!r}, the index was built with "
            f"{meta['model']!r}"
        )
    fingerprint = meta["checkpoint"]["vocab_fingerprint"]
    assert loaded.vocab is not None
    if fingerprint is not None and loaded.vocab.fingerprint() != fingerprint:
        raise DataError(
            f"{resolved}: the vocabulary differs from the one the index {path} was built with"
        )
    with torch.inference_mode():
        probe = model.embed_captions(torch.tensor([[1, 2]]), torch.tensor([2]))
    if probe.shape[-1] != meta["dim"]:
        raise DataError(
            f"{resolved}: the model embeds into {probe.shape[-1]} dimensions, the index {path} "
            f"holds {meta['dim']}-d vectors"
        )
    return loaded


def _resolve_index(path: Path) -> Path:
    if (path / META_NAME).is_file():
        return path
    old = swapped_out(path)
    if not path.exists() and (old / META_NAME).is_file():  # a crash between a swap's renames
        return old
    if not path.exists():
        raise DataError(f"{path}: no index here (no such folder)")
    raise DataError(f"{path}: no index here (no {META_NAME})")


def load_index(
    path: str | Path,
    checkpoint: str | Path | None = None,
    device: str | torch.device | None = None,
) -> GalleryIndex:
    """Open an index written by ``build_index``, verifying it before any search can use it.

    Every file's size and SHA-256, the format version, the counts and dimensions, and the
    checkpoint's weights (the stored one, or ``checkpoint`` when the run has moved) must match;
    anything else raises DataError naming the file.
    """
    path = _resolve_index(Path(path))
    meta = read_index_meta(path)
    indexes = {gallery: read_gallery_file(path, meta, gallery) for gallery in GALLERIES}
    check_sealed(meta, path / META_NAME)  # last: the checks above name what is wrong
    loaded = _verified_checkpoint(path, meta, checkpoint)
    return GalleryIndex(path, meta, indexes, loaded, resolve_device(device))


class GalleryIndex:
    """A verified index with its model: search by text, by image file, or by gallery item."""

    def __init__(
        self,
        path: Path,
        meta: dict[str, Any],
        indexes: dict[str, faiss.Index],
        checkpoint: Checkpoint,
        device: torch.device,
    ) -> None:
        self.path = path
        self.meta = meta
        self.checkpoint = checkpoint
        self.device = device
        self.model = checkpoint.model.to(device).eval()
        self.dim: int = meta["dim"]
        self.kind: str = meta["kind"]
        self.image_names: list[str] = meta["images"]["names"]
        self.captions: list[str] = meta["captions"]["texts"]
        self.cap2img = np.asarray(meta["captions"]["cap2img"], dtype=np.int64)
        self.extractor: dict[str, Any] | None = meta["data"]["extractor"]
        ivf = self.kind == "ivf"
        self.nlist = {g: meta[g]["nlist"] for g in GALLERIES} if ivf else None
        self.nprobe = {g: meta[g]["nprobe"] for g in GALLERIES} if ivf else None
        self._indexes = indexes
        self._network: nn.Module | None = None

    def __repr__(self) -> str:
        return (
            f"GalleryIndex({str(self.path)!r}: {self.num_images} images, {self.num_captions} "
            f"captions, {self.meta['model']} {self.dim}-d, {self.kind})"
        )

    @property
    def num_images(self) -> int:
        return len(self.image_names)

    @property
    def num_captions(self) -> int:
        return len(self.captions)

    def image_vectors(self) -> np.ndarray:
        """The stored ``[num_images, dim]`` image embeddings (all in memory: for checks)."""
        return self._indexes["images"].reconstruct_n(0, self.num_images)

    def caption_vectors(self) -> np.ndarray:
        """The stored ``[num_captions, dim]`` caption embeddings (all in memory: for checks)."""
        return self._indexes["captions"].reconstruct_n(0, self.num_captions)

    @torch.inference_mode()
    def embed_text(self, text: str) -> np.ndarray:
        """The ``[dim]`` embedding of a query text, tokenised with the checkpoint's vocabulary."""
        if not isinstance(text, str) or not text.strip():
            raise ConfigError("the query text is empty")
        assert self.checkpoint.vocab is not None
        tokens = torch.tensor([self.checkpoint.vocab.encode(text)], device=self.device)
        lengths = torch.tensor([tokens.shape[1]], device=self.device)
        return as_numpy(self.model.embed_captions(tokens, lengths))[0]

    def extractor_config(self) -> ExtractorConfig:
        """How the gallery's features were made, so a query image is processed the same way."""
        source = f"{self.path / META_NAME} (data {self.meta['data']['root']})"
        return extractor_from_record(self.extractor, self.checkpoint.config.model.img_dim, source)

    @torch.inference_mode()
    def embed_image_file(self, image: str | Path) -> np.ndarray:
        """The ``[dim]`` embedding of an image file, its features made as the gallery's were."""
        config = self.extractor_config()
        if self._network is None:
            self._network = load_efficientnet_lite(config.backbone)
        stages = self.checkpoint.config.model.trunk_stages
        features = image_features([image], config, self.device, self._network, stages)
        return as_numpy(self.model.embed_images(features.to(self.device)))[0]

    def search_vector(
        self, vector: np.ndarray, gallery: str, k: int = 10, nprobe: int | None = None
    ) -> list[Hit]:
        """The ``k`` items of ``gallery`` (``images`` or ``captions``) nearest ``vector``."""
        if gallery not in GALLERIES:
            raise ConfigError(f"gallery {gallery!r} is unknown; valid: {', '.join(GALLERIES)}")
        check_count("k", k)
        index = self._indexes[gallery]
        query = np.ascontiguousarray(np.asarray(vector, dtype=np.float32).reshape(1, -1))
        if query.shape[1] != self.dim:
            raise DataError(
                f"{self.path}: a {query.shape[1]}-d query for an index of {self.dim}-d vectors"
            )
        params = None
        if self.nlist is not None and self.nprobe is not None:
            probes = self.nprobe[gallery] if nprobe is None else check_count("nprobe", nprobe)
            params = faiss.SearchParametersIVF(nprobe=min(probes, self.nlist[gallery]))
        scores, ids = index.search(query, min(k, index.ntotal), params=params)
        names = self.image_names if gallery == "images" else self.captions
        found = [(float(s), int(i)) for s, i in zip(scores[0], ids[0], strict=True) if i >= 0]
        return [Hit(rank, i, s, names[i]) for rank, (s, i) in enumerate(found, start=1)]

    def search_text(self, text: str, k: int = 10, nprobe: int | None = None) -> list[Hit]:
        """Images for a text query."""
        return self.search_vector(self.embed_text(text), "images", k, nprobe)

    def search_image(self, image: str | Path, k: int = 10, nprobe: int | None = None) -> list[Hit]:
        """Captions for an image file."""
        return self.search_vector(self.embed_image_file(image), "captions", k, nprobe)

    def search_image_id(self, i: int, k: int = 10, nprobe: int | None = None) -> list[Hit]:
        """Captions for gallery image ``i`` (its stored vector is the query)."""
        i = self._item(i, "images")
        return self.search_vector(self._indexes["images"].reconstruct(i), "captions", k, nprobe)

    def search_caption_id(self, j: int, k: int = 10, nprobe: int | None = None) -> list[Hit]:
        """Images for gallery caption ``j`` (its stored vector is the query)."""
        j = self._item(j, "captions")
        return self.search_vector(self._indexes["captions"].reconstruct(j), "images", k, nprobe)

    def search(
        self,
        *,
        text: str | None = None,
        image: str | Path | None = None,
        k: int = 10,
        nprobe: int | None = None,
    ) -> list[Hit]:
        """One query: ``text`` → images, or an ``image`` file → captions."""
        if (text is None) == (image is None):
            raise ConfigError("search needs exactly one query: a text or an image file")
        if text is not None:
            return self.search_text(text, k, nprobe)
        return self.search_image(image, k, nprobe)

    def _item(self, item: int, gallery: str) -> int:
        n = self._indexes[gallery].ntotal
        if isinstance(item, bool) or not isinstance(item, int | np.integer) or not 0 <= item < n:
            raise DataError(f"{self.path}: {gallery[:-1]} id {item!r} is outside [0, {n})")
        return int(item)


def search_index(
    index: str | Path,
    *,
    text: str | None = None,
    image: str | Path | None = None,
    k: int = 10,
    checkpoint: str | Path | None = None,
    nprobe: int | None = None,
    device: str | torch.device | None = None,
) -> list[Hit]:
    """Load ``index`` and answer one query: ``text`` → images, or an ``image`` file → captions."""
    if (text is None) == (image is None):  # before loading anything
        raise ConfigError("search needs exactly one query: a text or an image file")
    return load_index(index, checkpoint, device).search(text=text, image=image, k=k, nprobe=nprobe)
