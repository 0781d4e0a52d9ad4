"""Two-stage retrieval: shortlist by a dot product, re-rank with IMRAM; misses outside it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from imram.metrics import evaluate_sims
from imram.models import build_model
from imram.retrieval.two_stage import evaluate_two_stage, model_pair_scorer, top_k
from imram.scoring import block_similarity


@pytest.fixture(scope="module")
def gallery():
    """Random IMRAM and VSE++ models over 12 images with 1-3 captions each."""
    torch.manual_seed(0)
    dims = dict(embed_dim=24, word_dim=16, img_dim=20, vocab_size=40)
    imram = build_model("imram_full", steps=2, **dims).eval()
    vsepp = build_model("vsepp", **dims).eval()
    cap2img = np.repeat(np.arange(12), [1, 2, 3] * 4)
    n_cap = len(cap2img)
    features = torch.randn(12, 5, 20)
    lengths = torch.randint(2, 7, (n_cap,))
    tokens = torch.randint(4, 40, (n_cap, 6)) * (torch.arange(6) < lengths[:, None])
    with torch.no_grad():
        first = (vsepp.encode_images(features) @ vsepp.encode_captions(tokens, lengths).T).numpy()
        img, cap = imram.encode_images(features), imram.encode_captions(tokens, lengths)
        second = block_similarity(imram, img, cap, lengths).numpy()
    scorer = model_pair_scorer(imram, img, cap, lengths, budget_mb=64)
    return first, second, scorer, cap2img


def _reference(first, second, cap2img, k):
    """Per query: keep its k best candidates by ``first``, order them by ``second``; a query
    whose true match is not among them is a miss."""
    n_img, n_cap = first.shape
    r_t2i = []
    for j in range(n_cap):
        short = list(np.argsort(-first[:, j], kind="stable")[:k])
        if cap2img[j] not in short:
            r_t2i.append(n_img)
            continue
        order = sorted(short, key=lambda i: -second[i, j])
        r_t2i.append(order.index(cap2img[j]) + 1)
    r_i2t = []
    for i in range(n_img):
        short = list(np.argsort(-first[i], kind="stable")[:k])
        own = [j for j in short if cap2img[j] == i]
        if not own:
            r_i2t.append(n_cap)
            continue
        order = sorted(short, key=lambda j: -second[i, j])
        r_i2t.append(min(order.index(j) for j in own) + 1)
    recalls = {}
    for name, ranks in (("i2t", r_i2t), ("t2i", r_t2i)):
        for r in (1, 5, 10):
            recalls[f"{name}_r{r}"] = 100 * float(np.mean(np.asarray(ranks) <= r))
    return recalls


@pytest.mark.parametrize("k", [1, 3, 7])
def test_shortlist_recalls_equal_a_per_query_reference(gallery, k):
    first, second, scorer, cap2img = gallery
    metrics = evaluate_two_stage(first, scorer, cap2img, k)
    for key, value in _reference(first, second, cap2img, k).items():
        assert metrics[key] == pytest.approx(value), key
    one_stage = evaluate_sims(first, cap2img)
    if k in (1, 5, 10):
        assert metrics["t2i_in_shortlist"] == pytest.approx(one_stage[f"t2i_r{k}"])
    n_img, n_cap = first.shape
    assert k * max(n_img, n_cap) <= metrics["pairs_scored"] <= k * (n_img + n_cap)


def test_shortlist_of_everything_equals_the_one_stage_ranking(gallery):
    first, second, scorer, cap2img = gallery
    metrics = evaluate_two_stage(first, scorer, cap2img, k=10_000)
    expected = evaluate_sims(second, cap2img)
    for key, value in expected.items():
        assert metrics[key] == pytest.approx(value), key
    assert metrics["i2t_in_shortlist"] == metrics["t2i_in_shortlist"] == 100.0
    assert metrics["pairs_scored"] == first.size


def test_five_folds_shortlist_within_each_fold(gallery):
    first, second, scorer, cap2img = gallery
    keep = cap2img < 10  # 10 images: five folds of two
    first, second, cap2img = first[:10][:, keep], second[:10][:, keep], cap2img[keep]
    cols = np.flatnonzero(keep)

    def fold_scorer(rows, captions):
        return scorer(rows, cols[captions])

    metrics = evaluate_two_stage(first, fold_scorer, cap2img, k=10_000, protocol="5fold")
    expected = evaluate_sims(second, cap2img, "5fold")
    assert metrics["rsum"] == pytest.approx(expected["rsum"])
    assert len(metrics["folds"]) == 5


def test_top_k_is_best_first_and_clamped():
    scores = np.array([[0.1, 0.9, 0.5, 0.7], [3.0, 1.0, 2.0, 0.0]])
    assert top_k(scores, 2).tolist() == [[1, 3], [0, 2]]
    assert top_k(scores, 9).tolist() == [[1, 3, 2, 0], [0, 2, 1, 3]]
