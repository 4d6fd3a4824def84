"""Fine-tuning under torchrun (DDP, gloo, CPU): 2 ranks × 1 crop == one process with 1 crop × 2 accumulated.

Why this comparison holds exactly: every rank draws the step's whole global batch from the same seeded
generator and keeps its part (`Context.share`: part micro·world + rank), so rank r of 2 trains on the crop
that micro-batch r of one process with `finetune.accum=2` trains on. SwinUNETR normalises with InstanceNorm
and LayerNorm (per sample, no batch statistics), DiceCE is a mean over samples, and DDP averages the ranks'
gradients, which is what accumulating loss/2 over two micro-batches computes. At the smoke profile's 32³ roi
the backbone skips encoder10, which `build_backbone` freezes (no gradient, so DDP needs no
find_unused_parameters, and AdamW leaves those weights alone in both).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from voco_lib.loop import PERF_KEY
from voco_lib.runs import checkpoint_paths

COMMON = ["--profile", "smoke", "--seed", "0", "phantom-seg", "finetune.steps=3", "finetune.batch_size=1",
          "finetune.log_every=1", "finetune.eval_every=100", "finetune.checkpoint_every=2", "finetune.n_val=1",
          "finetune.hd95=false"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(out: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                          f"--master_port={_free_port()}", "-m", "voco_lib.cli", "finetune", "--out", str(out),
                          *extra, *COMMON], env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    return res


def _records(run: Path, kind: str) -> list[dict]:
    """The records of one kind without `perf` (timing: the only field that differs between equal runs)."""
    recs = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    return [{k: v for k, v in r.items() if k != PERF_KEY} for r in recs if r["kind"] == kind]


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(checkpoint_paths(run)[-1], map_location="cpu", weights_only=True)["model"]


def _assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), rtol=0, atol=1e-6), k


def test_share_splits_the_global_batch_like_the_pretraining_order():
    """Part v = micro·world + rank: (world 2, accum 2) and (world 1, accum 4) read the same samples per part."""
    from voco_lib.config import resolve
    from voco_lib.tasks.engine import Context
    from voco_lib.tasks.registry import load_task

    cfg = resolve("smoke", ["finetune.batch_size=3"])
    task, items = load_task("phantom-seg"), list(range(12))

    def part(world: int, rank: int, accum: int, micro: int) -> list[int]:
        ctx = Context(task, cfg, 0, None, None, torch.device("cpu"), 12, world=world, rank=rank, accum=accum)
        assert ctx.global_batch == 12
        return list(ctx.share(items, micro))

    ddp = [part(2, r, 2, a) for a in range(2) for r in range(2)]
    assert ddp == [part(1, 0, 4, v) for v in range(4)] == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 10, 11]]
    one = Context(task, resolve("smoke", ["finetune.batch_size=3"]), 0, None, None, torch.device("cpu"), 12)
    assert one.global_batch == 3 and list(one.share(items)) == [0, 1, 2]  # one process: the batch it always drew


def test_runners_that_do_not_shard_refuse_accumulation(tmp_path):
    from voco_lib.tasks.engine import Runner, run

    class Whole(Runner):  # draws its whole batch itself: must not run split
        pass

    with pytest.raises(ValueError, match="does not split its batches"):
        run("phantom-seg", Whole, profile="smoke", out=tmp_path, overrides=["finetune.accum=2"], show_progress=False)


@pytest.mark.slow
def test_torchrun_two_ranks_match_one_process_with_accumulation_and_resume(tmp_path):
    from voco_lib.tasks import finetune

    single, ddp, resumed = tmp_path / "single", tmp_path / "ddp", tmp_path / "resumed"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each torchrun rank (OMP_NUM_THREADS=1): the same kernels, the same sums
    try:
        finetune("phantom-seg", profile="smoke", seed=0, out=single, overrides=[*COMMON[5:], "finetune.accum=2"],
                 show_progress=False)
    finally:
        torch.set_num_threads(threads)
    res = _torchrun(ddp)
    assert "2 process(es) on cpu, global batch 2 (1 × accum 1 × 2), lr 0.001" in res.stdout
    assert res.stdout.count('"run_dir"') == 1  # the CLI's result line is printed by rank 0 only

    a, b = _records(single, "train"), _records(ddp, "train")
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3]
    for ra, rb in zip(a, b):
        assert abs(ra["loss"] - rb["loss"]) < 1e-5, (ra, rb)
        assert ra["lr"] == rb["lr"]
    # Ranks were checked bit-identical (elementwise max == min over ranks) before each checkpoint was written.
    _assert_same_weights(_weights(single), _weights(ddp))
    state = torch.load(checkpoint_paths(ddp)[-1], map_location="cpu", weights_only=True)
    assert state["world"] == 2 and state["accum"] == 1 and len(state["rng"]) == 2
    results = json.loads((ddp / "results.json").read_text())
    assert (results["world_size"], results["global_batch"]) == (2, 2)

    # Resume under torchrun from the step-2 checkpoint of the DDP run: same weights and records as uninterrupted.
    shutil.copytree(ddp, resumed)
    checkpoint_paths(resumed)[-1].unlink()
    (resumed / "results.json").unlink()
    res = _torchrun(resumed, "--resume")
    assert "resuming at step 2" in res.stdout
    _assert_same_weights(_weights(ddp), _weights(resumed))
    assert _records(resumed, "train") == _records(ddp, "train")
    assert [r["step"] for r in _records(resumed, "val")] == [0, 3]


def test_cli_takes_overrides_after_options(capsys, tmp_path):
    """`voco finetune TASK --opt V key=value` (the README's torchrun form): the overrides reach the run."""
    from voco_lib.cli import main

    assert main(["finetune", "btcv", "--profile", "smoke", "--out", str(tmp_path), "finetune.steps=1", "--seed", "1",
                 "datalist=/nonexistent/d.json"]) == 2
    assert "/nonexistent/d.json: datalist not found" in capsys.readouterr().err  # datalist= was not dropped
    with pytest.raises(SystemExit):
        main(["finetune", "phantom-seg", "--no-such-option"])
