"""Running a grid: each row's pre-training once, then every cell as a papermill run of its task's notebook.

Layout of `OUT/`: `pretrain/<row>-<key>/` (a pre-training run directory), `cells/<row>/<cell>-<key>/` holding
`notebook.ipynb` (the executed notebook), `run/` (the fine-tuning run directory) and `cell.json` (the cell's
result, written last and atomically: a cell counts as done exactly when it exists). A killed grid reruns only
the cells without `cell.json`; a cell killed mid-run resumes from its run's checkpoint (the notebooks pass
`resume="auto"`), so no cell is trained or counted twice.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from queue import Queue
from typing import Any, Callable

import yaml

from voco_lib.files import write_text
from voco_lib.reproduce.grid import Cell, Row, Table, cell_key, digest

REPO = Path(__file__).resolve().parents[2]
NOTEBOOKS_DIR = REPO / "notebooks"
KERNEL_QUIET = "--IPKernelApp.log_level=ERROR"


@dataclass
class Outcome:
    """What became of one cell: ok (with its result), not_run (why; the grid goes on) or failed (the error line)."""

    cell: Cell
    status: str
    reason: str = ""
    result: dict[str, Any] | None = None
    key: str = ""
    path: Path | None = None


# ------------------------------------------------------------------------------------------------ pre-training
def pretrain_plan(row: Row, table: Table, profile: str) -> tuple[list[str], str]:
    """(overrides, key) of a row's own pre-training: the method, the table's budget, the row's overrides."""
    from voco_lib.config import resolve, to_dict

    spec = row.pretrain or {}
    overrides = [f"method={spec['method']}", *table.budget(profile, "pretrain"), *spec.get("overrides", [])]
    return overrides, digest({"profile": to_dict(resolve(profile, overrides)), "data": spec.get("data", "phantom"),
                              "method": spec["method"]})


def ensure_pretrain(row: Row, table: Table, profile: str, out: Path, log: Callable[[str], None]) -> tuple[Path, str]:
    """The row's pre-training run directory with its `encoder.pt`, trained (or resumed) here when missing."""
    overrides, key = pretrain_plan(row, table, profile)
    run = out / "pretrain" / f"{row.name}-{key}"
    if (run / "encoder.pt").is_file():
        return run, key
    data = (row.pretrain or {}).get("data", "phantom")
    cmd = [sys.executable, "-m", "voco_lib.cli", "pretrain", "--profile", profile, "--data", data, "--out", str(run),
           *(["--resume"] if (run / "config.yaml").is_file() else []), *overrides]
    log(f"pre-training {row.name} ({' '.join(overrides)}) -> {run}")
    code, tail = _run(cmd, run.parent / f"{run.name}.log", os.environ.copy())
    if code != 0 or not (run / "encoder.pt").is_file():
        raise RuntimeError(f"pre-training of row {row.name} failed ({tail}); log: {run.parent / (run.name + '.log')}")
    return run, key


# ------------------------------------------------------------------------------------------------ cells
def datalist_for(task: Any, data_root: str | Path | None) -> tuple[str | None, str | None]:
    """(datalist, reason it is missing) of a task: none for phantom tasks; DATA_ROOT/<dataset>/dataset.json else."""
    if task.is_phantom:
        return None, None
    where = Path(data_root or "data") / task.dataset / "dataset.json"
    if where.is_file():
        return str(where), None
    return None, (f"not run: {task.dataset} not found at {where}; see data_manifests/datasets/{task.dataset}.yaml "
                  "(pass --data-root DIR holding DIR/<dataset>/dataset.json)")


def cell_dir(out: Path, cell: Cell, key: str) -> Path:
    return out / "cells" / f"{cell.slug}-{key}"


def done(path: Path, key: str) -> dict[str, Any] | None:
    """The stored result of a finished cell with this key, else None."""
    f = path / "cell.json"
    if not f.is_file():
        return None
    rec = json.loads(f.read_text())
    return rec if rec.get("key") == key and rec.get("status") == "ok" else None


def execute_cell(cell: Cell, key: str, path: Path, profile: str, init: str, datalist: str | None,
                 env: dict[str, str]) -> Outcome:
    """Run the cell's notebook with papermill (a child process group), then record `cell.json`."""
    params = {"task": cell.task, "profile": profile, "init": init, "n_labeled": cell.n_labeled, "seed": cell.seed,
              "run_dir": str(path / "run"), "datalist": datalist, "overrides": list(cell.overrides)}
    partial = path / "notebook.partial.ipynb"
    cmd = [sys.executable, "-m", "papermill", str(NOTEBOOKS_DIR / f"{cell.notebook}.ipynb"), str(partial),
           "-y", yaml.safe_dump(params), "--cwd", str(NOTEBOOKS_DIR), "-k", "python3", "--no-progress-bar",
           "--log-level", "ERROR"]
    path.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    code, tail = _run(cmd, path / "log.txt", env)
    results = path / "run" / "results.json"
    if code != 0 or not results.is_file():
        return Outcome(cell, "failed", f"failed: {tail} (log: {path / 'log.txt'})", key=key, path=path)
    os.replace(partial, path / "notebook.ipynb")
    res = json.loads(results.read_text())
    record = {"status": "ok", "key": key, "cell": {**cell.__dict__, "overrides": list(cell.overrides)},
              "metric": res["metric"], "value": res["value"], "best": res.get("best"), "curve": res.get("curve"),
              "init": res.get("init"), "init_sha256": res.get("init_sha256"), "protocol": cell.protocol,
              "split": res.get("split"), "wall_s": round(time.time() - t0, 1), "train_wall_s": res.get("wall_s"),
              "device": device_name(env), "notebook": str(path / "notebook.ipynb"), "run_dir": str(path / "run")}
    write_text(path / "cell.json", json.dumps(record, indent=1))
    return Outcome(cell, "ok", result=record, key=key, path=path)


# ------------------------------------------------------------------------------------------------ processes
_RUNNING: set[subprocess.Popen] = set()
_LOCK = threading.Lock()


def _run(cmd: list[str], log: Path, env: dict[str, str]) -> tuple[int, str]:
    """Run `cmd` in its own process group (so an interrupt reaches its kernel too), output to `log`;
    (exit code, the last informative line)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=REPO, start_new_session=True)
        with _LOCK:
            _RUNNING.add(p)
        try:
            code = p.wait()
        except BaseException:  # interrupted while waiting (main thread): stop the child too, then go on stopping
            os.killpg(p.pid, signal.SIGTERM)
            p.wait()
            raise
        finally:
            with _LOCK:
                _RUNNING.discard(p)
    return code, _last_error(log.read_text(errors="replace"))


def stop_children() -> None:
    """SIGTERM every running cell's process group: the training loop checkpoints and exits."""
    with _LOCK:
        for p in list(_RUNNING):
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass


def _last_error(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    errors = [ln for ln in lines if "Error" in ln or "error:" in ln]
    return (errors or lines or ["no output"])[-1][:300]


def device_name(env: dict[str, str] | None = None) -> str:
    import torch

    if torch.cuda.is_available():
        gpu = (env or {}).get("CUDA_VISIBLE_DEVICES", "0")
        return f"cuda:{gpu} {torch.cuda.get_device_name(0)}"
    return f"cpu ({(env or {}).get('OMP_NUM_THREADS', os.cpu_count())} threads)"


def worker_envs(workers: int) -> Queue:
    """One environment per worker slot: a GPU each where there are GPUs, else the CPU cores split evenly."""
    import torch

    slots: Queue = Queue()
    gpus = torch.cuda.device_count()
    threads = max(1, (os.cpu_count() or 1) // workers)
    for i in range(workers):
        env = {**os.environ, "VOCO_HEADLESS": "1", "PYTHONUNBUFFERED": "1"}
        if gpus:
            env["CUDA_VISIBLE_DEVICES"] = str(i % gpus)
        else:
            env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
        slots.put(env)
    return slots


def run_pool(jobs: list[Callable[[dict[str, str]], Outcome]], workers: int) -> list[Outcome]:
    """Run the jobs `workers` at a time, each with a slot's environment; results in job order."""
    slots = worker_envs(workers)

    def one(job: Callable[[dict[str, str]], Outcome]) -> Outcome:
        env = slots.get()
        try:
            return job(env)
        finally:
            slots.put(env)

    with ThreadPoolExecutor(max_workers=workers) as pool:
        try:
            return list(pool.map(one, jobs))
        except BaseException:  # Ctrl-C or SIGTERM: the running cells checkpoint and stop, the rest never start
            pool.shutdown(wait=False, cancel_futures=True)
            stop_children()
            raise


def terminate_on_sigterm() -> None:
    """SIGTERM (a batch scheduler's stop) ends the grid like Ctrl-C does: running cells checkpoint, then exit."""
    def stop(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, stop)

