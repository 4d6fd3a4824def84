"""`voco estimate` against what really happens, as ratios predicted / measured (1.00 is perfect):

- cache bytes: phantoms written as NIfTI, cached by the real cache (`CachedVolumes.warm`), against the estimate
  from their headers (an upper bound) and from the chain (exact);
- step time: the estimate's measured step against the median step of a real `voco pretrain` run
  (metrics.jsonl `perf.step_s`, first step excluded) of the same profile, in this process, one after the other;
- memory: the modelled step memory + loader RAM against the run's peak process RSS (CPU), which also holds the
  Python/torch baseline, so the ratio is expected below 1.

Step times depend on what else runs on the machine: say so when quoting them.

    .venv/bin/python benchmarks/estimate.py [--profile cpu] [--steps 4] [--phantoms 4] [key=value ...]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import torch

from voco_lib.config import resolve
from voco_lib.data.loader import CachedVolumes, datalist_images
from voco_lib.data.phantom import write_phantoms
from voco_lib.estimate import datalist_cost, estimate
from voco_lib.loop import tune_allocator
from voco_lib.pretrain import run_pretraining


def cache_ratios(cfg, n: int, tmp: Path) -> None:
    d = cfg.data
    datalist = write_phantoms(tmp / "phantoms", n, seed=0, shape=d.phantom_shape, spacing=d.phantom_spacing)
    cache = tmp / "cache"
    CachedVolumes([str(p) for p in datalist_images(datalist, "training")], d.chain, cache).warm(show=False)
    written = sum(f.stat().st_size for f in cache.iterdir() if f.suffix in (".npy", ".json"))
    for exact in (False, True):
        cost = datalist_cost(str(datalist), cfg, sample=64, seed=0, exact=exact)
        print(f"cache, {n} phantoms {'x'.join(map(str, d.phantom_shape))} @ {d.phantom_spacing} mm, shapes from "
              f"{cost.shapes_from}: predicted {cost.cache_bytes} B, written {written} B, "
              f"ratio {cost.cache_bytes / written:.4f}")


def run_step_seconds(profile: str, overrides: list[str], steps: int, out: Path) -> tuple[float, float]:
    """(median step seconds after the first, peak RSS GB) of a real pre-training run on phantoms."""
    run_pretraining(profile, "phantom", out, [*overrides, f"steps={steps}", "train.log_every=1",
                                              f"train.eval_every={steps}", f"train.checkpoint_every={steps}"],
                    show_progress=False)
    lines = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    perf = [ln["perf"] for ln in lines if ln.get("kind") == "train" and ln["step"] > 1]
    return statistics.median(p["step_s"] for p in perf), max(p.get("cpu_maxrss_gb", 0.0) for p in perf)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--profile", default="cpu")
    p.add_argument("--steps", type=int, default=4, help="steps of the real run (the first is not counted)")
    p.add_argument("--phantoms", type=int, default=4, help="phantoms written and cached for the cache check")
    p.add_argument("overrides", nargs="*")
    a = p.parse_args()
    if not torch.cuda.is_available():
        tune_allocator()  # as `voco pretrain` does on CPU
    cfg = resolve(a.profile, a.overrides)
    print(f"profile {cfg.name}, {torch.get_num_threads()} torch threads, "
          f"{torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu'}")
    with tempfile.TemporaryDirectory() as tmp:
        cache_ratios(cfg, a.phantoms, Path(tmp))
        e = estimate("phantom", a.profile, a.overrides)
        measured, rss_gb = run_step_seconds(a.profile, a.overrides, a.steps, Path(tmp) / "run")
    print(f"step time: estimated {e.step_seconds:.3f} s, real run {measured:.3f} s (median of {a.steps - 1}), "
          f"ratio {e.step_seconds / measured:.2f}")
    predicted_gb = (e.step_memory_bytes + e.loader_ram_bytes) / 2**30
    print(f"memory: step ({e.step_memory_how}) + loader {predicted_gb:.2f} GB, real peak RSS {rss_gb:.2f} GB, "
          f"ratio {predicted_gb / rss_gb:.2f}; FLOPs per step {e.flops_per_step / 1e9:.1f} G")


if __name__ == "__main__":
    main()
