"""Multi-channel images (BraTS: t1, t1ce, t2, flair; MSD prostate: T2, ADC): one file per channel or one 4-D NIfTI.

Small NIfTI files are written here; the checks: a list of files gives the channels each file gives on its own
(per-channel MRI z-score on non-zero voxels), a 4-D file gives the same tensor, mismatched grids and wrong channel
counts fail naming the files, label values are remapped and range-checked, and a 2-channel task fine-tunes.
"""

from __future__ import annotations

import json
import math

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml

from voco_lib.data.preprocess import Chain, preprocess
from voco_lib.data.volumes import VolumeError, load_channels
from voco_lib.tasks import finetune, load_finetuned, load_task
from voco_lib.tasks.data import datalist_samples, remap_labels
from voco_lib.tasks.registry import task_from_dict

SHAPE = (20, 18, 12)
AFFINE = np.diag([1.2, 1.0, 2.0, 1.0])
# Spacing 1.5 mm resamples every channel; the foreground crop and z-score then act per channel.
CHAIN = Chain("mri-test", modality="MRI", hu_window=None, spacing=(1.5, 1.5, 1.5), min_size=(8, 8, 8))


def _mask() -> np.ndarray:
    """An ellipsoidal 'brain' (zero outside, as skull-stripped MRI), off-centre so the crop matters."""
    x, y, z = np.meshgrid(*[np.arange(n) for n in SHAPE], indexing="ij")
    return ((x - 9) / 7.0) ** 2 + ((y - 10) / 6.0) ** 2 + ((z - 6) / 4.5) ** 2 <= 1.0


def channels(n: int, seed: int = 0) -> list[np.ndarray]:
    """n MRI-like channels, strictly positive on one mask and 0 outside, with different scales."""
    rng = np.random.default_rng(seed)
    m = _mask()
    return [np.where(m, rng.uniform(50, 400, SHAPE) * (c + 1), 0).astype(np.float32) for c in range(n)]


def save(path, data, affine=AFFINE):
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return str(path)


def test_channel_list_gives_each_file_preprocessed_on_its_own(tmp_path):
    chans = channels(4)
    files = [save(tmp_path / f"case_{m}.nii.gz", c) for m, c in zip(("flair", "t1ce", "t1", "t2"), chans)]
    out = preprocess({"image": files}, CHAIN, channels=True)["image"].as_tensor()
    assert out.shape[0] == 4
    for c, f in enumerate(files):
        alone = preprocess(f, CHAIN)["image"].as_tensor()
        assert alone.shape == (1, *out.shape[1:])
        torch.testing.assert_close(out[c], alone[0], rtol=0, atol=1e-6)
        # hand check of the MRI normalisation: each channel z-scored on its own non-zero voxels
        v = out[c][out[c] != 0].double()
        assert abs(float(v.mean())) < 1e-4 and float(v.std(unbiased=False)) == pytest.approx(1.0, abs=1e-4)
    # the scales differed by up to 4x before; after the per-channel z-score they agree
    assert float(out[3].abs().max()) < 3 * float(out[0].abs().max())


def test_4d_file_equals_the_list_of_files(tmp_path):
    chans = channels(2, seed=1)
    files = [save(tmp_path / f"c{i}.nii.gz", c) for i, c in enumerate(chans)]
    four_d = save(tmp_path / "prostate_4d.nii.gz", np.stack(chans, axis=-1))  # MSD layout: channels last
    v = load_channels(four_d, "MRI")
    assert v.array.shape == (2, *SHAPE) and np.array_equal(v.array, np.stack(chans))
    a = preprocess({"image": four_d}, CHAIN, channels=True)["image"].as_tensor()
    b = preprocess({"image": files}, CHAIN, channels=True)["image"].as_tensor()
    assert a.shape[0] == 2
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    # a 3-D file is one channel; pre-training (channels=False) still refuses a 4-D file, naming the fix
    assert load_channels(files[0], "MRI").array.shape == (1, *SHAPE)
    with pytest.raises(VolumeError, match="prostate_4d.nii.gz.*4-D"):
        preprocess(four_d, CHAIN)


def test_channels_on_different_grids_fail_naming_both_files(tmp_path):
    c = channels(2)
    first = save(tmp_path / "t2.nii.gz", c[0])
    other_shape = save(tmp_path / "adc_small.nii.gz", c[1][:, :, :10])
    with pytest.raises(VolumeError) as e:
        load_channels([first, other_shape], "MRI")
    assert "adc_small.nii.gz" in str(e.value) and "t2.nii.gz" in str(e.value) and "(20, 18, 10)" in str(e.value)
    shifted = save(tmp_path / "adc_shifted.nii.gz", c[1], np.diag([1.2, 1.0, 3.0, 1.0]))
    with pytest.raises(VolumeError) as e:
        load_channels([first, shifted], "MRI")
    assert "adc_shifted.nii.gz" in str(e.value) and "t2.nii.gz" in str(e.value) and "grid" in str(e.value)
    # the label is checked against the stacked image's grid, naming the label file
    label = save(tmp_path / "seg.nii.gz", np.zeros((20, 18, 11), np.uint8))
    with pytest.raises(VolumeError, match="seg.nii.gz"):
        preprocess({"image": [first, save(tmp_path / "adc.nii.gz", c[1])], "label": label}, CHAIN, channels=True)


def _task(in_channels: int, **extra):
    """msd05-prostate's manifest with a small roi (and optional changes)."""
    raw = {**load_task("msd05-prostate").raw, "in_channels": in_channels, "roi": [16, 16, 16], **extra}
    return task_from_dict(raw)


def _datalist(tmp_path, n_channels: int, n_train: int = 2, label_values=(1, 2)):
    """An MSD-style datalist whose entries list one file per channel, with a 0/1/2 label map."""
    entries = []
    for i in range(n_train + 1):
        chans = channels(n_channels, seed=10 + i)
        files = [save(tmp_path / f"case{i}_{c:04d}.nii.gz", x) for c, x in enumerate(chans)]
        lab = np.zeros(SHAPE, np.uint8)
        lab[4:9, 6:12, 3:7], lab[9:14, 6:12, 3:7] = label_values
        entries.append({"image": [f.split("/")[-1] for f in files],
                        "label": save(tmp_path / f"case{i}_seg.nii.gz", lab).split("/")[-1]})
    dl = tmp_path / "dataset.json"
    dl.write_text(json.dumps({"training": entries[:n_train], "validation": entries[n_train:]}))
    return dl


def test_wrong_channel_count_fails_naming_the_files_and_the_task(tmp_path):
    dl = _datalist(tmp_path, 3, n_train=1)
    with pytest.raises(VolumeError) as e:
        datalist_samples(_task(2), dl, "training", (16, 16, 16))
    msg = str(e.value)
    assert "case0_0000.nii.gz" in msg and "case0_0002.nii.gz" in msg
    assert "gives 3 input channel(s)" in msg and "expects 2" in msg and "msd05-prostate" in msg and "Fix:" in msg
    ok = datalist_samples(_task(3), dl, "training", (16, 16, 16))
    assert ok[0]["image"].shape[0] == 3 and ok[0]["name"] == "case0_0000.nii.gz"


def test_label_remap_and_range_check(tmp_path):
    dl = _datalist(tmp_path, 2, n_train=1, label_values=(2, 4))  # BraTS-style raw values 2 and 4
    with pytest.raises(VolumeError) as e:
        datalist_samples(_task(2), dl, "training", (16, 16, 16))
    assert "case0_seg.nii.gz" in str(e.value) and "[4]" in str(e.value) and "label_remap" in str(e.value)
    s = datalist_samples(_task(2, label_remap={"4": 1}), dl, "training", (16, 16, 16))[0]
    assert sorted(torch.unique(s["label"]).tolist()) == [0, 1, 2]
    # remap is a lookup: unlisted values stay, listed ones move (hand-made 1-D case)
    lab = torch.tensor([0, 1, 2, 4, 4])
    assert remap_labels(load_task("brats21"), lab, "x").tolist() == [0, 1, 2, 3, 3]


@pytest.mark.slow
def test_two_channel_segmentation_fine_tunes(tmp_path):
    (tmp_path / "data").mkdir()
    dl = _datalist(tmp_path / "data", 2)
    yaml_task = tmp_path / "tiny-prostate.yaml"
    raw = {**load_task("msd05-prostate").raw, "name": "tiny-prostate", "roi": [32, 32, 32], "spacing": None}
    yaml_task.write_text(yaml.safe_dump(raw))
    res = finetune(yaml_task, profile="smoke", seed=0, out=tmp_path / "run", datalist=dl, show_progress=False,
                   overrides=["finetune.steps=2", "finetune.eval_every=1"])
    assert res["task"] == "tiny-prostate" and res["n_train"] == 2 and res["steps"] == 2
    assert set(res["metrics"]["dice_per_class"]) == {"peripheral_zone", "transition_zone"}
    assert all(math.isfinite(v) for v in res["metrics"]["dice_per_class"].values())
    r = load_finetuned(tmp_path / "run")
    assert r.model.swinViT.patch_embed.proj.weight.shape[1] == 2  # the first layer takes both channels
