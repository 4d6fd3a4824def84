"""The frozen-encoder protocol: a fixed encoder, a linear read-out, and the fine-tuning parameter groups.

`protocol=frozen` measures the representation itself (the linear-probe evaluation of self-supervised
features): the encoder's weights are fixed (no gradient, eval mode, not in the optimizer) and only a linear
map is trained on top of them.
- segmentation: `LinearSegmentationProbe`, a per-voxel linear classifier (1x1x1 convolution) on the five
  multi-scale swinViT maps, each trilinearly upsampled to the input size and concatenated;
- classification: the linear head on the pooled embedding (`classification.EncoderClassifier`).

`param_groups` is the full protocol's optimizer layout: the head/decoder at lr, the encoder at
lr·encoder_lr_scale, with layer-wise lr decay over the Swin stages (BEiT's convention, Bao et al. 2022,
"BEiT: BERT Pre-Training of Image Transformers", ICLR; used for MAE fine-tuning, He et al. 2022, CVPR:
with L blocks, the embedding is depth 0, block i depth i, the head depth L + 1, and depth d gets
lr·decay^(L + 1 − d)). Here the blocks are the four Swin stages (L = 4), so patch_embed gets decay^5,
stage 1 decay^4, stage 4 decay^1; the authors' own fine-tuning uses one group
(Luffy03/Large-Scale-Medical Downstream/monai/BTCV/main.py:L202-203, commit 1ad538b).
"""

from __future__ import annotations

import re
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

N_STAGES = 4  # Swin stages of the encoder (L in BEiT's layer decay)
FROZEN_TYPES = ("segmentation", "classification")  # task types with a frozen-encoder read-out


def freeze(module: nn.Module) -> nn.Module:
    """No gradients and eval mode for `module` (a `FrozenEncoderMixin` keeps it in eval mode under .train())."""
    module.requires_grad_(False)
    return module.eval()


class FrozenEncoderMixin:
    """A model whose `encoder` stays in eval mode whatever `.train()` says (the loop calls model.train())."""

    encoder: nn.Module
    frozen: bool = True

    def train(self, mode: bool = True):  # type: ignore[override]
        nn.Module.train(self, mode)  # type: ignore[arg-type]
        if self.frozen:
            self.encoder.eval()
        return self


class LinearSegmentationProbe(FrozenEncoderMixin, nn.Module):
    """Per-voxel linear classifier on the frozen encoder's five swinViT maps (B, K, D, H, W logits).

    Trilinear upsampling is linear with weights summing to 1, so a 1x1x1 convolution of the upsampled,
    concatenated maps equals the sum over scales of each map's own 1x1x1 convolution, upsampled: the latter
    is computed (K channels upsampled instead of 31·feature_size). `concat_weight` gives the single
    convolution over the concatenation that this is.
    """

    def __init__(self, encoder: nn.Module, out_channels: int):
        super().__init__()
        self.encoder = freeze(encoder)
        fs = encoder.feature_size
        self.widths = [fs * 2**i for i in range(N_STAGES + 1)]  # patch embedding, then each stage
        self.heads = nn.ModuleList([nn.Conv3d(c, out_channels, 1, bias=i == 0) for i, c in enumerate(self.widths)])

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The swinViT maps of `x` (no graph: the encoder is fixed)."""
        with torch.no_grad():
            return self.encoder.swinViT(self.encoder._check(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[2:]
        out = 0
        for head, h in zip(self.heads, self.features(x)):
            z = head(h)
            out = out + (z if z.shape[2:] == size else F.interpolate(z, size=size, mode="trilinear",
                                                                     align_corners=False))
        return out

    def concat_weight(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(weight (K, ΣC), bias (K,)) of the equivalent 1x1x1 convolution over the concatenated maps."""
        w = torch.cat([h.weight.flatten(1) for h in self.heads], 1)
        return w, self.heads[0].bias


# ------------------------------------------------------------------------------------------------ lr groups
_STAGE = re.compile(r"^swinViT\.layers(\d)c?\.")
_SKIP = {"encoder1": 0, "encoder2": 1, "encoder3": 2, "encoder4": 3, "encoder10": N_STAGES}


def encoder_depth(name: str) -> int | None:
    """Depth (0 .. N_STAGES) of an encoder parameter by its MONAI name; None for a non-encoder parameter.

    patch_embed: 0; stage i's conv block and Swin blocks (`layers{i}c`, `layers{i}`): i; SwinUNETR's skip
    blocks take the depth just after the map they read (encoder1 the image: 0, encoder2 the patch embedding: 1,
    encoder3 stage 1's output: 2, encoder4 stage 2's: 3), encoder10 (stage 4's output) the last stage's, 4.
    """
    if name.startswith("swinViT.patch_embed."):
        return 0
    m = _STAGE.match(name)
    if m:
        return int(m.group(1))
    head = name.split(".", 1)[0]
    return _SKIP.get(head)


def param_groups(model: nn.Module, encoder: nn.Module, lr: float, encoder_lr_scale: float,
                 layer_decay: float) -> list[dict[str, Any]]:
    """AdamW groups of `model`'s trainable parameters: the encoder's at lr·encoder_lr_scale·layer_decay^(L + 1 − depth),
    every other one (decoder, head) at `lr`, first (the loop logs the first group's lr). `encoder`: the module
    with MONAI SwinUNETR names (`Runner.init_target`); its parameters without an encoder name (a SwinUNETR's
    decoder) count as head."""
    names = {id(p): n for n, p in encoder.named_parameters()}
    head: list[nn.Parameter] = []
    by_depth: dict[int, list[nn.Parameter]] = {}
    for p in model.parameters():
        if not p.requires_grad:
            continue
        depth = encoder_depth(names[id(p)]) if id(p) in names else None
        (head if depth is None else by_depth.setdefault(depth, [])).append(p)
    groups = [{"params": head, "lr": lr, "name": "head"}] if head else []
    for d in sorted(by_depth):
        groups.append({"params": by_depth[d], "lr": lr * encoder_lr_scale * layer_decay ** (N_STAGES + 1 - d),
                       "name": f"encoder_depth{d}"})
    return groups
