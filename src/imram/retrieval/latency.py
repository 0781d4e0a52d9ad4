"""What one query costs against a whole gallery: the milliseconds a user waits for a ranking.

The gallery is encoded (and, for a cross-attention model, prepared) once in advance, as an
index or the service holds it; each query is then answered alone, from its raw input (a
description's text, a picture's region features: extraction is not included) to its ranked
list. :class:`GallerySearch` answers with one model; :class:`TwoStageSearch` shortlists with
an embedding model's dot products and re-ranks the shortlist with a cross-attention model
(:mod:`imram.retrieval.two_stage` evaluates the same on a whole split).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

from imram.data import PrecompDataset
from imram.errors import ConfigError, DataError
from imram.evaluation import encode_split
from imram.models.interface import CrossAttentionModel, EmbeddingModel, RetrievalModel
from imram.retrieval.fusion import Fusion


class Search(Protocol):
    """Ranks a split's pictures for a description and its descriptions for a picture."""

    def images_for(self, text: str, k: int) -> Tensor:
        """The ``k`` best pictures for ``text``, best first."""
        ...

    def captions_for(self, features: Tensor, k: int) -> Tensor:
        """The ``k`` best descriptions for a picture's regions ``[R, img_dim]``, best first."""
        ...


class GallerySearch:
    """One model over an encoded split (both modalities held, prepared for a cross-attention
    model): a query is encoded and scored against every item of the other modality."""

    def __init__(
        self, model: RetrievalModel, dataset: PrecompDataset, device: str | torch.device = "cpu"
    ) -> None:
        if dataset.vocab is None:
            raise DataError(f"{dataset}: a gallery search needs the model's vocabulary")
        self.model, self.dataset, self.device = model.eval(), dataset, device
        with torch.no_grad():
            self.images, self.captions, self.lengths = encode_split(
                model,
                dataset,
                range(dataset.num_images),
                range(dataset.num_captions),
                device=device,
            )
        self.cross = isinstance(model, CrossAttentionModel)
        self.prepared_images = self.prepared_captions = None
        if self.cross:
            with torch.no_grad():
                self.prepared_images = model.prepare_images(self.images)
                self.prepared_captions = model.prepare_captions(self.captions, self.lengths)

    @torch.no_grad()
    def encode_text(self, text: str) -> tuple[Any, Tensor]:
        """A description as a query: its embedding (prepared for a cross-attention model) and
        its length ``[1]``."""
        tokens = self.dataset.vocab.encode(text)
        length = torch.tensor([len(tokens)], device=self.device)
        query = self.model.encode_captions(torch.tensor([tokens], device=self.device), length)
        return (self.model.prepare_captions(query, length) if self.cross else query), length

    @torch.no_grad()
    def encode_picture(self, features: Tensor) -> Any:
        """A picture's regions ``[R, img_dim]`` as a query (prepared for a cross-attention
        model)."""
        query = self.model.encode_images(features[None].to(self.device))
        return self.model.prepare_images(query) if self.cross else query

    @torch.no_grad()
    def image_scores(self, text: str, rows: Tensor | None = None) -> Tensor:
        """``text``'s scores ``[n]`` against the pictures ``rows`` (all when None)."""
        query, length = self.encode_text(text)
        side = self.prepared_images if self.cross else self.images
        if rows is not None:
            side = side.take(rows) if self.cross else side[rows]
        return self.model.similarity(side, query, length)[:, 0]

    @torch.no_grad()
    def caption_scores(self, features: Tensor, cols: Tensor | None = None) -> Tensor:
        """A picture's scores ``[n]`` against the descriptions ``cols`` (all when None)."""
        side, lengths = (self.prepared_captions if self.cross else self.captions), self.lengths
        if cols is not None:
            side, lengths = (side.take(cols) if self.cross else side[cols]), lengths[cols]
        return self.model.similarity(self.encode_picture(features), side, lengths)[0]

    def images_for(self, text: str, k: int) -> Tensor:
        scores = self.image_scores(text)
        return torch.topk(scores, min(k, len(scores))).indices

    def captions_for(self, features: Tensor, k: int) -> Tensor:
        scores = self.caption_scores(features)
        return torch.topk(scores, min(k, len(scores))).indices


class TwoStageSearch:
    """``first``'s dot products pick each query's ``shortlist`` candidates; ``second`` re-scores
    only those (ranked by both stages' fused scores with ``fusion``). A true match outside the
    shortlist is never seen."""

    def __init__(
        self,
        first: GallerySearch,
        second: GallerySearch,
        shortlist: int,
        fusion: Fusion | None = None,
    ) -> None:
        if not isinstance(first.model, EmbeddingModel):
            raise ConfigError(f"the first stage must be an embedding model, not {first.model!r}")
        if shortlist < 1:
            raise ConfigError(f"shortlist={shortlist} must be >= 1")
        self.first, self.second, self.shortlist = first, second, shortlist
        self.fusion = fusion

    def _ranked(self, candidates: Tensor, first: Tensor, second: Tensor, k: int) -> Tensor:
        if self.fusion is not None:
            fused = self.fusion.combine(first.double().cpu().numpy(), second.cpu().numpy())
            second = torch.from_numpy(fused).to(second.device)
        return candidates[torch.topk(second, min(k, len(candidates))).indices]

    def images_for(self, text: str, k: int) -> Tensor:
        first = self.first.image_scores(text)
        rows = torch.topk(first, min(self.shortlist, len(first))).indices
        return self._ranked(rows, first[rows], self.second.image_scores(text, rows), k)

    def captions_for(self, features: Tensor, k: int) -> Tensor:
        first = self.first.caption_scores(features)
        cols = torch.topk(first, min(self.shortlist, len(first))).indices
        return self._ranked(cols, first[cols], self.second.caption_scores(features, cols), k)


@dataclass
class QueryCost:
    """Mean milliseconds of one query: a description ranking every picture (``t2i_ms``) and a
    picture ranking every description (``i2t_ms``), over ``queries`` timed queries each way."""

    t2i_ms: float
    i2t_ms: float
    queries: int


def _timed(count: int, run: Callable[[int], Tensor]) -> float:
    """Mean milliseconds of ``run(q)`` over ``q = 0..count-1``, after one untimed call."""
    run(0)
    start = time.perf_counter()
    for q in range(count):
        run(q)
    return 1000 * (time.perf_counter() - start) / count


def _spread(count: int, queries: int) -> list[int]:
    """``queries`` item numbers spread evenly over ``0..count-1`` (every item when fewer)."""
    n = min(count, queries)
    return [i * count // n for i in range(n)]


def query_cost(
    search: Search, dataset: PrecompDataset, queries: int = 50, k: int = 10
) -> QueryCost:
    """Time ``search`` on ``queries`` descriptions and pictures of ``dataset``, spread over
    the split, each answered alone with its best ``k``."""
    texts = [dataset.captions[j] for j in _spread(dataset.num_captions, queries)]
    pictures = _spread(dataset.num_images, queries)
    t2i = _timed(len(texts), lambda q: search.images_for(texts[q], k))
    i2t = _timed(len(pictures), lambda q: search.captions_for(dataset.image(pictures[q]), k))
    return QueryCost(t2i, i2t, len(texts))
