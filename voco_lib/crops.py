"""VoCo's views: the base-crop grid, random crops, and their position (overlap) labels.

Pure tensor code. Boxes are per-axis half-open voxel intervals [start, stop), as tensors of shape
(..., ndim, 2). A random crop's label vector says which fraction of its volume lies in each base crop;
VoCo trains the network to predict it from embeddings alone (method spec §1.1).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from voco_lib.config import ViewConfig, view_preset


def grid_boxes(region: tuple[int, ...], grid: tuple[int, ...]) -> torch.Tensor:
    """Base crops tiling `region` with a `grid` of equal cells, flattened i-major (k = i·ny·nz + j·nz + l).

    With grid (3, 3, 1) this is the authors' k = 3·i + j (spec §1.1). Returns (K, ndim, 2) int64.
    """
    if len(region) != len(grid):
        raise ValueError(f"region {region} and grid {grid} have different dimensions")
    sizes = [r // g for r, g in zip(region, grid)]
    starts = torch.cartesian_prod(*[torch.arange(g) * s for g, s in zip(grid, sizes)]).reshape(-1, len(grid))
    size = torch.tensor(sizes)
    return torch.stack([starts, starts + size], dim=-1)


def random_boxes(
    region: tuple[int, ...], size: tuple[int, ...], n: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """`n` crops of `size`, start drawn uniformly so that the crop stays inside `region`. (n, ndim, 2).

    For TPAMI (64³ in 192×192×64) the starts are uniform in {0..128}² × {0}: the authors' centres
    uniform in [32, 160) with full depth.
    """
    span = torch.tensor([r - s + 1 for r, s in zip(region, size)])
    if (span < 1).any():
        raise ValueError(f"crop {size} does not fit in region {region}")
    starts = (torch.rand(n, len(region), generator=generator) * span).long().clamp_max(span - 1)
    return torch.stack([starts, starts + torch.tensor(size)], dim=-1)


def overlap_labels(crop_boxes: torch.Tensor, base_boxes: torch.Tensor) -> torch.Tensor:
    """Fraction of each crop's volume inside each base crop: (..., S, ndim, 2) × (..., K, ndim, 2) → (..., S, K).

    With a depth-1 grid and full-depth crops this equals the authors' x–y area fraction; rows sum to 1
    whenever the base crops tile a region that contains the crop.
    """
    c = crop_boxes.unsqueeze(-3).to(torch.float64)  # (..., S, 1, ndim, 2)
    b = base_boxes.unsqueeze(-4).to(torch.float64)  # (..., 1, K, ndim, 2)
    inter = (torch.minimum(c[..., 1], b[..., 1]) - torch.maximum(c[..., 0], b[..., 0])).clamp_min(0)
    volume = (c[..., 1] - c[..., 0]).prod(-1)
    return (inter.prod(-1) / volume).to(torch.float32)


def extract(region: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """Gather equal-size crops from a (C, X, Y, Z) region in one indexing call → (N, C, sx, sy, sz)."""
    size = (boxes[0, :, 1] - boxes[0, :, 0]).tolist()
    if not bool(((boxes[..., 1] - boxes[..., 0]) == torch.tensor(size)).all()):
        raise ValueError("extract() needs crops of equal size")
    idx = [boxes[:, d, :1] + torch.arange(s) for d, s in enumerate(size)]  # each (N, s_d)
    crops = region[:, idx[0][:, :, None, None], idx[1][:, None, :, None], idx[2][:, None, None, :]]
    return crops.transpose(0, 1)


def augment(crops: torch.Tensor, cfg: ViewConfig, generator: torch.Generator | None = None) -> torch.Tensor:
    """Independent per-crop flips (each axis), axial rot90 (k ∈ {1,2,3}) and intensity shift, batched.

    Same distributions as the authors' RandFlip/RandRotate90/RandShiftIntensity chain (spec §1.2), drawn for
    all crops at once; labels are unaffected (they refer to the un-augmented geometry).
    """
    n = crops.shape[0]
    out = crops
    for axis in range(3):
        flip = torch.rand(n, generator=generator) < cfg.flip_p
        if flip.any():
            out = torch.where(flip.view(-1, 1, 1, 1, 1), out.flip(2 + axis), out)
    rotate = torch.rand(n, generator=generator) < cfg.rot90_p
    k = torch.randint(1, 4, (n,), generator=generator)
    if rotate.any():
        if out.shape[2] != out.shape[3]:
            raise ValueError(f"rot90 in the axial plane needs square crops, got {tuple(out.shape[2:])}")
        for kk in (1, 2, 3):
            sel = (rotate & (k == kk)).view(-1, 1, 1, 1, 1)
            if sel.any():
                out = torch.where(sel, out.rot90(kk, dims=(2, 3)), out)
    shift = torch.rand(n, generator=generator) < cfg.shift_p
    offset = (torch.rand(n, generator=generator) * 2 - 1) * cfg.shift_offset
    return out + (shift * offset).to(out.dtype).view(-1, 1, 1, 1, 1)


@dataclass
class Views:
    """One volume's views: S random crops, K base crops, labels (S, K), and the boxes they came from."""

    random: torch.Tensor  # (S, C, *out)
    bases: torch.Tensor  # (K, C, *out)
    labels: torch.Tensor  # (S, K) float32
    random_boxes: torch.Tensor  # (S, 3, 2) voxel boxes in the region
    base_boxes: torch.Tensor  # (K, 3, 2)


def make_views(
    region: torch.Tensor, preset_or_config: str | ViewConfig = "tpami", generator: torch.Generator | None = None
) -> Views:
    """Random crops, base crops and labels of one (C, X, Y, Z) region, augmented per crop if configured."""
    cfg = view_preset(preset_or_config)
    if region.dim() != 4 or tuple(region.shape[1:]) != tuple(cfg.region):
        raise ValueError(f"region must be (C, {', '.join(map(str, cfg.region))}), got {tuple(region.shape)}")
    bases_b = grid_boxes(cfg.region, cfg.grid)
    random_b = random_boxes(cfg.region, cfg.crop_size, cfg.n_random, generator)
    rand = extract(region, random_b)
    bases = extract(region, bases_b)
    if cfg.out_size is not None:
        rand = _resize(rand, cfg.out_size)
        bases = _resize(bases, cfg.out_size)
    if cfg.augment:
        both = augment(torch.cat([rand, bases]), cfg, generator)
        rand, bases = both[: len(rand)], both[len(rand):]
    return Views(rand, bases, overlap_labels(random_b, bases_b), random_b, bases_b)


def _resize(crops: torch.Tensor, size: tuple[int, int, int]) -> torch.Tensor:
    if tuple(crops.shape[2:]) == tuple(size):
        return crops
    return F.interpolate(crops.float(), size=size, mode="trilinear", align_corners=False).to(crops.dtype)


def collate_views(views: list[Views]) -> Views:
    """Stack per-volume views into a batch: random (B, S, C, ...), bases (B, K, C, ...), labels (B, S, K)."""
    return Views(*(torch.stack([getattr(v, f) for v in views]) for f in Views.__dataclass_fields__))
