"""The downstream task registry: one YAML file per task in `data_manifests/tasks/`, validated by a JSON schema.

The authors ship one copied folder per task (Luffy03/Large-Scale-Medical Downstream/monai/<Task>/, commit 1ad538b);
here a task is data (dataset, classes, roi,
spacing, intensity, recipe, metric, split, the paper's numbers with provenance) and the code is one path
per task type (`voco_lib.tasks.segmentation`, `classification`, `registration`, `vision_language`).
"""

from __future__ import annotations

import argparse
import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from voco_lib.data.manifests import list_manifests, load_manifest, manifests_dir, validate_manifest as _validate_schema
from voco_lib.files import read_yaml

KIND = "tasks"  # data_manifests/tasks/<name>.yaml, schema data_manifests/schemas/tasks.json
TYPES = ("segmentation", "classification", "registration", "vision_language")


Triple = tuple[int, int, int]


@dataclass(frozen=True)
class PhantomSpec:
    """The `phantom` section of a phantom analog task (`voco_lib.data.phantom`), its defaults applied."""

    shape: Triple  # voxels of the generated patient
    spacing: float  # mm
    resize_to_roi: bool = False  # whole preprocessed volume resized to the roi (as the cpu/smoke pre-training)
    organs: tuple[str, ...] = ()  # phantom classes kept as labels (others -> background); (): the task's classes
    target: str = "lesion_present"  # classification: lesion_present | organ_enlarged:<organ>
    pairs: str = "inter"  # registration: "inter" (two patients) | "intra" (a patient and a deformed copy)
    seed_offset: int = 0  # first training seed, so that tasks do not share patients


@dataclass(frozen=True)
class Task:
    """One downstream task, as its manifest says, with the manifest's defaults resolved here and only here.

    The `recipe` values are the authors' fine-tuning settings; where a manifest leaves one out (null), the
    default below stands in: lr 3e-4 (upstream's fine-tuning lr, Luffy03/Large-Scale-Medical
    Downstream/monai/BTCV/main.py), 100 epochs, no warmup.
    `raw` keeps the whole manifest for provenance (results.json) and the nnU-Net export.
    """

    name: str
    title: str
    type: str
    modality: str
    dataset: str
    in_channels: int
    roi: Triple
    spacing: tuple[float, float, float] | None
    intensity: dict[str, Any] | None
    metric: str
    classes: tuple[str, ...] | None = None
    num_classes: int | None = None
    lr: float = 3e-4  # recipe.lr
    epochs: int = 100  # recipe.epochs; steps = epochs x training volumes unless finetune.steps says otherwise
    warmup_epochs: int = 0  # recipe.warmup_epochs
    similarity: str = "mse"  # registration (recipe.similarity): "lncc" | "mse"; unset: lncc for MRI, mse for CT
    smoothness_weight: float = 1.0  # registration (recipe.smoothness_weight): weight of the diffusion regulariser
    engine: str = "monai"  # the authors' training path: "monai" (our loop) or "nnunet" (export: tasks.nnunet)
    label_remap: dict[int, int] = field(default_factory=dict)  # raw label value -> class index (BraTS 4 -> 3)
    split: dict[str, Any] = field(default_factory=dict)
    paper_numbers: dict[str, Any] | None = None
    phantom: PhantomSpec | None = None
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def is_phantom(self) -> bool:
        return self.dataset == "phantom"

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


def _phantom_spec(section: dict[str, Any] | None, path: Path | str) -> PhantomSpec | None:
    if section is None:
        return None
    missing = [k for k in ("shape", "spacing") if k not in section]
    if missing:
        raise ValueError(f"{path}: the phantom section needs {missing} (voxels, mm); add them")
    return PhantomSpec(shape=tuple(int(v) for v in section["shape"]),  # type: ignore[arg-type]
                       spacing=float(section["spacing"]), resize_to_roi=bool(section.get("resize_to_roi", False)),
                       organs=tuple(section.get("organs") or ()), target=str(section.get("target", "lesion_present")),
                       pairs=str(section.get("pairs", "inter")), seed_offset=int(section.get("seed_offset", 0)))


def task_from_dict(data: dict[str, Any], path: Path | str = "<task>") -> Task:
    """A validated manifest as a Task: every optional value typed and defaulted once, here."""
    validate_manifest(data, path)
    sp, recipe = data.get("spacing"), data.get("recipe") or {}

    def given(key: str, default: Any) -> Any:  # null in a manifest means "not known": the default
        return default if recipe.get(key) is None else recipe[key]

    return Task(
        name=data["name"], title=data["title"], type=data["type"], modality=data["modality"], dataset=data["dataset"],
        in_channels=int(data["in_channels"]), roi=tuple(int(v) for v in data["roi"]),  # type: ignore[arg-type]
        spacing=None if sp is None else tuple(float(v) for v in sp),  # type: ignore[arg-type]
        intensity=data.get("intensity"), metric=data["metric"],
        classes=None if data.get("classes") is None else tuple(data["classes"]), num_classes=data.get("num_classes"),
        lr=float(given("lr", Task.lr)), epochs=int(given("epochs", Task.epochs)),
        warmup_epochs=int(given("warmup_epochs", Task.warmup_epochs)),
        similarity=str(given("similarity", "lncc" if data["modality"] == "MRI" else "mse")),
        smoothness_weight=float(given("smoothness_weight", Task.smoothness_weight)),
        engine=str(data.get("engine", Task.engine)),
        label_remap={int(k): int(v) for k, v in (data.get("label_remap") or {}).items()},
        split=dict(data.get("split") or {}), paper_numbers=data.get("paper_numbers"),
        phantom=_phantom_spec(data.get("phantom"), path), raw=data,
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
        return task_from_dict(read_yaml(p, "pass a task manifest YAML (see data_manifests/tasks/)"), p)
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
