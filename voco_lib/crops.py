"""VoCo's views: the base-crop grid, random crops, and their position (overlap) labels.

Pure tensor code. Boxes are per-axis half-open voxel intervals [start, stop), as tensors of shape
(..., ndim, 2). A random crop's label vector says which fraction of its volume lies in each base crop;
VoCo trains the network to predict it from embeddings alone (Luffy03/Large-Scale-Medical
Self-supervised/utils/voco_trans.py:L80-145, commit 1ad538b).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from voco_lib.config import ViewConfig, view_preset


def grid_boxes(region: tuple[int, ...], grid: tuple[int, ...]) -> torch.Tensor:
    """Base crops tiling `region` with a `grid` of equal cells, flattened i-major (k = i·ny·nz + j·nz + l).

    With grid (3, 3, 1) this is the authors' k = 3·i + j (voco_trans.py:L80-145). Returns (K, ndim, 2) int64.
    """
    return _grid_boxes(tuple(region), tuple(grid)).clone()


@functools.lru_cache(maxsize=32)
def _grid_boxes(region: tuple[int, ...], grid: tuple[int, ...]) -> torch.Tensor:
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
    """Gather equal-size crops from a (C, X, Y, Z) region in one indexing call → (N, C, sx, sy, sz).

    `unfold` gives a zero-copy view of every window of the crop size; indexing it by the crop starts copies
    exactly the crops' voxels once.
    """
    size = boxes[0, :, 1] - boxes[0, :, 0]
    if not bool(((boxes[..., 1] - boxes[..., 0]) == size).all()):
        raise ValueError("extract() needs crops of equal size")
    sx, sy, sz = size.tolist()
    windows = region.unfold(1, sx, 1).unfold(2, sy, 1).unfold(3, sz, 1)  # (C, X', Y', Z', sx, sy, sz)
    return windows[:, boxes[:, 0, 0], boxes[:, 1, 0], boxes[:, 2, 0]].transpose(0, 1).contiguous()


@dataclass
class Augmentation:
    """Per-crop draws of the authors' chain (Luffy03/Large-Scale-Medical
    Self-supervised/utils/voco_trans.py:L55-64, L89-100, commit 1ad538b): RandFlip p=0.2 on each axis, then
    RandRotate90
    p=0.2 with k ∈ {1,2,3} in the axial plane, then RandShiftIntensity ±0.1 with p=0.5."""

    flips: torch.Tensor  # (N, 3) bool
    k: torch.Tensor  # (N,) quarter turns, 0 = none
    offset: torch.Tensor  # (N,) intensity shift, 0 = none


def draw_augmentation(n: int, cfg: ViewConfig, generator: torch.Generator | None = None) -> Augmentation:
    """All random draws for `n` crops at once (a fixed number of draws, so the stream stays reproducible)."""
    flips = torch.rand(n, 3, generator=generator) < cfg.flip_p
    rotate = torch.rand(n, generator=generator) < cfg.rot90_p
    k = torch.randint(1, 4, (n,), generator=generator) * rotate
    shift = torch.rand(n, generator=generator) < cfg.shift_p
    offset = (torch.rand(n, generator=generator) * 2 - 1) * cfg.shift_offset * shift
    if not cfg.augment:
        return Augmentation(torch.zeros_like(flips), torch.zeros_like(k), torch.zeros_like(offset))
    return Augmentation(flips, k, offset)


# rot90 by k quarter turns in the (x, y) plane = flipping these axes, then swapping x and y for odd k.
_ROT_FLIPS = {0: set(), 1: {1}, 2: {0, 1}, 3: {0}}


def augment_into(out: torch.Tensor, crop: torch.Tensor, flips: list[bool], k: int, offset: float) -> None:
    """Write flip → rot90 → shift of one (C, X, Y, Z) CPU crop into `out` in a single pass.

    Flips and the rotation fold into one strided view (NumPy allows negative strides, torch does not),
    so every crop costs one read and one write whatever its augmentation.
    """
    axes = {a for a, f in enumerate(flips) if f} ^ _ROT_FLIPS[k]
    if not axes and not k:
        torch.add(crop, offset, out=out) if offset else out.copy_(crop)
        return
    view = crop.numpy()[(slice(None),) + tuple(slice(None, None, -1 if a in axes else 1) for a in range(3))]
    if k % 2:
        view = view.transpose(0, 2, 1, 3)
    np.add(view, np.asarray(offset, dtype=view.dtype), out=out.numpy())


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
    if region.device.type != "cpu":
        raise ValueError("make_views runs in the data loader: pass a CPU region (views go to the GPU batched)")
    if region.dim() != 4 or tuple(region.shape[1:]) != tuple(cfg.region):
        raise ValueError(f"region must be (C, {', '.join(map(str, cfg.region))}), got {tuple(region.shape)}")
    bases_b = grid_boxes(cfg.region, cfg.grid)
    random_b = random_boxes(cfg.region, cfg.crop_size, cfg.n_random, generator)
    boxes = torch.cat([random_b, bases_b])
    aug = draw_augmentation(len(boxes), cfg, generator)
    if cfg.out_size is not None:
        sources = _resize(extract(region, boxes), cfg.out_size)
    else:  # zero-copy views of the region: each crop is read once, augmented on the way out
        size = cfg.crop_size
        windows = region.unfold(1, size[0], 1).unfold(2, size[1], 1).unfold(3, size[2], 1)
        sources = [windows[:, x, y, z] for x, y, z in boxes[:, :, 0].tolist()]
    crops = region.new_empty((len(boxes), region.shape[0], *(cfg.out_size or cfg.crop_size)))
    for i, (flips, k, offset) in enumerate(zip(aug.flips.tolist(), aug.k.tolist(), aug.offset.tolist())):
        augment_into(crops[i], sources[i], flips, k, offset)
    rand, bases = crops[: len(random_b)], crops[len(random_b):]
    return Views(rand, bases, overlap_labels(random_b, bases_b), random_b, bases_b)


def _resize(crops: torch.Tensor, size: tuple[int, int, int]) -> torch.Tensor:
    if tuple(crops.shape[2:]) == tuple(size):
        return crops
    return F.interpolate(crops.float(), size=size, mode="trilinear", align_corners=False).to(crops.dtype)


def collate_views(views: list[Views]) -> Views:
    """Stack per-volume views into a batch: random (B, S, C, ...), bases (B, K, C, ...), labels (B, S, K)."""
    return Views(*(torch.stack([getattr(v, f) for v in views]) for f in Views.__dataclass_fields__))
