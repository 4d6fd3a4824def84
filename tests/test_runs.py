"""The run-directory contract (voco_lib.runs): one run per directory, one writer, nothing lost."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from voco_lib.runs import (RunDirError, checkpoint_paths, fingerprint, latest_checkpoint, open_run, read_config,
                           read_metrics, truncate_metrics)

CFG = {"kind": "pretrain", "profile": {"steps": 4, "train": {"lr": 1e-4, "seed": 0, "log_every": 1},
                                       "views": {"region": (64, 64, 32)}}}


def _with(path: str, value) -> dict:
    cfg = json.loads(json.dumps(CFG))
    *parents, leaf = path.split(".")
    d = cfg["profile"]
    for p in parents:
        d = d[p]
    d[leaf] = value
    return cfg


def _finished(tmp_path, cfg=CFG):
    """A run directory holding a config, a metrics line and a checkpoint, closed."""
    with open_run(tmp_path / "run", cfg) as run:
        run.write_config()
        run.append_metrics({"kind": "train", "step": 1, "loss": 1.0})
        run.save_checkpoint({"step": 1, "w": torch.ones(2)}, 1, keep_last=2)
    return tmp_path / "run"


def test_fingerprint_ignores_cadence_and_budget_but_not_results():
    assert fingerprint(CFG) == fingerprint(_with("steps", 40)) == fingerprint(_with("train.log_every", 5))
    assert fingerprint(CFG) != fingerprint(_with("train.seed", 1))
    assert fingerprint(CFG) != fingerprint(_with("train.lr", 1e-3))


def test_a_used_directory_is_refused_and_kept(tmp_path):
    run = _finished(tmp_path)
    before = {p.name: p.read_bytes() for p in [run / "config.yaml", *checkpoint_paths(run)]}
    with pytest.raises(RunDirError, match="--resume.*--out.*--overwrite"):
        open_run(run, _with("train.seed", 1))
    assert {p.name: p.read_bytes() for p in [run / "config.yaml", *checkpoint_paths(run)]} == before


def test_overwrite_moves_the_old_run_aside(tmp_path):
    run = _finished(tmp_path)
    with open_run(run, _with("train.seed", 1), overwrite=True) as new:
        new.write_config()
    aside = tmp_path / "run.old-1"
    assert [p.name for p in checkpoint_paths(aside)] == ["step_00000001.pt"]
    assert read_config(aside) == json.loads(json.dumps(CFG))
    assert checkpoint_paths(run) == [] and read_config(run)["profile"]["train"]["seed"] == 1
    with pytest.raises(RunDirError, match="contradict"):
        open_run(run, CFG, resume=True, overwrite=True)


def test_one_writer_at_a_time(tmp_path):
    with open_run(tmp_path / "run", CFG) as run:
        run.write_config()
        with pytest.raises(RunDirError, match="in use by pid"):
            open_run(tmp_path / "run", CFG, resume=True)
        with pytest.raises(RunDirError, match="in use"):
            open_run(tmp_path / "run", CFG, overwrite=True)
    with open_run(tmp_path / "run", CFG, overwrite=True):  # released on close
        assert (tmp_path / "run.old-1" / "config.yaml").is_file()


def test_resume_refuses_a_result_changing_key_and_leaves_config_yaml(tmp_path):
    run = _finished(tmp_path)
    before = (run / "config.yaml").read_bytes()
    with pytest.raises(RunDirError, match=r"profile\.train\.lr: 0\.0001 -> 0\.001"):
        open_run(run, _with("train.lr", 1e-3), resume=True)
    assert (run / "config.yaml").read_bytes() == before
    assert read_config(run) == json.loads(json.dumps(CFG))  # still opens


def test_resume_allows_extending_steps_and_records_it(tmp_path, capsys):
    run = _finished(tmp_path)
    with open_run(run, _with("steps", 8), resume=True) as r:
        assert r.start_step == 1
        r.write_config()
    assert "steps 4 -> 8" in capsys.readouterr().out
    doc = yaml.safe_load((run / "config.yaml").read_text())
    assert doc["config"]["profile"]["steps"] == 8 and doc["fingerprint"] == fingerprint(CFG)


def test_resume_falls_back_to_the_newest_readable_checkpoint(tmp_path, capsys):
    run = _finished(tmp_path)
    good = checkpoint_paths(run)[-1]
    torn = run / "checkpoints" / "step_00000002.pt"
    torn.write_bytes(good.read_bytes()[:100])  # a truncated newest checkpoint
    with open_run(run, CFG, resume=True) as r:
        assert r.resumed[0] == good and r.start_step == 1
    out = capsys.readouterr().out
    assert "skipping unreadable checkpoint" in out and "step_00000002.pt" in out
    assert (run / "checkpoints" / "step_00000002.pt.unreadable").is_file()  # kept, never resumed or pruned


def test_resume_needs_a_run_and_a_readable_checkpoint(tmp_path):
    with pytest.raises(RunDirError, match="holds no run.*without --resume"):
        open_run(tmp_path / "none", CFG, resume=True)
    assert not (tmp_path / "none").exists()
    with open_run(tmp_path / "empty", CFG) as run:
        run.write_config()
    with pytest.raises(RunDirError, match="no readable checkpoint"):
        open_run(tmp_path / "empty", CFG, resume=True)


def test_orphan_temp_files_are_removed_on_open(tmp_path):
    run = _finished(tmp_path)
    orphan = run / "checkpoints" / ".step_00000002.pt.abc.tmp"
    orphan.write_bytes(b"partial")
    with open_run(run, CFG, resume=True):
        assert not orphan.exists()


def test_metrics_torn_last_line_and_truncation_by_line_count(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"kind": "train", "step": 1}\n{"kind": "eval", "step": 1}\n{"kind": "train", "st')
    assert [r["kind"] for r in read_metrics(tmp_path)] == ["train", "eval"]  # the torn line is skipped
    truncate_metrics(path, 1)
    assert path.read_text() == '{"kind": "train", "step": 1}\n'
    with pytest.raises(RunDirError, match="lost lines"):
        truncate_metrics(path, 3)
    path.write_text('{"kind": "train", "step": 1}\nnot json\n{"kind": "train", "step": 2}\n')
    with pytest.raises(RunDirError, match="line 2"):
        read_metrics(tmp_path)


def test_checkpoints_are_pruned_to_keep_last_and_the_reader_does_not_rename(tmp_path, capsys):
    with open_run(tmp_path / "run", CFG) as r:
        for s in range(1, 5):
            r.save_checkpoint({"step": s}, s, keep_last=2)
    assert [p.name for p in checkpoint_paths(tmp_path / "run")] == ["step_00000003.pt", "step_00000004.pt"]
    (tmp_path / "run" / "checkpoints" / "step_00000004.pt").write_bytes(b"junk")
    path, state = latest_checkpoint(tmp_path / "run", set_aside=False)
    assert state["step"] == 3 and (tmp_path / "run" / "checkpoints" / "step_00000004.pt").exists()


def test_config_yaml_is_written_only_when_the_run_starts(tmp_path):
    """A run refused after open_run (bad data, say) leaves the directory unclaimed: the rerun is not refused."""
    with open_run(tmp_path / "run", CFG):
        pass  # the data failed to load: fit never started
    assert not (tmp_path / "run" / "config.yaml").exists()
    with open_run(tmp_path / "run", CFG) as run:
        run.write_config()
    assert read_config(tmp_path / "run") == json.loads(json.dumps(CFG))


def test_files_a_refused_run_leaves_do_not_make_the_directory_foreign(tmp_path):
    """A folder --data run writes datalist.json before its data load; if that fails, the rerun is not refused."""
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "datalist.json").write_text("{}")
    with open_run(tmp_path / "run", CFG):
        pass
    (tmp_path / "run" / "notes.txt").write_text("mine")
    with pytest.raises(RunDirError, match="not a voco run directory"):
        open_run(tmp_path / "run", CFG)
