"""`mae`: masked volume modelling on the Swin encoder, SimMIM-style (Xie et al., "SimMIM", CVPR 2022).

Per crop, `mae.mask_ratio` of the `mae.patch`³ mask patches (exactly ⌈ratio · count⌉, as SimMIM's mask
generator) have their patch embeddings replaced by one learned mask token; the Swin transformer runs as
usual, and a single 1×1×1 convolution from the stride-32 map, shuffled back to voxels, predicts the crop.
The loss is L1 over masked voxels only (microsoft/SimMIM models/simmim.py, commit 0e71746). As in SimMIM
only the transformer (`swinViT`) and the decoder learn; SwinUNETR's conv blocks (encoder1..4, 10) are not
on the path and stay frozen at their initial values in the exported encoder.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from voco_lib.config import Profile
from voco_lib.crops import Views, collate_views
from voco_lib.methods.common import STRIDE, crops_of, transformer_only


def random_mask(n: int, grid: tuple[int, ...], ratio: float, generator: torch.Generator | None = None,
                device: torch.device | str = "cpu") -> torch.Tensor:
    """(n, *grid) bool: exactly ⌈ratio · cells⌉ masked cells per sample, uniformly chosen."""
    cells = math.prod(grid)
    count = math.ceil(cells * ratio)
    order = torch.rand(n, cells, generator=generator).argsort(1)
    mask = torch.zeros(n, cells, dtype=torch.bool)
    mask.scatter_(1, order[:, :count], True)
    return mask.view(n, *grid).to(device)


def upsample_mask(mask: torch.Tensor, factor: int) -> torch.Tensor:
    """(n, a, b, c) -> (n, a·f, b·f, c·f): each cell repeated over a cube of `factor` per side."""
    for dim in (1, 2, 3):
        mask = mask.repeat_interleave(factor, dim)
    return mask


def pixel_shuffle_3d(x: torch.Tensor, r: int) -> torch.Tensor:
    """(B, C·r³, d, h, w) -> (B, C, d·r, h·r, w·r); channel c·r³ + (i·r + j)·r + k goes to offset (i, j, k)."""
    b, ch, d, h, w = x.shape
    c = ch // r**3
    x = x.view(b, c, r, r, r, d, h, w).permute(0, 1, 5, 2, 6, 3, 7, 4)
    return x.reshape(b, c, d * r, h * r, w * r)


def masked_l1(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """SimMIM's loss: Σ |pred − target| over masked voxels / (masked voxels + 1e-5) / channels.
    pred/target (N, C, ...), mask (N, ...) bool at voxel resolution."""
    w = mask.unsqueeze(1).to(pred.dtype)
    return ((pred - target).abs() * w).sum() / (w.sum() + 1e-5) / pred.shape[1]


class MaskedModel(nn.Module):
    """Swin encoder with a mask token at the patch embedding and SimMIM's one-layer decoder."""

    def __init__(self, cfg: Profile):
        super().__init__()
        crop = cfg.views.out_size or cfg.views.crop_size
        self.patch, self.ratio = cfg.mae.patch, cfg.mae.mask_ratio
        if any(s % self.patch for s in crop):
            raise ValueError(f"mae.patch={self.patch} does not divide the crop {crop}; set e.g. mae.patch=8")
        self.grid = tuple(s // self.patch for s in crop)
        self.backbone = transformer_only(cfg)
        fs, cin = cfg.feature_size, 1
        self.mask_token = nn.Parameter(torch.zeros(1, fs, 1, 1, 1))
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        self.decoder = nn.Conv3d(16 * fs, cin * STRIDE**3, kernel_size=1)

    @property
    def encoder(self) -> nn.Module:
        return self.backbone

    def features(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The deepest Swin map of `x` with masked patch embeddings replaced by the mask token.
        Same computation as `SwinViT.forward` (patch embedding, four conv block + stage pairs, channel norm)."""
        vit = self.backbone.swinViT
        t = vit.patch_embed(x)
        w = upsample_mask(mask, self.patch // 2).unsqueeze(1).to(t.dtype)  # the patch embedding halves each side
        t = t * (1 - w) + self.mask_token.to(t.dtype) * w
        for i in range(1, 5):
            t = getattr(vit, f"layers{i}")[0](getattr(vit, f"layers{i}c")[0](t))
        return F.layer_norm(t.movedim(1, -1), [t.shape[1]]).movedim(-1, 1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x (N, C, ...) crops, mask (N, *grid) bool -> reconstruction (N, C, ...)."""
        return pixel_shuffle_3d(self.decoder(self.features(x, mask)), STRIDE)


def step(net: nn.Module, model: MaskedModel, views: Views, first_micro: bool) -> tuple[torch.Tensor, dict]:
    x = crops_of(views)
    mask = random_mask(len(x), model.grid, model.ratio, device=x.device)
    rec = net(x, mask)
    with torch.autocast(x.device.type, enabled=False):
        loss = masked_l1(rec.float(), x.float(), upsample_mask(mask, model.patch))
    return loss, {}


@torch.no_grad()
def evaluate(model: MaskedModel, views: list[Views], batch_size: int) -> dict[str, float]:
    """Masked L1 on the held-out crops under fixed masks (seed 0); lower is better."""
    gen = torch.Generator().manual_seed(0)
    dev = next(model.parameters()).device
    total, count = 0.0, 0
    for i in range(0, len(views), batch_size):
        x = crops_of(collate_views(views[i:i + batch_size])).to(dev)
        mask = random_mask(len(x), model.grid, model.ratio, gen, dev)
        m = upsample_mask(mask, model.patch)
        total += masked_l1(model(x, mask).float(), x.float(), m).item() * m.sum().item()
        count += m.sum().item()
    return {"recon_l1": total / max(count, 1)}
