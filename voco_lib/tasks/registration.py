"""Deformable registration: a Swin network predicts a displacement field, MONAI's Warp applies it.

The TransMorph-style setup the paper uses for OASIS/IXI (Luffy03/Large-Scale-Medical
Downstream/monai/Registration/OASIS/TransMorph/train_pre_swin.py:L87-96, commit 1ad538b): moving and fixed image as
two input
channels of SwinUNETR (our encoder; the decoder outputs 3 channels: a displacement in voxels, zero at
start, i.e. the identity), loss = image similarity (MSE, or LNCC for MRI) + λ · diffusion smoothness.
Scored by the Dice of the warped moving labels against the fixed labels and the % of folding voxels.
Phantom analog: pairs of phantom patients (`inter`), or a patient and a smoothly deformed copy (`intra`).
Real data: a segmentation datalist; consecutive entries (0,1), (2,3), ... are (moving, fixed) pairs.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.losses import DiffusionLoss, LocalNormalizedCrossCorrelationLoss
from monai.networks.blocks import Warp
from torch import nn

from voco_lib.tasks.data import Sample, datalist_samples, labelled_count, phantom_samples, phantom_seeds, resize_to
from voco_lib.tasks.engine import Context, Runner
from voco_lib.tasks.metrics import dice_per_class, folding_fraction

Pair = tuple[Sample, Sample]
FLOW_SCALE = 10.0


def smooth_displacement(shape: tuple[int, ...], g: torch.Generator, magnitude: float = 3.0, cells: int = 4) -> torch.Tensor:
    """A random smooth displacement (3, X, Y, Z) in voxels: coarse Gaussian noise, trilinearly upsampled."""
    coarse = torch.randn((1, 3, cells, cells, cells), generator=g) * magnitude
    return F.interpolate(coarse, size=tuple(shape), mode="trilinear", align_corners=True)[0]


def _pairs(samples: list[Sample]) -> list[Pair]:
    return [(samples[i], samples[i + 1]) for i in range(0, len(samples) - 1, 2)]


class RegistrationRunner(Runner):
    shards_batches = True

    def __init__(self, ctx: Context):
        super().__init__(ctx)
        task, fc = ctx.task, ctx.fc
        self.warp, self.warp_nn = Warp(mode="bilinear", padding_mode="border"), Warp(mode="nearest", padding_mode="border")
        if task.is_phantom:
            n_tr, n_val = labelled_count(ctx, fc.n_train), fc.n_val
            mode = task.phantom.pairs
            tr = phantom_samples(task, phantom_seeds(task, "training", 2 * n_tr if mode == "inter" else n_tr, ctx.seed))
            va = phantom_samples(task, phantom_seeds(task, "validation", 2 * n_val if mode == "inter" else n_val))
            tr, va = ([resize_to(s, ctx.roi) for s in x] for x in (tr, va))
            if mode == "inter":
                self.train, self.val = _pairs(tr), _pairs(va)
            else:
                self.train = [self._deformed_copy(s, i) for i, s in enumerate(tr)]
                self.val = [self._deformed_copy(s, 10_000 + i) for i, s in enumerate(va)]
        else:
            tr = [resize_to(s, ctx.roi) for s in datalist_samples(task, ctx.datalist, "training", ctx.roi)]
            va = [resize_to(s, ctx.roi) for s in datalist_samples(task, ctx.datalist, "validation", ctx.roi)]
            self.train, self.val = _pairs(tr), _pairs(va)
            self.train = self.train[: labelled_count(ctx)]
        if not self.train or not self.val:
            raise ValueError(f"task {task.name}: registration needs at least one training and one validation pair")
        self.n_train = len(self.train)
        labels = [int(s["label"].max()) for p in self.train + self.val for s in p if s.get("label") is not None]
        self.num_classes = task.num_classes or (max(labels) + 1 if labels else 2)
        from voco_lib.backbone import build_backbone

        self.model = build_backbone(ctx.feature_size, ctx.roi, in_channels=2, out_channels=3)
        nn.init.normal_(self.model.out.conv.conv.weight, std=1e-5)  # start at (nearly) the identity transform
        nn.init.zeros_(self.model.out.conv.conv.bias)
        self.similarity = LocalNormalizedCrossCorrelationLoss(kernel_size=5) if task.similarity == "lncc" else nn.MSELoss()
        self.smooth, self.smooth_weight = DiffusionLoss(), task.smoothness_weight

    def _deformed_copy(self, s: Sample, key: int) -> Pair:
        """(moving, fixed): the patient warped by a random smooth field, and the patient."""
        ddf = smooth_displacement(s["image"].shape[1:], self.ctx.generator(3, key))[None]
        moving = {**s, "image": self.warp(s["image"][None], ddf)[0],
                  "label": self.warp_nn(s["label"][None].float(), ddf)[0].round().long()}
        return moving, s

    def flow(self, moving: torch.Tensor, fixed: torch.Tensor, net: nn.Module | None = None) -> torch.Tensor:
        """Displacement field (N, 3, X, Y, Z) in voxels that warps `moving` onto `fixed` (`net`: the model as
        trained, DDP-wrapped under torchrun; the bare model otherwise).

        The network's output is scaled by FLOW_SCALE voxels so that a few optimizer steps can move labels.
        """
        return FLOW_SCALE * (net or self.model)(torch.cat([moving, fixed], 1))

    def loss(self, net: nn.Module, step: int, micro: int) -> torch.Tensor:
        g = self.ctx.generator(4, step)
        idx = self.ctx.share(torch.randint(self.n_train, (self.ctx.global_batch,), generator=g).tolist(), micro)
        mov = torch.stack([self.train[i][0]["image"] for i in idx]).to(self.ctx.device)
        fix = torch.stack([self.train[i][1]["image"] for i in idx]).to(self.ctx.device)
        ddf = self.flow(mov, fix, net)
        return self.similarity(self.warp(mov, ddf), fix) + self.smooth_weight * self.smooth(ddf)

    def register(self, pair: Pair) -> dict[str, torch.Tensor]:
        """Warped image and label of one pair, and its displacement field."""
        mov, fix = (s["image"][None].to(self.ctx.device) for s in pair)
        ddf = self.flow(mov, fix).float()
        out = {"ddf": ddf[0].cpu(), "warped": self.warp(mov, ddf)[0].cpu()}
        if pair[0].get("label") is not None:
            out["warped_label"] = self.warp_nn(pair[0]["label"][None].float().to(ddf.device), ddf)[0].round().long().cpu()
        return out

    def evaluate(self, final: bool = False) -> dict[str, Any]:
        d_w, d_i, fold, sim = [], [], [], []
        for pair in self.val:
            r = self.register(pair)
            fold.append(folding_fraction(r["ddf"]))
            sim.append(float(self.similarity(r["warped"][None], pair[1]["image"][None])))
            if "warped_label" in r and pair[1].get("label") is not None:
                d_w.append(np.nanmean(dice_per_class(r["warped_label"][0], pair[1]["label"][0], self.num_classes)))
                d_i.append(np.nanmean(dice_per_class(pair[0]["label"][0], pair[1]["label"][0], self.num_classes)))
        return {"dice_warped": float(np.mean(d_w)) if d_w else float("nan"),
                "dice_identity": float(np.mean(d_i)) if d_i else float("nan"),
                "folding_percent": 100.0 * float(np.mean(fold)), "similarity_loss": float(np.mean(sim))}
