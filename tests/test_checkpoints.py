"""Checkpoint loading: weights_only, every released layout at 100 % coverage, loud partial loads, export, fetch."""

from __future__ import annotations

import argparse
import builtins
import functools
import hashlib
import http.server
import pickle
import threading
from pathlib import Path

import pytest
import torch
import yaml
from monai.networks.nets import SwinUNETR

from voco_lib.backbone import build_encoder, build_swinunetr
from voco_lib.checkpoints import (CheckpointError, cli_weights, export_encoder, fetch_weights, load_checkpoint,
                                  load_encoder, normalize_state_dict, released)
from voco_lib.data.fetch import FetchError

FS = 12  # small models for the load tests; names and counts do not depend on the feature size


@pytest.fixture(scope="module")
def monai_full() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return SwinUNETR(in_channels=1, out_channels=21, feature_size=FS, use_v2=True).state_dict()


def encoder_only(state):
    return {k: v for k, v in state.items() if not k.startswith(("decoder", "out."))}


def assert_equal_weights(model, state):
    own = model.state_dict()
    assert all(torch.equal(own[k], v) for k, v in state.items())


def test_encoder_layout_loads_fully(tmp_path, monai_full):
    state = encoder_only(monai_full)
    assert len(state) == 145
    torch.save(state, tmp_path / "ssl.pt")
    model = build_encoder(FS)
    report = load_encoder(model, tmp_path / "ssl.pt")
    assert report.coverage == 1.0 and len(report.loaded) == 145
    assert report.missing == report.unexpected == report.mismatched == []
    assert_equal_weights(model, state)


@pytest.mark.parametrize("wrap", ["module", "state_dict", "module+state_dict", "training"])
def test_wrapped_layouts_load_fully(tmp_path, monai_full, wrap):
    state = encoder_only(monai_full)
    if wrap == "module":
        obj = {f"module.{k}": v for k, v in state.items()}
    elif wrap == "state_dict":
        obj = {"state_dict": state}
    elif wrap == "module+state_dict":
        obj = {"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 3}
    else:  # the authors' raw SSL training checkpoint: module.backbone.* plus projection heads
        heads = {"module.student.layer1.0.weight": torch.zeros(4, 4), "module.teacher.layer1.0.weight": torch.zeros(4, 4)}
        obj = {"global_step": 10, "state_dict": {**{f"module.backbone.{k}": v for k, v in state.items()}, **heads}}
    torch.save(obj, tmp_path / "w.pt")
    model = build_encoder(FS)
    report = load_encoder(model, tmp_path / "w.pt")
    assert report.coverage == 1.0 and report.unexpected == []
    assert_equal_weights(model, state)


def test_full_21_class_layout(tmp_path, monai_full):
    torch.save({"state_dict": {f"module.{k}": v for k, v in monai_full.items()}}, tmp_path / "omni.pt")
    model = build_swinunetr(FS, 21)
    report = load_encoder(model, tmp_path / "omni.pt")
    assert report.kind == "full model" and report.coverage == 1.0
    assert len(report.loaded) == len(monai_full) == len(model.state_dict())
    assert_equal_weights(model, monai_full)
    # the encoder of a full checkpoint also loads into a bare encoder; the decoder keys are reported
    enc_report = load_encoder(build_encoder(FS), tmp_path / "omni.pt")
    assert enc_report.coverage == 1.0
    assert sorted(enc_report.unexpected) == sorted(k for k in monai_full if k.startswith(("decoder", "out.")))


def test_truncated_checkpoint_fails_naming_missing_keys(tmp_path, monai_full):
    state = {k: v for k, v in encoder_only(monai_full).items() if not k.startswith("encoder10.")}
    torch.save(state, tmp_path / "cut.pt")
    model = build_encoder(FS)
    before = model.swinViT.patch_embed.proj.weight.clone()
    with pytest.raises(CheckpointError, match=r"encoder10\.layer\.conv1\.conv\.weight") as e:
        load_encoder(model, tmp_path / "cut.pt")
    assert "cut.pt" in str(e.value) and "143/145" in str(e.value)
    assert torch.equal(model.swinViT.patch_embed.proj.weight, before)  # nothing loaded on failure
    report = load_encoder(model, tmp_path / "cut.pt", min_coverage=0.9)  # an explicit, reported partial load
    assert len(report.missing) == 2 and report.coverage == pytest.approx(143 / 145)


def test_wrong_feature_size_is_a_shape_mismatch(tmp_path, monai_full):
    torch.save(encoder_only(monai_full), tmp_path / "fs12.pt")
    with pytest.raises(CheckpointError, match=r"shape-mismatched.*swinViT\.patch_embed\.proj\.weight"):
        load_encoder(build_encoder(24), tmp_path / "fs12.pt")


class Payload:
    """Unpickling this calls open(marker, "w"): a visible side effect if a loader ever ran it."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return builtins.open, (str(self.marker), "w")


@pytest.mark.parametrize("fmt", ["torch.save", "plain pickle"])
def test_malicious_pickle_is_refused_and_never_runs(tmp_path, fmt):
    marker = tmp_path / "payload-ran"
    path = tmp_path / "evil.pt"
    obj = {"swinViT.patch_embed.proj.weight": torch.zeros(1), "x": Payload(marker)}
    if fmt == "torch.save":
        torch.save(obj, path)
    else:
        path.write_bytes(pickle.dumps(obj))
    with pytest.raises(CheckpointError, match="refused"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="refused"):
        load_encoder(build_encoder(FS), path)
    assert not marker.exists()


def test_corrupt_and_missing_files_are_named(tmp_path):
    (tmp_path / "half.pt").write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(CheckpointError, match="half.pt.*truncated"):
        load_checkpoint(tmp_path / "half.pt")
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_checkpoint(tmp_path / "nope.pt")


def test_normalize_strips_every_wrapper():
    t = torch.zeros(1)
    got = normalize_state_dict({"model": {"module._orig_mod.swin_vit.patch_embed.proj.bias": t,
                                          "module.proj_head.0.weight": t, "step": 3}})
    assert list(got) == ["swinViT.patch_embed.proj.bias"]
    with pytest.raises(CheckpointError, match="no state dict"):
        normalize_state_dict({"optimizer": {"lr": 1.0}})


def test_export_round_trip_is_atomic_and_loads_into_monai(tmp_path, monkeypatch):
    torch.manual_seed(1)
    model = build_swinunetr(FS, 3)
    path = export_encoder(model, tmp_path / "out" / "encoder.pt")
    state = torch.load(path, weights_only=True)
    assert len(state) == 145 and all(not k.startswith(("decoder", "out.")) for k in state)
    ref = SwinUNETR(in_channels=1, out_channels=2, feature_size=FS, use_v2=True)
    report = load_encoder(ref, path)
    assert report.coverage == 1.0
    assert torch.equal(ref.encoder10.layer.conv1.conv.weight, model.encoder10.layer.conv1.conv.weight)
    assert sorted(p.name for p in path.parent.iterdir()) == ["encoder.pt"]

    def broken_save(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        export_encoder(model, tmp_path / "out2" / "encoder.pt")
    assert list((tmp_path / "out2").iterdir()) == []  # no partial file, no temporary left


def test_manifest_lists_the_released_files():
    entries = released()
    assert sorted(entries) == sorted(["VoCo_B_SSL_head", "VoCo_L_SSL_head", "VoCo_H_SSL_head", "VoComni_B",
                                      "VoComni_L", "VoComni_H", "VoComni_nnunet"])
    for name, e in entries.items():
        assert e["url"] == f"https://huggingface.co/Luffy503/VoCo/resolve/main/{name}.pt" == \
            f"https://huggingface.co/Luffy503/VoCo/resolve/main/{e['file']}"
    sizes = {e["architecture"].get("feature_size") for e in entries.values() if e["kind"] == "encoder"}
    assert sizes == {48, 96, 192}
    with torch.device("meta"):
        assert all(len(build_encoder(e["architecture"]["feature_size"]).state_dict()) == e["n_tensors"]
                   for e in entries.values() if e["kind"] == "encoder")
    assert all(e["architecture"]["out_channels"] == 21 for e in entries.values() if e["kind"] == "swinunetr")


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def local_server(tmp_path):
    root = tmp_path / "www"
    root.mkdir()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(root)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def _manifest(path: Path, url: str, sha: str | None) -> Path:
    doc = {"name": "checkpoints", "source": "test", "checkpoints": [
        {"name": "Tiny", "file": "tiny.pt", "url": url, "kind": "encoder",
         "architecture": {"model": "SwinUNETR", "feature_size": FS, "in_channels": 1},
         "size": "small", "size_source": "test", "content_source": "test", "sha256": sha}]}
    path.write_text(yaml.safe_dump(doc))
    return path


def test_fetch_checks_sha256(tmp_path, local_server, monai_full):
    root, base = local_server
    torch.save(encoder_only(monai_full), root / "tiny.pt")
    sha = hashlib.sha256((root / "tiny.pt").read_bytes()).hexdigest()
    good = _manifest(tmp_path / "good.yaml", f"{base}/tiny.pt", sha)
    got = fetch_weights("Tiny", tmp_path / "dl", manifest=good, progress=False)
    assert hashlib.sha256(got.read_bytes()).hexdigest() == sha
    assert load_encoder(build_encoder(FS), got).coverage == 1.0

    bad = _manifest(tmp_path / "bad.yaml", f"{base}/tiny.pt", "0" * 64)
    with pytest.raises(FetchError, match="sha256 mismatch"):
        fetch_weights("Tiny", tmp_path / "dl2", manifest=bad, progress=False)
    assert not (tmp_path / "dl2" / "tiny.pt").exists()

    unknown = _manifest(tmp_path / "null.yaml", f"{base}/tiny.pt", None)
    with pytest.raises(CheckpointError, match="no sha256 recorded"):
        fetch_weights("Tiny", tmp_path / "dl3", manifest=unknown, progress=False)
    with pytest.raises(CheckpointError, match="unknown checkpoint"):
        fetch_weights("Nope", tmp_path / "dl3", manifest=good, progress=False)


def test_cli_list_and_inspect(tmp_path, capsys, monai_full):
    assert cli_weights(argparse.Namespace(action="list", target=None, out=None)) == 0
    out = capsys.readouterr().out
    assert out.count("huggingface.co/Luffy503/VoCo") == 7 and "VoComni_nnunet" in out
    torch.save({"state_dict": {f"module.{k}": v for k, v in monai_full.items()}}, tmp_path / "omni.pt")
    assert cli_weights(argparse.Namespace(action="inspect", target=str(tmp_path / "omni.pt"), out=None)) == 0
    out = capsys.readouterr().out
    assert "feature_size: 12" in out and "out_channels: 21" in out
    assert f"loaded {len(monai_full)}/{len(monai_full)} (100.0%)" in out


# ------------------------------------------------------------------------------------------------ bad tensors
def test_non_finite_and_integer_weights_are_refused_by_name(tmp_path, monai_full):
    """Issue 13's init guard: the fine-tuning init goes through load_encoder, which must refuse before loading."""
    state = dict(encoder_only(monai_full))
    state["swinViT.patch_embed.proj.weight"] = state["swinViT.patch_embed.proj.weight"].clone()
    state["swinViT.patch_embed.proj.weight"][0, 0, 0, 0, 0] = float("nan")
    state["encoder1.layer.conv1.conv.weight"] = torch.full_like(state["encoder1.layer.conv1.conv.weight"], float("inf"))
    state["encoder10.layer.conv1.conv.weight"] = state["encoder10.layer.conv1.conv.weight"].to(torch.int64)
    torch.save(state, tmp_path / "bad.pt")
    model = build_encoder(FS)
    before = model.swinViT.patch_embed.proj.bias.clone()
    with pytest.raises(CheckpointError) as e:
        load_encoder(model, tmp_path / "bad.pt")
    msg = str(e.value)
    assert "bad.pt" in msg and "2 tensor(s) with NaN/inf" in msg and "1 tensor(s) of the wrong dtype" in msg
    assert "swinViT.patch_embed.proj.weight" in msg and "encoder1.layer.conv1.conv.weight" in msg
    assert "encoder10.layer.conv1.conv.weight (int64, expected a float)" in msg
    assert torch.equal(model.swinViT.patch_embed.proj.bias, before)  # nothing loaded
    with pytest.raises(CheckpointError, match="bad.pt: refused"):  # inspect / weights add / export read it the same way
        cli_weights(argparse.Namespace(action="inspect", target=str(tmp_path / "bad.pt"), out=None))


def test_bad_tensor_list_is_capped_and_index_buffers_stay_integer(tmp_path, monai_full):
    state = {k: (torch.full_like(v, float("nan")) if v.is_floating_point() else v)
             for k, v in encoder_only(monai_full).items()}
    with pytest.raises(CheckpointError, match=r"137 tensor\(s\) with NaN/inf values: .* \.\.\. and 132 more"):
        load_encoder(build_encoder(FS), state, name="all-nan")
    good = dict(encoder_only(monai_full))
    index = next(k for k in good if k.endswith("relative_position_index"))
    good[index] = good[index].float()  # an index buffer saved as float cannot index
    with pytest.raises(CheckpointError, match=rf"{index} \(float32, expected an integer\)"):
        load_encoder(build_encoder(FS), good, name="float-index")
    assert load_encoder(build_encoder(FS), encoder_only(monai_full)).coverage == 1.0  # int64 index buffers are fine
