"""A run directory: one run, one writer, nothing lost.

Layout: `config.yaml` (the resolved config and its fingerprint), `metrics.jsonl`, `checkpoints/step_*.pt`,
`figures/`, `tb/`, and at the end `encoder.pt` (pre-training) or `results.json` (fine-tuning).

The contract (`open_run` enforces it; README "Run directories" says the same):
1. A run directory belongs to exactly one run: `config.yaml` holds the resolved config and a fingerprint
   (sha256 of that config without the keys in rule 3), seed included.
2. A new run in a used directory is refused, with the fix: `--resume`, a new `--out`, or `--overwrite`, which
   moves the old directory aside to `OUT.old-N` (never deletes it).
3. `--resume` compares the resolved configs and refuses any change that alters results, listing the keys.
   Allowed: `RESUMABLE` (the step budget, to extend a run, and logging/checkpoint cadence, loader workers).
4. `config.yaml` is written only after these checks pass and the run's data and checkpoint have loaded, atomically
   (a run refused for bad input leaves the directory as it was).
5. One writer at a time: an exclusive `fcntl` lock on `OUT/.lock`, held until the run closes.
6. Resume takes the newest *readable* checkpoint; an unreadable one is renamed `*.unreadable` and named.
   `metrics.jsonl` is cut back to the lines that checkpoint had seen (a torn last line is dropped).
7. Orphan temporary files (`.*.tmp`, left by a killed writer) are removed when the run opens.
8. Every file is written through `voco_lib.files` (temporary file, fsync, rename).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import torch
import yaml

from voco_lib.files import atomic_write, read_yaml, write_text

# Keys whose change on --resume does not alter what the run computes (leaf names anywhere in the config).
RESUMABLE = frozenset({"steps", "checkpoint_every", "keep_last", "eval_every", "log_every", "workers",
                       "tune_allocator", "cache_dir", "show_progress"})
USED_MARKERS = ("config.yaml", "metrics.jsonl", "results.json", "encoder.pt", "checkpoints")
SCRATCH = frozenset({".lock", "datalist.json", "tb", "figures"})  # written before a run claims its directory


class RunDirError(ValueError):
    """A run directory cannot be used as asked (the message says why and what to do)."""


# ------------------------------------------------------------------------------------------------ config
def fingerprint(config: dict[str, Any]) -> str:
    """sha256 of the canonical JSON of the config without the resumable keys: equal iff results are."""
    return hashlib.sha256(json.dumps(_without_resumable(config), sort_keys=True, default=str).encode()).hexdigest()


def _without_resumable(d: Any) -> Any:
    if isinstance(d, dict):
        return {k: _without_resumable(v) for k, v in d.items() if k not in RESUMABLE}
    return list(d) if isinstance(d, tuple) else d


def config_changes(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> dict[str, tuple[Any, Any]]:
    """Flat `a.b.c -> (old, new)` of every leaf that differs (tuples and lists compare equal)."""
    out: dict[str, tuple[Any, Any]] = {}
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out.update(config_changes(a, b, f"{prefix}{k}."))
        elif (list(a) if isinstance(a, tuple) else a) != (list(b) if isinstance(b, tuple) else b):
            out[prefix + k] = (a, b)
    return out


def read_config(run_dir: str | Path) -> dict[str, Any]:
    """The `config` section of a run's config.yaml."""
    path = Path(run_dir) / "config.yaml"
    doc = read_yaml(path, f"{run_dir} is not a run directory of voco: pass one, or start a new --out")
    if not isinstance(doc, dict) or "config" not in doc:
        raise RunDirError(f"{path}: no `config` section; it was not written by this version of voco")
    return doc["config"]


# ------------------------------------------------------------------------------------------------ metrics
def json_safe(v: Any) -> Any:
    """A JSON-safe copy for metrics and results: NaN/inf -> None, arrays and tensors -> lists."""
    import numpy as np

    if isinstance(v, (np.ndarray, torch.Tensor)):
        return [json_safe(x) for x in np.asarray(v).tolist()]
    if isinstance(v, (list, tuple)):
        return [json_safe(x) for x in v]
    if isinstance(v, dict):
        return {k: json_safe(x) for k, x in v.items()}
    if isinstance(v, (float, np.floating)):
        return float(v) if np.isfinite(v) else None
    if isinstance(v, np.integer):
        return int(v)
    return v


def read_metrics(run_dir: str | Path, kind: str | None = None) -> list[dict[str, Any]]:
    """The lines of a run's `metrics.jsonl` (or of a `.jsonl` file given directly), optionally of one `kind`;
    a torn last line (a killed writer) is skipped."""
    path = Path(run_dir) if Path(run_dir).suffix == ".jsonl" else Path(run_dir) / "metrics.jsonl"
    return [r for r in _metric_lines(path) if kind is None or r["kind"] == kind]


def _metric_lines(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    out = []
    for i, ln in enumerate(lines):
        try:
            out.append(json.loads(ln))
        except json.JSONDecodeError:
            if i < len(lines) - 1:
                raise RunDirError(f"{path}: line {i + 1} is not JSON; the metrics file is damaged") from None
    return out


def truncate_metrics(path: Path, n_lines: int) -> None:
    """Keep the first `n_lines` records (those the resumed checkpoint had seen); the rest are recomputed."""
    recs = _metric_lines(path)
    if len(recs) < n_lines:
        raise RunDirError(f"{path}: {len(recs)} lines, the checkpoint saw {n_lines}; the metrics file lost lines")
    write_text(path, "".join(json.dumps(r) + "\n" for r in recs[:n_lines]))


# ------------------------------------------------------------------------------------------------ checkpoints
def checkpoint_paths(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary files are hidden dot-files and never listed)."""
    return sorted((Path(run_dir) / "checkpoints").glob("step_*.pt"))


def latest_checkpoint(run_dir: str | Path, set_aside: bool = True) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint that loads (weights_only), skipping unreadable ones by name; the writer
    (`set_aside`) renames them `*.unreadable` so that they are kept but never resumed from or pruned."""
    for path in reversed(checkpoint_paths(run_dir)):
        try:
            return path, torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # a truncated or foreign file: any unpickling/zip error
            note = ""
            if set_aside:
                os.replace(path, path.with_name(path.name + ".unreadable"))
                note = f"; kept as {path.name}.unreadable"
            print(f"voco: skipping unreadable checkpoint {path} ({e.__class__.__name__}){note}", flush=True)
    return None


# ------------------------------------------------------------------------------------------------ the run
@dataclass
class Run:
    """An open run directory (rank 0 holds the lock; other ranks only read)."""

    path: Path
    config: dict[str, Any]
    resumed: tuple[Path, dict[str, Any]] | None = None  # (checkpoint, its state) when resuming
    main: bool = True
    _lock: IO | None = field(default=None, repr=False)

    @property
    def start_step(self) -> int:
        return int(self.resumed[1]["step"]) if self.resumed else 0

    def write_config(self) -> None:
        """Claim the directory for this run (rule 4): called by `loop.fit` once the data and checkpoint loaded,
        so that a run refused for bad input leaves the directory as it was."""
        if self.main:
            doc = {"fingerprint": fingerprint(self.config), "config": self.config}
            write_text(self.path / "config.yaml", yaml.safe_dump(doc, sort_keys=False))

    def append_metrics(self, record: dict[str, Any]) -> None:
        if self.main:
            with open(self.path / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")

    def n_metric_lines(self) -> int:
        return len(_metric_lines(self.path / "metrics.jsonl"))

    def save_checkpoint(self, state: dict[str, Any], step: int, keep_last: int) -> Path:
        """Temp file + rename, then keep the newest `keep_last` (all are this run's: rule 1)."""
        path = self.path / "checkpoints" / f"step_{step:08d}.pt"
        with atomic_write(path) as f:
            torch.save(state, f)
        for old in checkpoint_paths(self.path)[:-keep_last]:
            old.unlink(missing_ok=True)
        return path

    def close(self) -> None:
        if self._lock is not None:
            fcntl.flock(self._lock, fcntl.LOCK_UN)
            self._lock.close()
            self._lock = None

    def __enter__(self) -> "Run":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def is_used(path: Path) -> bool:
    return path.is_dir() and any((path / m).exists() for m in USED_MARKERS)


def open_run(path: str | Path, config: dict[str, Any], resume: bool | str = False, overwrite: bool = False,
             main: bool = True) -> Run:
    """Open `path` for the run described by `config` under the contract above; `main=False` for other ranks.

    resume="auto" (notebooks: a cell run again continues its run) resumes when `path` holds a run, with the
    same checks as `--resume`, and starts a new run otherwise."""
    path = Path(path)
    if resume == "auto":
        resume = (path / "config.yaml").is_file()
    config = json.loads(json.dumps(config, default=str))  # plain data, tuples as lists: what config.yaml holds
    if not main:  # rank 0 checks, writes and picks the checkpoint (`loop.fit` broadcasts its choice)
        return Run(path, config, main=False)
    if resume and overwrite:
        raise RunDirError("--resume and --overwrite contradict each other: continue the run or replace it, not both")
    if resume and not (path / "config.yaml").is_file():
        raise RunDirError(f"--resume: {path} holds no run (no config.yaml, no checkpoint); start without --resume")
    if path.is_dir() and not is_used(path) and any(p.name not in SCRATCH for p in path.iterdir()):
        raise RunDirError(f"{path} holds other files and is not a voco run directory; choose an empty or new --out")
    if overwrite and is_used(path):
        _move_aside(path)
    path.mkdir(parents=True, exist_ok=True)
    run = Run(path, config, main=True, _lock=lock_dir(path))
    try:
        if resume:
            run.resumed = _check_resume(path, config)
        elif is_used(path):
            raise RunDirError(f"{path} already holds a run; continue it with --resume, start a new one with a new "
                              "--out, or pass --overwrite to move the old one aside")
        for tmp in [*path.glob(".*.tmp"), *path.glob("checkpoints/.*.tmp")]:
            tmp.unlink()
    except BaseException:
        run.close()
        raise
    return run


def lock_dir(path: Path) -> IO:
    """An exclusive lock on `path/.lock` (held while the returned file is open); a second writer is told the holder."""
    f = open(path / ".lock", "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise RunDirError(f"{path} is in use by {holder}; wait for it to finish or choose another --out") from None
    f.truncate(0)
    f.write(f"pid {os.getpid()}")
    f.flush()
    return f


def _move_aside(path: Path) -> None:
    with open(path / ".lock", "a+") as f:  # never move a directory another process is writing
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunDirError(f"{path} is in use by another process; --overwrite cannot move it aside") from None
        n = 1
        while path.with_name(f"{path.name}.old-{n}").exists():
            n += 1
        aside = path.with_name(f"{path.name}.old-{n}")
        os.replace(path, aside)
    print(f"voco: moved the previous run in {path} aside to {aside}", flush=True)


def _check_resume(path: Path, config: dict[str, Any]) -> tuple[Path, dict[str, Any]]:
    """Rule 3 and 6: the stored config matches (up to RESUMABLE keys); the newest readable checkpoint."""
    old = read_config(path)
    every = config_changes(old, config)
    changed = {k: v for k, v in every.items() if k.rsplit(".", 1)[-1] not in RESUMABLE}
    if changed:
        listed = "; ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in ((k, *v) for k, v in changed.items()))
        raise RunDirError(f"--resume {path}: the config differs from the run's ({listed}); these change results. "
                          f"Resume with the run's values, or start a new --out (changeable: {', '.join(sorted(RESUMABLE))})")
    found = latest_checkpoint(path)
    if found is None:
        raise RunDirError(f"--resume: no readable checkpoint in {path / 'checkpoints'}; start without --resume "
                          "(with --overwrite to move the old files aside)")
    for k, (a, b) in every.items():
        if k not in changed:
            print(f"voco: resuming with {k} {a!r} -> {b!r}", flush=True)
    return found
