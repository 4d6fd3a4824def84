"""What the non-VoCo pretexts share: the crops of a batch of views and the transformer-only backbone."""

from __future__ import annotations

import torch
from torch import nn

from voco_lib.backbone import build_backbone
from voco_lib.config import Profile
from voco_lib.crops import Views

STRIDE = 32  # the Swin encoder's total downsampling: one token of the deepest map covers 32³ voxels
CONV_BLOCKS = ("encoder1", "encoder2", "encoder3", "encoder4", "encoder10")


def crops_of(views: Views) -> torch.Tensor:
    """Every crop of a batch of views, (B·S + B·K, C, ...): the images the non-VoCo pretexts learn from."""
    return torch.cat([views.random.flatten(0, 1), views.bases.flatten(0, 1)])


def transformer_only(cfg: Profile) -> nn.Module:
    """The run's backbone with SwinUNETR's conv blocks frozen: the pretexts here use the transformer only."""
    crop = cfg.views.out_size or cfg.views.crop_size
    bad = [s for s in crop if s % STRIDE]
    if bad:
        raise ValueError(f"views crop {crop}: every side must be a multiple of {STRIDE} for the Swin encoder; "
                         "set e.g. views.out_size=64x64x64")
    backbone = build_backbone(cfg.feature_size, crop, grad_checkpoint=cfg.train.grad_checkpoint)
    for name in CONV_BLOCKS:
        getattr(backbone, name).requires_grad_(False)
    return backbone
