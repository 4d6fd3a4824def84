"""The procedural torso phantom: determinism, anatomy in RAS world coordinates, variation across patients where
pre-training looks (the cpu profile's region grid), field of view, HU per tissue, attributes, CLI."""

from __future__ import annotations

import dataclasses
import json
import os

import nibabel as nib
import numpy as np
import pytest
import torch.nn.functional as F
from scipy import ndimage

from voco_lib.cli import main
from voco_lib.data.phantom import class_ids, class_table, make_phantom, make_phantom_subject
from voco_lib.data.preprocess import CHAINS, preprocess_array

IDS = class_ids()
SEEDS = (0, 1, 2)
COHORT = range(12)  # coarse phantoms for the variation and plausibility checks
SEG_ORGANS = ("spleen", "kidney_right", "kidney_left", "liver", "stomach")  # phantom-seg's soft-tissue organs
ALWAYS_SCANNED = SEG_ORGANS + ("pancreas", "gallbladder", "aorta", "vertebrae")
REGION = (64, 64, 32)  # the cpu profile's region (voco_lib/config.py)


@pytest.fixture(scope="module")
def subjects():
    return {s: make_phantom_subject(s) for s in SEEDS}


@pytest.fixture(scope="module")
def cohort():
    """Coarse phantoms (the cpu profile's 80x80x64 at 3 mm) and their label maps on the pre-training region grid."""
    chain = dataclasses.replace(CHAINS["abdomen"], spacing=(3.0, 3.0, 3.0))
    out = []
    for seed in COHORT:
        s = make_phantom_subject(seed, shape=(80, 80, 64), spacing=3.0)
        lab = preprocess_array(s.image, s.affine, chain, label=s.label)["label"].as_tensor().float()
        region = F.interpolate(lab[None], size=REGION, mode="nearest")[0, 0].round().long().numpy()
        out.append((s, region))
    return out


def voxel_centroid(label: np.ndarray, name: str) -> np.ndarray | None:
    idx = np.argwhere(label == IDS[name])
    return idx.mean(0) if len(idx) else None


def world_centroid(label: np.ndarray, affine: np.ndarray, name: str) -> np.ndarray:
    idx = np.argwhere(label == IDS[name])
    assert len(idx), f"{name} missing"
    return affine[:3, :3] @ idx.mean(0) + affine[:3, 3]


def test_contract_and_determinism(subjects):
    img, lab, aff = make_phantom(0)
    assert img.shape == lab.shape == (160, 160, 128)
    assert img.dtype == np.float32 and lab.dtype == np.uint8 and aff.shape == (4, 4)
    np.testing.assert_allclose(np.diag(aff)[:3], 1.5)
    # Same seed -> identical arrays; different seeds -> different patients.
    assert np.array_equal(img, subjects[0].image) and np.array_equal(lab, subjects[0].label)
    assert np.array_equal(aff, subjects[0].affine)
    assert not np.array_equal(subjects[0].label, subjects[1].label)
    assert subjects[0].attributes["body"] != subjects[1].attributes["body"]


def check_anatomy(c: dict[str, np.ndarray | None], min_gap_z: float) -> None:
    """Relative positions that fail if organs were swapped or mirrored; `c` in RAS-ordered coordinates
    (+x patient's right, +y anterior, +z superior); organs the field of view left out are None."""
    assert c["liver"][0] > c["spleen"][0], "liver on the patient's right of the spleen"
    assert c["kidney_right"][0] > c["aorta"][0] > c["kidney_left"][0], "kidneys either side of the aorta"
    for k in ("kidney_left", "kidney_right"):
        assert c[k][1] < c["aorta"][1], "kidneys posterior to the aorta"
    assert c["vertebrae"][1] < c["aorta"][1], "spine behind the aorta"
    assert c["liver"][2] > min(c["kidney_left"][2], c["kidney_right"][2]), "liver above the lower kidney"
    for lung in ("lung_left", "lung_right"):
        if c[lung] is not None:
            assert c[lung][2] > c["liver"][2] + min_gap_z, "lungs above the diaphragm, over the liver"
    if c["lung_right"] is not None and c["lung_left"] is not None:
        assert c["lung_right"][0] > c["lung_left"][0]
    if c["heart"] is not None:
        assert c["heart"][2] > c["liver"][2]
    if c["urinary_bladder"] is not None:
        assert c["urinary_bladder"][2] < min(c["kidney_left"][2], c["kidney_right"][2])


ANATOMY = ("liver", "spleen", "kidney_left", "kidney_right", "aorta", "lung_left", "lung_right", "urinary_bladder",
           "heart", "vertebrae")


@pytest.mark.parametrize("seed", SEEDS)
def test_anatomy_in_ras_world(subjects, seed):
    s = subjects[seed]
    c = {n: world_centroid(s.label, s.affine, n) if (s.label == IDS[n]).any() else None for n in ANATOMY}
    assert all(c[n] is not None for n in ANATOMY if n in ALWAYS_SCANNED)
    # RAS+ (NIfTI): +x towards the patient's right, +y anterior, +z superior; the body centre near x = 0.
    assert c["liver"][0] > 0 > c["spleen"][0]
    check_anatomy(c, min_gap_z=20.0)


def test_anatomy_on_the_region_grid_of_every_patient(cohort):
    """What pre-training sees: the same layout in every patient, the liver in the right half, the spleen in the left."""
    for s, region in cohort:
        c = {n: voxel_centroid(region, n) for n in ANATOMY}
        check_anatomy(c, min_gap_z=2.0)  # region voxels: ~6 mm in z
        assert c["liver"][0] >= REGION[0] / 2 > c["spleen"][0], s.attributes["seed"]


def test_patients_vary_where_pretraining_looks(cohort):
    """Organ centroids on the region grid spread over the cohort, and an organ moves between base crops.

    Thresholds: an sd under ~1 voxel leaves the label maps of different patients nearly interchangeable (the
    whole-torso generator this replaced measured median sds of 0.7 / 1.1 / 1.7 voxels in x / y / z on these
    seeds); we require 1.3 / 1.4 / 2.0 (x: over 4 mm at the region's ~3.5 mm per voxel).
    """
    sd = np.array([np.std([voxel_centroid(r, n) for _, r in cohort], axis=0, ddof=1) for n in SEG_ORGANS])
    med = np.median(sd, axis=0)
    assert med[0] > 1.3 and med[1] > 1.4 and med[2] > 2.0, f"median centroid sd (x, y, z) {med.round(2)}"
    crop = {n: {(int(c[0] >= REGION[0] / 2), int(c[1] >= REGION[1] / 2)) for c in
                (voxel_centroid(r, n) for _, r in cohort) if c is not None} for n in ANATOMY + ("pancreas",)}
    assert any(len(v) > 1 for v in crop.values()), crop


def test_field_of_view_varies_and_keeps_the_abdominal_organs(cohort):
    """The scan range is a random crop of the torso: its length varies, chest and pelvis organs are cut or left
    out, but the upper-abdominal organs are always scanned whole (never touch the first or last scanned slice)."""
    lengths = []
    for s, _ in cohort:
        z0, z1 = s.attributes["fov_z_mm"]
        lengths.append(z1 - z0)
        zs = s.affine[2, 3] + 3.0 * np.arange(s.label.shape[2])
        first, last = np.searchsorted(zs, [z0 - 0.01, z1 - 0.01])
        for n in ALWAYS_SCANNED[:7]:
            m = s.label == IDS[n]
            assert m.any() and not m[:, :, first].any() and not m[:, :, last].any(), (s.attributes["seed"], n)
    assert np.std(lengths) > 10 and min(lengths) < 0.8 * 189, lengths
    present = [(s.label == IDS["urinary_bladder"]).any() for s, _ in cohort]
    assert 0.5 < np.mean(present) < 1.0, "the bladder is scanned in most patients, not all"


def test_same_seed_same_coarse_patient(cohort):
    s, _ = cohort[3]
    again = make_phantom_subject(3, shape=(80, 80, 64), spacing=3.0)
    assert np.array_equal(again.image, s.image) and np.array_equal(again.label, s.label)
    assert again.attributes == s.attributes


@pytest.mark.parametrize("seed", SEEDS)
def test_labels_inside_the_body_outline(subjects, seed):
    s = subjects[seed]
    # Body outline from the image alone: tissue denser than -500 HU, holes (lungs, gas) filled slice by slice.
    body = ndimage.binary_fill_holes(s.image > -500, structure=np.ones((3, 3, 1), bool))
    outside = (s.label > 0) & ~body
    assert outside.sum() == 0, f"{outside.sum()} labelled voxels outside the body"
    assert (s.image[~body] < -900).mean() > 0.99  # surroundings are air


def test_hu_per_tissue_in_the_class_table_range(subjects):
    for s in subjects.values():
        for c in class_table()["classes"]:
            if c["hu"] is None or not (s.label == c["id"]).any():
                continue
            med = float(np.median(s.image[s.label == c["id"]]))
            lo, hi = c["hu"]
            if c["name"] == "vertebrae":  # cancellous core plus a brighter cortical rim
                hi = max(t for t in class_table()["tissues"]["cortical_bone"]["hu"])
            assert lo - 10 <= med <= hi + 10, f"{c['name']}: median {med:.0f} HU outside [{lo}, {hi}]"
            if c["name"] not in ("vertebrae", "stomach"):
                assert abs(med - s.attributes["organ_hu"][c["name"]]) < 6


def test_attributes_match_the_label_map(subjects):
    s = subjects[1]
    ml = 1.5**3 / 1000
    for name, vol in s.attributes["organ_volumes_ml"].items():
        assert vol == pytest.approx((s.label == IDS[name]).sum() * ml, abs=1e-3)
    # fov_z_mm: world z of the first and last scanned slices; every other slice is air, every scanned one has body.
    z0, z1 = s.attributes["fov_z_mm"]
    zs = s.affine[2, 3] + 1.5 * np.arange(s.image.shape[2])
    scanned = (zs >= z0 - 0.01) & (zs <= z1 + 0.01)
    assert zs[scanned][0] == pytest.approx(z0, abs=0.01) and zs[scanned][-1] == pytest.approx(z1, abs=0.01)
    assert (s.image[:, :, ~scanned] < -900).all() and not s.label[:, :, ~scanned].any()
    assert ((s.image[:, :, scanned] > -500).sum(axis=(0, 1)) > 1000).all()


def test_lesion_forced_on_and_off():
    with_lesion = make_phantom_subject(7, lesion=True)
    les = with_lesion.attributes["lesion"]
    assert les is not None and les["organ"] in class_table()["lesion"]["organs"]
    m = with_lesion.label == IDS["lesion"]
    assert m.sum() * 1.5**3 / 1000 == pytest.approx(les["volume_ml"], abs=1e-3) and les["volume_ml"] > 0
    centroid = world_centroid(with_lesion.label, with_lesion.affine, "lesion")
    assert np.linalg.norm(centroid - np.array(les["center_ras_mm"])) <= les["radius_mm"]
    # The lesion sits inside its organ: its rim touches the organ far more than anything else.
    rim = ndimage.binary_dilation(m) & ~m
    neighbours = with_lesion.label[rim]
    assert (neighbours == IDS[les["organ"]]).mean() > 0.5
    assert float(np.median(with_lesion.image[m])) < with_lesion.attributes["organ_hu"][les["organ"]] - 20

    without = make_phantom_subject(7, lesion=False)
    assert without.attributes["lesion"] is None and not (without.label == IDS["lesion"]).any()
    # Same patient otherwise: identical outside the lesion, the organ there instead of the lesion.
    assert np.array_equal(with_lesion.image[~m], without.image[~m])
    assert (without.label[m] == IDS[les["organ"]]).all()


def test_anatomy_is_in_millimetres_not_voxels(subjects):
    """A coarser grid over the same field of view gives the same patient (same centroids within a voxel)."""
    coarse = make_phantom_subject(0, shape=(80, 80, 64), spacing=3.0)
    np.testing.assert_allclose(coarse.affine[:3, :3], np.eye(3) * 3.0)
    lesion_organ = (subjects[0].attributes["lesion"] or {}).get("organ")  # lesion voxels are drawn per grid
    for name in {"liver", "spleen", "kidney_left", "kidney_right", "aorta", "stomach"} - {lesion_organ}:
        fine_c = world_centroid(subjects[0].label, subjects[0].affine, name)
        coarse_c = world_centroid(coarse.label, coarse.affine, name)
        assert np.linalg.norm(fine_c - coarse_c) < 3.0, name


def test_cli_writes_int16_niftis_and_a_datalist(tmp_path):
    assert main(["phantom", "--n", "2", "--out", str(tmp_path), "--seed", "5"]) == 0
    dl = json.loads((tmp_path / "dataset.json").read_text())
    assert [e["image"] for e in dl["training"]] == ["imagesTr/phantom_s0005.nii.gz", "imagesTr/phantom_s0006.nii.gz"]
    entry = dl["training"][1]
    img, lab = nib.load(tmp_path / entry["image"]), nib.load(tmp_path / entry["label"])
    ref_img, ref_lab, ref_aff = make_phantom(6)
    assert img.get_data_dtype() == np.int16 and lab.get_data_dtype() == np.uint8
    np.testing.assert_allclose(img.affine, ref_aff)
    assert nib.aff2axcodes(img.affine) == ("R", "A", "S")
    assert np.array_equal(np.asarray(img.dataobj), np.rint(ref_img).astype(np.int16))
    assert np.array_equal(np.asarray(lab.dataobj), ref_lab)
    attrs = json.loads((tmp_path / "attributes.json").read_text())
    assert attrs[entry["image"]]["seed"] == 6
    assert not [p for p in tmp_path.rglob(".*")], "temporary files left behind"
    umask = os.umask(0)
    os.umask(umask)
    for p in (tmp_path / "dataset.json", tmp_path / entry["image"]):  # readable like any file, not mkstemp's 0600
        assert p.stat().st_mode & 0o777 == 0o666 & ~umask
