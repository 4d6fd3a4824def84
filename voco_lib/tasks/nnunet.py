"""The nnU-Net v2 path (Luffy03/Large-Scale-Medical Downstream/nnUNet, commit 1ad538b): export a task's datalist as
an nnU-Net raw dataset, the commands, a weight check.

Upstream trains VerSe20 and AutoPET-II inside a vendored copy of nnU-Net v2 with its own trainers. We do not
vendor nnU-Net: `export_dataset` writes `DatasetXXX_Name/` (imagesTr/{case}_{channel:04d}.nii.gz, labelsTr/
{case}.nii.gz, dataset.json, our split as splits_final.json) for the user's own nnU-Net (`pip install
"voco[nnunet]"`), `commands` gives the nnU-Net v2 commands to plan, preprocess and train, and
`check_checkpoint` says, before hours of training, whether a VoComni_nnunet-style checkpoint fits the network
a plans file builds (name and shape of every tensor, nnU-Net's own rule for `-pretrained_weights`).

Rules of nnU-Net v2's raw format followed here (nnunetv2 2.8.1: `verify_dataset_integrity.py`,
`dataset_conversion/generate_dataset_json.py`): one file per channel named `{case}_{XXXX}{file_ending}`,
a label file `{case}{file_ending}`, labels 0..K-1 consecutive with 0 = background, dataset.json with
`channel_names`, `labels` (name -> value), `numTraining` and `file_ending`.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from voco_lib.checkpoints import CoverageReport, load_checkpoint, normalize_state_dict
from voco_lib.files import write_text
from voco_lib.data.volumes import VolumeError
from voco_lib.tasks.registry import Task, load_task

FILE_ENDING = ".nii.gz"
SEG_LAYERS = ".seg_layers."  # nnU-Net's output convolutions: never transferred by -pretrained_weights
INSTALL_HINT = 'nnU-Net v2 is not installed: pip install "voco[nnunet]" (or pip install nnunetv2), then rerun'


class NnUNetError(ValueError):
    """An export or check that cannot be done as asked; the message names the file and the fix."""


# ------------------------------------------------------------------------------------------------ export
def dataset_folder_name(dataset_id: int, name: str) -> str:
    """nnU-Net's folder name: `Dataset` + 3-digit id + `_` + name (e.g. Dataset503_VerSe20)."""
    if not 1 <= int(dataset_id) <= 999:
        raise NnUNetError(f"dataset id {dataset_id} is outside 1..999; nnU-Net folders are DatasetXXX_Name")
    return f"Dataset{int(dataset_id):03d}_{name}"


def dataset_json(task: Task, num_training: int, channel_names: Sequence[str] | None = None) -> dict[str, Any]:
    """The dataset.json nnU-Net v2 needs for `task` (labels from the task's classes, index = label value)."""
    names = list(channel_names or (task.raw.get("nnunet") or {}).get("channel_names") or
                 [task.modality] * task.in_channels)
    if len(names) != task.in_channels:
        raise NnUNetError(f"task {task.name}: {len(names)} channel names for in_channels={task.in_channels}")
    k = task.num_classes
    if task.type != "segmentation" or k is None:
        raise NnUNetError(f"task {task.name} is a {task.type} task; the nnU-Net export is for segmentation")
    classes = list(task.classes or ["background"] + [f"class_{i}" for i in range(1, k)])
    return {
        "channel_names": {str(i): n for i, n in enumerate(names)},
        "labels": {n: i for i, n in enumerate(classes)},
        "numTraining": int(num_training),
        "file_ending": FILE_ENDING,
        "name": (task.raw.get("nnunet") or {}).get("dataset_name", task.name),
        "description": f"{task.title}: exported by voco_lib.tasks.nnunet from the voco task '{task.name}'",
        "reference": task.raw.get("classes_source", task.raw.get("source", "")),
    }


def _case_files(entry: Mapping[str, Any]) -> list[str]:
    img = entry["image"]
    return [str(img)] if isinstance(img, (str, Path)) else [str(p) for p in img]


def _header(path: str) -> tuple[tuple[int, ...], np.ndarray]:
    """Shape and affine from the header only (no voxel data read)."""
    import nibabel as nib

    try:
        img = nib.load(path)
    except Exception as e:  # noqa: BLE001 - nibabel raises many types for unreadable files
        raise VolumeError(path, f"has no readable NIfTI header ({type(e).__name__}: {e})",
                          "re-export it as NIfTI (.nii.gz); nnU-Net's export reads NIfTI only") from None
    return tuple(int(s) for s in img.shape), np.asarray(img.affine, np.float64)


def _same_grid(a: tuple[tuple[int, ...], np.ndarray], b: tuple[tuple[int, ...], np.ndarray]) -> bool:
    spacing = float(np.linalg.norm(a[1][:3, :3], axis=0).max())
    return a[0][:3] == b[0][:3] and np.allclose(a[1], b[1], atol=1e-3 * spacing)


def _place(src: str, dst: Path, mode: str) -> None:
    """Link or copy one finished NIfTI file into the dataset (a .nii is gzipped: nnU-Net wants one file ending)."""
    if src.endswith(FILE_ENDING):
        if mode == "symlink":
            os.symlink(os.path.abspath(src), dst)
        else:
            shutil.copyfile(src, dst)
        return
    _write_nifti(dst, *_read(src))


def _read(path: str) -> tuple[np.ndarray, np.ndarray, Any]:
    import nibabel as nib

    img = nib.load(path)
    return np.asarray(img.dataobj), np.asarray(img.affine), img.header


def _write_nifti(dst: Path, data: np.ndarray, affine: np.ndarray, header: Any = None) -> None:
    import nibabel as nib

    img = nib.Nifti1Image(data, affine, header)
    img.set_data_dtype(data.dtype)
    nib.save(img, str(dst))


def export_dataset(task: str | Task, datalist: str | Path, out: str | Path, dataset_id: int | None = None,
                   mode: str = "symlink", channel_names: Sequence[str] | None = None,
                   overwrite: bool = False) -> Path:
    """Write `out/DatasetXXX_Name/` (nnU-Net v2 raw layout) from an MSD-style datalist; return its path.

    Every labelled entry of the datalist's "training" and "validation" lists becomes a training case (nnU-Net
    cross-validates itself); `splits_final.json` keeps our split as fold 0. "test" entries go to imagesTs.
    Channels: an entry's `image` list (one file per channel) or a 4-D NIfTI (split into channel files).
    `mode="symlink"` links .nii.gz files, `"copy"` copies them; label maps are rewritten when the task has a
    `label_remap`. Grids are checked from the headers. Atomic: built in a temporary folder, renamed at the end.
    """
    from voco_lib.data.manifests import read_datalist

    t = load_task(task) if not isinstance(task, Task) else task
    if mode not in ("symlink", "copy"):
        raise NnUNetError(f"mode must be 'symlink' or 'copy', got {mode!r}")
    settings = t.raw.get("nnunet") or {}
    name = settings.get("dataset_name") or "".join(c if c.isalnum() else "_" for c in t.name)
    did = dataset_id if dataset_id is not None else settings.get("dataset_id")
    if did is None:
        raise NnUNetError(f"task {t.name}: pass a dataset id (1..999, not used by another nnU-Net dataset of yours), "
                          "e.g. --id 501")
    lists: dict[str, list[dict[str, Any]]] = {}
    for split in ("training", "validation", "test"):
        try:
            lists[split] = read_datalist(datalist, split)
        except KeyError:
            lists[split] = []
    labelled = [(s, e) for s in ("training", "validation") for e in lists[s]]
    missing = [_case_files(e)[0] for _, e in labelled if "label" not in e]
    if missing:
        raise NnUNetError(f"{datalist}: {len(missing)} training/validation entries have no label (first: "
                          f"{missing[0]}); "
                          "nnU-Net trains on labelled cases only: add the labels, or move those entries to 'test'")
    if not labelled:
        raise NnUNetError(f"{datalist}: no labelled entries in 'training' or 'validation'")
    meta = dataset_json(t, len(labelled), channel_names)
    out = Path(out)
    final = out / dataset_folder_name(int(did), name)
    if final.exists() and not overwrite:
        raise FileExistsError(f"{final} exists; pass overwrite=True (--overwrite) to replace it, or another dataset id")
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=out))
    try:
        cases: dict[str, dict[str, Any]] = {}
        split_ids: dict[str, list[str]] = {"training": [], "validation": []}
        for sub in ("imagesTr", "labelsTr") + (("imagesTs",) if lists["test"] else ()):
            (tmp / sub).mkdir()
        for i, (split, e) in enumerate(labelled):
            case = f"{name}_{i:04d}"
            cases[case] = _export_case(t, e, case, tmp / "imagesTr", tmp / "labelsTr", mode)
            cases[case]["split"] = split
            split_ids[split].append(case)
        for j, e in enumerate(lists["test"]):
            case = f"{name}_ts{j:04d}"
            cases[case] = _export_case(t, e, case, tmp / "imagesTs", None, mode)
            cases[case]["split"] = "test"
        _write_json(tmp / "dataset.json", meta)
        _write_json(tmp / "cases.json", {"datalist": str(Path(datalist).absolute()), "task": t.name, "cases": cases})
        if split_ids["validation"]:
            _write_json(tmp / "splits_final.json", [{"train": split_ids["training"], "val": split_ids["validation"]}])
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _export_case(task: Task, entry: Mapping[str, Any], case: str, images: Path, labels: Path | None,
                 mode: str) -> dict[str, Any]:
    """One case: channel files (checked to share one grid, count = in_channels) and its label map."""
    files = _case_files(entry)
    heads = [_header(f) for f in files]
    if len(files) == 1 and len(heads[0][0]) == 4 and heads[0][0][3] > 1:  # 4-D NIfTI, channels last (MSD)
        data, affine, header = _read(files[0])
        n = data.shape[3]
        _check_count(task, n, files)
        for c in range(n):
            _write_nifti(images / f"{case}_{c:04d}{FILE_ENDING}", np.ascontiguousarray(data[..., c]), affine)
    else:
        _check_count(task, len(files), files)
        for f, h in zip(files[1:], heads[1:]):
            if not _same_grid(heads[0], h):
                raise VolumeError(f, f"is on a different grid (shape {h[0]}) than {files[0]} (shape {heads[0][0]}), "
                                  "channel 0 of the same case", "resample the channels onto one grid first")
        for c, f in enumerate(files):
            _place(f, images / f"{case}_{c:04d}{FILE_ENDING}", mode)
    rec: dict[str, Any] = {"image": files}
    if labels is not None:
        lab = str(entry["label"])
        if not _same_grid(heads[0], _header(lab)):
            raise VolumeError(lab, f"is not on the grid of its image {files[0]}",
                              "resample the label (nearest-neighbour) onto the image grid")
        dst = labels / f"{case}{FILE_ENDING}"
        remap = task.label_remap
        if remap:
            data, affine, header = _read(lab)
            lut = np.arange(max(int(data.max()), *remap) + 1)
            lut[list(remap)] = list(remap.values())
            mapped = lut[data.astype(np.int64)].astype(np.uint8 if len(lut) < 256 else np.int16)
            _write_nifti(dst, mapped, affine, header)
        else:
            _place(lab, dst, mode)
        rec["label"] = lab
    return rec


def _check_count(task: Task, n: int, files: Sequence[str]) -> None:
    if n != task.in_channels:
        raise VolumeError(", ".join(files), f"gives {n} channel(s) but task {task.name} has "
                          f"in_channels={task.in_channels}",
                          f"list {task.in_channels} files (one per channel) in the entry's 'image', or a 4-D NIfTI")


def _write_json(path: Path, doc: Any) -> None:
    write_text(path, json.dumps(doc, indent=1) + "\n")


# ------------------------------------------------------------------------------------------------ commands
def commands(dataset_id: int, raw_dir: str | Path, configuration: str = "3d_fullres", fold: int | str = 0,
             pretrained: str | Path | None = None, dataset_name: str | None = None) -> list[str]:
    """The nnU-Net v2 shell commands for an exported dataset (plan + preprocess with integrity check, our split,
    train one fold). nnU-Net finds its folders through the nnUNet_raw / _preprocessed / _results variables."""
    raw = Path(raw_dir).absolute()
    base = raw.parent
    pre, res = base / "nnUNet_preprocessed", base / "nnUNet_results"
    cmds = [f"export nnUNet_raw={shlex.quote(str(raw))} nnUNet_preprocessed={shlex.quote(str(pre))} "
            f"nnUNet_results={shlex.quote(str(res))}",
            f"nnUNetv2_plan_and_preprocess -d {int(dataset_id)} --verify_dataset_integrity"]
    if dataset_name:
        folder = dataset_folder_name(dataset_id, dataset_name)
        split = raw / folder / "splits_final.json"
        if split.is_file():  # fold 0 = the datalist's training/validation split
            cmds.append(f"cp {shlex.quote(str(split))} {shlex.quote(str(pre / folder))}/")
    train = f"nnUNetv2_train {int(dataset_id)} {configuration} {fold}"
    if pretrained is not None:
        train += f" -pretrained_weights {shlex.quote(str(pretrained))}"
    cmds.append(train)
    return cmds


def nnunet_installed() -> bool:
    return shutil.which("nnUNetv2_plan_and_preprocess") is not None and shutil.which("nnUNetv2_train") is not None


def run_commands(cmds: Sequence[str]) -> None:
    """Run the commands of `commands` (the first sets the environment) if nnU-Net v2 is installed."""
    if not nnunet_installed():
        raise NnUNetError(INSTALL_HINT)
    env = dict(os.environ)
    for assignment in shlex.split(cmds[0])[1:]:
        k, v = assignment.split("=", 1)
        env[k] = v
        Path(v).mkdir(parents=True, exist_ok=True)
    for c in cmds[1:]:
        print(f"$ {c}", flush=True)
        subprocess.run(c, shell=True, check=True, env=env)


# ------------------------------------------------------------------------------------------------ checkpoint check
def compare_to_network(state: Mapping[str, torch.Tensor], model_shapes: Mapping[str, Sequence[int]]) -> CoverageReport:
    """Which of a network's tensors a checkpoint provides by name and shape (every tensor is promised).

    `report.missing`/`mismatched` outside `.seg_layers.` are what nnU-Net's `-pretrained_weights` would refuse.
    """
    loaded, missing, mismatched = [], [], []
    for k, shape in model_shapes.items():
        if k not in state:
            missing.append(k)
        elif tuple(state[k].shape) != tuple(shape):
            mismatched.append((k, tuple(state[k].shape), tuple(shape)))
        else:
            loaded.append(k)
    unexpected = [k for k in state if k not in model_shapes]
    return CoverageReport(loaded, missing, unexpected, mismatched, len(model_shapes), "nnU-Net network")


def accepted_by_nnunet(report: CoverageReport) -> bool:
    """nnU-Net v2's `load_pretrained_weights` rule: every tensor but the segmentation layers present, same shape."""
    return not any(SEG_LAYERS not in k for k in report.missing) and \
        not any(SEG_LAYERS not in k for k, _, _ in report.mismatched)


def network_shapes(plans: str | Path | Mapping[str, Any], dataset_json_doc: str | Path | Mapping[str, Any],
                   configuration: str = "3d_fullres") -> dict[str, tuple[int, ...]]:
    """{name: shape} of the network nnU-Net v2 builds from a plans file (its own builder; needs nnunetv2)."""
    try:
        from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
        from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    except ImportError:
        raise NnUNetError(INSTALL_HINT) from None
    plans_doc, ds = (json.loads(Path(d).read_text()) if isinstance(d, (str, Path)) else dict(d)
                     for d in (plans, dataset_json_doc))
    pm = PlansManager(plans_doc)
    cm = pm.get_configuration(configuration)
    net = get_network_from_plans(cm.network_arch_class_name, cm.network_arch_init_kwargs,
                                 cm.network_arch_init_kwargs_req_import, len(ds["channel_names"]),
                                 pm.get_label_manager(ds).num_segmentation_heads, allow_init=False,
                                 deep_supervision=True)
    return {k: tuple(v.shape) for k, v in net.state_dict().items()}


def check_checkpoint(checkpoint: str | Path, plans: str | Path | Mapping[str, Any],
                     dataset_json_doc: str | Path | Mapping[str, Any],
                     configuration: str = "3d_fullres") -> CoverageReport:
    """Coverage of the plans' network by a checkpoint (weights_only load; `network_weights` etc. unwrapped)."""
    state = normalize_state_dict(load_checkpoint(checkpoint))
    return compare_to_network(state, network_shapes(plans, dataset_json_doc, configuration))


# ------------------------------------------------------------------------------------------------ CLI
def cli_nnunet(args: argparse.Namespace) -> int:
    """`voco nnunet export TASK DATALIST OUT [--id N] [--copy] [--run]`; `voco nnunet check CKPT PLANS DATASET_JSON`."""
    want = {"export": "TASK DATALIST OUT", "check": "CHECKPOINT PLANS DATASET_JSON"}[args.action]
    if len(args.args) != 3:
        raise NnUNetError(f"voco nnunet {args.action} takes {want}, got {len(args.args)} argument(s): {args.args}")
    if args.action == "export":
        task, datalist, out = args.args
        t = load_task(task)
        folder = export_dataset(t, datalist, out, args.id, "copy" if args.copy else "symlink", overwrite=args.overwrite)
        did = int(folder.name[len("Dataset"):len("Dataset") + 3])
        name = folder.name.split("_", 1)[1]
        cfg = (t.raw.get("nnunet") or {}).get("configuration", "3d_fullres")
        cmds = commands(did, out, cfg, args.fold, args.pretrained, name)
        n = json.loads((folder / "dataset.json").read_text())["numTraining"]
        print(f"wrote {folder} ({n} training cases). nnU-Net v2 commands:")
        print("\n".join(cmds))
        if args.run:
            run_commands(cmds)
        elif not nnunet_installed():
            print(f"({INSTALL_HINT})")
        return 0
    report = check_checkpoint(*args.args, configuration=args.configuration)
    print(report.summary())
    for k in report.missing[:20]:
        print(f"  missing     {k}")
    for k, a, b in report.mismatched[:20]:
        print(f"  mismatched  {k}: checkpoint {list(a)} vs network {list(b)}")
    ok = accepted_by_nnunet(report)
    print("nnUNetv2_train -pretrained_weights would " + ("accept" if ok else "refuse") + " this checkpoint "
          "(it needs every tensor but the .seg_layers. by name and shape)")
    return 0 if ok else 1
