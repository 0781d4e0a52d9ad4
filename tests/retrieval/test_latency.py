"""One query at a time against a whole split: the rankings equal the full score matrix's, and
a two-stage query ranks the first model's shortlist by the second model's scores."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from imram.data import PrecompDataset
from imram.data.text import Vocabulary
from imram.errors import ConfigError, DataError
from imram.evaluation import evaluate_model
from imram.models import build_model
from imram.retrieval.fusion import Fusion
from imram.retrieval.latency import GallerySearch, TwoStageSearch, query_cost


@pytest.fixture(scope="module")
def split(toy_data):
    vocab = Vocabulary.build(PrecompDataset(toy_data, "train", None).captions, 1)
    return PrecompDataset(toy_data, "test", vocab)


def _models(data: PrecompDataset):
    torch.manual_seed(0)
    dims = dict(embed_dim=16, word_dim=8, img_dim=data.feature_dim, vocab_size=len(data.vocab))
    return {
        "vsepp": build_model("vsepp", **dims).eval(),
        "member": build_model("member", member_bank="learned", member_bank_size=5, **dims).eval(),
        "imram": build_model("imram_full", steps=2, **dims).eval(),
    }


def _matrix(model, data: PrecompDataset) -> np.ndarray:
    _, sims, _ = evaluate_model(model, data, "1k")
    return sims


def _assert_best(got, scores: np.ndarray, k: int) -> None:
    """``got`` holds the ``k`` best of ``scores``, best first (ties, e.g. two pictures with the
    same description, may come in either order)."""
    got = got.tolist()
    assert len(got) == len(set(got)) == k
    assert np.allclose(scores[got], np.sort(scores)[::-1][:k], atol=1e-5)


def _assert_reranked(got, first: np.ndarray, second: np.ndarray, shortlist: int, k: int) -> None:
    """``got`` is the first stage's ``shortlist`` best re-ordered by ``second``, cut to ``k``."""
    got = got.tolist()
    assert len(got) == len(set(got)) == min(k, shortlist)
    assert (first[got] >= np.sort(first)[::-1][shortlist - 1] - 1e-6).all()
    assert (np.diff(second[got]) <= 1e-6).all()


@pytest.mark.parametrize("name", ["vsepp", "member", "imram"])
def test_one_query_ranks_as_the_full_matrix(split, name):
    model = _models(split)[name]
    sims = _matrix(model, split)
    search = GallerySearch(model, split)
    for j in (0, 7, split.num_captions - 1):
        _assert_best(search.images_for(split.captions[j], 5), sims[:, j], 5)
        assert np.allclose(search.image_scores(split.captions[j]).numpy(), sims[:, j], atol=1e-5)
    for i in (0, split.num_images - 1):
        _assert_best(search.captions_for(split.image(i), 7), sims[i], 7)
    rows = torch.tensor([4, 1, 9])
    scores = search.image_scores(split.captions[3], rows).numpy()
    assert np.allclose(scores, sims[[4, 1, 9], 3], atol=1e-5)  # a subset keeps its order
    cols = torch.tensor([20, 2, 11, 40])
    scores = search.caption_scores(split.image(2), cols).numpy()
    assert np.allclose(scores, sims[2, [20, 2, 11, 40]], atol=1e-5)


def test_two_stage_ranks_the_shortlist_by_the_second_model(split):
    models = _models(split)
    first, second = _matrix(models["member"], split), _matrix(models["imram"], split)
    one = GallerySearch(models["member"], split)
    two = GallerySearch(models["imram"], split)
    search = TwoStageSearch(one, two, shortlist=6)
    for j in (0, 30, split.num_captions - 1):
        got = search.images_for(split.captions[j], 4)
        _assert_reranked(got, first[:, j], second[:, j], 6, 4)
    for i in (0, 11):
        got = search.captions_for(split.image(i), 10)  # k above the shortlist: all six
        _assert_reranked(got, first[i], second[i], 6, 10)
    whole = TwoStageSearch(one, two, shortlist=split.num_images)  # every item: one stage
    _assert_best(whole.images_for(split.captions[12], 3), second[:, 12], 3)


def test_fused_two_stage_ranks_the_shortlist_by_both_models(split):
    """With a fusion the shortlist is ordered by the fused scores of both models' own scores
    (a weight of 0 keeps the first model's order)."""
    models = _models(split)
    first, second = _matrix(models["member"], split), _matrix(models["imram"], split)
    fusion = Fusion.standardising(first.ravel(), second.ravel(), 0.8)
    fused = fusion.combine(first, second).reshape(first.shape)
    one = GallerySearch(models["member"], split)
    search = TwoStageSearch(one, GallerySearch(models["imram"], split), 6, fusion)
    for j in (0, 30):
        _assert_reranked(search.images_for(split.captions[j], 6), first[:, j], fused[:, j], 6, 6)
    for i in (0, 11):
        _assert_reranked(search.captions_for(split.image(i), 6), first[i], fused[i], 6, 6)
    kept = TwoStageSearch(one, GallerySearch(models["imram"], split), 6, fusion.with_weight(0))
    _assert_best(kept.images_for(split.captions[5], 6), first[:, 5], 6)


def test_query_cost_times_each_way(split):
    search = GallerySearch(_models(split)["vsepp"], split)
    cost = query_cost(search, split, queries=8)
    assert cost.queries == 8 and cost.t2i_ms > 0 and cost.i2t_ms > 0
    many = query_cost(search, split, queries=10_000)  # capped at the split's items
    assert many.queries == split.num_captions


def test_errors(split, toy_data):
    models = _models(split)
    imram = GallerySearch(models["imram"], split)
    with pytest.raises(ConfigError, match="first stage must be an embedding model"):
        TwoStageSearch(imram, imram, 5)
    with pytest.raises(ConfigError, match="shortlist=0 must be >= 1"):
        TwoStageSearch(GallerySearch(models["vsepp"], split), imram, 0)
    with pytest.raises(DataError, match="needs the model's vocabulary"):
        GallerySearch(models["vsepp"], PrecompDataset(toy_data, "test", None))
