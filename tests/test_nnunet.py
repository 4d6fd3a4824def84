"""nnU-Net v2 export (layout, dataset.json, round trip of images and labels, atomicity), commands, weight check.

nnU-Net itself is not installed here; its raw-format rules (file names `{case}_{XXXX}.nii.gz`, labels 0..K-1,
dataset.json keys, numTraining) are checked the way its `verify_dataset_integrity` reads them.
"""

from __future__ import annotations

import json
import os
import sys

import nibabel as nib
import numpy as np
import pytest
import torch

from voco_lib.cli import main
from voco_lib.data.volumes import VolumeError
from voco_lib.tasks import nnunet
from voco_lib.tasks.registry import load_task, task_from_dict

SHAPE = (10, 9, 8)
AFFINE = np.diag([1.5, 1.2, 3.0, 1.0])


def save(path, data, affine=AFFINE):
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return path.name


def make_datalist(root, n_channels=2, n_train=2, n_val=1, n_test=1, four_d=False, label_values=(1,)):
    """Cases with n_channels random channels (one file each, or one 4-D file) and a label map; returns the
    datalist path and the arrays written, by split."""
    rng = np.random.default_rng(0)
    arrays = {"training": [], "validation": [], "test": []}
    doc = {}
    for split, n in (("training", n_train), ("validation", n_val), ("test", n_test)):
        entries = []
        for i in range(n):
            chans = [rng.normal(0, 1, SHAPE).astype(np.float32) for _ in range(n_channels)]
            stem = f"{split}{i}"
            if four_d:
                image = save(root / f"{stem}.nii.gz", np.stack(chans, -1))
            else:
                image = [save(root / f"{stem}_ch{c}.nii.gz", x) for c, x in enumerate(chans)]
            lab = np.zeros(SHAPE, np.uint8)
            for j, v in enumerate(label_values):
                lab[2 + 3 * j:4 + 3 * j, 2:6, 2:6] = v
            e = {"image": image}
            if split != "test":
                e["label"] = save(root / f"{stem}_seg.nii.gz", lab)
            entries.append(e)
            arrays[split].append((chans, lab))
        doc[split] = entries
    dl = root / "dataset.json"
    dl.write_text(json.dumps(doc))
    return dl, arrays


def nnunet_identifiers(folder, ending):
    """Case identifiers the way nnU-Net v2 derives them: file name minus `_XXXX` and the file ending."""
    return sorted({f.name[: -(5 + len(ending))] for f in folder.iterdir() if f.name.endswith(ending)})


def test_export_layout_dataset_json_and_round_trip(tmp_path):
    (tmp_path / "data").mkdir()
    dl, arrays = make_datalist(tmp_path / "data")
    out = tmp_path / "nnUNet_raw"
    folder = nnunet.export_dataset("autopet", dl, out, dataset_id=7)
    assert folder == out / "Dataset007_AutoPETII"
    meta = json.loads((folder / "dataset.json").read_text())
    assert meta["channel_names"] == {"0": "CT", "1": "PET"}
    assert meta["labels"] == {"background": 0, "lesion": 1}
    assert meta["numTraining"] == 3 and meta["file_ending"] == ".nii.gz"
    cases = ["AutoPETII_0000", "AutoPETII_0001", "AutoPETII_0002"]
    names = sorted(p.name for p in (folder / "imagesTr").iterdir())
    assert names == [f"{c}_{k:04d}.nii.gz" for c in cases for k in (0, 1)]
    assert sorted(p.name for p in (folder / "labelsTr").iterdir()) == [f"{c}.nii.gz" for c in cases]
    ts = sorted(p.name for p in (folder / "imagesTs").iterdir())
    assert ts == [f"AutoPETII_ts0000_{k:04d}.nii.gz" for k in (0, 1)]
    # nnU-Net's reading: identifiers from imagesTr == labelsTr, as many as numTraining, labels consecutive from 0
    ids = nnunet_identifiers(folder / "imagesTr", meta["file_ending"])
    assert ids == cases == [p.name[:-7] for p in sorted((folder / "labelsTr").iterdir())]
    assert len(ids) == meta["numTraining"] and sorted(meta["labels"].values()) == list(range(len(meta["labels"])))
    # round trip: each channel file and label holds the original voxels and geometry (training, then validation)
    originals = arrays["training"] + arrays["validation"]
    for case, (chans, lab) in zip(cases, originals):
        for k, x in enumerate(chans):
            img = nib.load(folder / "imagesTr" / f"{case}_{k:04d}.nii.gz")
            assert np.array_equal(np.asarray(img.dataobj), x) and np.allclose(img.affine, AFFINE)
        assert np.array_equal(np.asarray(nib.load(folder / "labelsTr" / f"{case}.nii.gz").dataobj), lab)
    assert (folder / "imagesTr" / "AutoPETII_0000_0000.nii.gz").is_symlink()
    # our split as nnU-Net's fold 0; the provenance of every case
    assert json.loads((folder / "splits_final.json").read_text()) == [{"train": cases[:2], "val": cases[2:]}]
    prov = json.loads((folder / "cases.json").read_text())["cases"]
    assert prov["AutoPETII_0002"]["split"] == "validation"
    assert prov["AutoPETII_0000"]["image"][1].endswith("training0_ch1.nii.gz")
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary folder left
    with pytest.raises(FileExistsError, match="Dataset007_AutoPETII exists"):
        nnunet.export_dataset("autopet", dl, out, dataset_id=7)
    again = nnunet.export_dataset("autopet", dl, out, dataset_id=7, mode="copy", overwrite=True)
    assert not (again / "imagesTr" / "AutoPETII_0000_0000.nii.gz").is_symlink()


def test_export_splits_4d_files_and_applies_label_remap(tmp_path):
    (tmp_path / "data").mkdir()
    dl, arrays = make_datalist(tmp_path / "data", n_channels=4, n_train=1, n_val=0, n_test=0, four_d=True,
                               label_values=(2, 4))
    # BraTS 2021 labels 1, 2, 4 -> 1, 2, 3; a task of our own on the brats21 manifest, exported for nnU-Net
    settings = {"dataset_name": "BraTS", "channel_names": ["FLAIR", "T1CE", "T1", "T2"]}
    task = task_from_dict({**load_task("brats21").raw, "nnunet": settings})
    folder = nnunet.export_dataset(task, dl, tmp_path / "raw", dataset_id=12)
    chans, lab = arrays["training"][0]
    for k in range(4):
        img = nib.load(folder / "imagesTr" / f"BraTS_0000_{k:04d}.nii.gz")
        assert np.array_equal(np.asarray(img.dataobj), chans[k])
    out_lab = np.asarray(nib.load(folder / "labelsTr" / "BraTS_0000.nii.gz").dataobj)
    assert np.array_equal(out_lab, np.where(lab == 4, 3, lab)) and set(np.unique(out_lab)) == {0, 2, 3}
    meta = json.loads((folder / "dataset.json").read_text())
    assert meta["labels"] == {"background": 0, "necrotic_core": 1, "edema": 2, "enhancing_tumour": 3}
    assert not (folder / "splits_final.json").exists()  # no validation list: nnU-Net makes its own folds


def test_export_errors_name_the_files_and_leave_nothing(tmp_path):
    (tmp_path / "data").mkdir()
    dl, _ = make_datalist(tmp_path / "data", n_channels=3, n_train=1, n_val=0, n_test=0)
    out = tmp_path / "raw"
    with pytest.raises(VolumeError) as e:
        nnunet.export_dataset("autopet", dl, out, dataset_id=3)
    assert "training0_ch0.nii.gz" in str(e.value) and "in_channels=2" in str(e.value)
    assert list(out.iterdir()) == []  # the half-built folder was removed
    with pytest.raises(nnunet.NnUNetError, match="dataset id"):
        nnunet.export_dataset("autopet", dl, out)
    with pytest.raises(nnunet.NnUNetError, match="1..999"):
        nnunet.dataset_folder_name(1000, "X")
    with pytest.raises(nnunet.NnUNetError, match="segmentation"):
        nnunet.dataset_json(load_task("luna16"), 1)
    doc = json.loads(dl.read_text())
    del doc["training"][0]["label"]
    dl.write_text(json.dumps(doc))
    with pytest.raises(nnunet.NnUNetError, match="no label.*training0_ch0.nii.gz.*'test'"):
        nnunet.export_dataset("autopet", dl, out, dataset_id=3)


def test_commands_and_cli(tmp_path, capsys, monkeypatch):
    (tmp_path / "data").mkdir()
    dl, _ = make_datalist(tmp_path / "data")
    raw = tmp_path / "nnUNet_raw"
    cmds = nnunet.commands(42, raw, pretrained="/w/VoComni_nnunet.pt")
    assert cmds[0] == (f"export nnUNet_raw={raw} nnUNet_preprocessed={tmp_path}/nnUNet_preprocessed "
                       f"nnUNet_results={tmp_path}/nnUNet_results")
    assert cmds[1:] == ["nnUNetv2_plan_and_preprocess -d 42 --verify_dataset_integrity",
                        "nnUNetv2_train 42 3d_fullres 0 -pretrained_weights /w/VoComni_nnunet.pt"]
    monkeypatch.setattr(nnunet.shutil, "which", lambda name: None)  # nnU-Net not on PATH
    assert main(["nnunet", "export", "autopet", str(dl), str(raw), "--id", "42"]) == 0
    out = capsys.readouterr().out
    assert "Dataset042_AutoPETII (3 training cases)" in out and "nnUNetv2_train 42 3d_fullres 0" in out
    folder = "Dataset042_AutoPETII"
    assert f"cp {raw}/{folder}/splits_final.json {tmp_path}/nnUNet_preprocessed/{folder}/" in out
    assert 'pip install "voco[nnunet]"' in out
    assert main(["nnunet", "export", "verse20", str(dl), str(raw), "--id", "43", "--run"]) == 2  # 2 channels != 1
    assert "in_channels=1" in capsys.readouterr().err
    with pytest.raises(nnunet.NnUNetError, match="not installed"):
        nnunet.run_commands(cmds)


def test_run_commands_calls_nnunet_with_its_folders(tmp_path, monkeypatch):
    """Stand-in nnU-Net executables record their arguments and nnU-Net's three folder variables."""
    bin_dir, log = tmp_path / "bin", tmp_path / "calls.log"
    bin_dir.mkdir()
    for exe in ("nnUNetv2_plan_and_preprocess", "nnUNetv2_train"):
        f = bin_dir / exe
        f.write_text(f'#!/bin/sh\necho "{exe} $* raw=$nnUNet_raw pre=$nnUNet_preprocessed" >> {log}\n')
        f.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    raw = tmp_path / "nnUNet_raw"
    nnunet.run_commands(nnunet.commands(9, raw, fold="all"))
    pre = tmp_path / "nnUNet_preprocessed"
    assert log.read_text().splitlines() == [
        f"nnUNetv2_plan_and_preprocess -d 9 --verify_dataset_integrity raw={raw} pre={pre}",
        f"nnUNetv2_train 9 3d_fullres all raw={raw} pre={pre}"]
    assert pre.is_dir() and (tmp_path / "nnUNet_results").is_dir()


# A small PlainConvUNet-like name set: encoder, decoder (which repeats the encoder's tensors), seg layers.
NET = {"encoder.stages.0.0.convs.0.conv.weight": (32, 1, 3, 3, 3), "encoder.stages.0.0.convs.0.norm.weight": (32,),
       "decoder.encoder.stages.0.0.convs.0.conv.weight": (32, 1, 3, 3, 3),
       "decoder.transpconvs.0.weight": (64, 32, 2, 2, 2), "decoder.seg_layers.0.weight": (2, 32, 1, 1, 1),
       "decoder.seg_layers.0.bias": (2,)}


def _state(shapes):
    return {k: torch.zeros(s) for k, s in shapes.items()}


def test_checkpoint_check_by_name_and_shape(tmp_path, monkeypatch, capsys):
    # VoComni_nnunet-style: same network, 21 output classes -> only the seg layers differ: nnU-Net accepts it
    ckpt = {**NET, "decoder.seg_layers.0.weight": (21, 32, 1, 1, 1), "decoder.seg_layers.0.bias": (21,)}
    r = nnunet.compare_to_network(_state(ckpt), NET)
    assert r.expected == 6 and len(r.loaded) == 4 and r.coverage == pytest.approx(4 / 6)
    assert [m[0] for m in r.mismatched] == ["decoder.seg_layers.0.weight", "decoder.seg_layers.0.bias"]
    assert nnunet.accepted_by_nnunet(r) and r.kind == "nnU-Net network"
    # a missing encoder tensor, or another input-channel count, is refused
    no_enc = {k: v for k, v in ckpt.items() if not k.startswith("encoder.")}
    assert not nnunet.accepted_by_nnunet(nnunet.compare_to_network(_state(no_enc), NET))
    two_in = {**ckpt, "encoder.stages.0.0.convs.0.conv.weight": (32, 2, 3, 3, 3)}
    r2 = nnunet.compare_to_network(_state({**two_in, "extra.weight": (1,)}), NET)
    assert not nnunet.accepted_by_nnunet(r2) and r2.unexpected == ["extra.weight"]
    # from a file: weights_only load, `network_weights` (nnU-Net's checkpoint layout) and `module.` unwrapped
    path = tmp_path / "VoComni_nnunet.pt"
    torch.save({"network_weights": {f"module.{k}": v for k, v in _state(ckpt).items()}}, path)
    monkeypatch.setattr(nnunet, "network_shapes", lambda plans, ds, configuration: NET)
    r3 = nnunet.check_checkpoint(path, "plans.json", "dataset.json")
    assert len(r3.loaded) == 4 and nnunet.accepted_by_nnunet(r3)
    assert main(["nnunet", "check", str(path), "plans.json", "dataset.json"]) == 0
    assert "would accept" in capsys.readouterr().out
    torch.save({"network_weights": _state(no_enc)}, path)
    assert main(["nnunet", "check", str(path), "plans.json", "dataset.json"]) == 1
    out = capsys.readouterr().out
    assert "would refuse" in out and "missing     encoder.stages.0.0.convs.0.conv.weight" in out


def test_network_shapes_without_nnunet_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "nnunetv2", None)  # as if nnunetv2 were not installed
    with pytest.raises(nnunet.NnUNetError, match=r'pip install "voco\[nnunet\]"'):
        nnunet.network_shapes({}, {})


def test_finetune_of_an_nnunet_task_points_to_the_export(tmp_path):
    """VerSe20 is fine-tuned with nnU-Net in the paper: our SwinUNETR path says so and names the export command."""
    from voco_lib.tasks import finetune

    with pytest.warns(UserWarning, match="voco nnunet export verse20"), pytest.raises(Exception, match="missing.json"):
        finetune("verse20", profile="smoke", datalist=tmp_path / "missing.json", out=tmp_path / "run",
                 show_progress=False)
