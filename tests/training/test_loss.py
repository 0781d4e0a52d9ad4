"""The hinge triplet loss against hand-computed values."""

from __future__ import annotations

import pytest
import torch

from imram.training.loss import triplet_loss

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
