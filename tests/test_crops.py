"""Base-crop grid, random crops and overlap labels, checked against hand-computed cases."""

import pytest
import torch

from voco_lib.config import PRESETS, ViewConfig
from voco_lib.crops import augment_into, draw_augmentation, extract, grid_boxes, make_views, overlap_labels, random_boxes


def box(*starts_sizes):
    return torch.tensor([[[s, s + n] for s, n in starts_sizes]])


TPAMI_BASES = grid_boxes((192, 192, 64), (3, 3, 1))


def test_grid_layout_is_i_major():
    assert TPAMI_BASES.shape == (9, 3, 2)
    # k = 3*i + j: k=5 is i=1 (x 64..128), j=2 (y 128..192), full depth
    assert TPAMI_BASES[5].tolist() == [[64, 128], [128, 192], [0, 64]]


def test_centred_crop_is_one_base():
    labels = overlap_labels(box((64, 64), (64, 64), (0, 64)), TPAMI_BASES)
    assert labels[0].tolist() == [0, 0, 0, 0, 1, 0, 0, 0, 0]


def test_crop_on_grid_corner_splits_in_four():
    labels = overlap_labels(box((32, 64), (32, 64), (0, 64)), TPAMI_BASES)[0]
    expected = torch.zeros(9)
    expected[[0, 1, 3, 4]] = 0.25
    assert torch.allclose(labels, expected)


def test_crop_touching_edges_counts_no_touching_neighbour():
    # x [64, 128) touches cells 0 and 2 at their borders; y [0, 64) touches the region edge.
    labels = overlap_labels(box((64, 64), (0, 64), (0, 64)), TPAMI_BASES)[0]
    assert labels.tolist() == [0, 0, 0, 1, 0, 0, 0, 0, 0]


def test_spec_worked_example():
    # Luffy03/Large-Scale-Medical Self-supervised/utils/voco_trans.py:L80-145: centre (80, 100) -> x [48, 112), y [68, 132)
    labels = overlap_labels(box((48, 64), (68, 64), (0, 64)), TPAMI_BASES)[0]
    expected = torch.zeros(9)
    expected[1], expected[2], expected[4], expected[5] = 16 * 60 / 4096, 16 * 4 / 4096, 48 * 60 / 4096, 48 * 4 / 4096
    assert torch.allclose(labels, expected)
    assert expected[[1, 2, 4, 5]].tolist() == [0.234375, 0.015625, 0.703125, 0.046875]


def test_3d_grid_with_depth_splits():
    bases = grid_boxes((64, 64, 64), (2, 2, 2))  # k = 4i + 2j + l
    centred = overlap_labels(box((16, 32), (16, 32), (16, 32)), bases)[0]
    assert torch.allclose(centred, torch.full((8,), 1 / 8))
    labels = overlap_labels(box((0, 32), (16, 32), (8, 32)), bases)[0]
    expected = torch.tensor([0.375, 0.125, 0.375, 0.125, 0, 0, 0, 0])
    assert torch.allclose(labels, expected)


def test_non_square_region():
    bases = grid_boxes((96, 64, 32), (3, 2, 1))  # k = 2i + j
    labels = overlap_labels(box((40, 32), (10, 32), (0, 32)), bases)[0]
    expected = torch.zeros(6)
    expected[2], expected[3], expected[4], expected[5] = 0.75 * 22 / 32, 0.75 * 10 / 32, 0.25 * 22 / 32, 0.25 * 10 / 32
    assert torch.allclose(labels, expected)


def test_cvpr_preset_geometry_and_label():
    cfg = PRESETS["cvpr"]
    assert cfg.base_size == (96, 96, 96) and cfg.n_bases == 16 and cfg.out_size == (64, 64, 64)
    bases = grid_boxes(cfg.region, cfg.grid)  # k = 4i + j
    labels = overlap_labels(box((48, 96), (120, 96), (0, 96)), bases)[0]
    expected = torch.zeros(16)
    expected[1], expected[2], expected[5], expected[6] = 0.375, 0.125, 0.375, 0.125
    assert torch.allclose(labels, expected)


def test_rows_sum_to_one_and_translation_invariance():
    g = torch.Generator().manual_seed(3)
    for region, grid in [((192, 192, 64), (3, 3, 1)), ((64, 96, 48), (2, 3, 2)), ((384, 384, 96), (4, 4, 1))]:
        bases = grid_boxes(region, grid)
        crops = random_boxes(region, tuple(r // n for r, n in zip(region, grid)), 50, g)
        labels = overlap_labels(crops, bases)
        assert torch.allclose(labels.sum(1), torch.ones(50), atol=1e-6)
        assert (labels >= 0).all() and (labels <= 1).all()
        shift = torch.tensor([[7, -3], [11, 0], [-5, 2]])[:, :1]  # same shift for start and stop
        assert torch.equal(overlap_labels(crops + shift, bases + shift), labels)


def test_random_boxes_stay_inside_and_cover_the_authors_range():
    g = torch.Generator().manual_seed(0)
    boxes = random_boxes((192, 192, 64), (64, 64, 64), 20000, g)
    assert (boxes[..., 0] >= 0).all() and (boxes[..., 1] <= torch.tensor([192, 192, 64])).all()
    starts = boxes[:, :2, 0]
    assert starts.min() == 0 and starts.max() == 128  # centres 32..159, as upstream
    assert (boxes[:, 2].tolist() == [[0, 64]] * 20000)


def test_views_shapes_exact_crops_and_determinism():
    cfg = ViewConfig(region=(64, 64, 32), grid=(2, 2, 1), n_random=3, augment=False)
    region = torch.randn(2, 64, 64, 32)
    v = make_views(region, cfg, torch.Generator().manual_seed(1))
    assert v.random.shape == (3, 2, 32, 32, 32) and v.bases.shape == (4, 2, 32, 32, 32)
    assert v.labels.shape == (3, 4) and v.labels.dtype == torch.float32
    for crops, boxes in [(v.random, v.random_boxes), (v.bases, v.base_boxes)]:
        for crop, b in zip(crops, boxes):
            assert torch.equal(crop, region[:, b[0, 0]:b[0, 1], b[1, 0]:b[1, 1], b[2, 0]:b[2, 1]])
    assert torch.equal(v.labels, overlap_labels(v.random_boxes, v.base_boxes))
    w = make_views(region, cfg, torch.Generator().manual_seed(1))
    assert torch.equal(v.random, w.random) and torch.equal(v.random_boxes, w.random_boxes)


def _candidates(crop):
    """All outputs of the augmentation group on one crop, up to an intensity offset."""
    out = []
    for fx in (0, 1):
        for fy in (0, 1):
            for fz in (0, 1):
                c = crop
                for axis, f in enumerate((fx, fy, fz)):
                    if f:
                        c = c.flip(1 + axis)
                for k in range(4):
                    out.append(c.rot90(k, dims=(1, 2)))
    return out


def test_augmentation_is_a_flip_rot_shift_of_the_exact_crop():
    cfg = ViewConfig(region=(64, 64, 32), grid=(2, 2, 1), n_random=4, flip_p=0.5, rot90_p=0.5, shift_p=0.5)
    region = torch.randn(1, 64, 64, 32)
    aug = make_views(region, cfg, torch.Generator().manual_seed(5))
    exact = make_views(region, ViewConfig(**{**cfg.__dict__, "augment": False}), torch.Generator().manual_seed(5))
    changed = 0
    for a, e in zip(torch.cat([aug.random, aug.bases]), torch.cat([exact.random, exact.bases])):
        offset = (a - e).mean() if torch.allclose(a - (a - e).mean(), e, atol=1e-5) else None
        matches = [c for c in _candidates(e) if torch.allclose(a - (a.mean() - c.mean()), c, atol=1e-5)]
        assert matches, "augmented crop is not a flip/rot90/shift of the exact crop"
        assert abs(float(a.mean() - matches[0].mean())) <= 0.1 + 1e-6
        changed += offset is None or abs(float(offset)) > 1e-7
    assert changed > 0


def test_augmentation_draws_match_the_configured_probabilities():
    cfg = ViewConfig(region=(8, 8, 8), grid=(1, 1, 1))
    aug = draw_augmentation(20000, cfg, torch.Generator().manual_seed(0))
    assert torch.allclose(aug.flips.float().mean(0), torch.full((3,), 0.2), atol=0.015)
    assert abs((aug.k > 0).float().mean() - 0.2) < 0.015 and set(aug.k.unique().tolist()) == {0, 1, 2, 3}
    assert abs((aug.offset != 0).float().mean() - 0.5) < 0.015 and aug.offset.abs().max() <= 0.1
    off = draw_augmentation(10, ViewConfig(region=(8, 8, 8), grid=(1, 1, 1), augment=False))
    assert not off.flips.any() and not off.k.any() and not off.offset.any()


def test_augment_into_equals_flip_then_rot90_then_shift():
    crop = torch.randn(2, 6, 6, 5)
    for flips in [(0, 0, 0), (1, 0, 0), (0, 1, 1), (1, 1, 1)]:
        for k in range(4):
            expected = crop
            for axis, f in enumerate(flips):
                if f:
                    expected = expected.flip(1 + axis)
            expected = torch.rot90(expected, k, dims=(1, 2)) + 0.05
            out = torch.empty_like(crop)
            augment_into(out, crop, list(map(bool, flips)), k, 0.05)
            assert torch.equal(out, expected), (flips, k)


def test_cvpr_views_are_resized():
    v = make_views(torch.randn(1, 384, 384, 96), "cvpr", torch.Generator().manual_seed(0))
    assert v.random.shape == (2, 1, 64, 64, 64) and v.bases.shape == (16, 1, 64, 64, 64)
    assert torch.allclose(v.labels.sum(1), torch.ones(2))


def test_bad_region_and_grid_are_refused():
    with pytest.raises(ValueError, match="region must be"):
        make_views(torch.randn(1, 100, 192, 64), "tpami")
    with pytest.raises(ValueError, match="not divisible"):
        ViewConfig(region=(100, 100, 64), grid=(3, 3, 1))
    with pytest.raises(ValueError, match="unknown view preset"):
        make_views(torch.randn(1, 192, 192, 64), "nope")


def test_extract_matches_slicing():
    region = torch.randn(1, 10, 11, 12)
    boxes = torch.tensor([[[1, 5], [2, 6], [3, 7]], [[6, 10], [0, 4], [8, 12]]])
    crops = extract(region, boxes)
    assert torch.equal(crops[1, 0], region[0, 6:10, 0:4, 8:12])
