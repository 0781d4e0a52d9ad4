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
from torch import nn
from tqdm import tqdm

from imram.checkpoint import Checkpoint, load_checkpoint, resolve_checkpoint
from imram.data.precomp import PrecompDataset, pad_captions, read_folder_meta
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
    fsync_path,
    sealed,
    sha256_file,
    sibling_dir,
    swap_in,
    swapped_out,
)
from imram.models.interface import EmbeddingModel

FORMAT = "imram-index/1"
META_NAME = "index.json"
GALLERIES = ("images", "captions")
FILES = {"images": "images.faiss", "captions": "captions.faiss"}
KINDS = ("flat", "ivf")
WEIGHTS_NAME = "model.safetensors"
MAX_TRAIN = 100_000  # embeddings an IVF index's k-means sees at most (bounded memory)
POINTS_PER_LIST = 256  # faiss's own cap on training points per list
NPROBE_SHARE = 8  # default nprobe: one list in eight


@dataclass(frozen=True)
class Hit:
    """One result: its rank (from 1), gallery id, inner-product score, and image name or caption."""

    rank: int
    id: int
    score: float
    name: str


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


def _embedding_model(checkpoint: Checkpoint) -> EmbeddingModel:
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


def _check_count(name: str, value: Any, low: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"{name} must be an integer >= {low}, got {value!r}")
    return value


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
            yield _numpy(model.embed_images(features))

    return embed


def _embed_captions(
    model: EmbeddingModel, dataset: PrecompDataset, batch_size: int, device: torch.device
) -> Callable[[np.ndarray], Iterator[np.ndarray]]:
    def embed(indices: np.ndarray) -> Iterator[np.ndarray]:
        for start in range(0, len(indices), batch_size):
            chunk = indices[start : start + batch_size]
            tokens, lengths = pad_captions([dataset.caption_tokens(int(j)) for j in chunk])
            yield _numpy(model.embed_captions(tokens.to(device), lengths.to(device)))

    return embed


def _numpy(vectors: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(vectors.detach().float().cpu().numpy())


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


def _is_index(path: Path) -> bool:
    try:
        meta = json.loads((path / META_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and str(meta.get("format", "")).startswith("imram-index/")


def _check_out(out: Path, overwrite: bool) -> None:
    """Refuse to write over anything but an index (with ``overwrite``) or an empty folder."""
    if not out.exists():
        return
    if out.is_dir() and _is_index(out):
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
    model = _embedding_model(loaded)
    dataset = PrecompDataset(data, split, loaded.vocab)
    dataset.require_feature_dim(loaded.config.model.img_dim, f"the checkpoint {loaded.path}")
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
            _check_count(name, value)
    _check_count("batch_size", batch_size)


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


def _read_meta(path: Path) -> dict[str, Any]:
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


def _read_faiss(path: Path, meta: dict[str, Any], gallery: str) -> faiss.Index:
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
    model = _embedding_model(loaded)
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
    meta = _read_meta(path)
    indexes = {gallery: _read_faiss(path, meta, gallery) for gallery in GALLERIES}
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
        return _numpy(self.model.embed_captions(tokens, lengths))[0]

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
        features = image_features([image], config, self.device, self._network)
        return _numpy(self.model.embed_images(features.to(self.device)))[0]

    def search_vector(
        self, vector: np.ndarray, gallery: str, k: int = 10, nprobe: int | None = None
    ) -> list[Hit]:
        """The ``k`` items of ``gallery`` (``images`` or ``captions``) nearest ``vector``."""
        if gallery not in GALLERIES:
            raise ConfigError(f"gallery {gallery!r} is unknown; valid: {', '.join(GALLERIES)}")
        _check_count("k", k)
        index = self._indexes[gallery]
        query = np.ascontiguousarray(np.asarray(vector, dtype=np.float32).reshape(1, -1))
        if query.shape[1] != self.dim:
            raise DataError(
                f"{self.path}: a {query.shape[1]}-d query for an index of {self.dim}-d vectors"
            )
        params = None
        if self.nlist is not None and self.nprobe is not None:
            probes = self.nprobe[gallery] if nprobe is None else _check_count("nprobe", nprobe)
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
