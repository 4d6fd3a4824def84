"""Classification fine-tuning: the Swin encoder's pooled embedding (24·feature values) and a linear head.

`finetune.protocol=frozen`: the encoder is fixed (`probe.freeze`) and only the linear head trains (a linear
probe of the embedding). Upstream (Luffy03/Large-Scale-Medical Downstream/monai/CC-CCII and LUNA16/main.py,
commit 1ad538b): CC-CCII 3 classes on slice stacks, LUNA16 binary on 64³ candidate patches. Each volume is
resized to the roi (the whole preprocessed volume, as the pre-training's "resize" regions).
Phantom analog: lesion present/absent (balanced by forcing the lesion on even seeds), or
`organ_enlarged:<organ>` (volume above the training cohort's median).
Real data: an MSD-style datalist whose entries carry an integer `target` beside `image`.
"""

from __future__ import annotations

import contextlib
from typing import Any

import numpy as np
import torch
from torch import nn

from voco_lib.tasks.data import (Sample, labelled_count, labelled_datalist, phantom_samples, phantom_seeds,
                                 random_flips, resize_to, stack)
from voco_lib.tasks.engine import Context, Runner
from voco_lib.tasks.metrics import accuracy, auc
from voco_lib.tasks.probe import FrozenEncoderMixin, freeze


class EncoderClassifier(FrozenEncoderMixin, nn.Module):
    """encoder.embed(x) -> dropout -> linear: logits (N, K). frozen: the encoder is fixed (no graph, eval mode)."""

    def __init__(self, encoder: nn.Module, num_classes: int, dropout: float = 0.0, frozen: bool = False):
        super().__init__()
        self.frozen = frozen
        self.encoder = freeze(encoder) if frozen else encoder
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(encoder.embed_dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad() if self.frozen else contextlib.nullcontext():
            z = self.encoder.embed(x)
        return self.head(self.drop(z))


def phantom_targets(task, samples: list[Sample], reference: list[Sample] | None = None) -> list[int]:
    """Targets of phantom samples: lesion present, or organ volume above the reference cohort's median."""
    target = task.phantom.target
    if target == "lesion_present":
        return [int(s["attributes"]["lesion"] is not None) for s in samples]
    if target.startswith("organ_enlarged:"):
        organ = target.split(":", 1)[1]
        ref = reference or samples
        median = float(np.median([r["attributes"]["organ_volumes_ml"][organ] for r in ref]))
        return [int(s["attributes"]["organ_volumes_ml"][organ] > median) for s in samples]
    raise ValueError(f"task {task.name}: unknown phantom target {target!r}; use lesion_present or organ_enlarged:<organ>")


def _phantom_split(ctx: Context, split: str, n: int) -> list[Sample]:
    seeds = phantom_seeds(ctx.task, split, n, ctx.seed)
    forced = [i % 2 == 0 for i in range(n)] if ctx.task.phantom.target == "lesion_present" else None
    return phantom_samples(ctx.task, seeds, labels=False, lesion=forced)


class ClassificationRunner(Runner):
    shards_batches = True

    def __init__(self, ctx: Context):
        super().__init__(ctx)
        task, fc = ctx.task, ctx.fc
        if task.is_phantom:
            train = _phantom_split(ctx, "training", labelled_count(ctx, fc.n_train))
            val = _phantom_split(ctx, "validation", fc.n_val)
            ys, yv = phantom_targets(task, train), phantom_targets(task, val, reference=train)
        else:
            train, val = labelled_datalist(ctx, ("image",), "target", lambda v: v is not None,
                                           "integer 'target' (the class index)")
            ys, yv = [int(s["target"]) for s in train], [int(s["target"]) for s in val]
        self.train = [resize_to(s, ctx.roi) for s in train]
        self.val = [resize_to(s, ctx.roi) for s in val]
        self.y_train, self.y_val = torch.tensor(ys), torch.tensor(yv)
        self.n_train = len(self.train)
        from voco_lib.backbone import build_backbone

        enc = build_backbone(ctx.feature_size, ctx.roi, task.in_channels)
        self.model = EncoderClassifier(enc, task.out_channels, frozen=fc.protocol == "frozen")
        self.ce = nn.CrossEntropyLoss()

    def init_target(self) -> nn.Module:
        return self.model.encoder

    def loss(self, net: nn.Module, step: int, micro: int) -> torch.Tensor:
        g = self.ctx.generator(2, step)
        idx = torch.randint(self.n_train, (self.ctx.global_batch,), generator=g)  # the step's global batch
        flips = [random_flips([self.train[i]["image"]], g, self.ctx.fc.flip_p)[0] for i in idx.tolist()]
        x, idx = torch.stack(self.ctx.share(flips, micro)), self.ctx.share(idx, micro)
        return self.ce(net(x.to(self.ctx.device)), self.y_train[idx].to(self.ctx.device))

    def logits(self, samples: list[Sample]) -> torch.Tensor:
        out = [self.model(stack(samples[i:i + 4]).to(self.ctx.device)).float().cpu() for i in range(0, len(samples), 4)]
        return torch.cat(out)

    def evaluate(self, final: bool = False) -> dict[str, Any]:
        z = self.logits(self.val)
        return {"accuracy": accuracy(z, self.y_val), "auc": auc(z, self.y_val),
                "loss": float(nn.functional.cross_entropy(z, self.y_val)), "n_val": len(self.val)}
