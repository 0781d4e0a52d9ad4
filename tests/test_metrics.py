"""Metrics on hand-computed cases, against a plain double loop, and their error paths."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from imram.errors import DataError
from imram.metrics import (
    METRIC_KEYS,
    PROTOCOLS,
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
    # Row 0: 0.9 is top → 1. Row 1: 0.8 is above 0.7 → 2. Row 2: 0.95, 0.6 above 0.3 → 3.
    assert ranks_i2t(sims, cap2img).tolist() == [1, 2, 3]
    # Column 0: 0.95 above 0.9 → 2. Column 1: 0.7 is top → 1. Column 2: 0.5 above 0.3 → 2.
    assert ranks_t2i(sims, cap2img).tolist() == [2, 1, 2]
    m = evaluate_sims(sims, cap2img)
    assert list(m) == list(METRIC_KEYS)
    assert m["i2t_r1"] == pytest.approx(100 / 3)
    assert m["i2t_r5"] == m["i2t_r10"] == 100
    assert m["i2t_medr"] == 2 and m["i2t_meanr"] == 2
    assert m["t2i_r1"] == pytest.approx(100 / 3)
    assert m["t2i_r5"] == m["t2i_r10"] == 100
    assert m["t2i_medr"] == 2 and m["t2i_meanr"] == pytest.approx(5 / 3)
    assert m["rsum"] == pytest.approx(2 * (100 / 3) + 400)


def test_two_images_ten_captions_best_of_five():
    sims = np.array(
        [
            [0.2, 0.7, 0.4, 0.1, 0.3, 0.9, 0.8, 0.5, 0.6, 0.0],
            [0.5, 0.5, 0.9, 0.5, 0.3, 0.1, 0.5, 0.2, 0.3, 0.4],
        ]
    )
    cap2img = np.arange(10) // 5
    # Row 0, own captions 0-4 rank 8, 3, 6, 9, 7 (caption 1: only 0.9 and 0.8 above) → best 3.
    # Row 1, own captions 5-9 rank 10, 5, 9, 7, 6 (caption 6's 0.5 ties four others) → best 5.
    assert ranks_i2t(sims, cap2img).tolist() == [3, 5]
    # Captions 1 and 9 beat the other image; caption 4 ties it (0.3 vs 0.3) and ranks 2.
    assert ranks_t2i(sims, cap2img).tolist() == [2, 1, 2, 2, 2, 2, 2, 2, 2, 1]
    m = evaluate_sims(sims, cap2img)
    assert (m["i2t_r1"], m["i2t_r5"], m["i2t_r10"]) == (0, 100, 100)
    assert m["i2t_medr"] == 4 and m["i2t_meanr"] == 4  # 0-based ranks 2, 4 → median 3
    assert (m["t2i_r1"], m["t2i_r5"], m["t2i_r10"]) == (20, 100, 100)
    assert m["t2i_medr"] == 2 and m["t2i_meanr"] == pytest.approx(1.8)
    assert m["rsum"] == pytest.approx(420)


def test_all_equal_scores_rank_last():
    m = evaluate_sims(np.zeros((4, 20)), np.arange(20) // 5)
    assert m["i2t_r1"] == m["i2t_r5"] == m["i2t_r10"] == 0  # every image ranks 20
    assert m["t2i_r1"] == 0 and m["t2i_r5"] == m["t2i_r10"] == 100  # every caption ranks 4
    assert m["i2t_medr"] == 20 and m["i2t_meanr"] == 20
    assert m["t2i_medr"] == 4 and m["t2i_meanr"] == 4
    assert m["rsum"] == 200


def test_partial_tie_counts_against_model():
    sims = np.array([[0.5, 0.5, 0.1], [0.5, 0.2, 0.5], [0.0, 0.0, 0.0]])
    cap2img = np.arange(3)
    # Row 0: 0.5 ties 0.5 → 2; row 1: 0.2 has two 0.5 above → 3; row 2: all three tie → 3.
    assert ranks_i2t(sims, cap2img).tolist() == [2, 3, 3]
    # Column 0: 0.5 ties 0.5 → 2; column 1: 0.5 above 0.2 → 2; column 2: 0.0 is last → 3.
    assert ranks_t2i(sims, cap2img).tolist() == [2, 2, 3]


def test_medr_floors_the_zero_based_median():
    m = recall_metrics(np.array([1, 2, 3, 4]), np.array([1, 1, 1, 10]))
    assert m["i2t_medr"] == 2  # 0-based 0,1,2,3: median 1.5 → floor 1 → +1
    assert m["t2i_medr"] == 1  # 0-based 0,0,0,9: median 0
    assert m["i2t_meanr"] == 2.5 and m["t2i_meanr"] == 3.25
    assert m["i2t_r1"] == 25 and m["t2i_r5"] == 75 and m["t2i_r10"] == 100
    odd = recall_metrics(np.array([1, 2]), np.array([10, 1, 3]))
    assert odd["i2t_medr"] == 1  # 0-based 0, 1: median 0.5 → 0 → +1
    assert odd["t2i_medr"] == 3  # 0-based 0, 2, 9: median 2


def _loop_ranks(sims, cap2img):
    """Plain double loop over the definition: per-caption ranks, then the best per image."""
    n_img, n_cap = sims.shape
    i2t = []
    for i in range(n_img):
        best = n_cap
        for c in range(n_cap):
            if cap2img[c] == i:
                best = min(best, sum(sims[i, o] >= sims[i, c] for o in range(n_cap)))
        i2t.append(int(best))
    t2i = [int(sum(sims[o, c] >= sims[cap2img[c], c] for o in range(n_img))) for c in range(n_cap)]
    return i2t, t2i


@pytest.mark.parametrize("seed", range(5))
def test_vectorised_equals_double_loop_with_ties_and_chunks(seed):
    rng = np.random.default_rng(seed)
    n_img = int(rng.integers(3, 9))
    extra = int(rng.integers(0, 3 * n_img))
    cap2img = np.concatenate([np.arange(n_img), rng.integers(0, n_img, extra)])
    rng.shuffle(cap2img)  # uneven captions per image, in any order
    sims = np.round(rng.random((n_img, len(cap2img))), 1)  # many ties
    i2t, t2i = _loop_ranks(sims, cap2img)
    assert len(set(np.bincount(cap2img).tolist())) > 1 or extra == 0
    for chunk in (1, 7, len(cap2img) + 5):
        assert ranks_i2t(sims, cap2img, chunk=chunk).tolist() == i2t
        assert ranks_t2i(sims, cap2img, chunk=chunk).tolist() == t2i
    as_float32 = torch.tensor(sims, dtype=torch.float32)  # ties must survive the dtype
    assert ranks_i2t(as_float32, torch.tensor(cap2img)).tolist() == i2t
    assert ranks_t2i(as_float32, torch.tensor(cap2img)).tolist() == t2i
    expected = recall_metrics(np.array(i2t), np.array(t2i))
    assert evaluate_sims(sims, cap2img) == expected
    assert evaluate_sims(sims, cap2img, "5k") == expected


def _fold_matrix():
    """10 images × 50 captions (5 each); in fold f, image 2f has f of image 2f+1's captions above.

    Hand results per fold f: i2t ranks [f+1, 1]; t2i ranks 2 for those f captions, else 1. So
    i2t R@1 = 100, 50, 50, 50, 50; t2i R@1 = 100, 90, 80, 70, 60; rsum = 600, 540, 530, 520, 510.
    Scores across folds are 3.0, above everything, so only a fold-wise evaluation scores well.
    """
    cap2img = np.arange(50) // 5
    sims = np.full((10, 50), 3.0)
    for f in range(5):
        a, b = 2 * f, 2 * f + 1
        cols = np.flatnonzero((cap2img == a) | (cap2img == b))
        sims[np.ix_([a, b], cols)] = 0.0
        for c in cols:
            sims[cap2img[c], c] = 1.0 - 0.01 * (c % 5)  # own captions distinct, best 1.0
        sims[a, np.flatnonzero(cap2img == b)[:f]] = 2.0
    return sims, cap2img


def test_five_fold_by_hand_and_averaged():
    sims, cap2img = _fold_matrix()
    result = evaluate_sims(sims, cap2img, "5fold")
    folds = result["folds"]
    assert len(folds) == 5
    assert [fold["rsum"] for fold in folds] == pytest.approx([600, 540, 530, 520, 510])
    assert [fold["i2t_r1"] for fold in folds] == [100, 50, 50, 50, 50]
    assert [fold["t2i_r1"] for fold in folds] == pytest.approx([100, 90, 80, 70, 60])
    assert [fold["i2t_medr"] for fold in folds] == [1, 1, 2, 2, 3]  # floor(f / 2) + 1
    assert [fold["i2t_meanr"] for fold in folds] == [1, 1.5, 2, 2.5, 3]
    assert [fold["t2i_meanr"] for fold in folds] == pytest.approx([1, 1.1, 1.2, 1.3, 1.4])
    assert result["rsum"] == pytest.approx(540)  # the mean; the last fold alone says 510
    assert result["i2t_r1"] == pytest.approx(60) and result["t2i_r1"] == pytest.approx(80)
    assert result["i2t_medr"] == pytest.approx(1.8) and result["i2t_meanr"] == pytest.approx(2)
    assert result["t2i_medr"] == 1 and result["t2i_meanr"] == pytest.approx(1.2)
    assert set(result) == {*METRIC_KEYS, "folds"}
    for key in METRIC_KEYS:
        assert result[key] == pytest.approx(np.mean([fold[key] for fold in folds])), key
    for f, fold in enumerate(folds):
        cols = slice(10 * f, 10 * f + 10)
        assert fold == evaluate_sims(sims[2 * f : 2 * f + 2, cols], cap2img[cols] - 2 * f, "1k")
    # Over the whole matrix the 3.0s rank every image ≥ 41 and every caption's image 9th.
    whole = evaluate_sims(sims, cap2img, "1k")
    assert whole["rsum"] == whole["t2i_r10"] == 100


def test_five_fold_selects_captions_by_image_not_position():
    sims, cap2img = _fold_matrix()
    order = np.random.default_rng(0).permutation(50)
    shuffled = evaluate_sims(sims[:, order], cap2img[order], "5fold")
    plain = evaluate_sims(sims, cap2img, "5fold")
    for key in METRIC_KEYS:
        assert shuffled[key] == pytest.approx(plain[key]), key


def test_protocol_errors_and_bad_input():
    sims = np.zeros((4, 8))
    cap2img = np.arange(8) // 2
    assert PROTOCOLS == ("1k", "5fold", "5k")
    with pytest.raises(ValueError, match="unknown protocol '10k'; valid protocols: 1k, 5fold, 5k"):
        evaluate_sims(sims, cap2img, "10k")
    with pytest.raises(DataError, match="divisible by 5, got 4"):
        evaluate_sims(sims, cap2img, "5fold")
    with pytest.raises(DataError, match=r"cap2img has shape \(7,\), expected \(8,\)"):
        evaluate_sims(sims, cap2img[:7])
    with pytest.raises(DataError, match=r"cap2img\[3\] = 9 is not an image index in \[0, 4\)"):
        evaluate_sims(sims, np.array([0, 1, 2, 9, 0, 1, 2, 3]))
    with pytest.raises(DataError, match=r"cap2img\[0\] = -1"):
        ranks_i2t(sims, np.array([-1, 1, 2, 3, 0, 1, 2, 3]))
    with pytest.raises(DataError, match="image 3 has no caption"):
        evaluate_sims(sims, np.array([0, 1, 2, 0, 0, 1, 2, 1]))
    with pytest.raises(DataError, match="integer image indices"):
        evaluate_sims(sims, cap2img.astype(float))
    with pytest.raises(DataError, match=r"2-D \[n_images, n_captions\], got shape \(8,\)"):
        evaluate_sims(np.zeros(8), cap2img)
    with pytest.raises(DataError, match="empty"):
        ranks_t2i(np.zeros((0, 8)), cap2img)
    with pytest.raises(DataError, match="real numbers"):
        evaluate_sims(sims.astype(complex), cap2img)
    bad = sims.copy()
    bad[1, 2] = np.nan
    with pytest.raises(DataError, match=r"NaN \(1 entries, first at \[1, 2\]\)"):
        evaluate_sims(bad, cap2img)
    with pytest.raises(DataError, match="NaN"):
        ranks_t2i(torch.tensor(bad, dtype=torch.float32), cap2img)
    with pytest.raises(ValueError, match="chunk must be a positive integer"):
        ranks_i2t(sims, cap2img, chunk=0)
    with pytest.raises(DataError, match="non-empty 1-D"):
        recall_metrics(np.array([], dtype=int), np.array([1]))
    with pytest.raises(DataError, match="1-based"):
        recall_metrics(np.array([0, 1]), np.array([1]))


def test_torch_input_accepted():
    sims = torch.eye(3, requires_grad=True) + 0.1
    m = evaluate_sims(sims, torch.arange(3))
    assert m["rsum"] == 600
    tied = torch.zeros(2, 4, dtype=torch.bfloat16)
    assert ranks_i2t(tied, torch.tensor([0, 0, 1, 1])).tolist() == [4, 4]
    assert ranks_t2i(tied, torch.tensor([0, 0, 1, 1])).tolist() == [2, 2, 2, 2]
    assert ranks_i2t(sims, torch.arange(3)).dtype == np.int64


def test_chance_matches_enumeration():
    """The average over every ranking of a tiny gallery equals the closed form."""
    n_img, cap2img = 3, np.array([0, 0, 1, 2, 2, 2])
    keys = [k for k in METRIC_KEYS if not k.endswith("medr")]
    totals = dict.fromkeys(keys, 0.0)
    i2t_ranks = []
    perms = list(itertools.permutations(range(6)))
    img_perms = list(itertools.permutations(range(3)))
    for p in perms:
        for q in img_perms:
            # Every row orders the captions by p and every column the images by q.
            sims = np.array(p, dtype=float)[None, :] + 10 * np.array(q, dtype=float)[:, None]
            i2t, t2i = ranks_i2t(sims, cap2img), ranks_t2i(sims, cap2img)
            i2t_ranks.extend(i2t.tolist())
            m = recall_metrics(i2t, t2i)
            for key in keys:
                totals[key] += m[key]
    n = len(perms) * len(img_perms)
    chance = chance_metrics(n_img, 6, cap2img)
    assert list(chance) == list(METRIC_KEYS)
    for key, total in totals.items():
        assert chance[key] == pytest.approx(total / n), key
    cdf = np.cumsum(np.bincount(i2t_ranks, minlength=7)[1:]) / len(i2t_ranks)
    assert chance["i2t_medr"] == np.flatnonzero(cdf >= 0.5)[0] + 1
    assert chance["t2i_medr"] == 2 and chance["t2i_r5"] == 100


def test_chance_closed_forms():
    coco = chance_metrics(1000, 5000)  # five captions per image by default
    assert coco["t2i_r1"] == pytest.approx(0.1) and coco["t2i_r10"] == pytest.approx(1.0)
    for k in (1, 5, 10):
        assert coco[f"i2t_r{k}"] == pytest.approx(
            100 * (1 - math.comb(4995, k) / math.comb(5000, k)), rel=1e-12
        )
    assert coco["i2t_meanr"] == pytest.approx(5001 / 6) and coco["t2i_meanr"] == 500.5
    assert coco["t2i_medr"] == 500
    mixed = chance_metrics(2, 12, np.array([0] * 4 + [1] * 8))
    expected = 100 * (2 - math.comb(8, 5) / math.comb(12, 5) - math.comb(4, 5)) / 2
    assert mixed["i2t_r5"] == pytest.approx(expected)
    with pytest.raises(DataError, match="n_images <= n_captions"):
        chance_metrics(10, 5)
    with pytest.raises(DataError, match="image 1 has no caption"):
        chance_metrics(2, 3, np.array([0, 0, 0]))


def test_format_table_layout():
    text = format_table(evaluate_sims(np.eye(5), np.arange(5)), title="demo")
    lines = text.splitlines()
    assert lines[0] == "demo"
    assert lines[1].split() == "i2t R@1 R@5 R@10 | t2i R@1 R@5 R@10 | rsum".split()
    assert lines[2].split() == ["100.0"] * 3 + ["|"] + ["100.0"] * 3 + ["|", "600.0"]
    assert lines[3] == "i2t medr 1.0 meanr 1.0  t2i medr 1.0 meanr 1.0"
    sims, cap2img = _fold_matrix()
    folded = format_table(evaluate_sims(sims, cap2img, "5fold"), title="coco")
    assert folded.splitlines()[0] == "coco (mean of 5 folds)"
    assert "i2t medr 1.8 meanr 2.0" in folded and "540.0" in folded
    assert not format_table(evaluate_sims(np.eye(5), np.arange(5))).startswith("demo")
    with pytest.raises(ValueError, match="lacks rsum"):
        format_table({k: 0.0 for k in METRIC_KEYS if k != "rsum"})
