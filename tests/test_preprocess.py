"""Preprocessing chains (shape, spacing, orientation, intensity), region sampling, and the on-disk cache."""

from __future__ import annotations

import dataclasses
import json

import nibabel as nib
import numpy as np
import pytest
import torch

from voco_lib.data import cache as cache_mod
from voco_lib.data.cache import load_preprocessed
from voco_lib.data.phantom import class_ids, make_phantom_subject, save_nifti
from voco_lib.data.preprocess import CHAINS, build_chain, preprocess, preprocess_array, sample_region

LIVER = class_ids()["liver"]


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    """One phantom on a coarse 3 mm grid (fast to resample), as int16 HU and uint8 label NIfTIs."""
    d = tmp_path_factory.mktemp("phantom")
    s = make_phantom_subject(0, shape=(80, 80, 64), spacing=3.0)
    save_nifti(d / "img.nii.gz", np.rint(s.image), s.affine, np.int16)
    save_nifti(d / "lab.nii.gz", s.label, s.affine, np.uint8)
    return {"image": str(d / "img.nii.gz"), "label": str(d / "lab.nii.gz"), "subject": s}


@pytest.mark.parametrize("name", ["abdomen", "abdomen_unlabelled", "headneck", "chest", "cvpr"])
def test_ct_chain_spacing_orientation_and_hu_window(phantom, name):
    chain = CHAINS[name]
    out = preprocess({"image": phantom["image"], "label": phantom["label"]}, name)
    img, lab = out["image"], out["label"]
    assert img.shape == lab.shape and img.shape[0] == 1
    assert all(s >= m for s, m in zip(img.shape[1:], chain.min_size))
    np.testing.assert_allclose(img.pixdim.numpy(), chain.spacing or (3.0, 3.0, 3.0), rtol=1e-5)
    assert nib.aff2axcodes(img.affine.numpy()) == ("R", "A", "S")
    assert float(img.min()) >= 0.0 and float(img.max()) <= 1.0
    # HU window: the liver's median HU maps to (hu - lo) / (hi - lo).
    lo, hi = chain.hu_window
    liver_hu = phantom["subject"].attributes["organ_hu"]["liver"]
    got = float(img[lab == LIVER].median())
    assert got == pytest.approx((liver_hu - lo) / (hi - lo), abs=12 / (hi - lo) + 0.005)
    if name == "abdomen":
        # Foreground crop: the box hugs the body (every face touches it), much smaller than the 240 mm FOV.
        x = img[0]
        for axis in range(3):
            assert x.select(axis, 0).max() > 0 and x.select(axis, -1).max() > 0
        # Width: the body's, plus up to 192 mm * sin(3 deg) ~ 10 mm from the phantom's tilt about y.
        body_mm = phantom["subject"].attributes["body"]["width_mm"]
        assert body_mm - 4 <= x.shape[0] * 1.5 <= min(body_mm + 14, 0.95 * 240)


def test_in_memory_phantom_matches_the_file_path(phantom):
    s = phantom["subject"]
    from_file = preprocess({"image": phantom["image"], "label": phantom["label"]}, "abdomen")
    in_memory = preprocess_array(np.rint(s.image), s.affine, "abdomen", label=s.label)
    assert torch.allclose(in_memory["image"], from_file["image"], atol=1e-6)
    assert torch.equal(in_memory["label"].as_tensor(), from_file["label"].as_tensor())
    np.testing.assert_allclose(in_memory["image"].affine, from_file["image"].affine, atol=1e-6)


def test_orientation_and_spacing_keep_world_positions(tmp_path):
    """An LPS-stored volume comes out RAS with the bright cube at the same world position."""
    vol = np.full((40, 30, 20), -1000, np.int16)
    vol[5:15, 20:26, 8:12] = 100
    affine = np.array([[-2.0, 0, 0, 30], [0, -2.0, 0, 40], [0, 0, 3.0, -20], [0, 0, 0, 1]])
    save_nifti(tmp_path / "lps.nii.gz", vol, affine, np.int16)
    idx = np.argwhere(vol == 100).mean(0)
    world_in = affine[:3, :3] @ idx + affine[:3, 3]

    img = preprocess(str(tmp_path / "lps.nii.gz"), "abdomen")["image"]
    a = img.affine.numpy()
    assert nib.aff2axcodes(a) == ("R", "A", "S") and np.allclose(np.diag(a)[:3], 1.5)
    inside = np.argwhere(img[0].numpy() > 0.5).mean(0)
    world_out = a[:3, :3] @ inside + a[:3, 3]
    assert np.linalg.norm(world_out - world_in) < 1.5
    assert float(img.max()) == pytest.approx((100 + 175) / 425, abs=1e-4)  # the HU window, by hand


def test_mri_chain_normalises_the_nonzero_voxels(tmp_path):
    rng = np.random.default_rng(0)
    vol = np.zeros((40, 40, 40), np.float32)
    g = np.mgrid[:40, :40, :40] - 20
    inside = (g**2).sum(0) < 15**2
    vol[inside] = rng.normal(300, 40, inside.sum())
    save_nifti(tmp_path / "mr.nii.gz", vol, np.diag([1.5, 1.5, 1.5, 1]), np.float32)
    img = preprocess(str(tmp_path / "mr.nii.gz"), "mri")["image"][0]
    fg = img != 0
    assert float(img[fg].mean()) == pytest.approx(0, abs=1e-3) and float(img[fg].std()) == pytest.approx(1, abs=1e-2)
    # Cropped to the non-zero box (30 voxels across), then padded to the 64³ minimum.
    assert tuple(img.shape) == (64, 64, 64) and int(fg.sum()) == int(inside.sum())


def test_pretraining_chain_never_loads_the_label(phantom):
    out = build_chain("abdomen")({"image": phantom["image"], "label": "/nonexistent/label.nii.gz"})
    assert isinstance(out["label"], str)  # untouched: never opened, resampled or cached


def test_sample_region_crop_pads_and_picks_a_uniform_subblock():
    vol = torch.arange(2 * 20 * 18 * 12, dtype=torch.float32).reshape(2, 20, 18, 12)
    g = torch.Generator().manual_seed(0)
    starts = set()
    for _ in range(200):
        r = sample_region(vol, (8, 8, 12), g)
        assert r.shape == (2, 8, 8, 12)
        i, j, k = np.unravel_index(int(r[0, 0, 0, 0]), (20, 18, 12))
        assert torch.equal(r, vol[:, i:i + 8, j:j + 8, k:k + 12]) and k == 0
        starts.add((int(i), int(j)))
    assert {s[0] for s in starts} == set(range(13)) and {s[1] for s in starts} == set(range(11))
    a = sample_region(vol, (8, 8, 12), torch.Generator().manual_seed(3))
    b = sample_region(vol, (8, 8, 12), torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    # Smaller than the region in every axis: zero-padded, centred, content intact.
    small = torch.ones(1, 10, 12, 8)
    out = sample_region(small, (16, 16, 16), g)
    expected = torch.zeros(1, 16, 16, 16)
    expected[:, 3:13, 2:14, 4:12] = 1
    assert torch.equal(out, expected)


def test_sample_region_resize_keeps_corners_and_constants():
    vol = torch.rand(1, 30, 20, 10, generator=torch.Generator().manual_seed(1))
    out = sample_region(vol, (64, 64, 32), mode="resize")
    assert out.shape == (1, 64, 64, 32)
    assert out[0, 0, 0, 0] == pytest.approx(float(vol[0, 0, 0, 0])) and out[0, -1, -1, -1] == pytest.approx(float(vol[0, -1, -1, -1]))
    assert torch.allclose(sample_region(torch.full((1, 7, 9, 5), 0.25), (16, 16, 16), mode="resize"), torch.tensor(0.25))
    with pytest.raises(ValueError, match="region mode"):
        sample_region(vol, (8, 8, 8), mode="zoom")


def test_cache_round_trip_equals_uncached_and_skips_preprocessing(phantom, tmp_path, monkeypatch):
    calls = []
    real = cache_mod.preprocess
    monkeypatch.setattr(cache_mod, "preprocess", lambda *a, **k: calls.append(a) or real(*a, **k))
    reference = preprocess(phantom["image"], "abdomen")["image"].as_tensor()
    first = load_preprocessed(phantom["image"], "abdomen", tmp_path)
    second = load_preprocessed(phantom["image"], "abdomen", tmp_path)
    assert len(calls) == 1, "the second call must come from the cache"
    assert (first - reference).abs().max() <= 0.5 / 65535 + 1e-7  # uint16 quantisation of [0, 1]
    assert torch.equal(first, second) and second.dtype == torch.float32
    npy = list(tmp_path.glob("*.npy"))
    assert len(npy) == 1 and np.load(npy[0], mmap_mode="r").dtype == np.uint16
    meta = json.loads(npy[0].with_suffix(".json").read_text())
    assert meta["chain"]["hu_window"] == [-175.0, 250.0] and meta["shape"] == list(reference.shape)
    # uint8 on request: coarser but bounded error, its own entry.
    u8 = load_preprocessed(phantom["image"], "abdomen", tmp_path, store="uint8")
    assert (u8 - reference).abs().max() <= 0.5 / 255 + 1e-7 and len(calls) == 2


def test_cache_key_changes_with_settings_and_content(phantom, tmp_path):
    base = load_preprocessed(phantom["image"], "abdomen", tmp_path)
    wide = dataclasses.replace(CHAINS["abdomen"], hu_window=(-1000.0, 1000.0))
    other = load_preprocessed(phantom["image"], wide, tmp_path)
    assert len(list(tmp_path.glob("*.npy"))) == 2, "a changed HU window must not reuse the stale entry"
    fresh = preprocess(phantom["image"], wide)["image"].as_tensor()
    assert other.shape == fresh.shape and (other - fresh).abs().max() <= 0.5 / 65535 + 1e-7
    assert base.shape != other.shape  # the wider window keeps air above 0, so the foreground box grows
    # Same path, new content -> new entry.
    src = tmp_path / "copy.nii.gz"
    s = phantom["subject"]
    save_nifti(src, np.rint(s.image), s.affine, np.int16)
    k1 = cache_mod.cache_key(src, "abdomen")
    save_nifti(src, np.rint(s.image) + 10, s.affine, np.int16)
    assert cache_mod.cache_key(src, "abdomen") != k1


def test_cache_write_is_atomic_and_damaged_entries_are_rebuilt(phantom, tmp_path, monkeypatch):
    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(cache_mod.np, "save", boom)
    with pytest.raises(OSError, match="disk full"):
        load_preprocessed(phantom["image"], "abdomen", tmp_path)
    assert not list(tmp_path.glob("*.npy")) and not list(tmp_path.glob(".*")), "no partial entry may remain"
    monkeypatch.undo()
    good = load_preprocessed(phantom["image"], "abdomen", tmp_path)
    (npy,) = tmp_path.glob("*.npy")
    npy.write_bytes(npy.read_bytes()[:100])  # damaged on disk
    assert torch.equal(load_preprocessed(phantom["image"], "abdomen", tmp_path), good)


def test_mri_cache_is_float16(tmp_path):
    vol = np.zeros((30, 30, 30), np.float32)
    vol[5:25, 5:25, 5:25] = np.random.default_rng(0).normal(500, 50, (20, 20, 20))
    save_nifti(tmp_path / "mr.nii.gz", vol, np.diag([1.5, 1.5, 1.5, 1]), np.float32)
    ref = preprocess(str(tmp_path / "mr.nii.gz"), "mri")["image"].as_tensor()
    got = load_preprocessed(tmp_path / "mr.nii.gz", "mri", tmp_path / "c")
    assert torch.allclose(got, ref, rtol=1e-3, atol=1e-3)
    with pytest.raises(ValueError, match="float16"):
        load_preprocessed(tmp_path / "mr.nii.gz", "mri", tmp_path / "c", store="uint8")
