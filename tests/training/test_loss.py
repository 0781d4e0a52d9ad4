"""The hinge triplet loss against hand-computed values; InfoNCE against a plain softmax."""

from __future__ import annotations

import math

import pytest
import torch

from imram.training.loss import contrastive_loss, triplet_loss

SIMS = torch.tensor([[0.9, 0.8, 0.1], [0.3, 0.5, 0.6], [0.2, 0.1, 0.7]])


def test_hardest_negative_by_hand():
    # Rows (image → captions), margin 0.2: row0 max(0.1, 0) = 0.1; row1 max(0, 0.3) = 0.3;
    # row2 max(0, 0) = 0. Columns (caption → images): col0 max(0, 0) = 0; col1 max(0.5, 0) = 0.5;
    # col2 max(0, 0.1) = 0.1.
    assert triplet_loss(SIMS, 0.2).item() == pytest.approx(0.1 + 0.3 + 0.5 + 0.1)


def test_sum_of_violations_by_hand():
    rows = (0.1 + 0.0) + (0.0 + 0.3) + (0.0 + 0.0)
    cols = (0.0 + 0.0) + (0.5 + 0.0) + (0.0 + 0.1)
    assert triplet_loss(SIMS, 0.2, hardest=False).item() == pytest.approx(rows + cols)


def test_collapsed_scores_give_two_b_margin():
    sims = torch.full((8, 8), 0.3)
    assert triplet_loss(sims, 0.2).item() == pytest.approx(2 * 8 * 0.2)


def test_positive_mask_removes_same_image_negatives():
    positives = torch.zeros(3, 3, dtype=torch.bool)
    positives[1, 0] = positives[0, 1] = True
    # Without pairs (0,1) and (1,0): row0 0, row1 0.3 (caption 2), row2 0; col0 0,
    # col1 0 (image 0 excluded), col2 0.1 (image 1).
    assert triplet_loss(SIMS, 0.2, positives=positives).item() == pytest.approx(0.3 + 0.1)


def test_rejects_non_square():
    with pytest.raises(ValueError, match="square"):
        triplet_loss(torch.zeros(2, 3))


def test_contrastive_loss_equals_a_plain_softmax_per_query():
    torch.manual_seed(0)
    sims = torch.randn(5, 5, dtype=torch.float64)
    expected = 0.0
    for b in range(5):
        row = torch.exp(sims[b] / (3 * 0.1))
        col = torch.exp(sims[:, b] / (3 * 0.1))
        expected += -math.log(row[b] / row.sum()) - math.log(col[b] / col.sum())
    got = contrastive_loss(sims, 0.1, terms=3)
    assert float(got) == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError, match="square"):
        contrastive_loss(torch.zeros(2, 3), 0.1)


def test_infonce_needs_every_pair_in_autograd():
    from imram.config import TrainConfig
    from imram.errors import ConfigError

    with pytest.raises(ConfigError, match="train.mining: off"):
        TrainConfig(loss="infonce").validate()
    with pytest.raises(ConfigError, match="train.loss"):
        TrainConfig(loss="ntxent", mining="off").validate()
    with pytest.raises(ConfigError, match="train.temperature"):
        TrainConfig(loss="infonce", mining="off", temperature=0.0).validate()
