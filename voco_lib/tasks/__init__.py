"""Downstream tasks: the registry (`data_manifests/tasks/`), one fine-tuning code path per task type.

`finetune(task, init, profile, n_labeled, seed, out, overrides)` is the Python API and `voco finetune` the CLI;
both write a run directory (config.yaml, metrics.jsonl, checkpoints/, results.json) and return the results.
"""

from __future__ import annotations

import argparse
import importlib
import json
from pathlib import Path
from typing import Any, Sequence

from voco_lib.tasks.registry import Task, list_tasks, load_task

RUNNERS = {
    "segmentation": "voco_lib.tasks.segmentation:SegmentationRunner",
    "classification": "voco_lib.tasks.classification:ClassificationRunner",
    "registration": "voco_lib.tasks.registration:RegistrationRunner",
    "vision_language": "voco_lib.tasks.vision_language:VisionLanguageRunner",
}


def runner_class(task_type: str) -> type:
    """The Runner of a task type (imported on demand)."""
    module, name = RUNNERS[task_type].split(":")
    return getattr(importlib.import_module(module), name)


def finetune(task: str | Task, init: str | Path | None = "scratch", profile: str | None = None,
             n_labeled: int | None = None, seed: int = 0, out: str | Path | None = None,
             overrides: Sequence[str] | dict[str, str] | None = None, resume: bool | str = False,
             datalist: str | Path | None = None, overwrite: bool = False,
             show_progress: bool = True) -> dict[str, Any]:
    """Fine-tune a registered task (name, YAML path or Task) and return its results (also in out/results.json).

    init: "scratch" | "voco-b" | "voco-l" | "voco-h" | a released checkpoint name | a pre-training run dir | a file.
    datalist: MSD-style JSON of a real dataset (not needed for the phantom tasks).
    overrides: config overrides, e.g. ["finetune.steps=50", "finetune.lr=1e-3"].
    resume: True continues the run in `out` (its config must match); "auto" does so when `out` holds a run
    and starts one otherwise (notebooks); overwrite: move a used `out` aside first (voco_lib.runs).
    """
    from voco_lib.tasks.engine import run

    t = load_task(task) if not isinstance(task, Task) else task
    return run(t, runner_class(t.type), init=init, profile=profile, n_labeled=n_labeled, seed=seed, out=out,
               overrides=overrides, resume=resume, datalist=None if datalist is None else str(datalist),
               overwrite=overwrite, show_progress=show_progress)


def load_finetuned(run_dir: str | Path):
    """The Runner of a fine-tuning run with its newest weights (model, data, `predict`/`evaluate`)."""
    from voco_lib.runs import read_config
    from voco_lib.tasks.engine import load_run

    return load_run(run_dir, runner_class(read_config(run_dir)["task"]["type"]))


def _split_overrides(items: Sequence[str]) -> tuple[str | None, list[str]]:
    """`datalist=PATH` among the overrides names the real data; the rest are config overrides."""
    datalist, rest = None, []
    for it in items:
        if it.split("=", 1)[0].strip() == "datalist":
            datalist = it.split("=", 1)[1].strip()
        else:
            rest.append(it)
    return datalist, rest


def cli_finetune(args: argparse.Namespace) -> int:
    """`voco finetune TASK --init ... --profile ... [--n-labeled K] [--seed S] [--out DIR] [--resume] [datalist=PATH] [k=v ...]`."""
    datalist, overrides = _split_overrides(args.overrides)
    res = finetune(args.task, init=args.init, profile=args.profile, n_labeled=args.n_labeled, seed=args.seed,
                   out=args.out, overrides=overrides, resume=args.resume, datalist=datalist,
                   overwrite=args.overwrite)
    from voco_lib.distributed import is_main_process

    if is_main_process():  # under torchrun: once
        print(json.dumps({k: res[k] for k in ("task", "init", "seed", "n_labeled", "metric", "value", "run_dir")}))
    return 0


__all__ = ["finetune", "load_finetuned", "load_task", "list_tasks", "cli_finetune", "runner_class"]
