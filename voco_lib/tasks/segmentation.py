"""Segmentation fine-tuning: SwinUNETR on our Swin encoder, DiceCE, sliding-window Dice (and HD95).

The authors' recipe (Luffy03/Large-Scale-Medical Downstream/monai/BTCV/utils/data_utils.py:L85-97 and
main.py:L66-68,L95,L213-215, commit 1ad538b): random roi crops centred on foreground 9 times in 10, flips
(finetune.flip_p per axis), DiceCE without background, per-iteration warmup-cosine AdamW, validation by
sliding-window inference and mean foreground Dice in the resampled space. `finetune.protocol=frozen` trains
`probe.LinearSegmentationProbe` on the fixed encoder instead of the SwinUNETR decoder. `--n-labeled K` keeps the first K labelled volumes of the pool
(label efficiency); the validation curve over steps is the convergence curve.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from monai.inferers import sliding_window_inference
from monai.losses import DiceCELoss

from voco_lib.tasks.data import (Sample, labelled_count, labelled_datalist, phantom_samples, phantom_seeds,
                                 random_crop_start, random_flips)
from voco_lib.tasks.engine import Context, Runner
from voco_lib.tasks.metrics import dice_per_class, hd95_per_class
from voco_lib.tasks.probe import LinearSegmentationProbe


def labelled_split(ctx: Context) -> tuple[list[Sample], list[Sample]]:
    """(training, validation) samples with labels; training cut to `n_labeled` when given."""
    task, fc = ctx.task, ctx.fc
    if task.is_phantom:
        n = labelled_count(ctx, fc.n_train)
        train = phantom_samples(task, phantom_seeds(task, "training", n, ctx.seed))
        val = phantom_samples(task, phantom_seeds(task, "validation", fc.n_val))
        return train, val
    return labelled_datalist(ctx)


def build_model(ctx: Context) -> torch.nn.Module:
    """SwinUNETR (full protocol), or the linear probe on a fixed encoder (frozen protocol)."""
    from voco_lib.backbone import build_backbone

    task = ctx.task
    if ctx.fc.protocol == "frozen":
        return LinearSegmentationProbe(build_backbone(ctx.feature_size, ctx.roi, task.in_channels), task.out_channels)
    return build_backbone(ctx.feature_size, ctx.roi, task.in_channels, out_channels=task.out_channels)


class SegmentationRunner(Runner):
    shards_batches = True

    def __init__(self, ctx: Context):
        super().__init__(ctx)
        self.train, self.val = labelled_split(ctx)
        self.n_train = len(self.train)
        self.model = build_model(ctx)
        self.loss_fn = DiceCELoss(include_background=False, to_onehot_y=True, softmax=True)

    def init_target(self) -> torch.nn.Module:
        return self.model.encoder if isinstance(self.model, LinearSegmentationProbe) else self.model

    def batch(self, step: int, micro: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """This micro-batch's share of the step's roi crops (`ctx.global_batch` of them, drawn in one sequence):
        each from a random training volume, foreground-centred 9 times in 10, flipped (finetune.flip_p per axis)."""
        g = self.ctx.generator(1, step)
        roi, crops = self.ctx.roi, []
        for _ in range(self.ctx.global_batch):
            s = self.train[int(torch.randint(len(self.train), (), generator=g))]
            img, lab = s["image"], s["label"]
            start = random_crop_start(img.shape[1:], roi, g, foreground=lab[0] > 0)
            sl = (slice(None),) + tuple(slice(a, a + r) for a, r in zip(start, roi))
            crops.append(random_flips([img[sl], lab[sl]], g, self.ctx.fc.flip_p))
        mine = self.ctx.share(crops, micro)
        xs, ys = [_pad_to(img, roi) for img, _ in mine], [_pad_to(lab, roi) for _, lab in mine]
        return torch.stack(xs).to(self.ctx.device), torch.stack(ys).to(self.ctx.device)

    def loss(self, net: torch.nn.Module, step: int, micro: int) -> torch.Tensor:
        x, y = self.batch(step, micro)
        return self.loss_fn(net(x), y)

    def predict(self, image: torch.Tensor) -> torch.Tensor:
        """Label map (X, Y, Z) of one (C, X, Y, Z) volume by sliding-window inference over roi windows."""
        fc = self.ctx.fc
        logits = sliding_window_inference(image[None].to(self.ctx.device), self.ctx.roi, fc.sw_batch_size, self.model,
                                          overlap=fc.sw_overlap)
        return logits.argmax(1)[0].cpu()

    def evaluate(self, final: bool = False) -> dict[str, Any]:
        k = self.ctx.task.out_channels
        names = list(self.ctx.task.classes or [f"class_{i}" for i in range(k)])[1:]
        dices, hds = [], []
        for s in self.val:
            pred = self.predict(s["image"])
            dices.append(dice_per_class(pred, s["label"][0], k))
            if final and self.ctx.fc.hd95:
                hds.append(hd95_per_class(pred, s["label"][0], k, spacing=_spacing(self.ctx, s)))
        per_class = _nanmean0(np.stack(dices)) if len(dices) else np.full(k - 1, np.nan)
        out: dict[str, Any] = {"dice": float(np.nanmean(per_class)) if np.isfinite(per_class).any() else float("nan"),
                               "dice_per_class": dict(zip(names, per_class.tolist()))}
        if hds:
            hd = np.stack(hds)
            per = _nanmean0(np.where(np.isfinite(hd), hd, np.nan))  # a missed structure (inf) is counted apart
            out["hd95"] = float(np.nanmean(per)) if np.isfinite(per).any() else float("nan")
            out["hd95_per_class"] = dict(zip(names, per.tolist()))
            out["missed_structures"] = int(np.isinf(hd).sum())
        return out


def _nanmean0(x: np.ndarray) -> np.ndarray:
    """Column means skipping NaN; NaN for an all-NaN column (no warning)."""
    n = (~np.isnan(x)).sum(0)
    return np.where(n > 0, np.nansum(x, 0) / np.maximum(n, 1), np.nan)


def _spacing(ctx: Context, s: Sample) -> tuple[float, ...] | None:
    """Voxel size (mm) of a sample: the task's spacing, or for a volume resized to the roi its effective spacing."""
    return s.get("spacing") or ctx.task.spacing


def _pad_to(t: torch.Tensor, roi: tuple[int, ...]) -> torch.Tensor:
    pad = [max(0, r - n) for r, n in zip(roi, t.shape[1:])]
    if not any(pad):
        return t
    spec = [p for d in reversed(pad) for p in (0, d)]
    return torch.nn.functional.pad(t, spec)
