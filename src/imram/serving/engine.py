"""The search service without HTTP: loads an index (and a re-ranker) once, checks every request
value, and answers text, image-file and explain queries as JSON-ready dictionaries.

Every problem with a request raises ``RequestError`` with the HTTP status it deserves, so the web
layer only translates; nothing a client sends ever becomes a filesystem path.
"""

from __future__ import annotations

import io
import logging
import re
import struct
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

import torch
from PIL import Image, UnidentifiedImageError

from imram.checkpoint import Checkpoint, load_checkpoint
from imram.data.precomp import PrecompDataset, pad_captions, read_folder_meta
from imram.data.text import merge_words
from imram.errors import ConfigError, DataError
from imram.features.efficientnet_lite import load_efficientnet_lite
from imram.features.extract import ExtractorConfig, ImageError, image_features
from imram.models.imram import BranchTrace
from imram.models.interface import RetrievalModel
from imram.retrieval.fusion import Fusion, load_fusion
from imram.retrieval.index import GalleryIndex, Hit, load_index
from imram.retrieval.two_stage import rerank_by_features

UPLOAD_FORMATS = ("PNG", "JPEG", "GIF", "WEBP", "BMP")
WEB_TYPES = {
    "PNG": "image/png",
    "JPEG": "image/jpeg",
    "GIF": "image/gif",
    "WEBP": "image/webp",
    "BMP": "image/bmp",
}
_ID = re.compile(r"[0-9]+")
_ROUND = 6  # decimals of attention weights and fragment scores in explain answers

T = TypeVar("T")
logger = logging.getLogger(__name__)


class RequestError(Exception):
    """A request the service refuses: ``status`` is the HTTP code, ``message`` says why."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class Limits:
    """What one request may ask for; anything beyond is refused with a 4xx answer."""

    max_query_chars: int = 200
    max_k: int = 100
    max_upload_bytes: int = 8 * 1024 * 1024
    max_pixels: int = 40_000_000

    def __post_init__(self) -> None:
        for name in ("max_query_chars", "max_k", "max_upload_bytes", "max_pixels"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"limit {name} must be an integer >= 1, got {value!r}")


def _floats(values: torch.Tensor, decimals: int | None = None) -> Any:
    """A tensor as nested Python floats, optionally rounded (keeps explain answers small)."""
    values = values.detach().double().cpu()
    if decimals is not None:
        values = torch.round(values, decimals=decimals)
    return values.tolist()


def _read_files(root: Path, split: str, count: int) -> list[Path] | None:
    """The image file behind each feature row, from the precomp's meta.json, if recorded."""
    try:
        files = (read_folder_meta(root) or {})["splits"][split]["files"]
    except (DataError, KeyError, TypeError):
        return None
    if not isinstance(files, list) or len(files) != count:
        return None
    if not all(isinstance(f, str) and f for f in files):
        return None
    return [Path(f) for f in files]


def _grid(extractor: dict[str, Any] | None, regions: int | None) -> list[int] | None:
    """The ``[h, w]`` region grid of the extractor meta, if it matches the feature rows."""
    grid = extractor.get("grid") if isinstance(extractor, dict) else None
    if not (isinstance(grid, list) and len(grid) == 2 and all(type(g) is int for g in grid)):
        return None
    if regions is not None and grid[0] * grid[1] != regions:
        return None
    return list(grid)


def _probe(path: Path, formats: tuple[str, ...] | None, max_pixels: int) -> str:
    """The Pillow format of an image file, read from its header only; refuses formats outside
    ``formats`` (415; None: any) and more than ``max_pixels`` pixels (413) before decoding."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path, formats=None if formats is None else list(formats)) as image:
                width, height = image.size
                found = str(image.format)
    except UnidentifiedImageError:
        names = ", ".join(formats or ())
        raise RequestError(415, f"not an image in a supported format ({names})") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        message = "the image has too many pixels (decompression-bomb guard)"
        raise RequestError(413, message) from None
    except (OSError, ValueError, SyntaxError, EOFError, struct.error) as err:
        raise RequestError(400, f"unreadable image ({type(err).__name__})") from None
    if width <= 0 or height <= 0:
        raise RequestError(400, f"zero-size image ({width}x{height})")
    if width * height > max_pixels:
        raise RequestError(
            413, f"the image has {width}x{height} pixels, more than the limit of {max_pixels:,}"
        )
    return found


class SearchService:
    """An index with its embedding model, plus an optional cross-attention re-ranker, loaded once.

    ``shortlist`` items (at least ``k``) are re-ranked per query when ``rerank`` is given.
    Every model call runs on one dedicated thread under ``inference_mode``: grad mode is per
    thread, the scorer keeps per-thread scratch buffers (one set instead of one per server
    thread), and on a few cores parallel forward passes would only compete for the same cores.
    """

    def __init__(
        self,
        index: str | Path,
        checkpoint: str | Path | None = None,
        rerank: str | Path | None = None,
        shortlist: int = 100,
        limits: Limits | None = None,
        device: str | torch.device | None = None,
        fusion: str | Path | None = None,
    ) -> None:
        if isinstance(shortlist, bool) or not isinstance(shortlist, int) or shortlist < 1:
            raise ConfigError(f"shortlist must be an integer >= 1, got {shortlist!r}")
        self.limits = limits if limits is not None else Limits()
        self.shortlist = shortlist
        self.gallery: GalleryIndex = load_index(index, checkpoint, device)
        self.device = self.gallery.device
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="imram-model")
        data = self.gallery.meta["data"]
        self.root, self.split = Path(data["root"]), str(data["split"])
        self.files = _read_files(self.root, self.split, self.gallery.num_images)
        self._media: dict[int, str] = {}
        self.extractor: ExtractorConfig | None = None
        self.image_search_problem: str | None = None
        self._network: torch.nn.Module | None = None
        try:
            config = self.gallery.extractor_config()
        except DataError as err:
            logger.warning("image search is off: %s", err)
            self.image_search_problem = (
                "this gallery cannot embed image files (its features were not made by "
                "imram prepare, or by another extractor); query by text instead"
            )
        else:
            self.extractor = replace(config, max_pixels=self.limits.max_pixels)
            self._network = load_efficientnet_lite(config.backbone).to(self.device).eval()
        self.reranker: Checkpoint | None = None
        self.dataset: PrecompDataset | None = None
        if rerank is not None:
            self.reranker, self.dataset = self._load_reranker(rerank)
        self.fusion: Fusion | None = None
        if fusion is not None:
            if self.reranker is None:
                raise ConfigError("--fusion combines two stages: it needs --rerank")
            self.fusion = load_fusion(fusion, self.gallery.checkpoint, self.reranker)
        regions = self.dataset.num_regions if self.dataset is not None else None
        self.grid = _grid(self.gallery.extractor, regions)

    def _load_reranker(self, rerank: str | Path) -> tuple[Checkpoint, PrecompDataset]:
        """The re-ranking checkpoint on the device, and the indexed split's region features."""
        loaded = load_checkpoint(rerank)
        model = loaded.model
        if not isinstance(model, RetrievalModel):
            raise ConfigError(
                f"{loaded.path}: model {loaded.config.model.name!r} cannot re-rank; use an IMRAM "
                "or SCAN checkpoint"
            )
        if loaded.vocab is None:
            raise DataError(f"{loaded.path}: the re-ranking checkpoint has no vocabulary")
        loaded.model = model.to(self.device).eval()
        dataset = PrecompDataset(self.root, self.split, None, loaded.config.model.trunk_stages)
        if dataset.num_images != self.gallery.num_images:
            raise DataError(
                f"{self.root}: split {self.split} holds {dataset.num_images} images, the index "
                f"{self.gallery.num_images}; rebuild the index"
            )
        dataset.require_input(loaded.config.model, f"the re-ranker {loaded.path}")
        return loaded, dataset

    def _call(self, task: Callable[[], T]) -> T:
        """Run ``task`` on the model thread under ``inference_mode`` and return its result."""

        def run() -> T:
            with torch.inference_mode():
                return task()

        return self._worker.submit(run).result()

    def close(self) -> None:
        """Stop the model thread once its queued calls are done."""
        self._worker.shutdown(wait=True)

    def health(self) -> dict[str, Any]:
        """What is loaded and which endpoints can answer."""
        reranker = self.reranker
        return {
            "status": "ok",
            "images": self.gallery.num_images,
            "captions": self.gallery.num_captions,
            "model": self.gallery.meta["model"],
            "rerank": reranker.config.model.name if reranker is not None else None,
            "shortlist": self.shortlist if reranker is not None else None,
            "fusion_weight": self.fusion.weight if self.fusion is not None else None,
            "image_search": self.extractor is not None,
            "image_files": self.files is not None,
            "explain": self._explain_problem() is None,
            "limits": vars(self.limits),
        }

    def check_query(self, q: str) -> str:
        """The query text, refused when blank or longer than the limit."""
        if not q.strip():
            raise RequestError(400, "the query text q is empty")
        if len(q) > self.limits.max_query_chars:
            raise RequestError(
                400,
                f"the query text q has {len(q)} characters; at most "
                f"{self.limits.max_query_chars} are allowed",
            )
        return q

    def check_k(self, k: int) -> int:
        """The number of results, refused outside ``[1, max_k]``."""
        if not 1 <= k <= self.limits.max_k:
            raise RequestError(400, f"k must be between 1 and {self.limits.max_k}, got {k}")
        return k

    def image_id(self, raw: str) -> int:
        """A gallery image id from its text: decimal digits only (400), in range (404)."""
        if not _ID.fullmatch(raw):
            raise RequestError(400, "an image id is a non-negative decimal integer")
        # Longer than any gallery's ids: out of range, not converted (int() of a huge string).
        value = int(raw) if len(raw) <= 12 else None
        if value is None or value >= self.gallery.num_images:
            shown = raw if len(raw) <= 24 else f"{raw[:20]}…"
            raise RequestError(
                404, f"no image {shown}: ids run from 0 to {self.gallery.num_images - 1}"
            )
        return value

    def _image_hit(self, hit: Hit) -> dict[str, Any]:
        return {**vars(hit), "image_url": f"/images/{hit.id}"}

    def _caption_hit(self, hit: Hit) -> dict[str, Any]:
        image = int(self.gallery.cap2img[hit.id])
        return {**vars(hit), "image_id": image, "image_url": f"/images/{image}"}

    def search_text(self, q: str, k: int) -> dict[str, Any]:
        """The ``k`` best gallery images for a text, re-ranked over the shortlist if possible."""
        q, k = self.check_query(q), self.check_k(k)

        def task() -> list[Hit]:
            hits = self.gallery.search_text(q, max(k, self.shortlist) if self.reranker else k)
            if self.reranker is not None and self.dataset is not None:
                features = self.dataset.images([hit.id for hit in hits])
                hits = self._rerank(hits, features, [q], text_query=True)
            return hits

        hits = self._call(task)
        return {
            "query": q,
            "k": k,
            "reranked": self.reranker is not None,
            "hits": [self._image_hit(hit) for hit in hits[:k]],
        }

    def check_image_search(self) -> None:
        """Refuse image queries up front when the gallery's features cannot be reproduced."""
        if self.extractor is None:
            raise RequestError(404, self.image_search_problem or "image search is unavailable")

    def search_image(self, path: Path, k: int) -> dict[str, Any]:
        """The ``k`` best gallery captions for an uploaded image file (a server-side temp file)."""
        self.check_image_search()
        assert self.extractor is not None
        k = self.check_k(k)
        _probe(path, UPLOAD_FORMATS, self.limits.max_pixels)
        extractor = self.extractor

        def task() -> list[Hit]:
            first = self.gallery.checkpoint.config.model.trunk_stages
            features = self._image_input(path, extractor, first)
            vector = self.gallery.model.embed_images(features.to(self.device))
            vector = vector.float().cpu().numpy()[0]
            hits = self.gallery.search_vector(
                vector, "captions", max(k, self.shortlist) if self.reranker else k
            )
            if self.reranker is not None:
                second = self.reranker.config.model.trunk_stages
                if second != first:
                    features = self._image_input(path, extractor, second)
                hits = self._rerank(hits, features, [hit.name for hit in hits], text_query=False)
            return hits

        hits = self._call(task)
        return {
            "k": k,
            "reranked": self.reranker is not None,
            "hits": [self._caption_hit(hit) for hit in hits[:k]],
        }

    def _image_input(self, path: Path, extractor: ExtractorConfig, stages: int) -> torch.Tensor:
        """An uploaded image as a model reads it: the region grid, or the trunk output below a
        tuned tower's ``stages`` stages (the tower itself runs inside the model)."""
        try:
            return image_features([path], extractor, self.device, self._network, stages)
        except ImageError as err:
            status = 413 if "pixels" in err.reason else 400
            raise RequestError(status, f"cannot use the image: {err.reason}") from None

    def _rerank(
        self, hits: list[Hit], features: torch.Tensor, texts: list[str], text_query: bool
    ) -> list[Hit]:
        """Re-order ``hits`` by the cross-attention model (see ``rerank_by_features``)."""
        assert self.reranker is not None
        return rerank_by_features(
            self.reranker, hits, features, texts, text_query, self.device, self.fusion
        )

    def _explain_problem(self) -> str | None:
        """Why explain cannot answer with this configuration, or None when it can."""
        if self.reranker is None:
            return (
                "explain needs a cross-attention model: start the server with --rerank and an "
                "IMRAM or SCAN checkpoint"
            )
        model = self.reranker.model
        if not hasattr(model, "explain") or not model.uses("text"):
            return (
                f"explain shows words attending over image regions, and the re-ranker "
                f"{self.reranker.config.model.name!r} has no text branch"
            )
        return None

    def explain(self, q: str, image_id: str) -> dict[str, Any]:
        """How the re-ranker matched a text to a gallery image, step by step.

        ``steps`` is the text branch: at each step every word (``<start>`` and ``<end>``
        included, as the model reads them) attends over the regions, which lie on ``grid`` in
        row-major order. ``image_branch`` adds the regions attending over words, when the
        model has that branch.
        """
        problem = self._explain_problem()
        if problem is not None:
            raise RequestError(400, problem)
        q = self.check_query(q)
        image = self.image_id(image_id)
        assert self.reranker is not None and self.reranker.vocab is not None
        assert self.dataset is not None
        model, vocab = self.reranker.model, self.reranker.vocab
        ids = vocab.encode(q)
        groups = vocab.word_groups(ids)
        tokens, lengths = pad_captions([ids])
        dataset = self.dataset

        def task() -> tuple[int, dict[str, BranchTrace]]:
            img = model.encode_images(dataset.images([image]).to(self.device))
            on_device = lengths.to(self.device)
            cap = model.encode_captions(tokens.to(self.device), on_device)
            return int(img.shape[1]), model.explain(img, cap, on_device)

        regions, traces = self._call(task)
        text = traces["text"]

        def by_word(values: torch.Tensor, dim: int, reduce: str) -> Any:
            """Word pieces merged into the shown words (a no-op for a word vocabulary)."""
            return _floats(merge_words(values, groups, dim, reduce), _ROUND)

        steps = [
            {
                "step": k + 1,
                "attention": by_word(text.attention[k][0, 0], 0, "mean"),
                "word_scores": by_word(text.fragment_scores[0, 0, k], 0, "mean"),
                "step_score": float(text.step_scores[0, 0, k]),
            }
            for k in range(text.step_scores.shape[-1])
        ]
        branch_scores = {name: float(trace.step_scores.sum()) for name, trace in traces.items()}
        image_branch = None
        if "image" in traces:
            trace = traces["image"]
            image_branch = {
                "steps": [
                    {
                        "step": k + 1,
                        "attention": by_word(trace.attention[k][0, 0], 1, "sum"),
                        "region_scores": _floats(trace.fragment_scores[0, 0, k], _ROUND),
                        "step_score": float(trace.step_scores[0, 0, k]),
                    }
                    for k in range(trace.step_scores.shape[-1])
                ]
            }
        return {
            "query": q,
            "image_id": image,
            "name": self.gallery.image_names[image],
            "image_url": f"/images/{image}",
            "model": self.reranker.config.model.name,
            "words": vocab.shown_words(ids),
            "tokens": vocab.tokens(q),
            "markers": "included",
            "grid": self.grid,
            "regions": regions,
            "score": sum(branch_scores.values()),
            "branch_scores": branch_scores,
            "steps": steps,
            "image_branch": image_branch,
        }

    def image_file(self, image_id: str) -> tuple[Path, str | None]:
        """The recorded file of a gallery image and its web media type (None: a format browsers
        may not show, to be sent converted by ``png_bytes``)."""
        image = self.image_id(image_id)
        if self.files is None:
            raise RequestError(404, "this gallery has no image files recorded")
        path = self.files[image]
        if not path.is_file():
            raise RequestError(404, f"the file of image {image} is no longer on the server")
        if image not in self._media:
            try:
                found = _probe(path, None, self.limits.max_pixels)
            except RequestError as err:
                raise RequestError(404, f"image {image} cannot be shown: {err.message}") from None
            self._media[image] = WEB_TYPES.get(found, "")
        return path, self._media[image] or None


def png_bytes(path: Path) -> bytes:
    """An image file re-encoded as PNG, for gallery files in formats browsers do not show."""
    with Image.open(path) as image:
        image.load()
        rgb = image if image.mode in ("RGB", "RGBA", "L", "LA") else image.convert("RGBA")
        out = io.BytesIO()
        rgb.save(out, format="PNG")
    return out.getvalue()
