"""Downstream metrics against values computed by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from voco_lib.tasks.metrics import (accuracy, auc, dice_per_class, folding_fraction, hd95_per_class,
                                    jacobian_determinant, recall_at_k)


def test_dice_of_overlapping_cubes():
    a = np.zeros((10, 10, 10), np.int64)
    b = a.copy()
    a[2:6, 2:6, 2:6] = 1  # 64 voxels
    b[3:7, 2:6, 2:6] = 1  # 64 voxels, 48 shared -> 2*48/128
    a[8:10, 8:10, 8:10] = 2  # class 2: 8 voxels in the prediction, absent from the reference -> NaN
    d = dice_per_class(a, b, 3)
    assert d[0] == pytest.approx(0.75)
    assert math.isnan(d[1])
    assert dice_per_class(b, b, 2)[0] == pytest.approx(1.0)


def test_hd95_of_parallel_planes_in_mm():
    p = np.zeros((12, 12, 12), np.int64)
    t = p.copy()
    p[2:10, 2:10, 3] = 1
    t[2:10, 2:10, 6] = 1  # every surface voxel is 3 voxels away along z
    assert hd95_per_class(p, t, 2, spacing=(1.0, 1.0, 2.0))[0] == pytest.approx(6.0)
    assert hd95_per_class(p, t, 2)[0] == pytest.approx(3.0)
    assert hd95_per_class(np.zeros_like(t), t, 2)[0] == math.inf  # missed structure


def test_recall_at_k_on_a_toy_similarity_matrix():
    s = torch.tensor([[0.9, 0.1, 0.0, 0.0],   # match ranked 1st
                      [0.8, 0.5, 0.0, 0.0],   # match ranked 2nd
                      [0.9, 0.8, 0.1, 0.0],   # 3rd
                      [0.0, 0.0, 0.0, 0.0]])  # a tie with everything ranks last
    assert recall_at_k(s, 1) == pytest.approx(1 / 4)
    assert recall_at_k(s, 2) == pytest.approx(2 / 4)
    assert recall_at_k(s, 3) == pytest.approx(3 / 4)
    assert recall_at_k(s, 4) == pytest.approx(1.0)
    assert recall_at_k(torch.eye(5), 1) == 1.0
    with pytest.raises(ValueError, match="square"):
        recall_at_k(torch.zeros(2, 3), 1)


def test_folding_fraction_on_toy_fields():
    u = np.zeros((3, 8, 8, 8))
    assert folding_fraction(u) == 0.0
    assert np.allclose(jacobian_determinant(u), 1.0)
    x = np.arange(8, dtype=np.float64)
    u[0] = 0.5 * x[:, None, None]  # stretch x by 1.5: det = 1.5 everywhere
    assert np.allclose(jacobian_determinant(u), 1.5)
    u[0] = -2.0 * x[:, None, None]  # x -> -x: everything folds
    assert folding_fraction(u) == 1.0
    # fold only the first 4 x-slices: d(u_x)/dx = -2 there (central differences straddle the kink at 3..4)
    u[0] = np.where(x < 4, -2.0 * x, -6.0 + 0.0 * x)[:, None, None]
    det = jacobian_determinant(u)[0]
    assert np.allclose(det[:3], -1.0) and np.allclose(det[5:], 1.0)
    assert folding_fraction(u) == pytest.approx(4 / 8)  # slices 0-2 and the kink slice 3 (det = -1)


def test_accuracy_and_auc_by_hand():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [0.0, 3.0], [1.0, 0.0]])
    y = torch.tensor([0, 1, 0, 1])
    assert accuracy(logits, y) == pytest.approx(0.5)
    # positive-class scores: 0.12, 0.73, 0.95, 0.27; positives {0.73, 0.27}, negatives {0.12, 0.95}
    # pairs (pos > neg): 0.73>0.12, 0.27>0.12 -> 2 of 4
    assert auc(logits, y) == pytest.approx(0.5)
    assert auc(torch.tensor([[0.0, 1.0], [1.0, 0.0]]), torch.tensor([1, 0])) == pytest.approx(1.0)
    assert math.isnan(auc(logits, torch.zeros(4)))
    three = torch.eye(3) * 5
    assert auc(three, torch.tensor([0, 1, 2])) == pytest.approx(1.0)
