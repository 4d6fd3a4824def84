"""make_views vs the authors' style of one MONAI Compose per crop (TPAMI preset, 192×192×64, aug on).

Prints the per-sample time of both and the ratio (target ≥ 20×). Run: `.venv/bin/python benchmarks/views.py`.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import Compose, RandFlipd, RandRotate90d, RandShiftIntensityd, SpatialCropd

from voco_lib.config import PRESETS
from voco_lib.crops import grid_boxes, make_views, overlap_labels, random_boxes


def monai_reference(region: MetaTensor, rng: np.random.RandomState, generator: torch.Generator):
    """One dictionary Compose per crop (crop, 3 flips, rot90, shift) on the loaded MetaTensor, as upstream
    builds its 9 + S crops (Luffy03/Large-Scale-Medical Self-supervised/utils/voco_trans.py:L55-64, L89-100, commit
    1ad538b)."""
    cfg = PRESETS["tpami"]
    bases, rand = grid_boxes(cfg.region, cfg.grid), random_boxes(cfg.region, cfg.crop_size, cfg.n_random, generator)
    crops = []
    for b in torch.cat([rand, bases]):
        chain = Compose([
            SpatialCropd("image", roi_start=b[:, 0].tolist(), roi_end=b[:, 1].tolist()),
            RandFlipd("image", prob=0.2, spatial_axis=0), RandFlipd("image", prob=0.2, spatial_axis=1),
            RandFlipd("image", prob=0.2, spatial_axis=2), RandRotate90d("image", prob=0.2, max_k=3),
            RandShiftIntensityd("image", offsets=0.1, prob=0.5),
        ])
        chain.set_random_state(state=rng)
        crops.append(chain({"image": region})["image"])
    return torch.stack([torch.as_tensor(c) for c in crops]), overlap_labels(rand, bases)


def timeit(fn, repeats: int) -> float:
    """Median seconds per call over `repeats` single calls (robust to other processes on a shared CPU)."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeats", type=int, default=100)
    args = ap.parse_args()
    torch.set_num_threads(1)
    region = torch.rand(1, 192, 192, 64)
    g, rng = torch.Generator().manual_seed(0), np.random.RandomState(0)
    ours = timeit(lambda: make_views(region, "tpami", g), args.repeats)
    ref = timeit(lambda: monai_reference(MetaTensor(region, affine=torch.eye(4)), rng, g), args.repeats)
    boxes = torch.cat([grid_boxes((192, 192, 64), (3, 3, 1))] + [grid_boxes((192, 192, 64), (3, 3, 1))[:2]])
    floor = timeit(lambda: torch.stack([region[:, x:x + 64, y:y + 64, :] for x, y, _ in boxes[:, :, 0].tolist()]),
                   args.repeats)
    print(f"make_views (batched)        : {ours * 1e3:8.2f} ms/sample")
    print(f"copy floor (11 crops, no aug): {floor * 1e3:7.2f} ms/sample  (one read + write of the crops)")
    print(f"MONAI Compose per crop (ref): {ref * 1e3:8.2f} ms/sample")
    print(f"speed-up                    : {ref / ours:8.1f}x  (target >= 20x; at most {ref / floor:.1f}x "
          f"for any method that writes the crops once)")


if __name__ == "__main__":
    main()
