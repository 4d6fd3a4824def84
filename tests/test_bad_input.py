"""Bad volume files: each case raises VolumeError (or warns) with the file name and a fix in the message."""

from __future__ import annotations

import gzip
import json
import warnings

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch

from voco_lib.cli import main
from voco_lib.data.preprocess import preprocess, sample_region
from voco_lib.data.volumes import HURangeWarning, VolumeError, check_datalist_files, load_pair, load_volume

RNG = np.random.default_rng(0)


def ct(shape=(24, 24, 16)) -> np.ndarray:
    """A small CT-like block: air around a soft-tissue body."""
    v = np.full(shape, -1000, np.int16)
    v[4:-4, 4:-4, 2:-2] = RNG.normal(40, 20, [s - 8 for s in shape[:2]] + [shape[2] - 4]).astype(np.int16)
    return v


def save(path, data, affine=None):
    nib.save(nib.Nifti1Image(data, np.diag([1.5, 1.5, 1.5, 1.0]) if affine is None else affine), str(path))
    return path


def raises(path, *fragments):
    """Assert load_volume(path) fails naming the file, the problem and a fix."""
    with pytest.raises(VolumeError) as e:
        load_volume(path)
    msg = str(e.value)
    assert str(path) in msg and "Fix:" in msg, msg
    for f in fragments:
        assert f in msg, msg
    return e.value


def test_good_file_loads(tmp_path):
    v = load_volume(save(tmp_path / "ok.nii.gz", ct()))
    assert v.array.shape == (24, 24, 16) and v.array.dtype == np.float32 and v.spacing == (1.5, 1.5, 1.5)


def test_corrupt_gzip(tmp_path):
    raw = (save(tmp_path / "ok.nii.gz", ct())).read_bytes()
    bad = tmp_path / "corrupt.nii.gz"
    bad.write_bytes(raw[:12] + bytes(b ^ 0x5A for b in raw[12:300]) + raw[300:])
    raises(bad, "gzip")
    notgz = tmp_path / "plain_text.nii.gz"
    notgz.write_bytes(b"this is not a gzip archive\n" * 20)
    raises(notgz, "gzip")


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_truncated_nifti(tmp_path, suffix):
    raw = save(tmp_path / f"ok{suffix}", ct()).read_bytes()
    cut = tmp_path / f"cut{suffix}"
    if suffix == ".nii":
        cut.write_bytes(raw[: len(raw) // 2])
    else:  # a gzip stream cut short after its header
        cut.write_bytes(gzip.compress(gzip.decompress(raw)[:2000]))
    raises(cut, "truncated", "(24, 24, 16)")


@pytest.mark.parametrize("shape", [(24, 24), (24, 24, 1)])
def test_2d_image(tmp_path, shape):
    raises(save(tmp_path / "slice.nii.gz", np.zeros(shape, np.int16) + np.arange(24, dtype=np.int16)[:, None].reshape(
        (24,) + (1,) * (len(shape) - 1))), "2-D")


def test_4d_image(tmp_path):
    raises(save(tmp_path / "multi.nii.gz", np.stack([ct()] * 3, axis=-1)), "4-D", "(24, 24, 16, 3)", "split")
    # A trailing singleton axis is harmless and accepted.
    assert load_volume(save(tmp_path / "one.nii.gz", ct()[..., None])).array.shape == (24, 24, 16)


def test_nan_and_inf_voxels(tmp_path):
    v = ct().astype(np.float32)
    v[3, 3, 3], v[5, 5, 5] = np.nan, np.inf
    raises(save(tmp_path / "nan.nii.gz", v), "2 NaN/inf voxels")


def test_constant_volume(tmp_path):
    raises(save(tmp_path / "flat.nii.gz", np.full((24, 24, 16), -1000, np.int16)), "constant", "-1000")


@pytest.mark.parametrize("voxel", [0.001, 1000.0])
def test_absurd_spacing(tmp_path, voxel):
    raises(save(tmp_path / "scale.nii.gz", ct(), np.diag([voxel, 1.5, 1.5, 1.0])), "implausible voxel size")


def test_volume_smaller_than_the_crop_is_padded(tmp_path):
    """Policy: pad (with 0, the normalised minimum), never fail: to the chain's 64³, then to the region."""
    img = preprocess(str(save(tmp_path / "tiny.nii.gz", ct((12, 10, 8)))), "abdomen")["image"]
    assert tuple(img.shape[1:]) == (64, 64, 64)
    region = sample_region(img.as_tensor(), (96, 96, 80), torch.Generator().manual_seed(0))
    assert region.shape == (1, 96, 96, 80)
    assert float(region.sum()) == pytest.approx(float(img.sum()), rel=1e-6)  # nothing lost, only zeros added


def test_label_image_shape_mismatch(tmp_path):
    image = save(tmp_path / "img.nii.gz", ct())
    label = save(tmp_path / "lab.nii.gz", np.zeros((24, 24, 15), np.uint8))
    with pytest.raises(VolumeError) as e:
        load_pair(image, label)
    assert str(label) in str(e.value) and "(24, 24, 15)" in str(e.value) and "(24, 24, 16)" in str(e.value)
    with pytest.raises(VolumeError, match="lab.nii.gz"):  # the fine-tuning chain reports it the same way
        preprocess({"image": str(image), "label": str(label)}, "abdomen")
    shifted = save(tmp_path / "lab2.nii.gz", np.zeros((24, 24, 16), np.uint8), np.diag([2.0, 1.5, 1.5, 1.0]))
    with pytest.raises(VolumeError, match="different grid"):
        load_pair(image, shifted)


def test_missing_files(tmp_path):
    save(tmp_path / "a.nii.gz", ct())
    entries = [{"image": "a.nii.gz"}, {"image": "b.nii.gz", "label": "lb.nii.gz"}]
    with pytest.raises(VolumeError) as e:
        check_datalist_files(entries, tmp_path, tmp_path / "dataset.json")
    msg = str(e.value)
    assert "dataset.json" in msg and "b.nii.gz" in msg and "lb.nii.gz" in msg and "a.nii.gz," not in msg
    assert "VOCO_DATA_DIR" in msg
    check_datalist_files(entries[:1], tmp_path)  # nothing missing: no error
    raises(tmp_path / "gone.nii.gz", "does not exist")


def test_mri_passed_as_ct_warns(tmp_path):
    mr = np.zeros((24, 24, 16), np.float32)
    mr[4:-4, 4:-4, 2:-2] = RNG.normal(600, 80, (16, 16, 12))
    path = save(tmp_path / "t1.nii.gz", mr)
    with pytest.warns(HURangeWarning, match="t1.nii.gz.*mri"):
        load_volume(path, modality="CT")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same file as MRI, or a real CT, is quiet
        load_volume(path, modality="MRI")
        load_volume(save(tmp_path / "ct.nii.gz", ct()), modality="CT")


def test_non_nifti_formats_come_out_ras(tmp_path):
    """SimpleITK formats (LPS+ geometry) get a RAS+ affine: x and y of origin and direction negated."""
    arr = ct()
    img = sitk.GetImageFromArray(arr.T.copy())  # SimpleITK wants (z, y, x)
    img.SetSpacing((1.0, 2.0, 3.0))
    img.SetOrigin((10.0, 20.0, 30.0))
    sitk.WriteImage(img, str(tmp_path / "v.mha"))
    v = load_volume(tmp_path / "v.mha")
    assert np.array_equal(v.array, arr.astype(np.float32))
    np.testing.assert_allclose(v.affine, [[-1, 0, 0, -10], [0, -2, 0, -20], [0, 0, 3, 30], [0, 0, 0, 1]])
    bad = tmp_path / "broken.mha"
    bad.write_bytes(b"ObjectType = Image\nNDims = 3\n")
    raises(bad, "SimpleITK")


def test_cli_reports_a_bad_volume_cleanly(tmp_path, capsys):
    """VolumeError is a ValueError: `voco` prints one line with the file and exits 2, no traceback, also when
    the bad volume is found while a datalist is preprocessed."""
    err = raises(save(tmp_path / "flat.nii.gz", np.zeros((8, 8, 8), np.int16)), "constant")
    assert isinstance(err, ValueError)
    assert main(["phantom", "--n", "0", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.splitlines() == ["voco phantom: error: --n must be at least 1, got 0"] and "Traceback" not in err
    flat = save(tmp_path / "flat.nii.gz", np.zeros((8, 8, 8), np.int16))
    datalist = tmp_path / "dataset.json"
    datalist.write_text(json.dumps({"training": [{"image": str(flat)}]}))
    assert main(["pretrain", "--profile", "smoke", "--data", str(datalist), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    line = [ln for ln in err.splitlines() if ln.strip() and "it/s]" not in ln]  # a progress bar may be there
    assert len(line) == 1 and str(flat) in line[0] and "constant" in line[0] and "Traceback" not in err, err
