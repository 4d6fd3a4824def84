"""Phantom generation speed on one CPU core: 160x160x128 at 1.5 mm against the 1 s budget (issue 4).

Reference in the same process: allocating and filling one float32 volume of that size with Gaussian noise
(the unavoidable floor), so the ratio says how many "noise volumes" one phantom costs on this machine.
Run: .venv/bin/python benchmarks/phantom.py
"""

from __future__ import annotations

import time

import numpy as np
import torch

from voco_lib.data.phantom import make_phantom

SHAPE = (160, 160, 128)
BUDGET_S = 1.0


def best_of(fn, n: int) -> float:
    times = []
    for i in range(n):
        t0 = time.perf_counter()
        fn(i)
        times.append(time.perf_counter() - t0)
    return min(times), float(np.median(times))


def main() -> None:
    torch.set_num_threads(1)  # one core, as the budget says
    make_phantom(0, SHAPE)  # warm-up (imports, class table)
    best, med = best_of(lambda i: make_phantom(100 + i, SHAPE), 5)
    rng = np.random.default_rng(0)
    ref, _ = best_of(lambda i: rng.standard_normal(SHAPE, dtype=np.float32), 5)
    print(f"phantom {SHAPE} @1.5 mm, 1 thread: best {best:.3f} s, median {med:.3f} s "
          f"(budget {BUDGET_S:.1f} s: {med / BUDGET_S:.2f}x of budget)")
    print(f"reference: one float32 Gaussian-noise volume {ref * 1e3:.1f} ms; phantom = {best / ref:.1f}x that")


if __name__ == "__main__":
    main()
