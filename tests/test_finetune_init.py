"""Loading a released-layout encoder checkpoint into every task model, with the coverage report."""

from __future__ import annotations

import pytest
import torch

from voco_lib.backbone import build_encoder
from voco_lib.config import resolve
from voco_lib.tasks import load_task, runner_class
from voco_lib.files import sha256
from voco_lib.tasks.engine import Context, checkpoint_feature_size, load_init, resolve_init


@pytest.fixture(scope="module")
def released_layout(tmp_path_factory):
    """An encoder-only state dict with bare SwinUNETR names (the layout of VoCo_B_SSL_head.pt), feature 12."""
    torch.manual_seed(0)
    enc = build_encoder(12)
    path = tmp_path_factory.mktemp("ckpt") / "encoder.pt"
    torch.save(enc.state_dict(), path)
    return path, enc.state_dict()


def _runner(task_name):
    task = load_task(task_name)
    cfg = resolve("smoke", ["finetune.n_train=1", "finetune.n_val=1"])
    return runner_class(task.type)(Context(task, cfg, 0, None, None, torch.device("cpu"), 12))


@pytest.mark.parametrize("task_name", ["phantom-seg", "phantom-cls", "phantom-reg", "phantom-vl", "phantom-rg"])
def test_released_layout_loads_into_every_task_model(released_layout, task_name):
    path, state = released_layout
    r = _runner(task_name)
    report = load_init(r.init_target(), path, min_coverage=0.9)
    target = r.init_target().state_dict()
    if task_name == "phantom-reg":  # 2 input channels: the first layers cannot load, and the report says so
        assert report["coverage"] < 1.0 and report["mismatched"]
        assert {m[0] for m in report["mismatched"]} >= {"swinViT.patch_embed.proj.weight"}
        assert torch.equal(target["swinViT.layers1.0.blocks.0.attn.qkv.weight"], state["swinViT.layers1.0.blocks.0.attn.qkv.weight"])
    else:
        assert report["coverage"] == 1.0 and report["loaded"] == report["expected"] == len(state)
        assert all(torch.equal(target[k], v) for k, v in state.items())
    assert "loaded" in report["summary"]


def test_init_resolution(released_layout, tmp_path):
    path, _ = released_layout
    assert resolve_init("scratch") is None and resolve_init(None) is None
    assert resolve_init(path) == path
    (tmp_path / "run").mkdir()
    with pytest.raises(FileNotFoundError, match="without encoder.pt"):
        resolve_init(tmp_path / "run")
    (tmp_path / "run" / "encoder.pt").write_bytes(path.read_bytes())
    assert resolve_init(tmp_path / "run") == tmp_path / "run" / "encoder.pt"
    assert checkpoint_feature_size(path) == 12
    assert len(sha256(path)) == 64
    with pytest.raises(ValueError, match="not a file, not a run directory"):
        resolve_init("no-such-checkpoint")


def test_cli_errors_are_clear(capsys):
    from voco_lib.cli import main
    from voco_lib.tasks import _split_overrides

    assert _split_overrides(["datalist=/d/x.json", "finetune.steps=3"]) == ("/d/x.json", ["finetune.steps=3"])
    assert main(["finetune", "btcv", "--profile", "smoke"]) == 2  # a real task needs its data
    assert "needs its data: pass a datalist" in capsys.readouterr().err
    assert main(["finetune", "no-such-task"]) == 2
    assert "unknown task 'no-such-task'" in capsys.readouterr().err
    assert main(["finetune", "phantom-seg", "--init", "nowhere.pt", "--profile", "smoke"]) == 2
    assert "not a file, not a run directory" in capsys.readouterr().err
