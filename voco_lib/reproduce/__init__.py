"""`voco reproduce TABLE`: a table of the paper (or the phantom table) as one resumable grid of notebook runs.

The protocol, recorded in every cell: task, init (scratch / a released checkpoint / the row's own pre-training
run), protocol (`full` fine-tuning or `frozen` encoder with a trained probe/head), `n_labeled`, seed, split
(phantom tasks: the phantom validation seeds; real tasks: the datalist's `validation` list — never the test
set), metric. Each cell is a papermill run of the task type's notebook (10-13), so every number has an
executed notebook beside it; `OUT/` then holds `table.md`, `table.csv`, `table.html`, `table.png` and
`provenance.json` (commit, device, per-cell resolved-config key, init sha256, wall time).
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from voco_lib.files import write_text
from voco_lib.reproduce import render
from voco_lib.reproduce.execute import (Outcome, cell_dir, datalist_for, device_name, done, ensure_pretrain,
                                        execute_cell, pretrain_plan, run_pool, terminate_on_sigterm)
from voco_lib.reproduce.grid import Cell, Table, cell_key, expand, load_table

__all__ = ["Report", "plan", "run_table", "load_table", "expand", "cli_reproduce"]


@dataclass
class Report:
    """What `run_table` made: the outcomes per cell and the rendered files."""

    table: Table
    profile: str
    out: Path
    store: Path  # where the cells and pre-training runs are kept
    outcomes: list[Outcome]
    entries: list[render.Entry]
    markdown: str
    files: dict[str, Path]


@dataclass
class Planned:
    """A cell before running: todo, done (a result with the same key exists) or not_run (why)."""

    cell: Cell
    state: str
    key: str = ""
    reason: str = ""
    init: str = ""
    datalist: str | None = None
    needs: str = ""


def plan(table: Table, profile: str, store: Path, seeds: Sequence[int] | None = None,
         data_root: str | Path | None = None) -> list[Planned]:
    """Every cell's state; a pre-training row's cells point at its run `STORE/pretrain/ROW-KEY` (trained or not)."""
    from voco_lib.tasks.registry import load_task

    rows, planned = {r.name: r for r in table.rows}, []
    for cell in expand(table, profile, seeds):
        task = load_task(cell.task)
        datalist, missing = datalist_for(task, data_root)
        row = rows[cell.row]
        if cell.init is None:
            planned.append(Planned(cell, "not_run", reason=f"not run: no weights for {row.label} in this repository"
                                   + (f" ({row.note})" if row.note else "")))
            continue
        if missing:
            planned.append(Planned(cell, "not_run", reason=missing))
            continue
        pkey, init, needs = None, cell.init, f"notebook {cell.notebook}, init {cell.init}"
        if cell.init.startswith("pretrain:"):
            try:
                _, pkey = pretrain_plan(row, table, profile)
            except ValueError as e:  # e.g. a method this checkout does not have
                planned.append(Planned(cell, "not_run", reason=f"not run: pre-training {row.name}: {e}"))
                continue
            run = store / "pretrain" / f"{row.name}-{pkey}"  # where ensure_pretrain trains it
            init, needs = str(run), f"notebook {cell.notebook}, pre-training run {run.name}"
        if datalist:
            needs += f", datalist {datalist}"
        key = cell_key(cell, profile, pkey, datalist)
        state = "done" if done(cell_dir(store, cell, key), key) else "todo"
        planned.append(Planned(cell, state, key, init=init, datalist=datalist, needs=needs))
    return planned


def run_table(table: str | Path | Table, profile: str | None = None, seeds: Sequence[int] | None = None,
              workers: int = 1, out: str | Path | None = None, data_root: str | Path | None = None,
              dry_run: bool = False, log: Callable[[str], None] = print) -> Report | list[Planned]:
    """Run (or with `dry_run`, list) the table's grid and render it into `out`; returns the Report.

    Cells and pre-training runs are kept in `out` when it is given; by default (`out=None`) in the shared
    store `runs/reproduce/` (tables written to `runs/reproduce/TABLE/PROFILE/`), so a cell two tables share,
    with the same key, runs once."""
    from voco_lib.config import profile_name
    from voco_lib.runs import lock_dir

    t = table if isinstance(table, Table) else load_table(table)
    profile = profile_name(profile)
    if workers < 1:
        raise ValueError(f"--workers must be ≥ 1, got {workers}; e.g. --workers 2")
    store = Path(out or Path("runs") / "reproduce").resolve()
    out = Path(out or store / t.name / profile).resolve()
    if dry_run:
        cells = plan(t, profile, store, seeds, data_root)
        for p in cells:
            log(f"{p.state:8s} {p.cell.slug:40s} {p.reason or p.needs}")
        return cells
    out.mkdir(parents=True, exist_ok=True)
    _claim(out, t, profile)
    terminate_on_sigterm()
    with lock_dir(out):
        return _run_locked(t, profile, seeds, workers, out, store, data_root, log)


def _claim(out: Path, table: Table, profile: str) -> None:
    """An output folder belongs to one table and profile (its cells' keys would mix otherwise)."""
    f, mine = out / "grid.json", {"table": table.name, "profile": profile}
    if f.is_file():
        theirs = json.loads(f.read_text())
        if {k: theirs.get(k) for k in mine} != mine:
            raise ValueError(f"{out} holds the grid of table {theirs.get('table')} / profile {theirs.get('profile')}; "
                             f"choose another --out for {table.name} / {profile}")
    elif any(p.name not in (".lock", "cells", "pretrain") for p in out.iterdir()):
        raise ValueError(f"{out} is not empty and holds no grid; choose another --out")
    else:
        write_text(f, json.dumps(mine))


def _run_locked(t: Table, profile: str, seeds: Sequence[int] | None, workers: int, out: Path, store: Path,
                data_root: str | Path | None, log: Callable[[str], None]) -> Report:
    t0 = time.time()
    cells = plan(t, profile, store, seeds, data_root)
    needed = {p.cell.row for p in cells if p.state == "todo" and p.cell.init.startswith("pretrain:")}
    pretrain_dirs, failed_rows = {}, {}
    for row in (r for r in t.rows if r.name in needed):
        try:
            pretrain_dirs[row.name] = ensure_pretrain(row, t, profile, store, log)
        except RuntimeError as e:
            failed_rows[row.name] = str(e)
    todo = [p for p in cells if p.state == "todo" and p.cell.row not in failed_rows]
    log(f"voco reproduce {t.name} ({profile}): {len(cells)} cells, {sum(p.state == 'done' for p in cells)} done, "
        f"{len(todo)} to run, {sum(p.state == 'not_run' for p in cells)} not run; {workers} worker(s) -> {out}")
    ran = {p.cell: o for p, o in zip(todo, run_pool([_job(p, profile, store, log) for p in todo], workers))}
    outcomes = [_outcome(p, ran, store, failed_rows) for p in cells]
    reused = sum(p.state == "done" for p in cells)
    return _render(t, profile, out, store, outcomes, seeds, (len(todo), reused), time.time() - t0, pretrain_dirs)


def _job(p: Planned, profile: str, store: Path, log: Callable[[str], None]) -> Callable[[dict[str, str]], Outcome]:
    def job(env: dict[str, str]) -> Outcome:
        log(f"  running {p.cell.slug} ...")
        o = execute_cell(p.cell, p.key, cell_dir(store, p.cell, p.key), profile, p.init, p.datalist, env)
        log(f"  {p.cell.slug}: " + (f"{o.result['metric']} {o.result['value']:.4f} ({o.result['wall_s']:.0f} s)"
                                      if o.status == "ok" else o.reason))
        return o
    return job


def _outcome(p: Planned, ran: dict[Cell, Outcome], store: Path, failed_rows: dict[str, str]) -> Outcome:
    if p.cell in ran:
        return ran[p.cell]
    if p.state == "done":
        path = cell_dir(store, p.cell, p.key)
        return Outcome(p.cell, "ok", result=done(path, p.key), key=p.key, path=path)
    if p.cell.row in failed_rows:
        return Outcome(p.cell, "failed", f"failed: {failed_rows[p.cell.row]}", key=p.key)
    return Outcome(p.cell, p.state, p.reason, key=p.key)


def _render(t: Table, profile: str, out: Path, store: Path, outcomes: list[Outcome], seeds: Sequence[int] | None,
            counts: tuple[int, int],
            wall_s: float, pretrain_dirs: dict[str, tuple[Path, str]]) -> Report:
    from voco_lib.viz import write_png

    prov = provenance(t, profile, outcomes, seeds, counts, wall_s, pretrain_dirs)
    entries = render.summarize(t, outcomes)
    md = render.markdown(t, entries, profile, prov)
    png = write_png(render.figure(t, entries, outcomes), out / "table.png")
    files = {"md": write_text(out / "table.md", md), "csv": write_text(out / "table.csv", render.csv_text(t, entries)),
             "html": write_text(out / "table.html", render.html_page(t.title, md, png.read_bytes())),
             "provenance": write_text(out / "provenance.json", json.dumps(prov, indent=1)), "png": png}
    failed = [o for o in outcomes if o.status == "failed"]
    if failed:
        print(f"voco reproduce: {len(failed)} cell(s) failed, first: {failed[0].cell.slug}: {failed[0].reason}")
    return Report(t, profile, out, store, outcomes, entries, md, files)


def provenance(t: Table, profile: str, outcomes: Sequence[Outcome], seeds: Sequence[int] | None,
               counts: tuple[int, int],
               wall_s: float, pretrain_dirs: dict[str, tuple[Path, str]]) -> dict[str, Any]:
    """Commit, device and per-cell identity (resolved-config key and file, init sha256, wall time) of a table."""
    import torch

    cells = [{"cell": o.cell.slug, "status": o.status, "key": o.key, "reason": o.reason or None,
              **({k: o.result.get(k) for k in ("value", "init", "init_sha256", "split", "wall_s", "device",
                                               "notebook", "run_dir")} if o.result else {}),
              **({"config": str(Path(o.result["run_dir"]) / "config.yaml")} if o.result else {})} for o in outcomes]
    return {"table": t.name, "profile": profile, "seeds": list(seeds if seeds is not None else t.seeds(profile)),
            "commit": _commit(), "device": device_name(), "host": platform.node(), "torch": str(torch.__version__),
            "wall_s": round(wall_s, 1), "cells_run": counts[0], "cells_reused": counts[1],
            "pretrain": {row: {"run_dir": str(d), "key": k} for row, (d, k) in pretrain_dirs.items()}, "cells": cells}


def _commit() -> str:
    from voco_lib.reproduce.execute import REPO

    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (head or "unknown") + ("+local-changes" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown (not a git checkout)"


def cli_reproduce(args: argparse.Namespace) -> int:
    """`voco reproduce TABLE|list [--profile P] [--seeds ...] [--workers N] [--dry-run] [--out DIR] [--data-root DIR]`."""
    from voco_lib.data.manifests import list_manifests

    if args.table == "list":
        for name in list_manifests("paper"):
            print(f"{name:18s} {load_table(name).title}")
        return 0
    rep = run_table(args.table, args.profile, args.seeds, args.workers, args.out, args.data_root, args.dry_run)
    if isinstance(rep, Report):
        print(rep.markdown)
        print(f"written: {', '.join(str(p) for p in rep.files.values())}")
        return 2 if any(o.status == "failed" for o in rep.outcomes) else 0
    return 0
