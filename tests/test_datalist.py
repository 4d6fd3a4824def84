"""`voco datalist DIR` and DICOM series in datalists: a folder of NIfTI, NRRD and one DICOM series made here."""

from __future__ import annotations

import gzip
import json
import locale
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from voco_lib import cli
from voco_lib.data.datalist import build_datalist
from voco_lib.data.manifests import read_datalist
from voco_lib.data.volumes import VolumeError, load_volume

UID = "1.2.826.0.1.3680043.2.1125.7"
AFFINE = np.diag([1.5, 1.5, 2.0, 1.0])


def _ct(shape, seed=0) -> np.ndarray:
    a = np.full(shape, -1000, np.int16)
    a[4:-4, 4:-4, 2:-2] = np.random.default_rng(seed).integers(-100, 200, (shape[0] - 8, shape[1] - 8, shape[2] - 4))
    return a


def _dicom(folder: Path, vol: np.ndarray) -> None:
    """One CT series, one file per slice, 0.8 x 0.8 x 3 mm, PatientID PAT9."""
    folder.mkdir(parents=True)
    saved = locale.setlocale(locale.LC_ALL)  # GDCM's writer resets the C locale (Python's text encoding with it)
    try:
        _write_slices(folder, vol)
    finally:
        locale.setlocale(locale.LC_ALL, saved)


def _write_slices(folder: Path, vol: np.ndarray) -> None:
    w = sitk.ImageFileWriter()
    w.KeepOriginalImageUIDOn()
    for z in range(vol.shape[2]):
        sl = sitk.JoinSeries([sitk.GetImageFromArray(vol[:, :, z].T.copy())])
        sl.SetSpacing((0.8, 0.8, 3.0))
        sl.SetOrigin((0.0, 0.0, 3.0 * z))
        tags = {"0008|0060": "CT", "0010|0020": "PAT9", "0020|000e": UID, "0020|000d": "1.2.3.4",
                "0020|0032": f"0\\0\\{3.0 * z}", "0020|0037": "1\\0\\0\\0\\1\\0", "0028|0030": "0.8\\0.8",
                "0020|0013": str(z + 1), "0028|1052": "0", "0028|1053": "1", "0008|0018": f"1.2.3.4.5.{z}"}
        for k, v in tags.items():
            sl.SetMetaData(k, v)
        w.SetFileName(str(folder / f"slice{z:03d}.dcm"))
        w.Execute(sl)


@pytest.fixture(scope="module")
def scans(tmp_path_factory) -> Path:
    """root/scans: p01/{p01_a,p01_b}.nii.gz, p02/p02_a.nii.gz, p03.nrrd, dicom/ (12 slices), notes.txt;
    root/labels: one label per NIfTI, plus an orphan."""
    root = tmp_path_factory.mktemp("own_ct")
    for i, name in enumerate(["p01/p01_a", "p01/p01_b", "p02/p02_a"]):
        (root / "scans" / name).parent.mkdir(parents=True, exist_ok=True)
        (root / "labels").mkdir(exist_ok=True)
        nib.save(nib.Nifti1Image(_ct((40, 40, 24), i), AFFINE), root / "scans" / f"{name}.nii.gz")
        nib.save(nib.Nifti1Image(np.zeros((40, 40, 24), np.uint8), AFFINE), root / "labels" / f"{Path(name).name}.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros((40, 40, 24), np.uint8), AFFINE), root / "labels" / "orphan.nii.gz")
    img = sitk.GetImageFromArray(_ct((36, 36, 20), 3).T.copy())
    img.SetSpacing((1.0, 1.0, 2.5))
    sitk.WriteImage(img, str(root / "scans" / "p03.nrrd"))
    _dicom(root / "scans" / "dicom", _ct((32, 32, 12), 4))
    (root / "scans" / "notes.txt").write_text("not a scan")
    return root


def test_entries_pairing_grouping_relative_paths(scans, tmp_path, capsys):
    out = tmp_path / "lists" / "datalist.json"
    assert cli.main(["datalist", str(scans / "scans"), "--labels", str(scans / "labels"), "--group-by", r"(p\d+)",
                     "--validation", "0.4", "--out", str(out)]) == 0
    table = capsys.readouterr().out
    for text in ("NIfTI", "NRRD/MHA", "DICOM series", "CT 1", "notes.txt: not a volume",
                 "orphan.nii.gz: label without an image", "3 paired, 2 without"):
        assert text in table
    doc = json.loads(out.read_text())
    entries = doc["training"] + doc["validation"]
    assert len(entries) == 5 and all(not Path(e["image"]).is_absolute() for e in entries)
    dicom = next(e for e in entries if "#" in e["image"])
    assert dicom["image"].endswith(f"scans/dicom#{UID}") and dicom["shape"] == [32, 32, 12]
    assert dicom["spacing"] == [0.8, 0.8, 3.0] and dicom["patient"] == "PAT9" and dicom["modality"] == "CT"
    side = {Path(e["image"]).name: split for split in ("training", "validation") for e in doc[split]}
    assert side["p01_a.nii.gz"] == side["p01_b.nii.gz"]  # one patient, one side
    resolved = read_datalist(out, "training") + read_datalist(out, "validation")
    labelled = {Path(e["image"]).name: Path(e["label"]) for e in resolved if "label" in e}
    assert labelled == {f"{n}.nii.gz": scans / "labels" / f"{n}.nii.gz" for n in ("p01_a", "p01_b", "p02_a")}


@pytest.mark.parametrize("fraction, n_val", [(0.0, 0), (0.2, 1), (0.6, 3)])
def test_split_fractions_and_seed(scans, tmp_path, fraction, n_val):
    out, _ = build_datalist(scans / "scans", tmp_path / "d.json", label_pattern="*_x.nii.gz", validation=fraction,
                            seed=3, show=False)
    doc = json.loads(out.read_text())
    assert (len(doc["training"]), len(doc["validation"])) == (5 - n_val, n_val)
    again, _ = build_datalist(scans / "scans", tmp_path / "e.json", label_pattern="*_x.nii.gz", validation=fraction,
                              seed=3, show=False)
    assert json.loads(again.read_text())["validation"] == doc["validation"]


def test_dicom_series_reads_through_the_checked_loader(scans, tmp_path):
    vol = load_volume(f"{scans}/scans/dicom#{UID}")
    assert vol.array.shape == (32, 32, 12) and np.allclose(vol.spacing, (0.8, 0.8, 3.0))
    assert vol.array.min() == -1000  # HU, air
    assert np.array_equal(load_volume(scans / "scans" / "dicom").array, vol.array)  # the folder's only series
    with pytest.raises(VolumeError, match=r"dicom: has no DICOM series 9\.9"):
        load_volume(f"{scans}/scans/dicom#9.9")
    with pytest.raises(VolumeError, match="holds no DICOM series"):
        load_volume(scans / "labels")


def test_header_only_listing_then_clear_error_on_read(tmp_path):
    folder = tmp_path / "scans"
    folder.mkdir()
    good = tmp_path / "good.nii.gz"
    nib.save(nib.Nifti1Image(_ct((40, 40, 24)), AFFINE), good)
    raw = gzip.decompress(good.read_bytes())
    (folder / "cut.nii.gz").write_bytes(gzip.compress(raw[: 352 + 1000]))  # header intact, voxel data cut short
    out, table = build_datalist(folder, tmp_path / "d.json", validation=0.0, show=False)
    (entry,) = read_datalist(out)
    assert "1 without" in table and entry["image"].endswith("cut.nii.gz")
    with pytest.raises(VolumeError, match="cut.nii.gz: is truncated or corrupt"):
        load_volume(entry["image"])


def test_bad_arguments_name_the_fix(tmp_path, capsys):
    assert cli.main(["datalist", str(tmp_path / "nope"), "--out", str(tmp_path / "d.json")]) == 2
    assert "folder not found" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert cli.main(["datalist", str(tmp_path / "empty"), "--out", str(tmp_path / "d.json")]) == 2
    assert "no volumes found" in capsys.readouterr().err


def test_pretrain_on_a_folder_records_its_datalist(scans, tmp_path):
    run = tmp_path / "run"
    assert cli.main(["pretrain", "--profile", "smoke", "--data", str(scans / "scans"), "--out", str(run),
                     "steps=1", "data.n_eval=1", f"data.cache_dir={tmp_path / 'cache'}"]) == 0
    listed = read_datalist(run / "datalist.json")
    assert len(listed) == 5 and (run / "encoder.pt").is_file()
