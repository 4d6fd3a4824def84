"""Phantom generation speed on one CPU core, and how much the phantom patients vary where pre-training looks.

Speed: 160x160x128 at 1.5 mm against the 1 s budget (issue 4). Reference in the same process: allocating
and filling one float32 volume of that size with Gaussian noise (the unavoidable floor), so the ratio says
how many "noise volumes" one phantom costs on this machine.

Variation (`--variation N`): N phantoms through the cpu profile's pre-training path (80x80x64 at 3 mm, the
abdomen chain's foreground crop and pad, whole volume resized to the 64x64x32 region). Per organ: how
often it is in the field of view, the sd of its centroid in voxels of that region grid, and how often the
centroid falls in each of the 4 base crops of the 2x2x1 grid (index 2*[x >= 32] + [y >= 32]).
Run: .venv/bin/python benchmarks/phantom.py [--variation 24]
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import numpy as np
import torch
import torch.nn.functional as F

from voco_lib.data.phantom import class_ids, make_phantom, make_phantom_subject
from voco_lib.data.preprocess import get_chain, preprocess_array

SHAPE = (160, 160, 128)
BUDGET_S = 1.0
CPU_SHAPE, CPU_SPACING, REGION = (80, 80, 64), 3.0, (64, 64, 32)  # voco_lib/config.py PROFILES["cpu"]


def best_of(fn, n: int) -> tuple[float, float]:
    times = []
    for i in range(n):
        t0 = time.perf_counter()
        fn(i)
        times.append(time.perf_counter() - t0)
    return min(times), float(np.median(times))


def speed() -> None:
    torch.set_num_threads(1)  # one core, as the budget says
    make_phantom(0, SHAPE)  # warm-up (imports, class table)
    best, med = best_of(lambda i: make_phantom(100 + i, SHAPE), 5)
    rng = np.random.default_rng(0)
    ref, _ = best_of(lambda i: rng.standard_normal(SHAPE, dtype=np.float32), 5)
    print(f"phantom {SHAPE} @1.5 mm, 1 thread: best {best:.3f} s, median {med:.3f} s "
          f"(budget {BUDGET_S:.1f} s: {med / BUDGET_S:.2f}x of budget)")
    print(f"reference: one float32 Gaussian-noise volume {ref * 1e3:.1f} ms; phantom = {best / ref:.1f}x that")


def region_label(seed: int) -> torch.Tensor:
    """Label map of phantom `seed` on the cpu profile's region grid, as pre-training sees the image."""
    s = make_phantom_subject(seed, CPU_SHAPE, CPU_SPACING)
    chain = dataclasses.replace(get_chain("abdomen"), spacing=(CPU_SPACING,) * 3)
    d = preprocess_array(s.image, s.affine, chain, label=s.label, name=f"phantom {seed}")
    lab = d["label"].as_tensor().float()[None]
    return F.interpolate(lab, size=REGION, mode="nearest")[0, 0].round().long()


def variation(n: int) -> None:
    ids = {k: v for k, v in class_ids().items() if k not in ("background", "lesion")}
    cents: dict[str, list[np.ndarray]] = {k: [] for k in ids}
    for seed in range(n):
        lab = region_label(seed)
        for name, i in ids.items():
            idx = torch.nonzero(lab == i).double()
            if len(idx):
                cents[name].append(idx.mean(0).numpy())
    print(f"{n} phantoms (seeds 0..{n - 1}), {CPU_SHAPE} @ {CPU_SPACING} mm -> region {REGION}")
    print(f"{'organ':28s} {'in FOV':>6s}  {'sd x':>5s} {'sd y':>5s} {'sd z':>5s}  base crop 0/1/2/3")
    sds = []
    for name, cs in cents.items():
        if not cs:
            print(f"{name:28s} {0:6.2f}")
            continue
        c = np.stack(cs)
        sd = c.std(0, ddof=1) if len(c) > 1 else np.zeros(3)
        sds.append(sd)
        q = np.bincount(2 * (c[:, 0] >= REGION[0] / 2) + (c[:, 1] >= REGION[1] / 2), minlength=4) / len(c)
        print(f"{name:28s} {len(c) / n:6.2f}  {sd[0]:5.2f} {sd[1]:5.2f} {sd[2]:5.2f}  "
              + "/".join(f"{v:.2f}" for v in q))
    s = np.stack(sds)
    print(f"median sd over organs: x {np.median(s[:, 0]):.2f}, y {np.median(s[:, 1]):.2f}, z {np.median(s[:, 2]):.2f} voxels")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variation", type=int, default=0, metavar="N", help="measure variation over N phantoms instead")
    args = p.parse_args()
    variation(args.variation) if args.variation else speed()


if __name__ == "__main__":
    main()
