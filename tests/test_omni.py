"""Omni-supervised VoComni: the objective, the pseudo-label term's gradient, pseudo-label files, stage checks,
and stage 1 + pseudo-labels + stage 2 end to end on tiny phantoms."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from voco_lib.backbone import build_encoder, build_swinunetr
from voco_lib.checkpoints import load_encoder
from voco_lib.files import sha256
from voco_lib.omni import (MARKER, OmniConfig, OmniData, OmniModel, combine, predict, pseudo_label,
                           read_pseudo_labels, resolve_omni, run_omni, segment, stage2)
from voco_lib.runs import read_metrics

K = 21


def _cfg(*extra: str):
    return resolve_omni("smoke", ["method=omni", *extra])


def _checkpoint(tmp_path: Path, k: int = K, seed: int = 0, name: str = "omni_model.pt") -> Path:
    """A stage checkpoint in the layout `_run_stage` writes (untrained weights)."""
    cfg, _ = _cfg()
    torch.manual_seed(seed)
    model = OmniModel(cfg, k)
    path = tmp_path / name
    torch.save({"model": model.state_dict(), "out_channels": k, "classes": [], "stage": "stage1"}, path)
    return path


def _sample(name: str = "vol-a") -> dict:
    g = torch.Generator().manual_seed(1)
    return {"name": name, "source": f"/data/{name}.nii.gz", "image": torch.rand(1, 32, 32, 32, generator=g),
            "label": None, "spacing": (3.0, 3.0, 2.0)}


def test_combine_weights_each_term():
    terms = {"voco": torch.tensor(0.5), "seg": torch.tensor(2.0), "pseudo": torch.tensor(4.0)}
    assert float(combine(terms, OmniConfig())) == pytest.approx(6.5)  # the authors' 1 per term
    oc = OmniConfig(w_voco=2.0, w_seg=0.25, w_pseudo=0.5)
    assert float(combine(terms, oc)) == pytest.approx(2 * 0.5 + 0.25 * 2 + 0.5 * 4)
    assert float(combine({"voco": terms["voco"], "seg": terms["seg"]}, oc)) == pytest.approx(1.5)  # stage 1


def test_omni_overrides_are_parsed_and_checked():
    cfg, oc = _cfg("omni.w_pseudo=0.5", "omni.stage1_steps=3", "omni.out_channels=none", "steps=7")
    assert (oc.w_pseudo, oc.stage1_steps, oc.out_channels, cfg.steps) == (0.5, 3, None, 7)
    with pytest.raises(ValueError, match="omni.w_seg"):
        _cfg("omni.w_seg=-1")
    with pytest.raises(ValueError, match="pseudo_grad"):
        _cfg("omni.pseudo_grad=encoder")
    with pytest.raises(ValueError, match="ema_scope"):
        _cfg("train.ema_scope=full")


@pytest.mark.parametrize("mode", ["decoder", "all"])
def test_pseudo_term_gradient_reaches_what_upstream_trains(mode):
    """decoder: encoder1/2/3/4/10 get nothing (their maps are detached), the decoder and the Swin stages up to
    the stage-4 skip do; all: the encoder blocks too."""
    torch.manual_seed(0)
    model = build_swinunetr(12, 3, small_crop="bypass")
    segment(model, torch.rand(1, 1, 32, 32, 32), detach_encoder=mode == "decoder").square().mean().backward()

    def got(prefix: str) -> bool:
        return any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters()
                   if n.startswith(prefix))

    assert got("decoder1.") and got("out.") and got("swinViT.layers1.")
    assert got("encoder1.") == (mode == "all") and got("encoder4.") == (mode == "all")
    # not detached, the same forward as SwinUNETR's own
    x = torch.rand(1, 1, 32, 32, 32)
    model.eval()
    assert torch.allclose(segment(model, x, True), model(x), atol=1e-6)


def test_pseudo_labels_written_with_provenance_and_read_back(tmp_path):
    cfg, _ = _cfg()
    ck = _checkpoint(tmp_path)
    s = _sample()
    classes = [f"c{i}" for i in range(K)]
    index = pseudo_label(ck, [s], tmp_path / "pl", cfg, classes)
    label, prov_path = tmp_path / "pl" / "vol-a.nii.gz", tmp_path / "pl" / "vol-a.json"
    prov = json.loads(prov_path.read_text())
    assert prov["stage1_sha256"] == sha256(ck) == index["stage1_sha256"]
    assert prov["label_sha256"] == sha256(label)
    assert prov["source_image"] == "/data/vol-a.nii.gz" and prov["classes"] == classes and prov["date"]
    assert not list((tmp_path / "pl").glob(".*.tmp")) and not list((tmp_path / "pl").glob(".*.nii.gz"))
    model = OmniModel(cfg, K)
    model.load_state_dict(torch.load(ck, weights_only=True)["model"])
    expected = predict(model.backbone, s["image"], (32, 32, 32), cfg)
    back = read_pseudo_labels(tmp_path / "pl", [s], ck)[0]["label"]
    assert back.shape == (1, 32, 32, 32) and torch.equal(back[0], expected)
    other = _checkpoint(tmp_path, seed=1, name="other.pt")
    with pytest.raises(ValueError, match="another stage-1 model"):
        read_pseudo_labels(tmp_path / "pl", [s], other)


def test_pseudo_label_write_is_atomic(tmp_path, monkeypatch):
    import nibabel as nib

    cfg, _ = _cfg()
    ck = _checkpoint(tmp_path)

    def torn(img, path):  # a writer killed half-way: some bytes in its file, then an error
        Path(path).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(nib, "save", torn)
    with pytest.raises(OSError, match="disk full"):
        pseudo_label(ck, [_sample()], tmp_path / "pl", cfg, [f"c{i}" for i in range(K)])
    assert sorted(p.name for p in (tmp_path / "pl").iterdir()) == [MARKER]  # no label, no provenance, no temp


def test_pseudo_labels_never_overwrite_real_labels(tmp_path):
    cfg, _ = _cfg()
    ck = _checkpoint(tmp_path)
    classes = [f"c{i}" for i in range(K)]
    real = tmp_path / "pl" / "vol-a.nii.gz"
    real.parent.mkdir()
    real.write_bytes(b"a real label")
    # a folder voco did not make: nothing in it is replaced
    with pytest.raises(ValueError, match="not made by voco"):
        pseudo_label(ck, [_sample()], tmp_path / "pl", cfg, classes)
    # a listed real label at the target path is refused even inside a pseudo-label folder
    (tmp_path / "pl" / MARKER).write_text("")
    with pytest.raises(ValueError, match="real label"):
        pseudo_label(ck, [_sample()], tmp_path / "pl", cfg, classes, real_labels={real.resolve()})
    assert real.read_bytes() == b"a real label"
    assert not (tmp_path / "pl" / "vol-a.json").exists()


def test_stage2_refuses_stage1_of_another_class_count(tmp_path):
    cfg, oc = _cfg()
    ck = _checkpoint(tmp_path, k=5)
    data = OmniData([f"c{i}" for i in range(K)], [], [], [_sample()], None, None, set(), {})
    with pytest.raises(ValueError, match="5 classes, the labelled set 21"):
        stage2(cfg, oc, data, tmp_path / "out", ck)
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_omni_end_to_end_on_tiny_phantoms(tmp_path):
    """Stage 1, pseudo-labels, stage 2: every output, the segmentation loss falls, pseudo-label Dice reported."""
    out = tmp_path / "omni"
    run_omni("smoke", "phantom", "phantom", out,
             ["steps=4", "n_volumes=2", "data.n_eval=1", "omni.n_labelled=1", "omni.n_val=1",
              "finetune.sw_overlap=0", "finetune.sw_batch_size=4", "train.eval_every=1000", "train.lr=2e-3"],
             show_progress=False)
    for stage in ("stage1", "stage2"):
        assert (out / stage / "config.yaml").is_file() and (out / stage / "omni_model.pt").is_file()
    s1, s2 = read_metrics(out / "stage1", "train"), read_metrics(out / "stage2", "train")
    assert "pseudo" not in s1[0] and "pseudo" in s2[0] and "voco" in s2[0]
    seg = [r["seg"] for r in s1 + s2]
    assert np.mean(seg[-2:]) < np.mean(seg[:2])
    prov = [json.loads(p.read_text()) for p in sorted((out / "pseudo_labels").glob("phantom-*.json"))]
    assert len(prov) == 2 and all(p["stage1_sha256"] == sha256(out / "stage1" / "omni_model.pt") for p in prov)
    report = json.loads((out / "omni_report.json").read_text())
    for key in ("pseudo_label_dice_stage1", "pseudo_label_dice_stage2"):
        assert 0.0 <= report[key]["mean"] <= 1.0 and len(report[key]["per_class"]) == K - 1
    full = load_encoder(build_swinunetr(12, K, small_crop="bypass"), out / "omni_swinunetr.pt")
    assert full.kind == "full model" and full.coverage == 1.0
    enc = load_encoder(build_encoder(12, small_crop="bypass"), out / "encoder.pt")
    assert enc.kind == "encoder" and enc.coverage == 1.0
