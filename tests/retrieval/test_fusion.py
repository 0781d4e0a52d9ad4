"""Score fusion of two stages: the standardised sum, its limits, and its file."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from imram.errors import DataError
from imram.metrics import evaluate_sims
from imram.retrieval.fusion import Fusion, load_fusion, save_fusion
from imram.retrieval.two_stage import evaluate_two_stage, two_stage_matrices

RECALLS = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10")


@pytest.fixture
def split():
    """A first stage that knows the matches a little and a second that knows them better."""
    rng = np.random.default_rng(0)
    n_img, per = 40, 5
    cap2img = np.repeat(np.arange(n_img), per)
    truth = np.zeros((n_img, n_img * per), np.float32)
    truth[cap2img, np.arange(n_img * per)] = 1.0
    first = (truth + 1.5 * rng.standard_normal(truth.shape)).astype(np.float32)
    second = (3.0 * truth + 2.0 * rng.standard_normal(truth.shape) + 7.0).astype(np.float32)
    return first, second, cap2img


def _scorer(matrix):
    return lambda rows, cols: matrix[rows, cols]


def test_combine_is_the_standardised_sum():
    fusion = Fusion(0.5, 1.0, 2.0, -3.0, 4.0)
    got = fusion.combine(np.array([3.0, 1.0]), np.array([1.0, -7.0]))
    assert got == pytest.approx([(3 - 1) / 2 + 0.5 * (1 + 3) / 4, 0 + 0.5 * (-7 + 3) / 4])
    stats = Fusion.standardising(np.array([1.0, 3.0]), np.array([10.0, 30.0]), 2.0)
    assert (stats.first_mean, stats.first_std, stats.second_mean, stats.second_std) == (
        2.0,
        1.0,
        20.0,
        10.0,
    )


def test_weight_zero_keeps_the_first_ranking_and_a_large_one_the_second(split):
    first, second, cap2img = split
    stats = Fusion.standardising(first.ravel(), second.ravel())
    one_stage = evaluate_sims(first, cap2img)
    kept = evaluate_two_stage(first, _scorer(second), cap2img, 20, fusion=stats.with_weight(0.0))
    for key in RECALLS:  # R@10 within a shortlist of 20 is the first stage's own
        assert kept[key] == pytest.approx(one_stage[key]), key
    reranked = evaluate_two_stage(first, _scorer(second), cap2img, 20)
    dominated = evaluate_two_stage(
        first, _scorer(second), cap2img, 20, fusion=stats.with_weight(1e6)
    )
    assert all(dominated[k] == pytest.approx(reranked[k]) for k in RECALLS)
    fused = evaluate_two_stage(first, _scorer(second), cap2img, 20, fusion=stats)
    assert fused["rsum"] > max(kept["rsum"], reranked["rsum"])  # they err differently


def test_fused_scores_rank_the_union_of_the_shortlists(split):
    first, second, _ = split
    fusion = Fusion.standardising(first.ravel(), second.ravel(), 0.7)
    result = two_stage_matrices(first, _scorer(second), 5, fusion)
    rows, cols = np.nonzero(np.isfinite(result.i2t))
    assert np.allclose(
        result.i2t[rows, cols], fusion.combine(first[rows, cols], second[rows, cols])
    )
    assert (np.isfinite(result.i2t).sum(axis=1) == 5).all()


def _checkpoint(path, seed):
    from imram.checkpoint import load_checkpoint, save_checkpoint
    from imram.config import Config
    from imram.data.text import Vocabulary
    from imram.models import build_model

    torch.manual_seed(seed)
    vocab = Vocabulary.build(["a dog", "a cat"], 1)
    model = build_model("vsepp", embed_dim=8, img_dim=4, word_dim=4, vocab_size=len(vocab))
    save_checkpoint(path, model, Config.from_dict({"model": model.config.to_dict()}), vocab)
    return load_checkpoint(path)


def test_fusion_file_round_trip_and_damage(tmp_path):
    fusion = Fusion(1.25, 0.1, 0.2, 1.5, 0.3)
    first, second = _checkpoint(tmp_path / "a", 0), _checkpoint(tmp_path / "b", 1)
    save_fusion(tmp_path / "f.json", fusion, first, second, split="dev")
    assert load_fusion(tmp_path / "f.json") == fusion
    assert load_fusion(tmp_path / "f.json", first, second) == fusion
    with pytest.raises(DataError, match="f.json: fitted for other second-stage weights"):
        load_fusion(tmp_path / "f.json", first, first)
    (tmp_path / "bad.json").write_text('{"fusion": {"weight": 1}}')
    with pytest.raises(DataError, match="bad.json: not a fusion file"):
        load_fusion(tmp_path / "bad.json")
    (tmp_path / "nan.json").write_text(
        '{"fusion": {"weight": NaN, "first_mean": 0, "first_std": 1, "second_mean": 0, '
        '"second_std": 1}}'
    )
    with pytest.raises(DataError, match="nan.json: fusion weight=nan must be finite"):
        load_fusion(tmp_path / "nan.json")
