"""Where a pre-training step spends its time: data / forward+loss / backward / optimizer, samples/s, peak memory,
for any method of `voco_lib.methods`, and each method as ratios to `voco`.

CPU: the `cpu` profile (target for voco: data < 10 % of the step). With CUDA: the `gpu` profile (Swin-B, 64³,
bf16), and for voco also the same step built on MONAI's SwinUNETR encoder, in the same process. Each method
runs in its own process so that its peak memory (process RSS on CPU) is its own.

    .venv/bin/python benchmarks/pretrain_step.py [--method NAME|all] [--steps 5] [--profile cpu] [key=value ...]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import statistics
import subprocess
import sys
import time

import torch
from torch import nn

from voco_lib.config import METHODS, resolve
from voco_lib.data.loader import InfiniteOrder, ViewsDataset, build_volumes, make_loader, region_mode_of, views_to
from voco_lib.loop import adamw, tune_allocator
from voco_lib.methods import budget, get_method


class MonaiEncoder(nn.Module):
    """Reference: MONAI SwinUNETR(use_v2=True) encoder parts, pooled and concatenated as upstream
    (Luffy03/Large-Scale-Medical Self-supervised/models/voco_head.py:L180-205, commit 1ad538b)."""

    def __init__(self, feature_size: int, grad_checkpoint: bool):
        super().__init__()
        from monai.networks.nets import SwinUNETR

        m = SwinUNETR(in_channels=1, out_channels=2, feature_size=feature_size, use_v2=True,
                      use_checkpoint=grad_checkpoint)
        self.swinViT, self.encoder1, self.encoder2 = m.swinViT, m.encoder1, m.encoder2
        self.encoder3, self.encoder4, self.encoder10 = m.encoder3, m.encoder4, m.encoder10
        self.embed_dim = 24 * feature_size

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        hs = self.swinViT(x)
        maps = [self.encoder1(x), self.encoder2(hs[0]), self.encoder3(hs[1]), self.encoder4(hs[2]),
                self.encoder10(hs[4])]
        return torch.cat([f.mean((2, 3, 4)) for f in maps], 1)


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def bench(cfg, steps: int, dev: torch.device, backbone: nn.Module | None = None, label: str = "ours") -> dict:
    """Median phase times of `steps` steps of `cfg.method` (after one warm-up step) and the peak memory."""
    torch.manual_seed(0)
    method = get_method(cfg.method)
    model = method.build_model(cfg)
    if backbone is not None:
        model.backbone = backbone
    model = model.to(dev).train()
    t = cfg.train
    opt, sched = adamw(model, t.lr, t.weight_decay, t.warmup_steps, cfg.steps, amsgrad=t.amsgrad)
    amp = cfg.train.amp if dev.type == "cuda" else "off"
    vols, _ = build_volumes("phantom", dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, n_eval=0)))
    ds = ViewsDataset(vols, cfg.views, region_mode_of(cfg), cfg.train.seed)
    batches = iter(make_loader(ds, InfiniteOrder(len(vols), cfg.batch_size, 0), cfg.data.workers))
    times: dict[str, list[float]] = {"data": [], "forward": [], "backward": [], "optimizer": []}
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    for i in range(steps + 1):  # the first step warms up and is not counted
        t0 = time.perf_counter()
        v = views_to(next(batches), dev)
        _sync(dev)
        t1 = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp == "bf16"):
            loss, _ = method.step(model, model, v, True)
        _sync(dev)
        t2 = time.perf_counter()
        loss.backward()
        _sync(dev)
        t3 = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        _sync(dev)
        t4 = time.perf_counter()
        if i:
            for k, d in zip(times, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
                times[k].append(d)
    med = {k: statistics.median(v) for k, v in times.items()}
    step = sum(med.values())
    mem = (torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda"
           else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)
    crops = cfg.batch_size * (cfg.views.n_random + cfg.views.n_bases)
    phases = ", ".join(f"{k} {v:.3f} s ({100 * v / step:.1f} %)" for k, v in med.items())
    print(f"[{label}] step {step:.3f} s = {phases}")
    print(f"[{label}] {cfg.batch_size / step:.2f} volumes/s ({crops / step:.1f} crops/s), peak "
          f"{'GPU' if dev.type == 'cuda' else 'process RSS'} memory {mem:.2f} GB; {budget(cfg, cfg.batch_size)}")
    return {"step": step, **med, "mem": mem}


def _child(method: str, a: argparse.Namespace) -> dict:
    """One method's numbers from a fresh process (its own peak memory)."""
    cmd = [sys.executable, __file__, "--child", "--method", method, "--steps", str(a.steps),
           *(["--profile", a.profile] if a.profile else []), *a.overrides]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    print("\n".join(ln for ln in out.splitlines() if not ln.startswith("{")))
    return json.loads(next(ln for ln in reversed(out.splitlines()) if ln.startswith("{")))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--method", default="voco", help=f"one of {sorted(METHODS)} or 'all'")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--profile", default=None, help="default: cpu without CUDA, gpu with it")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*")
    a = p.parse_args()
    cuda = torch.cuda.is_available()
    dev = torch.device("cuda" if cuda else "cpu")
    if a.child:
        if not cuda:
            tune_allocator()
        cfg = resolve(a.profile or ("gpu" if cuda else "cpu"), [f"method={a.method}", *a.overrides])
        ours = bench(cfg, a.steps, dev, label=cfg.method)
        if cfg.method == "voco":
            print(f"data share of the step: {100 * ours['data'] / ours['step']:.1f} % (target < 10 %)")
            if cuda:
                ref = bench(cfg, a.steps, dev, MonaiEncoder(cfg.feature_size, cfg.train.grad_checkpoint),
                            "MONAI SwinUNETR")
                print(f"ours / MONAI: step time x{ours['step'] / ref['step']:.2f}, "
                      f"peak memory x{ours['mem'] / ref['mem']:.2f}")
        print(json.dumps(ours))
        return
    cfg = resolve(a.profile or ("gpu" if cuda else "cpu"), a.overrides)
    print(f"profile {cfg.name}: {cfg.batch_size} volumes x ({cfg.views.n_random} random + {cfg.views.n_bases} bases) "
          f"crops of {cfg.views.out_size or cfg.views.crop_size}, feature {cfg.feature_size}, device "
          f"{torch.cuda.get_device_name() if cuda else f'cpu ({torch.get_num_threads()} threads)'}")
    names = sorted(METHODS) if a.method == "all" else [resolve(cfg.name, [f"method={a.method}"]).method]
    results = {n: _child(n, a) for n in dict.fromkeys(["voco", *names])}
    ref = results["voco"]
    for n, r in results.items():
        print(f"{n:>12}: step x{r['step'] / ref['step']:.2f} ({r['step']:.3f} s), "
              f"peak memory x{r['mem'] / ref['mem']:.2f} ({r['mem']:.2f} GB) relative to voco")


if __name__ == "__main__":
    main()
