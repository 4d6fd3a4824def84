"""Ours vs MONAI SwinUNETR(use_v2=True) encoder: forward+backward time per iteration and peak memory.

Both sides get the same weights (one MONAI state dict, loaded strictly into each), the same input and
the same loss (sum of the squared pooled embedding), each in its own fresh subprocess so that peak memory
is measured fairly (peak RSS on CPU, `torch.cuda.max_memory_allocated` on CUDA), under the same allocator
settings (`--allocator tuned` keeps freed memory in glibc, see shared/reference/swin-speed-notes.md).
The sides alternate for `--rounds` rounds and each figure is the median over rounds, so that a slow spell of
a shared machine hits both sides.

    python benchmarks/backbone.py                       # CPU, the two issue configurations
    python benchmarks/backbone.py --device cuda --bf16  # GPU, bf16 autocast
    python benchmarks/backbone.py --configs 12:64:1 --iters 3 --rounds 3
    python benchmarks/backbone.py --small-crop-study 120   # which 32³ variant learns position faster
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TUNED_MALLOC = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(1 << 40)}


def monai_model(feature_size: int):
    from monai.networks.nets import SwinUNETR

    return SwinUNETR(in_channels=1, out_channels=2, feature_size=feature_size, use_v2=True)


def monai_maps(model, x):
    """The five maps VoCo pools, from MONAI's SwinUNETR (as the authors' SSL head computes them)."""
    h = model.swinViT(x, model.normalize)
    return [model.encoder1(x), model.encoder2(h[0]), model.encoder3(h[1]), model.encoder4(h[2]), model.encoder10(h[4])]


def worker(side: str, feature_size: int, size: int, batch: int, iters: int, device: str, bf16: bool,
           weights: str, conv_time: bool) -> dict:
    """One side in this process: load weights, warm up once, time `iters` forward+backward steps."""
    import torch

    from voco_lib.backbone import build_encoder, pooled_embedding

    torch.manual_seed(0)
    state = torch.load(weights, weights_only=True)
    if side == "monai":
        model = monai_model(feature_size)
        model.load_state_dict(state, strict=False)  # the decoder keeps its init; it is not run

        def run(x):
            return pooled_embedding(monai_maps(model, x))
    else:
        model = build_encoder(feature_size)
        model.load_state_dict(state, strict=True)
        run = model.embed
    model.to(device).train()
    x = torch.randn(batch, 1, size, size, size, generator=torch.Generator().manual_seed(1)).to(device)

    def step() -> float:
        with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=bf16):
            emb = run(x)
        loss = emb.float().square().sum()
        loss.backward()
        model.zero_grad(set_to_none=True)
        return float(loss)

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    loss = step()  # warm-up (window plans, allocator, kernels)
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    s_per_iter = median_time(step, iters, sync)
    peak = (torch.cuda.max_memory_allocated() / 2**20 if device == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return {"s_per_iter": s_per_iter, "peak_mb": peak, "rss_after_warmup_mb": base_rss, "loss": loss,
            "conv_s": conv_blocks_time(model, run, x, iters, sync, bf16, device) if conv_time else None,
            "threads": torch.get_num_threads(),
            "device_name": torch.cuda.get_device_name() if device == "cuda" else "cpu"}


def conv_blocks_time(model, run, x, iters: int, sync, bf16: bool, device: str) -> float:
    """Forward+backward time of MONAI's nine residual conv blocks alone (encoder1/2/3/4/10, layers1c..4c) on
    the inputs they see in the model: MONAI's step time / this is the most a rewrite of the Swin part alone
    could gain (ours also rewrites the conv blocks' norm and activation, see voco_lib.backbone.ConvBlock)."""
    import torch
    from monai.networks.blocks import UnetrBasicBlock

    blocks = [m for m in model.modules() if isinstance(m, UnetrBasicBlock)]
    inputs = {}

    def keep_input(module, args, output) -> None:
        inputs.setdefault(module, (args[0].detach(), args[0].requires_grad))

    hooks = [b.register_forward_hook(keep_input) for b in blocks]
    run(x)  # with autograd on, so each block's input says whether the model needs its gradient
    for h in hooks:
        h.remove()

    def step():
        for b, (inp, needs_grad) in inputs.items():
            with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=bf16):
                out = b(inp.requires_grad_(needs_grad))
            out.float().square().mean().backward()
        model.zero_grad(set_to_none=True)

    step()
    return median_time(step, iters, sync)


def median_time(step, iters: int, sync) -> float:
    times = []
    for _ in range(iters):
        sync()
        t = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def small_crop_study(seconds: float, feature_size: int = 12) -> None:
    """Which 32³ variant learns a position task faster per CPU second: "bypass" (32³ all the way) or
    "upsample" (crops resized to 64³, exact model).

    Proxy task (self-contained, no data download): one smooth random volume (64×64×32 region, 2×2×1 grid of
    32³ base crops); a random 32³ crop's label is the fraction of it inside each base crop (VoCo's position
    label, Luffy03/Large-Scale-Medical Self-supervised/utils/voco_trans.py:L80-145); encoder.embed -> Linear ->
    softmax, soft cross-entropy. Same seed, batch 4, AdamW 1e-4,
    for `seconds` of process CPU time each; the held-out loss of 32 fixed crops is printed as it falls.
    """
    import torch
    import torch.nn.functional as F

    from voco_lib.backbone import build_encoder
    from voco_lib.crops import grid_boxes, overlap_labels, random_boxes

    g = torch.Generator().manual_seed(0)
    region = F.interpolate(torch.randn(1, 1, 8, 8, 4, generator=g), size=(64, 64, 32), mode="trilinear")[0]
    region = region + 0.1 * torch.randn(region.shape, generator=g)
    bases = grid_boxes((64, 64, 32), (2, 2, 1))

    def batch(n: int, gen: torch.Generator):
        boxes = random_boxes((64, 64, 32), (32, 32, 32), n, gen)
        crops = torch.stack([region[:, x0:x1, y0:y1, z0:z1] for (x0, x1), (y0, y1), (z0, z1) in boxes.tolist()])
        return crops, overlap_labels(boxes, bases).float()

    held_x, held_y = batch(32, torch.Generator().manual_seed(99))
    floor = float(-(held_y * held_y.clamp_min(1e-9).log()).sum(1).mean())
    print(f"small-crop study: feature {feature_size}, {seconds:.0f} CPU-s per variant; held-out loss floor "
          f"(label entropy) {floor:.3f}")
    for variant in ("bypass", "upsample"):
        torch.manual_seed(0)
        enc = build_encoder(feature_size, small_crop=variant)
        head = torch.nn.Linear(enc.embed_dim, len(bases))
        opt = torch.optim.AdamW([*enc.parameters(), *head.parameters()], lr=1e-4)
        gen = torch.Generator().manual_seed(1)

        def held_out() -> float:
            enc.eval()
            with torch.no_grad():
                loss = float(-(held_y * head(enc.embed(held_x)).log_softmax(1)).sum(1).mean())
            enc.train()
            return loss

        steps, used, curve = 0, 0.0, [(0.0, held_out())]
        while used < seconds:
            t = time.process_time()
            x, y = batch(4, gen)
            loss = -(y * head(enc.embed(x)).log_softmax(1)).sum(1).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            steps += 1
            used += time.process_time() - t
            if steps % 10 == 0:
                curve.append((used, held_out()))
        curve.append((used, held_out()))
        print(f"  {variant:9} {steps:4d} steps, {used / steps:.2f} CPU-s/step; held-out loss by CPU-s: "
              + ", ".join(f"{u:.0f}s:{v:.3f}" for u, v in curve), flush=True)


def launch(side: str, cfg: tuple[int, int, int], args, weights: str, conv_time: bool = False) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    if args.allocator == "tuned":
        env.update(TUNED_MALLOC)
    cmd = [sys.executable, __file__, "--worker", side, "--configs", ":".join(map(str, cfg)), "--iters",
           str(args.iters), "--device", args.device, "--weights", weights] + (["--bf16"] if args.bf16 else []) + (
           ["--conv-time"] if conv_time else [])
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"{side} worker failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", default="48:64:2,12:64:1", help="comma list of feature:size:batch")
    p.add_argument("--iters", type=int, default=3, help="timed steps per worker (median)")
    p.add_argument("--rounds", type=int, default=2, help="alternating worker pairs per config (median)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (both sides)")
    p.add_argument("--allocator", default="tuned", choices=["tuned", "default"],
                   help="glibc malloc settings for both sides (tuned: keep freed memory)")
    p.add_argument("--small-crop-study", type=float, metavar="SECONDS", default=None,
                   help="instead: compare the 32³ variants on a position task for SECONDS CPU-s each")
    p.add_argument("--worker", choices=["monai", "ours"], help=argparse.SUPPRESS)
    p.add_argument("--weights", help=argparse.SUPPRESS)
    p.add_argument("--conv-time", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    configs = [tuple(int(v) for v in c.split(":")) for c in args.configs.split(",")]

    if args.small_crop_study:
        small_crop_study(args.small_crop_study)
        return 0
    if args.worker:
        fs, size, batch = configs[0]
        print(json.dumps(worker(args.worker, fs, size, batch, args.iters, args.device, args.bf16, args.weights,
                                args.conv_time)))
        return 0

    import torch

    print(f"device={args.device} bf16={args.bf16} allocator={args.allocator} iters={args.iters} rounds={args.rounds} "
          f"torch={torch.__version__} threads={torch.get_num_threads()}")
    print(f"{'config':>18} | {'MONAI s/it':>10} {'ours s/it':>10} {'speed-up':>8} {'bound':>6} | "
          f"{'MONAI MB':>9} {'ours MB':>9} {'mem ratio':>9} | loss rel diff")
    print("(bound: MONAI s/it / MONAI's conv blocks' s/it, the most a rewrite of the Swin part alone could gain)")
    with tempfile.TemporaryDirectory() as tmp:
        for fs, size, batch in configs:
            torch.manual_seed(0)
            weights = str(Path(tmp) / f"w{fs}.pt")
            state = monai_model(fs).state_dict()
            torch.save({k: v for k, v in state.items() if not k.startswith(("decoder", "out."))}, weights)
            runs = {"monai": [], "ours": []}
            for r in range(args.rounds):
                for side in runs:
                    runs[side].append(launch(side, (fs, size, batch), args, weights, conv_time=side == "monai" and r == 0))
            conv_s = runs["monai"][0]["conv_s"]
            ref, ours = ({k: statistics.median(run[k] for run in runs[side]) for k in ("s_per_iter", "peak_mb")}
                         | {"loss": runs[side][0]["loss"], "device_name": runs[side][0]["device_name"]}
                         for side in ("monai", "ours"))
            print(f"{f'f{fs} {size}^3 b{batch}':>18} | {ref['s_per_iter']:>10.3f} {ours['s_per_iter']:>10.3f} "
                  f"{ref['s_per_iter'] / ours['s_per_iter']:>7.2f}x {ref['s_per_iter'] / conv_s:>5.2f}x | "
                  f"{ref['peak_mb']:>9.0f} {ours['peak_mb']:>9.0f} "
                  f"{ours['peak_mb'] / ref['peak_mb']:>8.2f}x | {abs(ours['loss'] - ref['loss']) / abs(ref['loss']):.1e}"
                  f"  ({ours['device_name']})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
