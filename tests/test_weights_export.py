"""Weights out (`voco weights export`: safetensors, the released .pt layout, a MONAI bundle) and in
(`voco weights add NAME PATH`: a user-level manifest with the file's sha256, used by fetch / --init NAME)."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
import yaml
from monai.networks.nets import SwinUNETR

from voco_lib import checkpoints as C
from voco_lib.backbone import build_encoder, build_swinunetr
from voco_lib.checkpoints import CheckpointError, export_encoder, export_weights, load_checkpoint, load_encoder
from voco_lib.cli import main as voco

FS = 12


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A finished pre-training run as far as weights go: RUN_DIR/encoder.pt in the released layout."""
    run = tmp_path_factory.mktemp("run")
    torch.manual_seed(0)
    export_encoder(build_encoder(FS), run / "encoder.pt")
    return run


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_safetensors_round_trip_without_pickle(run_dir, tmp_path, monkeypatch):
    out = export_weights(run_dir, "safetensors", tmp_path / "enc.safetensors")
    source = torch.load(run_dir / "encoder.pt", weights_only=True)

    def no_pickle(*a, **k):
        raise AssertionError("a safetensors file must load without torch.load / pickle")

    monkeypatch.setattr(torch, "load", no_pickle)
    monkeypatch.setattr(pickle, "load", no_pickle)
    assert _same(load_checkpoint(out), source)
    renamed = tmp_path / "enc.pt"  # recognised by content, not by its suffix
    renamed.write_bytes(out.read_bytes())
    model = build_encoder(FS)
    assert load_encoder(model, renamed).coverage == 1.0
    assert _same({k: v for k, v in model.state_dict().items()}, source)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["enc.pt", "enc.safetensors"]  # no temporary left


def test_truncated_safetensors_is_named(run_dir, tmp_path):
    out = export_weights(run_dir, "safetensors", tmp_path / "enc.safetensors")
    out.write_bytes(out.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=r"enc\.safetensors: not a readable safetensors file.*export or download"):
        load_checkpoint(out)


def test_pt_export_is_the_released_layout(tmp_path):
    """A raw training checkpoint (DDP prefix, SSL heads) comes out as bare encoder names, heads dropped."""
    torch.manual_seed(2)
    enc = {k: v for k, v in build_encoder(FS).state_dict().items()}
    raw = {"state_dict": {**{f"module.backbone.{k}": v for k, v in enc.items()},
                          "module.student.layer1.0.weight": torch.zeros(3)}, "epoch": 1}
    torch.save(raw, tmp_path / "train.pt")
    out = export_weights(tmp_path / "train.pt", "pt")
    assert out == tmp_path / "train_released.pt"
    assert _same(torch.load(out, weights_only=True), enc)
    with pytest.raises(ValueError, match="is the source file itself"):
        export_weights(out, "pt", out)


def test_monai_bundle_is_accepted_by_monai_bundle_tools(run_dir, tmp_path):
    """The bundle is checked by MONAI's own tools, offline.

    `monai.bundle.verify_metadata` needs to download MONAI's metadata JSON schema (a URL in metadata.json), which
    this machine cannot reach, so instead: ConfigParser instantiates `network_def` from configs/inference.json and
    loads models/model.pt into it with strict=True; the bundle's own `initialize` expression runs;
    `verify_net_in_out` checks the network against metadata.json's input/output format; `ckpt_export` turns the
    bundle into TorchScript whose output equals the eager network's.
    """
    from monai.bundle import ConfigParser, ckpt_export, verify_net_in_out

    bundle = export_weights(run_dir, "monai-bundle", tmp_path / "b", out_channels=3)
    assert sorted(str(p.relative_to(bundle)) for p in bundle.rglob("*") if p.is_file()) == [
        "configs/inference.json", "configs/metadata.json", "models/model.pt"]
    assert [p.name for p in tmp_path.iterdir()] == ["b"]  # built aside, renamed into place
    meta, cfg = bundle / "configs" / "metadata.json", bundle / "configs" / "inference.json"
    parser = ConfigParser()
    parser.read_config(str(cfg))
    parser.read_meta(str(meta))
    parser["bundle_root"] = str(bundle)
    net = parser.get_parsed_content("network_def")
    assert isinstance(net, SwinUNETR)
    weights = torch.load(bundle / "models" / "model.pt", weights_only=True)
    net.load_state_dict(weights, strict=True)
    encoder = torch.load(run_dir / "encoder.pt", weights_only=True)
    assert all(torch.equal(weights[k], v) for k, v in encoder.items())  # our encoder, unchanged
    parser.get_parsed_content("initialize")  # the bundle's own load expression
    verify_net_in_out(net_id="network_def", meta_file=str(meta), config_file=str(cfg), device="cpu", n=2)

    ts = bundle / "models" / "model.ts"
    ckpt_export(net_id="network_def", filepath=str(ts), ckpt_file=str(bundle / "models" / "model.pt"),
                meta_file=str(meta), config_file=str(cfg), use_trace=True, input_shape=[1, 1, 64, 64, 64])
    x = torch.rand(1, 1, 64, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(torch.jit.load(str(ts))(x), net.eval()(x), atol=1e-5)


def test_bundle_errors_and_atomicity(run_dir, tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="--out-channels K"):
        export_weights(run_dir, "monai-bundle", tmp_path / "b")
    torch.manual_seed(0)
    full = build_swinunetr(FS, 4).state_dict()
    torch.save(full, tmp_path / "full.pt")
    bundle = export_weights(tmp_path / "full.pt", "monai-bundle")  # a full model keeps its decoder and classes
    assert bundle == tmp_path / "full_bundle"
    assert _same(torch.load(bundle / "models" / "model.pt", weights_only=True), full)
    assert json.loads((bundle / "configs" / "inference.json").read_text())["network_def"]["out_channels"] == 4
    with pytest.raises(ValueError, match="full_bundle: already exists"):
        export_weights(tmp_path / "full.pt", "monai-bundle")
    with pytest.raises(ValueError, match="has 4 output channels, not --out-channels 2"):
        export_weights(tmp_path / "full.pt", "monai-bundle", tmp_path / "c", out_channels=2)

    def disk_full(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(C, "write_text", disk_full, raising=False)
    monkeypatch.setattr("voco_lib.files.write_text", disk_full)
    with pytest.raises(OSError, match="disk full"):
        export_weights(run_dir, "monai-bundle", tmp_path / "d", out_channels=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full.pt", "full_bundle"]  # no partial bundle, no temp


def test_cli_export(run_dir, tmp_path, capsys):
    assert voco(["weights", "export", str(run_dir), "--format", "safetensors", "--out", str(tmp_path / "w")]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "w")
    assert voco(["weights", "export", str(run_dir)]) == 2
    assert "needs --format safetensors|monai-bundle|pt" in capsys.readouterr().err
    assert voco(["weights", "export", str(tmp_path / "nope"), "--format", "pt"]) == 2
    assert "nope: no such run directory or checkpoint file" in capsys.readouterr().err
    (tmp_path / "unfinished").mkdir()
    assert voco(["weights", "export", str(tmp_path / "unfinished"), "--format", "pt"]) == 2
    assert "no encoder.pt" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ weights add
@pytest.fixture
def user_dir(tmp_path, monkeypatch) -> Path:
    home = tmp_path / "home"
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("VOCO_DATA_DIR", str(tmp_path / "data"))
    return tmp_path / "data"


def test_add_registers_the_file_and_fetch_uses_it(run_dir, tmp_path, user_dir, capsys):
    file = tmp_path / "dl" / "mine.pt"
    file.parent.mkdir()
    file.write_bytes((run_dir / "encoder.pt").read_bytes())
    assert voco(["weights", "add", "MyEncoder", str(file)]) == 0
    assert "registered MyEncoder" in capsys.readouterr().out
    doc = yaml.safe_load((user_dir / "checkpoints.user.yaml").read_text())
    (entry,) = doc["checkpoints"]
    assert entry["name"] == "MyEncoder" and entry["path"] == str(file.resolve())
    assert entry["kind"] == "encoder" and entry["architecture"] == {"feature_size": FS, "in_channels": 1}
    from voco_lib.files import sha256

    assert entry["sha256"] == sha256(file) and entry["tensors"] == 145
    assert C.fetch_weights("MyEncoder") == file.resolve()
    assert voco(["weights", "list"]) == 0
    assert "MyEncoder" in capsys.readouterr().out
    assert not (Path.home() / ".cache").exists()  # VOCO_DATA_DIR wins over ~/.cache/voco

    data = file.read_bytes()
    file.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # changed after it was registered
    with pytest.raises(CheckpointError, match=r"mine\.pt: sha256 .* differs .*\(voco weights add MyEncoder"):
        C.fetch_weights("MyEncoder")
    file.unlink()
    with pytest.raises(FileNotFoundError, match="registered as MyEncoder .* but missing"):
        C.fetch_weights("MyEncoder")
    with pytest.raises(CheckpointError, match="no sha256 recorded.*voco weights add VoCo_B_SSL_head FILE"):
        C.fetch_weights("VoCo_B_SSL_head")  # released files with unknown hashes stay refused


def test_add_default_location_is_the_home_cache(run_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("VOCO_DATA_DIR", raising=False)
    C.add_weights("Home", run_dir / "encoder.pt")
    assert "Home" in yaml.safe_load((tmp_path / ".cache" / "voco" / "checkpoints.user.yaml").read_text())["checkpoints"][0]["name"]


def test_add_checks_architecture_and_coverage(run_dir, tmp_path, user_dir, monkeypatch):
    with pytest.raises(CheckpointError, match=r"feature_size 12, but VoCo_B_SSL_head .* has feature_size 48"):
        C.add_weights("VoCo_B_SSL_head", run_dir / "encoder.pt")
    with pytest.raises(CheckpointError, match="kind encoder, but VoComni_B is kind swinunetr"):
        C.add_weights("VoComni_B", run_dir / "encoder.pt")
    state = torch.load(run_dir / "encoder.pt", weights_only=True)
    torch.save({k: v for k, v in state.items() if not k.startswith("encoder10.")}, tmp_path / "cut.pt")
    with pytest.raises(CheckpointError, match=r"cut\.pt: encoder: loaded 143/145.*encoder10\.layer\.conv1\.conv\.weight"):
        C.add_weights("Cut", tmp_path / "cut.pt")
    torch.save({"w": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a SwinUNETR"):
        C.add_weights("Other", tmp_path / "other.pt")
    with pytest.raises(ValueError, match="checkpoint name 'a/b'"):
        C.add_weights("a/b", run_dir / "encoder.pt")
    assert not (user_dir / "checkpoints.user.yaml").exists()  # nothing registered on a refusal

    # a released name whose architecture matches is registered and then fetched from the user's file
    tiny = {"name": "Tiny", "file": "tiny.pt", "url": "https://example.invalid/tiny.pt", "kind": "encoder",
            "architecture": {"model": "SwinUNETR", "feature_size": FS, "in_channels": 1}, "sha256": None}
    monkeypatch.setattr(C, "released", lambda manifest=None: {"Tiny": tiny})
    C.add_weights("Tiny", run_dir / "encoder.pt")
    assert C.fetch_weights("Tiny") == (run_dir / "encoder.pt").resolve()


def test_broken_user_manifest_is_named(user_dir):
    user_dir.mkdir(parents=True)
    (user_dir / "checkpoints.user.yaml").write_text("name: checkpoints.user\ncheckpoints: [{name: X}]\n")
    with pytest.raises(ValueError, match=r"checkpoints\.user\.yaml"):
        C.fetch_weights("X")


@pytest.mark.slow
def test_init_name_fine_tunes_from_the_registered_file(run_dir, tmp_path, user_dir):
    """`--init NAME` after `voco weights add NAME PATH` loads that file (coverage recorded in results.json)."""
    from voco_lib.tasks import finetune

    C.add_weights("MyEncoder", run_dir / "encoder.pt")
    res = finetune("phantom-seg", init="MyEncoder", profile="smoke", out=tmp_path / "ft", show_progress=False)
    text = json.dumps(res)
    assert "MyEncoder" in text and "loaded 145/145" in text
