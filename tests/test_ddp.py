"""DDP (torchrun, gloo, CPU) with 2 ranks x 2 volumes == one process with 2 volumes x 2 accumulated micro-batches.

Why this comparison and not "one process with a batch of 4": VoCo's maths is per local batch. The heads'
BatchNorm normalises over the crops of the local batch (no SyncBN in TPAMI), and the inter-volume term pairs
volume b with (b+1) mod B *within* the local batch. DDP averages the gradients of per-rank mean losses,
which is exactly what gradient accumulation of per-micro-batch mean losses computes, with the same BN
groups and the same pairs. The data order maps micro-batch a of rank r to the same samples for every
(world, accum) with equal world·accum (see `voco_lib.data.loader`). The embedding dropout draws from a
per-process random stream, so it is switched off here (heads.dropout_p=0) to compare like with like.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch

from voco_lib.runs import checkpoint_paths

COMMON = ["--profile", "smoke", "--data", "phantom", "steps=3", "train.log_every=1", "train.eval_every=100",
          "train.checkpoint_every=3", "heads.dropout_p=0", "n_volumes=8", "data.n_eval=2"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train_losses(run) -> list[dict]:
    recs = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in recs if r["kind"] == "train"]


@pytest.mark.slow
def test_torchrun_two_ranks_match_one_process_with_accumulation(tmp_path):
    env = {**os.environ, "VOCO_PROFILE": "smoke", "OMP_NUM_THREADS": "1"}
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    subprocess.run([sys.executable, "-m", "voco_lib.cli", "pretrain", "--out", str(single), *COMMON,
                    "train.accum=2"], env=env, check=True, capture_output=True)
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                          f"--master_port={_free_port()}", "-m", "voco_lib.cli", "pretrain", "--out", str(ddp),
                          *COMMON], env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "effective batch 4 volumes (2 × accum 1 × 2)" in res.stdout
    a, b = _train_losses(single), _train_losses(ddp)
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3]
    for ra, rb in zip(a, b):
        for k in ("loss", "intra", "inter", "reg"):
            assert abs(ra[k] - rb[k]) < 1e-5, (k, ra, rb)
    # Ranks were checked bit-identical (elementwise max == min over ranks) before the checkpoint was written.
    state = torch.load(checkpoint_paths(ddp)[-1], map_location="cpu", weights_only=True)
    assert state["step"] == 3 and state["world"] == 2 and len(state["rng"]) == 2
    assert not torch.equal(state["rng"][0]["torch"], state["rng"][1]["torch"])  # per-rank RNG streams kept


def test_torchrun_with_one_process_takes_the_ddp_path(tmp_path):
    """Under torchrun a process group is up even for one process, so the DDP code path runs (the GPU check's
    one-process NCCL run relies on it); a plain process stays unwrapped."""
    script = tmp_path / "probe.py"
    script.write_text("import torch\nfrom voco_lib.distributed import init_runtime, wrap_ddp\nrt = init_runtime()\n"
                      "print('distributed', rt.distributed, type(wrap_ddp(torch.nn.Linear(2, 2), rt)).__name__)\n")
    one = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
                          str(script)], capture_output=True, text=True, timeout=300)
    assert "distributed True DistributedDataParallel" in one.stdout, one.stderr
    plain = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert "distributed False Linear" in plain.stdout, plain.stderr
