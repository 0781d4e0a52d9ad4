"""Building an index: embed a split's images and captions with an embedding-model checkpoint and
write them, with ``index.json``, into a directory swapped in atomically (``imram index build``)."""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import torch
from tqdm import tqdm

from imram.checkpoint import WEIGHTS_NAME, Checkpoint, load_checkpoint, resolve_checkpoint
from imram.data.precomp import PrecompDataset, pad_captions, read_folder_meta
from imram.devices import resolve_device
from imram.errors import ConfigError, DataError
from imram.files import (
    fsync_path,
    sealed,
    sha256_file,
    sibling_dir,
    swap_in,
)
from imram.models.interface import EmbeddingModel
from imram.retrieval.index_file import (
    FILES,
    FORMAT,
    GALLERIES,
    KINDS,
    META_NAME,
    as_numpy,
    check_count,
    is_index,
)

MAX_TRAIN = 100_000  # embeddings an IVF index's k-means sees at most (bounded memory)
POINTS_PER_LIST = 256  # faiss's own cap on training points per list
NPROBE_SHARE = 8  # default nprobe: one list in eight


@dataclass(frozen=True)
class IndexInfo:
    """What ``build_index`` wrote."""

    path: Path
    model: str
    dim: int
    kind: str
    num_images: int
    num_captions: int
    nlist: dict[str, int] | None
    nprobe: dict[str, int] | None
    seconds: float

    def summary(self) -> str:
        """One line for the terminal."""
        lists = ""
        if self.nlist and self.nprobe:
            parts = [f"{g}: nlist {self.nlist[g]}, nprobe {self.nprobe[g]}" for g in GALLERIES]
            lists = f" ({'; '.join(parts)})"
        return (
            f"wrote {self.path}: {self.num_images} images and {self.num_captions} captions, "
            f"{self.model} {self.dim}-d, {self.kind}{lists}, in {self.seconds:.1f} s"
        )


def checkpoint_weights(checkpoint: str | Path) -> tuple[Path, dict[str, str]]:
    """The resolved checkpoint path and the SHA-256 of its weights file(s), by file name.

    A run or checkpoint directory has ``model.safetensors``; a release checkpoint is one file.
    """
    path = Path(checkpoint)
    if not path.exists():
        raise DataError(f"{path}: checkpoint not found")
    resolved = path if path.is_file() else resolve_checkpoint(path)
    weights = resolved if resolved.is_file() else resolved / WEIGHTS_NAME
    if not weights.is_file():
        raise DataError(f"{weights}: the checkpoint's weights file is missing")
    return resolved.resolve(), {weights.name: sha256_file(weights)[0]}


def embedding_model(checkpoint: Checkpoint) -> EmbeddingModel:
    """The checkpoint's model if it embeds images and captions as single vectors, else refuse."""
    model = checkpoint.model
    if not isinstance(model, EmbeddingModel):
        name = checkpoint.config.model.name
        raise ConfigError(
            f"{checkpoint.path}: model {name!r} scores each image-caption pair by cross-attention "
            "and has no single vector per image or caption, so it cannot be indexed; an index "
            "needs an embedding model such as vsepp or member (IMRAM re-ranks a shortlist "
            "retrieved by one instead)"
        )
    if checkpoint.vocab is None:
        raise DataError(f"{checkpoint.path}: the checkpoint has no vocabulary to tokenise text")
    return model


def default_nlist(n: int) -> int:
    """About 4·sqrt(n) inverted lists, at most n."""
    return max(1, min(n, round(4 * math.sqrt(n))))


def _lists(
    kind: str, nlist: int | None, nprobe: int | None, n: int, gallery: str
) -> tuple[int | None, int | None]:
    """(nlist, nprobe) of one gallery: None for flat; the defaults or the checked choices."""
    if kind == "flat":
        return None, None
    lists = default_nlist(n) if nlist is None else nlist
    if lists > n:
        raise ConfigError(
            f"nlist={lists} exceeds the {n} {gallery} of the split; an IVF index needs at least "
            "one vector per list (omit nlist for about 4*sqrt(n))"
        )
    probes = max(1, math.ceil(lists / NPROBE_SHARE)) if nprobe is None else nprobe
    return lists, min(probes, lists)


def _embed_images(
    model: EmbeddingModel, dataset: PrecompDataset, batch_size: int, device: torch.device
) -> Callable[[np.ndarray], Iterator[np.ndarray]]:
    def embed(indices: np.ndarray) -> Iterator[np.ndarray]:
        for start in range(0, len(indices), batch_size):
            features = dataset.images(indices[start : start + batch_size]).to(device)
            yield as_numpy(model.embed_images(features))

    return embed


def _embed_captions(
    model: EmbeddingModel, dataset: PrecompDataset, batch_size: int, device: torch.device
) -> Callable[[np.ndarray], Iterator[np.ndarray]]:
    def embed(indices: np.ndarray) -> Iterator[np.ndarray]:
        for start in range(0, len(indices), batch_size):
            chunk = indices[start : start + batch_size]
            tokens, lengths = pad_captions([dataset.caption_tokens(int(j)) for j in chunk])
            yield as_numpy(model.embed_captions(tokens.to(device), lengths.to(device)))

    return embed


def _training_sample(n: int, nlist: int) -> np.ndarray:
    """Rows the k-means of an IVF index trains on: all, or a fixed random subset (sorted)."""
    size = min(n, MAX_TRAIN, POINTS_PER_LIST * nlist)
    if size == n:
        return np.arange(n)
    return np.sort(np.random.default_rng(0).choice(n, size=size, replace=False))


def _fill_index(
    embed: Callable[[np.ndarray], Iterator[np.ndarray]],
    n: int,
    nlist: int | None,
    bar: tqdm,
) -> faiss.Index:
    """Stream embeddings into a flat index, or train an IVF index on a sample, then stream."""
    everything = np.arange(n)
    if nlist is None:
        index = None
        for part in embed(everything):
            index = index if index is not None else faiss.IndexFlatIP(part.shape[1])
            index.add(part)
            bar.update(len(part))
        return index
    sample = _training_sample(n, nlist)
    train: np.ndarray | None = None
    done = 0
    for part in embed(sample):
        if train is None:
            train = np.empty((len(sample), part.shape[1]), dtype=np.float32)
        train[done : done + len(part)] = part
        done += len(part)
        bar.update(len(part))
    assert train is not None
    dim = train.shape[1]
    index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
    # The default nlist gives sqrt(n)/4 points per list, below faiss's 39-point warning.
    index.cp.min_points_per_centroid = 1
    index.train(train)
    if len(sample) == n:
        index.add(train)
    else:
        del train
        for part in embed(everything):
            index.add(part)
            bar.update(len(part))
    index.make_direct_map()  # lets a gallery item's stored vector be read back as a query
    return index


def _write_gallery(
    embed: Callable[[np.ndarray], Iterator[np.ndarray]],
    n: int,
    nlist: int | None,
    file: Path,
    progress: bool,
) -> dict[str, Any]:
    """Build one gallery's index, write and fsync it; return its metadata entry and ``dim``."""
    sample = 0 if nlist is None else len(_training_sample(n, nlist))
    total = n + (sample if sample < n else 0)  # a partial training sample is embedded twice
    gallery = file.stem
    with tqdm(total=total, unit=gallery[:-1], desc=gallery, disable=not progress) as bar:
        index = _fill_index(embed, n, nlist, bar)
    dim = index.d
    faiss.write_index(index, str(file))
    del index
    fsync_path(file)
    sha, size = sha256_file(file)
    return {"count": n, "file": file.name, "sha256": sha, "bytes": size, "nlist": nlist, "dim": dim}


def _check_out(out: Path, overwrite: bool) -> None:
    """Refuse to write over anything but an index (with ``overwrite``) or an empty folder."""
    if not out.exists():
        return
    if out.is_dir() and is_index(out):
        if not overwrite:
            raise DataError(
                f"{out}: already holds an index; choose another path or replace it "
                "(overwrite=True, --overwrite)"
            )
        return
    if out.is_dir() and not any(out.iterdir()):
        return
    raise DataError(
        f"{out}: exists and is not an imram index (no readable {META_NAME}); refusing to "
        "replace it, choose another path"
    )


def _data_extractor(root: Path) -> dict[str, Any] | None:
    """The ``extractor`` entry of a precomp folder's meta.json (``imram prepare``), if any."""
    meta = read_folder_meta(root)
    extractor = meta.get("extractor") if meta is not None else None
    return extractor if isinstance(extractor, dict) else None


@torch.inference_mode()
def build_index(
    checkpoint: str | Path,
    data: str | Path,
    split: str,
    out: str | Path,
    kind: str = "flat",
    nlist: int | None = None,
    nprobe: int | None = None,
    batch_size: int = 128,
    device: str | torch.device | None = None,
    progress: bool = True,
    overwrite: bool = False,
) -> IndexInfo:
    """Embed a split's images and captions with an embedding-model checkpoint into ``out``.

    ``kind="flat"`` searches exactly; ``kind="ivf"`` clusters each gallery into ``nlist``
    lists (default about 4·sqrt(n)) and searches ``nprobe`` of them (default nlist/8, stored,
    changeable per search): approximate, for large galleries. Embeddings stream batch by batch
    into the index; features of the whole split are never held. An existing index at ``out``
    is replaced only with ``overwrite``; any other existing path is refused.
    """
    start = time.monotonic()
    _check_index_options(kind, nlist, nprobe, batch_size)
    out, data = Path(out), Path(data)
    _check_out(out, overwrite)
    resolved, weights = checkpoint_weights(checkpoint)
    loaded = load_checkpoint(resolved)
    model = embedding_model(loaded)
    dataset = loaded.open_split(data, split)
    counts = {"images": dataset.num_images, "captions": dataset.num_captions}
    lists = {g: _lists(kind, nlist, nprobe, counts[g], g) for g in GALLERIES}
    device = resolve_device(device)
    model = model.to(device).eval()
    embedders = {
        "images": _embed_images(model, dataset, batch_size, device),
        "captions": _embed_captions(model, dataset, batch_size, device),
    }
    tmp = sibling_dir(out)
    try:
        entries: dict[str, dict[str, Any]] = {}
        for gallery in GALLERIES:
            lists_here, probes_here = lists[gallery]
            entries[gallery] = _write_gallery(
                embedders[gallery], counts[gallery], lists_here, tmp / FILES[gallery], progress
            )
            entries[gallery]["nprobe"] = probes_here
            dim = entries[gallery].pop("dim")
        meta = _index_meta(loaded, resolved, weights, dataset, data, split, kind, dim, entries)
        (tmp / META_NAME).write_text(
            json.dumps(sealed(meta), indent=1, ensure_ascii=False) + "\n", encoding="utf-8"
        )
        fsync_path(tmp / META_NAME)
        fsync_path(tmp)
        _check_out(out, overwrite)
        swap_in(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    ivf = kind == "ivf"
    return IndexInfo(
        out,
        loaded.config.model.name,
        dim,
        kind,
        counts["images"],
        counts["captions"],
        {g: lists[g][0] for g in GALLERIES} if ivf else None,
        {g: lists[g][1] for g in GALLERIES} if ivf else None,
        time.monotonic() - start,
    )


def _check_index_options(kind: str, nlist: int | None, nprobe: int | None, batch_size: int) -> None:
    """Refuse an unknown kind, IVF settings on a flat index, and counts below one."""
    if kind not in KINDS:
        raise ConfigError(f"index kind {kind!r} is unknown; valid: {', '.join(KINDS)}")
    if kind == "flat" and (nlist is not None or nprobe is not None):
        raise ConfigError("nlist and nprobe apply to kind 'ivf' only")
    for name, value in (("nlist", nlist), ("nprobe", nprobe)):
        if value is not None:
            check_count(name, value)
    check_count("batch_size", batch_size)


def _index_meta(
    loaded: Checkpoint,
    resolved: Path,
    weights: dict[str, str],
    dataset: PrecompDataset,
    data: Path,
    split: str,
    kind: str,
    dim: int,
    entries: dict[str, dict[str, Any]],
) -> dict[str, Any]:
    """``index.json``'s payload: the checkpoint and data it was built from, and each gallery's
    file entry with the names, texts and caption-to-image map that results show."""
    count = dataset.num_images
    names = list(dataset.ids) if dataset.ids is not None else [str(i) for i in range(count)]
    entries["images"]["names"] = names
    entries["captions"]["texts"] = list(dataset.captions)
    entries["captions"]["cap2img"] = [int(i) for i in dataset.cap2img]
    return {
        "format": FORMAT,
        "model": loaded.config.model.name,
        "dim": dim,
        "kind": kind,
        "checkpoint": {
            "path": str(resolved),
            "weights_sha256": weights,
            "vocab_fingerprint": loaded.vocab.fingerprint() if loaded.vocab else None,
        },
        "data": {"root": str(data.resolve()), "split": split, "extractor": _data_extractor(data)},
        **entries,
    }
