"""Volumes for the downstream tasks: a task's deterministic MONAI chain, phantom cohorts, datalists.

A task manifest names spacing and intensity; `task_chain` turns them into the same `preprocess.Chain` the
pre-training uses, so a phantom task sees exactly what VoCo pre-training saw (the scanned torso section, foreground
crop, resized to the roi: the phantom section's `resize_to_roi`), and a real task gets the authors'
per-task chain (RAS -> spacing -> HU window or MRI z-score -> foreground crop -> pad to roi: Luffy03/Large-Scale-Medical
Downstream/monai/BTCV/utils/data_utils.py:L73-83, commit 1ad538b).
Everything is loaded once and held in memory (fine for the phantom and for BTCV-sized sets).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from voco_lib.data.manifests import require_fields
from voco_lib.data.preprocess import Chain, get_chain, preprocess, preprocess_array
from voco_lib.data.volumes import VolumeError
from voco_lib.tasks.registry import Task

Sample = dict[str, Any]  # {"image": (C, X, Y, Z) float, "label": (1, X, Y, Z) long | None, "name": str, ...}
VAL_SEED_OFFSET = 50_000  # phantom validation seeds start here (after the task's seed_offset)


def task_chain(task: Task, roi: Sequence[int]) -> Chain:
    """The deterministic preprocessing of `task` (for phantoms: the pre-training chain at the phantom's spacing)."""
    if task.is_phantom:
        sp = task.phantom.spacing
        return dataclasses.replace(get_chain("abdomen"), name=f"task:{task.name}", spacing=(sp, sp, sp))
    inten = task.intensity or {"kind": "mri_zscore" if task.modality == "MRI" else "hu_window"}
    if inten["kind"] == "mri_zscore":
        kw: dict[str, Any] = {"modality": "MRI", "hu_window": None}
    elif inten["kind"] == "divide":  # x / d == the window [0, d] -> [0, 1] for data stored in [0, d]
        kw = {"modality": "CT", "hu_window": (0.0, float(inten["divisor"]))}
    elif "range" in inten:
        kw = {"modality": "CT", "hu_window": tuple(float(v) for v in inten["range"])}
    else:
        raise ValueError(f"task {task.name}: intensity {inten} needs a 'range'; fix data_manifests/tasks/{task.name}.yaml")
    return Chain(f"task:{task.name}", spacing=task.spacing, min_size=tuple(int(r) for r in roi), **kw)


def resize_to(sample: Sample, size: Sequence[int]) -> Sample:
    """Whole volume resized to `size` (image trilinear as the pre-training's `sample_region`, label nearest)."""
    size = tuple(int(s) for s in size)
    out = dict(sample)
    out["image"] = F.interpolate(sample["image"][None].float(), size=size, mode="trilinear", align_corners=True)[0]
    if sample.get("label") is not None:
        out["label"] = F.interpolate(sample["label"][None].float(), size=size, mode="nearest")[0].long()
    return out


def _remap_phantom_labels(label: np.ndarray, task: Task, attributes: dict[str, Any]) -> np.ndarray:
    """Phantom ids -> task class indices (organs listed in the task; a lesion counts as its organ; rest 0)."""
    from voco_lib.data.phantom import class_ids

    ids = class_ids()
    lut = np.zeros(256, np.uint8)
    organs = list(task.phantom.organs or (task.classes or ())[1:])
    for k, organ in enumerate(organs, start=1):
        if organ not in ids:
            raise ValueError(f"task {task.name}: phantom organ {organ!r} is not in data_manifests/phantom_classes.yaml")
        lut[ids[organ]] = k
    lesion = attributes.get("lesion")
    if lesion and lesion["organ"] in organs:
        lut[ids["lesion"]] = organs.index(lesion["organ"]) + 1
    return lut[label]


def phantom_samples(task: Task, seeds: Sequence[int], labels: bool = True,
                    lesion: Sequence[bool | None] | None = None) -> list[Sample]:
    """Phantom patients `seeds` through the task's chain (resized to the task's roi if the task says so)."""
    from voco_lib.data.phantom import make_phantom_subject

    ph = task.phantom
    roi = task.roi
    chain = task_chain(task, roi)
    out = []
    for i, s in enumerate(seeds):
        subj = make_phantom_subject(int(s), ph.shape, ph.spacing,
                                    lesion=None if lesion is None else lesion[i])
        lab = _remap_phantom_labels(subj.label, task, subj.attributes) if labels else None
        d = preprocess_array(subj.image, subj.affine, chain, label=lab, name=f"phantom {s}")
        sample: Sample = {"image": d["image"].as_tensor().float(), "name": f"phantom-{s}", "seed": int(s),
                          "attributes": subj.attributes,
                          "label": d["label"].as_tensor().round().long() if labels else None}
        if ph.resize_to_roi:
            sample["spacing"] = tuple(ph.spacing * n / r for n, r in zip(sample["image"].shape[1:], roi))
            sample = resize_to(sample, roi)
        out.append(sample)
    return out


def phantom_seeds(task: Task, split: str, n: int, seed: int = 0) -> list[int]:
    """Seeds of a phantom split: training from the task's offset (shifted by the run seed's pool), validation disjoint."""
    base = task.phantom.seed_offset
    start = base + VAL_SEED_OFFSET if split == "validation" else base + 1000 * int(seed)
    return list(range(start, start + n))


def datalist_samples(task: Task, datalist: str | Path, split: str, roi: Sequence[int], keys: Sequence[str] = ("image", "label"),
                     resize: bool = False) -> list[Sample]:
    """Entries of one split of an MSD-style datalist through the task's chain (extra entry fields are kept)."""
    from voco_lib.data.manifests import read_datalist

    try:
        entries = read_datalist(datalist, split)
    except KeyError:
        if split == "validation":
            return []
        raise
    chain = task_chain(task, roi)
    out = []
    for e in entries:
        path_entry = {k: e[k] for k in keys if k in e}
        d = preprocess(path_entry, chain, channels=True)
        image = d["image"].as_tensor().float()
        check_channels(task, image.shape[0], e["image"], datalist)
        label = None
        if "label" in d:
            label = remap_labels(task, d["label"].as_tensor().round().long(), e["label"])
        s: Sample = {**{k: v for k, v in e.items() if k not in keys}, "name": entry_name(e["image"]),
                     "image": image, "label": label}
        out.append(resize_to(s, roi) if resize else s)
    return out


def labelled_count(ctx: Any, pool: int | None = None) -> int | None:
    """The run's `--n-labeled K`, or `pool` when it is not given (phantoms: finetune.n_train; a datalist: None,
    every volume). K < 1 is refused: it would train on nothing, or (read as "not given") on the whole pool."""
    k = ctx.n_labeled
    if k is None:
        return pool
    if k < 1:
        raise ValueError(f"--n-labeled must be ≥ 1, got {k}; pass e.g. --n-labeled 1, or leave it out to train on "
                         "every labelled volume")
    return k


def labelled_datalist(ctx: Any, keys: Sequence[str] = ("image", "label"), field: str | None = None,
                      valid: Callable[[Any], bool] | None = None, what: str = "") -> tuple[list[Sample], list[Sample]]:
    """(training, validation) samples of a real datalist, the training split cut to the first `--n-labeled`
    entries. keys: the files each entry must have; field (image-level tasks): an entry value every sample
    must carry, checked by `valid` and described as `what` in the error. ctx: the run's `engine.Context`."""
    task, dl = ctx.task, ctx.datalist
    require_fields(dl, keys)  # before any volume is read: names the datalist, entry and key
    train = datalist_samples(task, dl, "training", ctx.roi, keys=keys)
    val = datalist_samples(task, dl, "validation", ctx.roi, keys=keys)
    k = labelled_count(ctx)
    if k is not None:
        if k > len(train):
            raise ValueError(f"--n-labeled {k} but {dl} lists only {len(train)} training volumes")
        train = train[:k]
    if field is not None:
        for s in train + val:
            if not valid(s.get(field)):
                raise ValueError(f"{dl}: entry {s['name']} has no {what}")
    if not val:
        raise ValueError(f"{dl}: no 'validation' list; add one (the split protocol: "
                         f"{task.split.get('protocol', 'see the task manifest')})")
    return train, val


def entry_name(image: str | Sequence[str]) -> str:
    """A sample's name: its image file name (the first channel's, for one file per channel)."""
    return Path(str(image if isinstance(image, (str, Path)) else image[0])).name


def check_channels(task: Task, n: int, image: str | Sequence[str], datalist: str | Path) -> None:
    """The image's channel count must be the task's `in_channels` (the model's first layer is built for it;
    a registration network takes moving and fixed together, so each of its volumes has half of them)."""
    expected = task.in_channels // 2 if task.type == "registration" else task.in_channels
    if n != expected:
        files = image if isinstance(image, (str, Path)) else ", ".join(map(str, image))
        raise VolumeError(files, f"gives {n} input channel(s) but task {task.name} expects {expected} "
                          f"(in_channels in data_manifests/tasks/{task.name}.yaml)",
                          f"list {expected} files (one per channel, same grid) in this entry's 'image' of "
                          f"{datalist}, or a 4-D NIfTI with {expected} channels on its last axis; for a "
                          "task of your own, set in_channels in its YAML")


def remap_labels(task: Task, label: torch.Tensor, path: str | Path) -> torch.Tensor:
    """Raw label values -> class indices by the task's `label_remap` (e.g. BraTS 4 -> 3), checked to be in 0..K-1.

    Negative values are refused first: as indices they would silently wrap around (the remap table, the loss)."""
    if label.numel() and int(label.min()) < 0:
        bad = sorted(int(v) for v in torch.unique(label) if v < 0)
        raise VolumeError(path, f"holds negative label value(s) {bad}; class indices start at 0 (background)",
                          f"relabel the file with classes 0..{(task.num_classes or 2) - 1}, or check that this is "
                          f"the label map of task {task.name}")
    remap = task.label_remap
    if remap:
        lut = torch.arange(max(int(label.max()), *remap) + 1)
        lut[list(remap)] = torch.tensor(list(remap.values()))
        label = lut[label]
    k = task.num_classes
    if k is not None and task.type == "segmentation" and int(label.max()) >= k:
        bad = sorted(int(v) for v in torch.unique(label) if v >= k)
        raise VolumeError(path, f"holds label value(s) {bad} but task {task.name} has {k} classes (0..{k - 1})",
                          f"map them with 'label_remap' in data_manifests/tasks/{task.name}.yaml (raw value -> class "
                          "index), or check that this is the task's label map")
    return label


def stack(samples: Sequence[Sample], key: str = "image") -> torch.Tensor:
    return torch.stack([s[key] for s in samples])


def random_flips(tensors: Sequence[torch.Tensor], g: torch.Generator, p: float = 0.2) -> list[torch.Tensor]:
    """The same random flips (each spatial axis with probability p; the task runners pass finetune.flip_p, upstream's
    RandFlipd_prob 0.2: Luffy03/Large-Scale-Medical Downstream/monai/BTCV/main.py:L95, utils/data_utils.py:L95-97,
    commit 1ad538b) applied to (C, X, Y, Z) tensors. Three draws from `g` whatever p is (p=0 keeps later draws)."""
    axes = [a + 1 for a in range(3) if float(torch.rand((), generator=g)) < p]
    return [t.flip(axes) if axes else t for t in tensors]


def random_crop_start(shape: Sequence[int], roi: Sequence[int], g: torch.Generator,
                      foreground: torch.Tensor | None = None, pos_fraction: float = 0.9) -> tuple[int, ...]:
    """Start of a roi crop: centred on a random foreground voxel with probability `pos_fraction`, else anywhere.

    The rule of MONAI's RandCropByPosNegLabeld(pos=9, neg=1) that upstream uses (Luffy03/Large-Scale-Medical
    Downstream/monai/BTCV/utils/data_utils.py:L85-94, commit 1ad538b), drawn from `g`.
    """
    if foreground is not None and float(torch.rand((), generator=g)) < pos_fraction:
        idx = torch.nonzero(foreground)
        if len(idx):
            c = idx[int(torch.randint(len(idx), (), generator=g))].tolist()
            return tuple(int(min(max(ci - r // 2, 0), max(s - r, 0))) for ci, r, s in zip(c, roi, shape))
    return tuple(int(torch.randint(max(s - r, 0) + 1, (), generator=g)) for s, r in zip(shape, roi))
