"""Omni-supervised VoComni: segmentation on labelled volumes and VoCo on unlabelled ones, then pseudo-labels.

The authors' recipe (Luffy03/Large-Scale-Medical `Omni-supervised/`, commit 1ad538b):
- one SwinUNETR-v2 with 21 outputs (`voco_train.py:L145`, `models/voco_head.py:L59-221`); every step adds the
  VoCo loss (intra + inter + regulariser) on unlabelled crops and DiceCE (no background, softmax) on labelled
  roi crops, each with weight 1 (`models/voco_head.py:L303-309`);
- labelled crops: 4 roi crops of 64³ per volume, foreground-centred 9 times in 10, flips
  (`utils/data_utils_omni.py:L74-105`; roi `voco_train.py:L137,L157-159`): one roi for both losses;
- at `num_steps // 2` a frozen copy of the model becomes the teacher (`voco_train.py:L63-76`); from then on its
  argmax on the step's VoCo crops is the target of a third DiceCE, weight 1 (`voco_train.py:L78-88`), whose
  logits use the encoder maps detached, so it trains the decoder and, through the stage-4 skip that is not
  detached, the Swin stages (`models/voco_head.py:L192-204,L257`): `pseudo_grad="decoder"` here.
The TPAMI paper's Algorithm 1 text was not available to us; the two stages below follow the code above.

Here, as two runs (each through `loop.fit`, one run per directory, `runs.open_run`):
1. `stage1` (OUT/stage1): w_voco·VoCo(unlabelled views) + w_seg·DiceCE(labelled crops);
2. `pseudo_label` (OUT/pseudo_labels): the stage-1 model's sliding-window argmax on every unlabelled volume,
   saved once as NIfTI with a provenance JSON each (stage-1 checkpoint sha256, source image, date, classes);
3. `stage2` (OUT/stage2): starts from stage 1's weights and heads, adds w_pseudo·DiceCE(pseudo-labelled crops).
Differences from the authors' code, by design: pseudo-labels are made once, offline and on whole volumes (files
a user can inspect), not per step on the VoCo crops; each stage has its own warmup-cosine schedule (upstream: one
over both halves); one process (no torchrun). Outputs: OUT/omni_swinunetr.pt (the full SwinUNETR, MONAI names),
OUT/encoder.pt (released encoder layout), OUT/omni_report.json (pseudo-label Dice against the phantoms' truth).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from monai.inferers import sliding_window_inference
from monai.losses import DiceCELoss
from torch import nn

from voco_lib.backbone import SwinUNETR, build_backbone
from voco_lib.config import Profile, override, resolve, to_dict
from voco_lib.crops import Views
from voco_lib.data.loader import (InfiniteOrder, ViewsDataset, build_volumes, held_out_views, make_loader,
                                  region_mode_of, sample_seed, views_to)
from voco_lib.data.phantom import save_nifti
from voco_lib.data.preprocess import get_chain, preprocess, preprocess_array
from voco_lib.distributed import init_runtime, shutdown
from voco_lib.files import atomic_write, sha256, write_text
from voco_lib.loop import LoopSpec, adamw, fit, seed_everything, tune_allocator
from voco_lib.methods.voco import VoCoModel, evaluate as position_eval, training_step
from voco_lib.runs import RunDirError, open_run, read_metrics
from voco_lib.tasks.data import random_crop_start, random_flips, resize_to
from voco_lib.tasks.metrics import dice_per_class

__all__ = ["OmniConfig", "OmniModel", "stage1", "pseudo_label", "stage2", "run_omni", "cli_omni"]

AUTHORS_CLASSES = 21  # `voco_train.py:L145` (--out_channels 21)
LABELLED_SEED_OFFSET, VAL_SEED_OFFSET = 2_000_000, 3_000_000  # phantom seeds, disjoint from VoCo's (loader.py)
LABELLED_STREAM, PSEUDO_STREAM = 2, 3  # sample_seed streams of the segmentation crops
MARKER = ".voco-pseudo-labels"  # a pseudo-label folder voco made; files elsewhere are never replaced
PSEUDO_GRADS = ("decoder", "all")
Sample = dict[str, Any]  # {"name", "source", "image" (1, X, Y, Z), "label" (1, X, Y, Z) long | None, "spacing"}


# ------------------------------------------------------------------------------------------------ config
@dataclass(frozen=True)
class OmniConfig:
    """The `omni.*` overrides (the rest of the config is the profile's)."""

    out_channels: int | None = None  # None: the phantom's 21 classes, a datalist's "labels", else 21 (authors)
    n_labelled: int | None = None  # labelled phantoms; None: finetune.n_train
    n_val: int | None = None  # labelled validation phantoms; None: finetune.n_val
    stage1_steps: int | None = None  # None: the profile's steps
    stage2_steps: int | None = None
    w_seg: float = 1.0  # the authors' 1 per term (models/voco_head.py:L303-309, voco_train.py:L88)
    w_voco: float = 1.0
    w_pseudo: float = 1.0
    pseudo_grad: str = "decoder"  # "decoder": encoder maps detached for the pseudo term (upstream); "all"

    def __post_init__(self) -> None:
        for k in ("w_seg", "w_voco", "w_pseudo"):
            if getattr(self, k) < 0:
                raise ValueError(f"omni.{k} must be ≥ 0, got {getattr(self, k)}; e.g. omni.{k}=1")
        for k in ("out_channels", "n_labelled", "n_val", "stage1_steps", "stage2_steps"):
            v = getattr(self, k)
            low = 2 if k == "out_channels" else 1
            if v is not None and v < low:
                raise ValueError(f"omni.{k} must be ≥ {low} (or none), got {v}")
        if self.pseudo_grad not in PSEUDO_GRADS:
            raise ValueError(f"omni.pseudo_grad must be one of {PSEUDO_GRADS}, got {self.pseudo_grad!r}")


def resolve_omni(profile: str | None, overrides: Sequence[str] | dict[str, str] | None) -> tuple[Profile, OmniConfig]:
    """The profile (+ overrides) and the `omni.*` keys; `method=omni` (the CLI's selector) is dropped."""
    if isinstance(overrides, dict):
        items = dict(overrides)
    else:
        bad = [kv for kv in overrides or [] if "=" not in kv]
        if bad:
            raise ValueError(f"override {bad[0]!r} is not of the form key=value")
        items = dict(kv.split("=", 1) for kv in overrides or [])
    if str(items.pop("method", "omni")).strip().lower() != "omni":
        raise ValueError("voco omni: method must be omni (method=tpami|cvpr are `voco pretrain` without --labelled)")
    omni = {k[len("omni."):]: v for k, v in items.items() if k.startswith("omni.")}
    cfg = resolve(profile, {k: v for k, v in items.items() if not k.startswith("omni.")})
    if cfg.train.ema_scope != "head":
        raise ValueError("omni: train.ema_scope must be head (the TPAMI shared backbone; VoComni uses it)")
    return cfg, override(OmniConfig(), omni)


# ------------------------------------------------------------------------------------------------ model
class OmniModel(VoCoModel):
    """VoCo's model whose backbone is a full SwinUNETR: VoCo uses its encoder, segmentation its decoder too."""

    def __init__(self, cfg: Profile, out_channels: int):
        super().__init__(cfg)
        self.backbone = build_backbone(cfg.feature_size, seg_roi(cfg), out_channels=out_channels,
                                       grad_checkpoint=cfg.train.grad_checkpoint)
        self.out_channels = out_channels


def seg_roi(cfg: Profile) -> tuple[int, int, int]:
    """The roi of segmentation crops and windows: VoCo's crop size (upstream uses one roi for both)."""
    return tuple(int(c) for c in (cfg.views.out_size or cfg.views.crop_size))


def segment(model: SwinUNETR, x: torch.Tensor, detach_encoder: bool = False) -> torch.Tensor:
    """Logits; `detach_encoder`: the encoder maps enter the decoder detached, the stage-4 skip not (upstream)."""
    if not detach_encoder:
        return model(x)
    hidden, encs = model.encode(x)
    enc0, enc1, enc2, enc3, dec4 = (e.detach() for e in encs)
    dec = model.decoder5(dec4, hidden[3])
    dec = model.decoder2(model.decoder3(model.decoder4(dec, enc3), enc2), enc1)
    return model.out(model.decoder1(dec, enc0))


def combine(terms: dict[str, torch.Tensor], oc: OmniConfig) -> torch.Tensor:
    """w_voco·voco + w_seg·seg (+ w_pseudo·pseudo when present): the omni objective."""
    loss = oc.w_voco * terms["voco"] + oc.w_seg * terms["seg"]
    return loss + oc.w_pseudo * terms["pseudo"] if "pseudo" in terms else loss


# ------------------------------------------------------------------------------------------------ data
@dataclass
class OmniData:
    """Everything both stages read: VoCo volumes, labelled train/val samples, unlabelled samples (truth if known)."""

    classes: list[str]
    labelled: list[Sample]
    val: list[Sample]
    unlabelled: list[Sample]  # "label" holds the phantom's true labels (report only), None for a datalist
    voco: Any
    voco_held: Any
    real_labels: set[Path]
    sources: dict[str, str]


def _chain(cfg: Profile, phantom: bool) -> Any:
    c = get_chain(cfg.data.chain)
    sp = float(cfg.data.phantom_spacing)
    return dataclasses.replace(c, spacing=(sp, sp, sp)) if phantom else c


def _to_seg_space(s: Sample, cfg: Profile, spacing: Sequence[float]) -> Sample:
    """What VoCo sees of the volume: resized to the region in resize mode (effective spacing kept), else as is."""
    if region_mode_of(cfg) != "resize":
        return {**s, "spacing": tuple(float(v) for v in spacing)}
    size = cfg.views.region
    eff = tuple(float(sp) * n / r for sp, n, r in zip(spacing, s["image"].shape[1:], size))
    return {**resize_to(s, size), "spacing": eff}


def phantom_set(seeds: Sequence[int], cfg: Profile) -> list[Sample]:
    """Phantom patients with their labels (the class table's ids), in the VoCo chain's space."""
    from voco_lib.data.phantom import make_phantom_subject

    chain, d = _chain(cfg, True), cfg.data
    out = []
    for s in seeds:
        subj = make_phantom_subject(int(s), tuple(d.phantom_shape), d.phantom_spacing)
        p = preprocess_array(subj.image, subj.affine, chain, label=subj.label, name=f"phantom {s}")
        sample = {"name": f"phantom-{s}", "source": f"phantom seed {s} (shape {list(d.phantom_shape)}, "
                  f"{d.phantom_spacing} mm)", "image": p["image"].as_tensor().float().clamp(0, 1),
                  "label": p["label"].as_tensor().round().long()}
        out.append(_to_seg_space(sample, cfg, chain.spacing))
    return out


def datalist_set(path: str | Path, split: str, cfg: Profile, k: int) -> list[Sample]:
    """Labelled entries of one split of a datalist through the VoCo chain; labels checked to be in 0..k-1."""
    from voco_lib.data.manifests import read_datalist

    try:
        entries = read_datalist(path, split, require=("image", "label"))
    except KeyError:
        return []
    chain, out = get_chain(cfg.data.chain), []
    for e in entries:
        p = preprocess({"image": e["image"], "label": e["label"]}, chain)
        lab = p["label"].as_tensor().round().long()
        bad = sorted(int(v) for v in torch.unique(lab) if v < 0 or v >= k)
        if bad:
            raise ValueError(f"{e['label']}: label values {bad} outside 0..{k - 1}; set omni.out_channels, or list "
                             f"the classes as \"labels\" in {path}")
        s = {"name": _stem(e["image"]), "source": str(e["image"]), "label_file": str(e["label"]),
             "image": p["image"].as_tensor().float(), "label": lab}
        out.append(_to_seg_space(s, cfg, chain.spacing))
    return out


def _stem(path: str | Path) -> str:
    name = Path(str(path)).name
    for ext in (".nii.gz", ".nii", ".nrrd", ".mha"):
        if name.endswith(ext):
            return name[: -len(ext)]
    return name


def classes_of(labelled: str, oc: OmniConfig) -> list[str]:
    """Class names: the phantom's table, a datalist's "labels" ({"0": "background", ...}), or class_i."""
    if labelled == "phantom":
        from voco_lib.data.phantom import class_table

        names = [c["name"] for c in sorted(class_table()["classes"], key=lambda c: int(c["id"]))]
        if oc.out_channels not in (None, len(names)):
            raise ValueError(f"omni.out_channels={oc.out_channels} but the phantom has {len(names)} classes "
                             "(data_manifests/phantom_classes.yaml); leave omni.out_channels unset")
        return names
    from voco_lib.data.manifests import datalist_file

    doc = json.loads(datalist_file(labelled).read_text())
    labels = doc.get("labels") if isinstance(doc, dict) else None
    if oc.out_channels is None and isinstance(labels, dict) and labels:
        return [str(labels.get(str(i), f"class_{i}")) for i in range(max(int(i) for i in labels) + 1)]
    return [f"class_{i}" for i in range(oc.out_channels or AUTHORS_CLASSES)]


def load_data(labelled: str, unlabelled: str, cfg: Profile, oc: OmniConfig, run_dir: Path) -> OmniData:
    """The labelled set (`phantom` or a datalist with labels) and the unlabelled one (`phantom` or a datalist)."""
    classes = classes_of(labelled, oc)
    seed, ft = cfg.train.seed, cfg.finetune
    if labelled == "phantom":
        n, nv = oc.n_labelled or ft.n_train, oc.n_val or ft.n_val
        train = phantom_set(range(LABELLED_SEED_OFFSET + seed, LABELLED_SEED_OFFSET + seed + n), cfg)
        val = phantom_set(range(VAL_SEED_OFFSET + seed, VAL_SEED_OFFSET + seed + nv), cfg)
    else:
        from voco_lib.data.manifests import require_fields

        require_fields(labelled, ("image", "label"))
        train = datalist_set(labelled, "training", cfg, len(classes))
        val = datalist_set(labelled, "validation", cfg, len(classes))
        if not train:
            raise ValueError(f"{labelled}: the 'training' list is empty; list labelled volumes in it")
    vols, held = build_volumes(unlabelled, cfg, run_dir)
    if unlabelled == "phantom":
        unl = phantom_set(vols.seeds, cfg)  # the VoCo volumes' patients, true labels kept for the report
    else:
        unl = [_to_seg_space({"name": _stem(p), "source": p, "image": vols[i].float(), "label": None}, cfg,
                             get_chain(cfg.data.chain).spacing) for i, p in enumerate(vols.paths)]
    real = {Path(s["label_file"]).resolve() for s in train + val if "label_file" in s}
    if Path(unlabelled).is_file():  # labels an unlabelled datalist happens to list are real labels too
        from voco_lib.data.manifests import read_datalist

        real |= {Path(e["label"]).resolve() for e in read_datalist(unlabelled, "training") if e.get("label")}
    return OmniData(classes, train, val, unl, vols, held, real, {"labelled": labelled, "unlabelled": unlabelled})


# ------------------------------------------------------------------------------------------------ crops
def _pad_to(t: torch.Tensor, roi: Sequence[int]) -> torch.Tensor:
    pad = [max(0, r - n) for r, n in zip(roi, t.shape[1:])]
    return F.pad(t, [p for d in reversed(pad) for p in (0, d)]) if any(pad) else t


def seg_crops(samples: Sequence[Sample], n: int, roi: Sequence[int], g: torch.Generator,
              flip_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """n roi crops (image, label) from random samples, foreground-centred 9 times in 10, flipped (upstream)."""
    xs, ys = [], []
    for _ in range(n):
        s = samples[int(torch.randint(len(samples), (), generator=g))]
        img, lab = s["image"], s["label"]
        start = random_crop_start(img.shape[1:], roi, g, foreground=lab[0] > 0)
        sl = (slice(None),) + tuple(slice(a, a + r) for a, r in zip(start, roi))
        x, y = random_flips([img[sl], lab[sl]], g, flip_p)
        xs.append(_pad_to(x, roi))
        ys.append(_pad_to(y, roi))
    return torch.stack(xs), torch.stack(ys)


@torch.no_grad()
def predict(model: SwinUNETR, image: torch.Tensor, roi: Sequence[int], cfg: Profile) -> torch.Tensor:
    """Label map (X, Y, Z) of one (C, X, Y, Z) volume by sliding-window inference."""
    was = model.training
    model.eval()
    dev = next(model.parameters()).device
    logits = sliding_window_inference(image[None].to(dev), tuple(roi), cfg.finetune.sw_batch_size, model,
                                      overlap=cfg.finetune.sw_overlap)
    model.train(was)
    return logits.argmax(1)[0].cpu()


def mean_dice(model: SwinUNETR, samples: Sequence[Sample], roi: Sequence[int], cfg: Profile,
              k: int) -> tuple[float, list[float]]:
    """Mean foreground Dice over `samples` (each has a label) and per class (NaN: class absent everywhere)."""
    rows = np.stack([dice_per_class(predict(model, s["image"], roi, cfg), s["label"][0], k) for s in samples])
    n = (~np.isnan(rows)).sum(0)
    per = np.where(n > 0, np.nansum(rows, 0) / np.maximum(n, 1), np.nan)
    return (float(np.nanmean(per)) if np.isfinite(per).any() else float("nan")), per.tolist()


# ------------------------------------------------------------------------------------------------ stages
def _step(model: OmniModel, views: Views, labelled: Sequence[Sample], pseudo: Sequence[Sample] | None,
          cfg: Profile, oc: OmniConfig, step: int, micro: int, dice_ce: nn.Module) -> dict[str, torch.Tensor]:
    """One omni step: VoCo on the views, DiceCE on this step's labelled (and pseudo-labelled) crops."""
    dev, roi, n = views.random.device, seg_roi(cfg), cfg.finetune.batch_size
    voco = training_step(model, model, views, cfg.loss, micro == 0)
    terms = {"voco": voco["loss"], **{f"voco_{k}": v for k, v in voco.items() if k != "loss"}}
    g = torch.Generator().manual_seed(sample_seed(cfg.train.seed, step, micro, LABELLED_STREAM))
    x, y = seg_crops(labelled, n, roi, g, cfg.finetune.flip_p)
    terms["seg"] = dice_ce(model.backbone(x.to(dev)), y.to(dev))
    if pseudo:
        g = torch.Generator().manual_seed(sample_seed(cfg.train.seed, step, micro, PSEUDO_STREAM))
        x, y = seg_crops(pseudo, n, roi, g, cfg.finetune.flip_p)
        terms["pseudo"] = dice_ce(segment(model.backbone, x.to(dev), oc.pseudo_grad == "decoder"), y.to(dev))
    return {"loss": combine(terms, oc), **terms}


def _run_stage(name: str, cfg: Profile, oc: OmniConfig, data: OmniData, out: Path, steps: int,
               init: Path | None, pseudo: list[Sample] | None, resume: bool | str, show_progress: bool,
               extra_config: dict[str, Any]) -> Path:
    """One stage as a run in OUT/name through `loop.fit`; returns its checkpoint OUT/name/omni_model.pt."""
    rt = init_runtime()
    if rt.distributed:
        raise ValueError("voco omni runs as one process; start it without torchrun")
    if rt.device.type == "cpu" and cfg.train.tune_allocator:
        tune_allocator()
    t, k = cfg.train, len(data.classes)
    config = {"kind": f"omni-{name}", **data.sources, "profile": to_dict(cfg), "omni": to_dict(oc),
              "classes": data.classes, "steps": steps, **extra_config}
    with open_run(out / name, config, resume, False, rt.main) as run:
        seed_everything(t.seed)
        model = OmniModel(cfg, k).to(rt.device)
        if init is not None:
            model.load_state_dict(load_stage(init, k)["model"])
        opt, sched = adamw(model, t.lr, t.weight_decay, t.warmup_steps, steps, amsgrad=t.amsgrad)
        seed_everything(t.seed + 1)  # the embedding dropout's stream, as pre-training
        order = InfiniteOrder(len(data.voco), cfg.batch_size, t.seed, 1, 0, t.accum)
        dataset = ViewsDataset(data.voco, cfg.views, region_mode_of(cfg), t.seed)
        eval_views = held_out_views(data.voco_held, cfg)
        dice_ce = DiceCELoss(include_background=False, to_onehot_y=True, softmax=True)
        spec = LoopSpec(steps, t.accum, t.clip, t.amp, t.log_every, t.eval_every, t.checkpoint_every, t.keep_last,
                        global_batch=cfg.batch_size * t.accum, desc=f"omni {name}")

        def evaluate(step: int) -> dict[str, Any]:
            metrics = {f"voco_{m}": v for m, v in position_eval(model, eval_views, cfg.batch_size).items()}
            if data.val:
                metrics["dice"] = mean_dice(model.backbone, data.val, seg_roi(cfg), cfg, k)[0]
            return metrics

        def order_state(step: int) -> dict[str, int]:
            order.next_step = step
            return order.state_dict()

        fit(model, lambda net, batch, step, micro: _step(model, views_to(batch, rt.device), data.labelled, pseudo,
                                                         cfg, oc, step, micro, dice_ce),
            opt, sched, run, rt, spec, batches=make_loader(dataset, order, cfg.data.workers, rt.device.type == "cuda"),
            evaluate=evaluate, extra_state={"data": (order_state, order.load_state_dict)}, ddp=False,
            show_progress=show_progress)
        path = run.path / "omni_model.pt"
        with atomic_write(path) as f:
            torch.save({"model": model.state_dict(), "out_channels": k, "classes": data.classes, "stage": name}, f)
    shutdown(rt)
    return path


def load_stage(path: str | Path, out_channels: int) -> dict[str, Any]:
    """A stage's omni_model.pt, refused (one line, the fix) when its head has another class count."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    w = state.get("model", {}).get("backbone.out.conv.conv.weight") if isinstance(state, dict) else None
    if w is None:
        raise ValueError(f"{path}: not a voco omni stage checkpoint (no backbone.out.conv.conv.weight); pass "
                         "OUT/stage1/omni_model.pt of a `voco pretrain method=omni` run")
    if w.shape[0] != out_channels:
        raise ValueError(f"{path}: the stage-1 model has {w.shape[0]} classes, the labelled set {out_channels}; "
                         "run stage 1 on this labelled set (or set omni.out_channels to match)")
    return state


def stage1(cfg: Profile, oc: OmniConfig, data: OmniData, out: str | Path, resume: bool | str = False,
           show_progress: bool = True) -> Path:
    """Stage 1: w_seg·DiceCE on labelled crops + w_voco·VoCo on unlabelled views; its checkpoint."""
    return _run_stage("stage1", cfg, oc, data, Path(out), oc.stage1_steps or cfg.steps, None, None, resume,
                      show_progress, {})


def stage2(cfg: Profile, oc: OmniConfig, data: OmniData, out: str | Path, stage1_checkpoint: str | Path,
           resume: bool | str = False, show_progress: bool = True) -> Path:
    """Stage 2 from the stage-1 model: + w_pseudo·DiceCE on crops of the unlabelled volumes' pseudo-labels."""
    out, k = Path(out), len(data.classes)
    load_stage(stage1_checkpoint, k)  # before anything is read or written
    pseudo = read_pseudo_labels(out / "pseudo_labels", data.unlabelled, stage1_checkpoint)
    return _run_stage("stage2", cfg, oc, data, out, oc.stage2_steps or cfg.steps, Path(stage1_checkpoint), pseudo,
                      resume, show_progress, {"stage1_sha256": sha256(stage1_checkpoint)})


# ------------------------------------------------------------------------------------------------ pseudo-labels
def _affine(spacing: Sequence[float]) -> np.ndarray:
    return np.diag([*(float(s) for s in spacing), 1.0])


def _claim(folder: Path) -> None:
    """Make `folder` a pseudo-label folder, or refuse one that voco did not make (its files may be real labels)."""
    if folder.is_dir() and any(folder.iterdir()) and not (folder / MARKER).is_file():
        raise ValueError(f"{folder} exists and was not made by voco omni (no {MARKER}); its files are never "
                         "replaced: choose a new --out")
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / MARKER).is_file():
        write_text(folder / MARKER, "pseudo-labels written by voco omni; files here are replaced on reruns\n")


def pseudo_label(checkpoint: str | Path, samples: Sequence[Sample], folder: str | Path, cfg: Profile,
                 classes: Sequence[str], real_labels: set[Path] = frozenset()) -> dict[str, Any]:
    """Label every sample with the stage-1 model: NIfTI + provenance JSON each (atomic), and an index.json.

    Never touches a real label: a target that is one of `real_labels`, or in a folder voco did not make, is
    refused before anything is written. Returns the index (and the Dice against true labels where samples
    carry them)."""
    folder, checkpoint = Path(folder), Path(checkpoint)
    targets = [folder / f"{s['name']}.nii.gz" for s in samples]
    clash = [str(t) for t in targets if t.resolve() in real_labels]
    if clash:
        raise ValueError(f"pseudo-label target(s) {clash[:3]} are real label files of the labelled set; they are "
                         "never overwritten: choose another --out")
    _claim(folder)
    k = len(classes)
    model = OmniModel(cfg, k)
    model.load_state_dict(load_stage(checkpoint, k)["model"])
    digest, roi, entries, dices = sha256(checkpoint), seg_roi(cfg), [], []
    for s, target in zip(samples, targets):
        pred = predict(model.backbone, s["image"], roi, cfg)
        save_nifti(target, pred.numpy(), _affine(s["spacing"]), np.uint8)
        prov = {"kind": "voco pseudo-label", "label": target.name, "label_sha256": sha256(target),
                "source_image": s["source"], "stage1_checkpoint": str(checkpoint), "stage1_sha256": digest,
                "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "classes": list(classes), "voxels": list(pred.shape), "spacing_mm": list(s["spacing"]),
                "grid": f"the VoCo chain's space ({cfg.data.chain}, region mode {region_mode_of(cfg)}), "
                        "not the source image's grid"}
        write_text(target.with_name(s["name"] + ".json"), json.dumps(prov, indent=1))
        entries.append({"name": s["name"], "label": target.name, "provenance": s["name"] + ".json"})
        if s.get("label") is not None:
            dices.append(dice_per_class(pred, s["label"][0], k))
    index: dict[str, Any] = {"stage1_checkpoint": str(checkpoint), "stage1_sha256": digest, "entries": entries}
    if dices:
        per = np.nanmean(np.stack(dices), 0)
        index["dice_vs_truth"] = {"mean": float(np.nanmean(per)), "per_class": dict(zip(classes[1:], per.tolist()))}
    write_text(folder / "index.json", json.dumps(index, indent=1))
    return index


def read_pseudo_labels(folder: Path, samples: Sequence[Sample], checkpoint: str | Path) -> list[Sample]:
    """The unlabelled samples with their pseudo-labels read back; each checked against its provenance."""
    import nibabel as nib

    digest, out = sha256(checkpoint), []
    for s in samples:
        prov_path = folder / f"{s['name']}.json"
        if not prov_path.is_file():
            raise ValueError(f"{prov_path}: no provenance for the pseudo-label of {s['name']}; run pseudo-labelling "
                             "(voco pretrain method=omni --resume --out OUT)")
        prov = json.loads(prov_path.read_text())
        label = folder / prov["label"]
        if prov["stage1_sha256"] != digest or sha256(label) != prov["label_sha256"]:
            raise ValueError(f"{label}: made by another stage-1 model or changed since ({prov_path}); pseudo-label "
                             "again with this stage-1 checkpoint")
        lab = torch.from_numpy(np.asarray(nib.load(str(label)).dataobj).astype(np.int64))[None]
        if tuple(lab.shape[1:]) != tuple(s["image"].shape[1:]):
            raise ValueError(f"{label}: shape {tuple(lab.shape[1:])}, its image {tuple(s['image'].shape[1:])}")
        out.append({**s, "label": lab})
    return out


# ------------------------------------------------------------------------------------------------ the run
def _prepare_out(out: Path, resume: bool, overwrite: bool) -> None:
    if resume and overwrite:
        raise RunDirError("--resume and --overwrite contradict each other: continue the run or replace it, not both")
    used = out.is_dir() and any(out.iterdir())
    if resume and not (out / "stage1" / "config.yaml").is_file():
        raise RunDirError(f"--resume: {out} holds no omni run (no stage1/config.yaml); start without --resume")
    if used and not resume:
        if not overwrite:
            raise RunDirError(f"{out} is not empty; continue its run with --resume, choose a new --out, or pass "
                              "--overwrite to move it aside")
        n = 1
        while out.with_name(f"{out.name}.old-{n}").exists():
            n += 1
        os.replace(out, out.with_name(f"{out.name}.old-{n}"))
        print(f"voco: moved the previous run in {out} aside to {out.name}.old-{n}", flush=True)


def _seg_losses(run_dir: Path) -> dict[str, Any]:
    train = read_metrics(run_dir, "train")
    ev = read_metrics(run_dir, "eval")
    return {"seg_first": train[0]["seg"] if train else None, "seg_last": train[-1]["seg"] if train else None,
            "val_dice": [(r["step"], r.get("dice")) for r in ev]}


def run_omni(profile: str | None = None, labelled: str = "phantom", unlabelled: str = "phantom",
             out: str | Path = "runs/omni", overrides: Sequence[str] | dict[str, str] | None = None,
             resume: bool = False, overwrite: bool = False, show_progress: bool = True) -> Path:
    """Stage 1, pseudo-labels, stage 2, exports and report under `out`; returns `out`."""
    from voco_lib.checkpoints import export_encoder

    cfg, oc = resolve_omni(profile, overrides)
    out = Path(out)
    _prepare_out(out, resume, overwrite)
    out.mkdir(parents=True, exist_ok=True)
    data = load_data(labelled, unlabelled, cfg, oc, out)
    auto = "auto" if resume else False
    ck1 = stage1(cfg, oc, data, out, auto, show_progress)
    index = pseudo_label(ck1, data.unlabelled, out / "pseudo_labels", cfg, data.classes, data.real_labels)
    ck2 = stage2(cfg, oc, data, out, ck1, auto, show_progress)
    model = OmniModel(cfg, len(data.classes))
    model.load_state_dict(load_stage(ck2, len(data.classes))["model"])
    with atomic_write(out / "omni_swinunetr.pt") as f:
        torch.save({k: v.detach().clone() for k, v in model.backbone.state_dict().items()}, f)
    export_encoder(model.backbone, out / "encoder.pt")
    report: dict[str, Any] = {"classes": data.classes, "stage1": _seg_losses(out / "stage1"),
                              "stage2": _seg_losses(out / "stage2"),
                              "pseudo_label_dice_stage1": index.get("dice_vs_truth")}
    if data.unlabelled and data.unlabelled[0].get("label") is not None:
        mean, per = mean_dice(model.backbone, data.unlabelled, seg_roi(cfg), cfg, len(data.classes))
        report["pseudo_label_dice_stage2"] = {"mean": mean, "per_class": dict(zip(data.classes[1:], per))}
    write_text(out / "omni_report.json", json.dumps(report, indent=1, default=float))
    _print_report(report, out)
    return out


def _print_report(report: dict[str, Any], out: Path) -> None:
    d1, d2 = report.get("pseudo_label_dice_stage1"), report.get("pseudo_label_dice_stage2")
    if d1 and d2:
        print(f"voco omni: Dice of the unlabelled volumes' labels vs the phantoms' truth: after stage 1 "
              f"{d1['mean']:.4f}, after stage 2 {d2['mean']:.4f}", flush=True)
    print(f"voco omni: {out}/omni_swinunetr.pt, {out}/encoder.pt, report {out}/omni_report.json", flush=True)


def cli_omni(args: argparse.Namespace) -> int:
    """`voco pretrain method=omni --labelled DATALIST|phantom --unlabelled DATALIST|phantom --out OUT [k=v ...]`."""
    labelled = getattr(args, "labelled", None)
    if not labelled:
        raise ValueError("voco pretrain method=omni needs --labelled DATALIST (image + label entries) or phantom")
    unlabelled = getattr(args, "unlabelled", None) or getattr(args, "data", None) or "phantom"
    run_omni(args.profile, labelled, unlabelled, args.out or "runs/omni", args.overrides or [],
             resume=bool(args.resume), overwrite=bool(getattr(args, "overwrite", False)))
    return 0
