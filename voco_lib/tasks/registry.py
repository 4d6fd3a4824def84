"""The downstream task registry: one YAML file per task in `data_manifests/tasks/`, validated by a JSON schema.

The authors ship one copied folder per task (spec §7.1-7.2); here a task is data (dataset, classes, roi,
spacing, intensity, recipe, metric, split, the paper's numbers with provenance) and the code is one path
per task type (`voco_lib.tasks.segmentation`, `classification`, `registration`, `vision_language`).
"""

from __future__ import annotations

import argparse
import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from voco_lib.data.manifests import list_manifests, load_manifest, manifests_dir, validate_manifest as _validate_schema

KIND = "tasks"  # data_manifests/tasks/<name>.yaml, schema data_manifests/schemas/tasks.json
TYPES = ("segmentation", "classification", "registration", "vision_language")


@dataclass(frozen=True)
class Task:
    """One downstream task, as its manifest says. `raw` keeps the whole manifest for provenance."""

    name: str
    title: str
    type: str
    modality: str
    dataset: str
    in_channels: int
    roi: tuple[int, int, int]
    spacing: tuple[float, float, float] | None
    intensity: dict[str, Any] | None
    metric: str
    classes: tuple[str, ...] | None = None
    num_classes: int | None = None
    recipe: dict[str, Any] = field(default_factory=dict)
    split: dict[str, Any] = field(default_factory=dict)
    paper_numbers: dict[str, Any] | None = None
    phantom: dict[str, Any] | None = None
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def is_phantom(self) -> bool:
        return self.dataset == "phantom"

    @property
    def engine(self) -> str:
        """The authors' training path: "monai" (our SwinUNETR loop) or "nnunet" (export: voco_lib.tasks.nnunet)."""
        return str(self.raw.get("engine", "monai"))

    @property
    def label_remap(self) -> dict[int, int]:
        """Raw label value -> class index from the manifest's `label_remap` (e.g. BraTS 4 -> 3); {} when none."""
        return {int(k): int(v) for k, v in (self.raw.get("label_remap") or {}).items()}

    @property
    def out_channels(self) -> int:
        """Network outputs: K (segmentation includes background), or the class count for classification."""
        if self.num_classes is None:
            raise ValueError(f"task {self.name!r} has no num_classes")
        return self.num_classes


def validate_manifest(data: Any, path: Path | str = "<task>") -> None:
    """Schema check (`data_manifests/schemas/tasks.json`, via the shared manifest validator) plus the
    cross-field rules a schema cannot say; errors name the file and the fix."""
    _validate_schema(data, KIND, path)
    stem = Path(path).stem
    if Path(path).suffix and data["name"] != stem:
        raise ValueError(f"{path}: name {data['name']!r} differs from the file name {stem!r}; rename one of them")
    classes, k = data.get("classes"), data.get("num_classes")
    if classes is not None and k is not None and len(classes) != k:
        raise ValueError(f"{path}: {len(classes)} class names but num_classes={k}; make them agree")
    if data["type"] in ("segmentation", "classification") and k is None:
        raise ValueError(f"{path}: a {data['type']} task needs num_classes")
    if data["type"] == "segmentation" and classes is not None and classes[0] != "background":
        raise ValueError(f"{path}: segmentation classes start with 'background' (index 0)")
    if classes is None and data["type"] != "vision_language" and not data.get("classes_note"):
        raise ValueError(f"{path}: no class names and no classes_note; list the classes (label order, citing "
                         "classes_source) or say in classes_note why they are not listed")
    if data.get("engine") == "nnunet" and "nnunet" not in data:
        raise ValueError(f"{path}: engine: nnunet needs an 'nnunet' section (dataset_name, channel_names)")
    if "nnunet" in data and len(data["nnunet"]["channel_names"]) != data["in_channels"]:
        raise ValueError(f"{path}: nnunet.channel_names lists {len(data['nnunet']['channel_names'])} channels but "
                         f"in_channels is {data['in_channels']}; make them agree")
    if data["dataset"] == "phantom" and "phantom" not in data:
        raise ValueError(f"{path}: a phantom task needs a 'phantom' section (shape, spacing, ...)")


def task_from_dict(data: dict[str, Any], path: Path | str = "<task>") -> Task:
    validate_manifest(data, path)
    sp = data.get("spacing")
    return Task(
        name=data["name"], title=data["title"], type=data["type"], modality=data["modality"], dataset=data["dataset"],
        in_channels=int(data["in_channels"]), roi=tuple(int(v) for v in data["roi"]),  # type: ignore[arg-type]
        spacing=None if sp is None else tuple(float(v) for v in sp),  # type: ignore[arg-type]
        intensity=data.get("intensity"), metric=data["metric"],
        classes=None if data.get("classes") is None else tuple(data["classes"]), num_classes=data.get("num_classes"),
        recipe=dict(data.get("recipe") or {}), split=dict(data.get("split") or {}),
        paper_numbers=data.get("paper_numbers"), phantom=data.get("phantom"), raw=data,
    )


def list_tasks(task_type: str | None = None) -> list[str]:
    """Names of all registered tasks (optionally of one type), sorted."""
    names = list_manifests(KIND)
    if task_type is None:
        return names
    if task_type not in TYPES:
        raise ValueError(f"unknown task type {task_type!r}; choose one of {TYPES}")
    return [n for n in names if load_task(n).type == task_type]


@functools.lru_cache(maxsize=None)
def _load_registered(name: str) -> Task:
    data = load_manifest(KIND, name)
    return task_from_dict(data, manifests_dir() / KIND / f"{name}.yaml")


def load_task(name: str | Path) -> Task:
    """A task by registry name (`btcv`, `phantom-seg`, ...) or by the path of a task YAML of your own."""
    p = Path(name)
    if p.suffix in (".yaml", ".yml"):
        if not p.is_file():
            raise FileNotFoundError(f"task manifest {p} not found")
        try:
            data = yaml.safe_load(p.read_text())
        except yaml.YAMLError as e:
            raise ValueError(f"{p}: not valid YAML ({e}); fix the file") from None
        return task_from_dict(data, p)
    if str(name) not in list_tasks():
        raise ValueError(f"unknown task {name!r}; `voco tasks list` shows the {len(list_tasks())} registered tasks")
    return _load_registered(str(name))


def cli_tasks(args: argparse.Namespace) -> int:
    """`voco tasks list`: one line per task (name, type, dataset, K, roi, metric, the paper's VoCo number)."""
    rows = [("task", "type", "dataset", "K", "in", "roi", "metric", "paper (VoCo)")]
    for n in list_tasks():
        t = load_task(n)
        pn = t.paper_numbers or {}
        voco = ", ".join(f"{k}={v}" for k, v in (pn.get("values") or {}).items() if k.startswith("voco"))
        rows.append((t.name, t.type, t.dataset, str(t.num_classes or "-"), str(t.in_channels),
                     "x".join(map(str, t.roi)), t.metric, voco or "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    print(f"{len(rows) - 1} tasks ({sum(1 for n in list_tasks() if not load_task(n).is_phantom)} real, "
          f"{sum(1 for n in list_tasks() if load_task(n).is_phantom)} phantom analogs)")
    return 0
