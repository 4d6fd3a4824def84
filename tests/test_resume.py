"""Resume: N steps straight == k steps, SIGKILL, resume to N (bit-identical weights and loss curve on CPU)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from voco_lib.loop import PERF_KEY
from voco_lib.runs import checkpoint_paths

N = 4
TIMEOUT = 900  # seconds; generous because CI machines may be shared
ARGS = [f"steps={N}", "train.checkpoint_every=1", "train.keep_last=2", "train.eval_every=3", "train.log_every=1",
        "n_volumes=4", "data.n_eval=2"]


def _cmd(out: Path, resume: bool = False) -> list[str]:
    return [sys.executable, "-m", "voco_lib.cli", "pretrain", "--profile", "smoke", "--data", "phantom",
            "--out", str(out), *(["--resume"] if resume else []), *ARGS]


def _env() -> dict[str, str]:
    return {**os.environ, "VOCO_PROFILE": "smoke", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}


def _curve(run: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(ln).items() if k != PERF_KEY}
            for ln in (run / "metrics.jsonl").read_text().splitlines()]


def _final(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(checkpoint_paths(run)[-1], map_location="cpu", weights_only=True)


def _assert_complete(run: Path) -> None:
    """Every visible checkpoint is complete (loads); temp files are hidden dot-files only."""
    for p in checkpoint_paths(run):
        torch.load(p, map_location="cpu", weights_only=True)


@pytest.mark.slow
def test_sigkill_then_resume_is_bit_identical(tmp_path):
    straight = tmp_path / "straight"
    subprocess.run(_cmd(straight), env=_env(), check=True, capture_output=True)

    killed = tmp_path / "killed"
    proc = subprocess.Popen(_cmd(killed), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    target = killed / "checkpoints" / "step_00000002.pt"
    try:
        deadline = time.time() + TIMEOUT
        while not target.exists():
            assert proc.poll() is None, "the run ended before it could be killed"
            assert time.time() < deadline, "no checkpoint at step 2"
            for p in checkpoint_paths(killed):  # only complete, renamed files are ever listed
                assert not p.name.startswith(".")
            time.sleep(0.02)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert not (killed / "checkpoints" / f"step_{N:08d}.pt").exists(), "killed too late: the run had finished"
    _assert_complete(killed)
    assert not (killed / "encoder.pt").exists()

    subprocess.run(_cmd(killed, resume=True), env=_env(), check=True, capture_output=True)
    a, b = _final(straight), _final(killed)
    assert a["step"] == b["step"] == N
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    assert _curve(straight) == _curve(killed)
    assert not list((killed / "checkpoints").glob(".*"))  # no temp file left behind
    assert [p.name for p in checkpoint_paths(killed)] == ["step_00000003.pt", "step_00000004.pt"]  # keep_last=2


@pytest.mark.slow
def test_sigterm_checkpoints_and_resume_finishes(tmp_path):
    run = tmp_path / "run"
    proc = subprocess.Popen(_cmd(run), env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    first = run / "checkpoints" / "step_00000002.pt"
    deadline = time.time() + TIMEOUT
    try:
        while not first.exists():
            assert proc.poll() is None and time.time() < deadline
            time.sleep(0.02)
    except AssertionError:
        proc.kill()
        raise
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 128 + signal.SIGTERM, out  # checkpointed, then stopped: not a success
    assert "stopped by SIGTERM" in out and "--resume" in out and "Traceback" not in out
    stopped = checkpoint_paths(run)[-1]
    step = torch.load(stopped, map_location="cpu", weights_only=True)["step"]
    assert 2 <= step < N and stopped.name == f"step_{step:08d}.pt"
    res = subprocess.run(_cmd(run, resume=True), env=_env(), capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert f"resuming at step {step}" in res.stdout
    assert (run / "encoder.pt").is_file()
    steps = [r["step"] for r in _curve(run) if r["kind"] == "train"]
    assert steps == list(range(1, N + 1))  # no step logged twice, none missing


def test_resume_without_checkpoint_is_a_clear_error(tmp_path):
    res = subprocess.run(_cmd(tmp_path / "empty", resume=True), env=_env(), capture_output=True, text=True)
    assert res.returncode == 2
    assert "no checkpoint" in res.stderr and "without --resume" in res.stderr
