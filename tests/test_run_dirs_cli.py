"""The run-directory defects a user hit from the command line, pre-training and fine-tuning (each was a bug)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from voco_lib import cli
from voco_lib.pretrain import load_run, run_pretraining
from voco_lib.runs import checkpoint_paths

TINY = ["steps=2", "n_volumes=2", "data.n_eval=1", "train.checkpoint_every=1"]
FT = ["finetune.steps=4", "finetune.checkpoint_every=1", "finetune.eval_every=2", "finetune.n_train=2",
      "finetune.n_val=2", "finetune.batch_size=2"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    return run_pretraining("smoke", "phantom", tmp_path_factory.mktemp("pre") / "run", TINY, show_progress=False)


def _snapshot(run):
    return {p.name: p.read_bytes() for p in [run / "config.yaml", run / "metrics.jsonl", *checkpoint_paths(run)]}


def _pretrain(run, *extra):
    return cli.main(["pretrain", "--profile", "smoke", "--data", "phantom", "--out", str(run), *extra, *TINY[1:]])


def test_rerun_into_a_used_out_is_refused_and_loses_nothing(finished, capsys):
    before = _snapshot(finished)
    assert _pretrain(finished, "steps=2", "train.seed=1") == 2
    err = capsys.readouterr().err
    assert "already holds a run" in err and "--resume" in err and "--overwrite" in err and "Traceback" not in err
    assert _snapshot(finished) == before


@pytest.mark.parametrize("change, key", [("train.lr=1e-3", "train.lr"), ("feature_size=24", "feature_size")])
def test_resume_with_a_result_changing_key_is_refused_and_the_run_still_loads(finished, capsys, change, key):
    before = _snapshot(finished)
    assert _pretrain(finished, "--resume", "steps=2", change) == 2
    err = capsys.readouterr().err
    assert key in err and "change results" in err
    assert _snapshot(finished) == before
    assert load_run(finished).backbone.embed_dim == 24 * 12  # the stored feature size, not the refused one


def test_finetune_resume_compares_the_config(tmp_path, capsys):
    out = tmp_path / "ft"
    base = ["finetune", "phantom-cls", "--profile", "smoke", "--out", str(out), "--seed", "1"]
    assert cli.main([*base, "finetune.steps=1", *FT[1:]]) == 0
    assert cli.main([*base, "--resume", "finetune.steps=1", *FT[1:], "finetune.lr=1e-2"]) == 2
    assert "finetune.lr" in capsys.readouterr().err
    assert cli.main([*base, "--seed", "2", "--resume", "finetune.steps=1", *FT[1:]]) == 2  # another seed
    assert "seed" in capsys.readouterr().err


def _finetune_cmd(out, *extra):
    return [sys.executable, "-m", "voco_lib.cli", "finetune", "phantom-cls", "--profile", "smoke", "--seed", "1",
            "--out", str(out), *extra, *FT]


@pytest.mark.slow
def test_finetune_sigterm_checkpoints_exits_143_and_resume_is_bit_identical(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    subprocess.run(_finetune_cmd(tmp_path / "straight"), env=env, check=True, capture_output=True)
    run = tmp_path / "cut"
    proc = subprocess.Popen(_finetune_cmd(run), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 600
    while not (run / "checkpoints" / "step_00000001.pt").exists():
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[0]
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 143, out
    assert "stopped by SIGTERM" in out and "Traceback" not in out
    assert not list(run.rglob(".*.tmp")) and not (run / "results.json").exists()
    res = subprocess.run(_finetune_cmd(run, "--resume"), env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    a = torch.load(checkpoint_paths(tmp_path / "straight")[-1], weights_only=True)["model"]
    b = torch.load(checkpoint_paths(run)[-1], weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
