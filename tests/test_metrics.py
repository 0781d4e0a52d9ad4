"""Metrics on hand-computed cases, against a plain double loop, and their error paths."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from imram.errors import DataError
from imram.metrics import (
    chance_metrics,
    evaluate_sims,
    format_table,
    ranks_i2t,
    ranks_t2i,
    recall_metrics,
)


def test_three_by_three_by_hand():
    sims = np.array([[0.9, 0.1, 0.5], [0.8, 0.7, 0.2], [0.95, 0.6, 0.3]])
    cap2img = np.arange(3)
    # Row 0: caption 0 is top → 1. Row 1: 0.7 has 0.8 above → 2. Row 2: 0.3 is last → 3.
    assert ranks_i2t(sims, cap2img).tolist() == [1, 2, 3]
    # Column 0: 0.9 below 0.95 → 2. Column 1: image 1 top → 1. Column 2: 0.3 below 0.5 → 2.
    assert ranks_t2i(sims, cap2img).tolist() == [2, 1, 2]
    m = evaluate_sims(sims, cap2img)
    assert m["i2t_r1"] == pytest.approx(100 / 3) and m["i2t_r5"] == 100
    assert m["t2i_r1"] == pytest.approx(100 / 3)
    assert m["i2t_medr"] == 2 and m["i2t_meanr"] == 2
    assert m["t2i_medr"] == 2 and m["t2i_meanr"] == pytest.approx(5 / 3)
    assert m["rsum"] == pytest.approx(100 / 3 + 100 + 100 + 100 / 3 + 100 + 100)


def test_five_captions_rule_best_of_five():
    rng = np.random.default_rng(0)
    sims = rng.permutation(20).reshape(2, 10).astype(float)
    cap2img = np.arange(10) // 5
    sims[0] = [5, 3, 9, 0, 1, 8, 7, 6, 2, 4]  # image 0's captions 0-4; best is 9 → rank 1
    sims[1] = [9, 8, 7, 6, 5, 4, 3, 2, 1, 0]  # image 1's captions 5-9; best is 4 → rank 6
    assert ranks_i2t(sims, cap2img).tolist() == [1, 6]
    # t2i: caption j's image is j // 5; compare the two scores in its column.
    expected = [1 + int(sims[1 - j // 5, j] >= sims[j // 5, j]) for j in range(10)]
    assert ranks_t2i(sims, cap2img).tolist() == expected


def test_all_equal_scores_rank_last():
    m = evaluate_sims(np.zeros((4, 20)), np.arange(20) // 5)
    assert m["i2t_r1"] == 0 and m["t2i_r1"] == 0 and m["rsum"] == 100 + 100  # R@5, R@10 t2i
    assert m["i2t_meanr"] == 20 and m["t2i_meanr"] == 4
    assert m["i2t_medr"] == 20 and m["t2i_medr"] == 4


def test_partial_tie_counts_against_model():
    sims = np.array([[0.5, 0.5, 0.1], [0.5, 0.2, 0.5], [0.0, 0.0, 0.0]])
    cap2img = np.arange(3)
    # Row 1: 0.2 has 0.5, 0.5 above → 3; row 2: all three tie → 3.
    assert ranks_i2t(sims, cap2img).tolist() == [2, 3, 3]
    # Column 1: 0.2 has 0.5 above → 2; column 2: 0.0 has 0.1, 0.5 above → 3.
    assert ranks_t2i(sims, cap2img).tolist() == [2, 2, 3]


def test_medr_floors_the_zero_based_median():
    m = recall_metrics(np.array([1, 2, 3, 4]), np.array([1, 1, 1, 10]))
    assert m["i2t_medr"] == 2  # 0-based median 1.5 → 1 → +1
    assert m["t2i_medr"] == 1
    assert m["i2t_meanr"] == 2.5 and m["t2i_meanr"] == 3.25


def _loop_ranks(sims, cap2img):
    n_img, n_cap = sims.shape
    i2t = []
    for i in range(n_img):
        best = n_cap
        for c in range(n_cap):
            if cap2img[c] == i:
                best = min(best, sum(sims[i, o] >= sims[i, c] for o in range(n_cap)))
        i2t.append(best)
    t2i = [sum(sims[o, c] >= sims[cap2img[c], c] for o in range(n_img)) for c in range(n_cap)]
    return i2t, t2i


@pytest.mark.parametrize("seed", range(4))
def test_vectorised_equals_double_loop_with_ties_and_chunks(seed):
    rng = np.random.default_rng(seed)
    n_img = 7
    cap2img = np.concatenate([np.arange(n_img), rng.integers(0, n_img, 13)])
    rng.shuffle(cap2img)
    sims = np.round(rng.random((n_img, len(cap2img))), 1)  # many ties
    i2t, t2i = _loop_ranks(sims, cap2img)
    for chunk in (1, 7, 1000):
        assert ranks_i2t(sims, cap2img, chunk=chunk).tolist() == i2t
        assert ranks_t2i(sims, cap2img, chunk=chunk).tolist() == t2i


def _fold_matrix():
    """10 images × 50 captions (5 each); folds 1-4 each hold one image whose captions score last."""
    sims = np.zeros((10, 50))
    cap2img = np.arange(50) // 5
    for c in range(50):
        sims[cap2img[c], c] = 1.0 - 0.01 * (c % 5)  # distinct, so own captions do not tie
    for f in range(1, 5):
        i = 2 * f  # one broken image per fold from fold 1 on
        sims[i, cap2img == i] -= 2.0
    return sims, cap2img


def test_five_fold_averages_every_metric():
    sims, cap2img = _fold_matrix()
    result = evaluate_sims(sims, cap2img, "5fold")
    assert len(result["folds"]) == 5
    for f, fold in enumerate(result["folds"]):
        rows = slice(2 * f, 2 * f + 2)
        cols = slice(10 * f, 10 * f + 10)
        assert fold == evaluate_sims(sims[rows, cols], cap2img[cols] - 2 * f, "1k")
    assert result["folds"][0]["rsum"] == 600
    assert result["folds"][4]["rsum"] < 600
    assert result["rsum"] == pytest.approx(np.mean([f["rsum"] for f in result["folds"]]))
    assert result["rsum"] != result["folds"][-1]["rsum"]
    assert result["i2t_r1"] == pytest.approx((100 + 4 * 50) / 5)


def test_protocol_errors_and_bad_input():
    sims = np.zeros((4, 8))
    cap2img = np.arange(8) // 2
    with pytest.raises(ValueError, match="1k, 5fold, 5k"):
        evaluate_sims(sims, cap2img, "10k")
    with pytest.raises(DataError, match="divisible by 5, got 4"):
        evaluate_sims(sims, cap2img, "5fold")
    with pytest.raises(DataError, match=r"expected \(8,\)"):
        evaluate_sims(sims, cap2img[:7])
    with pytest.raises(DataError, match=r"cap2img\[3\] = 9"):
        evaluate_sims(sims, np.array([0, 1, 2, 9, 0, 1, 2, 3]))
    with pytest.raises(DataError, match="image 3 has no caption"):
        evaluate_sims(sims, np.array([0, 1, 2, 0, 0, 1, 2, 1]))
    with pytest.raises(DataError, match="2-D"):
        evaluate_sims(np.zeros(8), cap2img)
    bad = sims.copy()
    bad[1, 2] = np.nan
    with pytest.raises(DataError, match="NaN"):
        evaluate_sims(bad, cap2img)


def test_torch_input_accepted():
    sims = torch.eye(3) + 0.1
    m = evaluate_sims(sims, torch.arange(3))
    assert m["rsum"] == 600


def test_chance_matches_enumeration():
    """Average over every permutation of a tiny gallery equals the closed form."""
    n_img, cap2img = 3, np.array([0, 0, 1, 2, 2, 2])
    totals = dict.fromkeys(("i2t_r1", "i2t_r5", "t2i_r1", "i2t_meanr", "t2i_meanr"), 0.0)
    perms = list(itertools.permutations(range(6)))
    img_perms = list(itertools.permutations(range(3)))
    for p in perms:
        for q in img_perms:
            sims = np.array(p, dtype=float)[None, :] + 10 * np.array(q, dtype=float)[:, None]
            m = evaluate_sims(sims, cap2img)
            for key in totals:
                totals[key] += m[key]
    n = len(perms) * len(img_perms)
    chance = chance_metrics(n_img, 6, cap2img)
    for key, total in totals.items():
        assert chance[key] == pytest.approx(total / n), key
    assert chance["t2i_r5"] == 100
    assert chance_metrics(1000, 5000)["t2i_r1"] == pytest.approx(0.1)
    assert chance_metrics(1000, 5000)["i2t_r1"] == pytest.approx(
        100 * (1 - math.comb(4999, 5) / math.comb(5000, 5))
    )


def test_format_table_shows_values():
    text = format_table(evaluate_sims(np.eye(5), np.arange(5)), title="demo")
    assert text.splitlines()[0] == "demo"
    assert "100.0" in text and "600.0" in text
