"""GPU readiness in one prepared check (issue 18): every CUDA path once, timed, in ≤ 8 minutes on an H100/H200.

    python benchmarks/gpu_check.py --out gpu-check        # a machine with a CUDA GPU (`make gpu-check`)
    python benchmarks/gpu_check.py --dry-run              # anywhere (CI): the plan, imports and configs; no training

GPU time is scarce, so the check runs unattended and keeps everything it measured: each section is timed and
guarded (an exception or a timeout is recorded with its traceback tail, and the next section runs); a section
that would start past the total budget is recorded as skipped; `gpu_check.json` is rewritten atomically after
every section, so a killed check keeps what it had; `gpu_check.txt` is the short summary. Sections run in the
order of what matters most if time runs short, `backbone-compile` (the slowest to warm up) last.

Only public entry points are used (`run_pretraining`, `tasks.finetune`, `backbone.build_encoder`, MONAI's
SwinUNETR, `checkpoints.load_encoder`, a run directory's `metrics.jsonl` and checkpoints, the `voco` CLI), so
the internals may change underneath; the dry run executes every section up to its first GPU work (imports,
resolved configs), so a renamed function or config key fails it.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch

BF16_RTOL = 3e-2  # relative L2 difference accepted between two bf16 computations of the same maths
TOTAL_BUDGET_S = 470  # the 8 minutes, minus start-up
BACKBONE_SIZES = ((48, 96, 2), (48, 64, 4), (96, 96, 1))  # feature size, cube side, batch
COMPILE_SIZES = BACKBONE_SIZES[:2]

# Phantoms resized to the TPAMI geometry (the gpu profile's 3x3x1 grid of 64³ over 192x192x64): the whole
# torso at 3 mm, as the cpu profile does; per-crop flips/rot90 off, which lets position accuracy rise within
# a few hundred steps (see config.py), and the cpu profile's phantom learning rate.
TPAMI_PHANTOMS = ("data.region_mode=resize", "data.phantom_shape=80x80x64", "data.phantom_spacing=3.0",
                  "views.augment=false", "train.lr=5e-4")
PRETRAIN = (*TPAMI_PHANTOMS, "n_volumes=16", "steps=200", "train.warmup_steps=20", "train.log_every=10",
            "train.eval_every=50", "train.checkpoint_every=200", "train.keep_last=1", "data.n_eval=4",
            "data.workers=6")
FP16 = (*TPAMI_PHANTOMS, "train.amp=fp16", "n_volumes=8", "steps=50", "train.warmup_steps=10", "train.log_every=5",
        "train.eval_every=50", "train.checkpoint_every=50", "train.keep_last=1", "data.n_eval=2", "data.workers=4")
RESUME = (*TPAMI_PHANTOMS, "n_volumes=8", "steps=30", "train.warmup_steps=5", "train.log_every=1",
          "train.eval_every=30", "train.checkpoint_every=15", "train.keep_last=2", "data.n_eval=2", "data.workers=2")
DDP = (*TPAMI_PHANTOMS, "n_volumes=4", "steps=20", "train.warmup_steps=5", "train.log_every=5", "train.eval_every=20",
       "train.checkpoint_every=20", "data.n_eval=2", "data.workers=2")
FINETUNE = ("finetune.steps=200", "finetune.roi=96x96x96", "finetune.eval_every=100", "finetune.warmup_steps=20",
            "finetune.log_every=10", "finetune.checkpoint_every=200", "finetune.keep_last=1")
FINETUNE_TASK = "phantom-seg"
# Children that must compute the same thing twice (resume vs uninterrupted) run with deterministic kernels.
DETERMINISTIC_CHILD = ("import sys, torch; torch.backends.cudnn.deterministic = True; "
                       "torch.backends.cudnn.benchmark = False; torch.use_deterministic_algorithms(True, warn_only=True); "
                       "from voco_lib.cli import main; sys.exit(main(sys.argv[1:]))")


# ------------------------------------------------------------------------------------------------ plumbing
def api(ref: str) -> Any:
    """`module:attribute` imported and looked up, so the dry run fails on a renamed public entry point."""
    import importlib

    module, _, name = ref.partition(":")
    obj = importlib.import_module(module)
    for part in name.split(".") if name else ():
        obj = getattr(obj, part)
    return obj


def build_config(profile: str, overrides: Sequence[str]) -> Any:
    """The resolved config of a section (the library's one config path); an unknown key raises ValueError."""
    return api("voco_lib.config:resolve")(profile, list(overrides))


@dataclasses.dataclass
class Ctx:
    """What a section gets: where to work, whether this is the dry run, results of earlier sections, and
    `partial`, where a section with several parts puts each part's figures as soon as it has them (kept when a
    later part fails or runs out of time)."""

    work: Path
    dry: bool
    results: dict[str, dict[str, Any]]
    deadline: float  # of the whole check
    section_deadline: float = math.inf
    partial: dict[str, Any] = dataclasses.field(default_factory=dict)

    def left(self) -> float:
        return min(self.deadline, self.section_deadline) - time.monotonic()


@dataclasses.dataclass(frozen=True)
class Section:
    name: str
    budget_s: int  # expected time on an H100/H200; the section is stopped at 2x this (or the total deadline)
    measures: str
    run: Callable[[Ctx], dict[str, Any]]


class SectionTimeout(Exception):
    pass


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Raise SectionTimeout in the main thread after `seconds` (SIGALRM; the training loops do not catch it)."""
    def handler(signum: int, frame: Any) -> None:
        raise SectionTimeout(f"stopped after its limit of {seconds:.0f} s")

    old = signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, max(1.0, seconds))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def peak_gb() -> float:
    return torch.cuda.max_memory_allocated() / 2**30


def fresh_gpu() -> None:
    import gc

    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖ / ‖b‖ in float32."""
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def outcome(checks: dict[str, bool], **figures: Any) -> dict[str, Any]:
    return {"checks": checks, "figures": figures}


def train_records(run_dir: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(train lines, evaluation lines) of a run's metrics.jsonl."""
    recs = api("voco_lib.runs:read_metrics")(run_dir)
    return [r for r in recs if r["kind"] == "train"], [r for r in recs if r["kind"] != "train"]


def perf_figures(train: list[dict[str, Any]], batch_name: str) -> dict[str, Any]:
    """Throughput (median over logged windows, the first one — warm-up — left out), data-loader share, memory."""
    steady = train[1:] or train
    perf = [r.get("perf", {}) for r in steady]
    step_s = sum(p.get("step_s", 0.0) for p in perf)
    return {f"{batch_name}_per_s": statistics.median(p["samples_per_s"] for p in perf) if perf else None,
            "data_loader_share": sum(p.get("data_s", 0.0) for p in perf) / step_s if step_s else None,
            "peak_gpu_gb_logged": max((p.get("gpu_mem_gb", 0.0) for p in perf), default=None)}


def voco_cli(args: Sequence[str], deterministic: bool = False) -> list[str]:
    """A `voco ...` command line in a fresh interpreter (deterministic kernels if asked)."""
    if deterministic:
        return [sys.executable, "-c", DETERMINISTIC_CHILD, *args]
    return [sys.executable, "-m", "voco_lib.cli", *args]


def child_env() -> dict[str, str]:
    return {**os.environ, "CUBLAS_WORKSPACE_CONFIG": ":4096:8"}  # cuBLAS's condition for deterministic matmuls


def run_child(cmd: Sequence[str], ctx: Ctx, log: Path) -> int:
    """Run a child to completion within the section's time, its output in `log`; the exit code."""
    with open(log, "ab") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=child_env(), start_new_session=True)
        try:
            return proc.wait(timeout=max(1.0, ctx.left()))
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def tail(path: Path, n: int = 1500) -> str:
    return path.read_text(errors="replace")[-n:] if path.is_file() else ""


# ------------------------------------------------------------------------------------------------ sections
def environment(ctx: Ctx) -> dict[str, Any]:
    monai = api("monai")
    if ctx.dry:
        return {"figures": {"torch": torch.__version__, "monai": monai.__version__}}
    props = torch.cuda.get_device_properties(0)
    return outcome({"bf16 supported": torch.cuda.is_bf16_supported(), "nccl available": torch.distributed.is_nccl_available()},
                   gpu=props.name, gpu_memory_gb=round(props.total_memory / 2**30, 1), capability=f"{props.major}.{props.minor}",
                   gpus=torch.cuda.device_count(), torch=torch.__version__, cuda=torch.version.cuda,
                   cudnn=torch.backends.cudnn.version(), monai=monai.__version__,
                   sdpa={"flash": torch.backends.cuda.flash_sdp_enabled(),
                         "mem_efficient": torch.backends.cuda.mem_efficient_sdp_enabled(),
                         "cudnn": torch.backends.cuda.cudnn_sdp_enabled()})


class Embedder(torch.nn.Module):
    """`x -> pooled embedding` of either side as one module (what torch.compile compiles)."""

    def __init__(self, model: torch.nn.Module, monai: bool) -> None:
        super().__init__()
        self.m, self.monai = model, monai
        self.pooled = api("voco_lib.backbone:pooled_embedding")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.monai:
            return self.m.embed(x)
        h = self.m.swinViT(x, self.m.normalize)  # the five maps VoCo pools, as the authors' SSL head computes them
        return self.pooled([self.m.encoder1(x), self.m.encoder2(h[0]), self.m.encoder3(h[1]), self.m.encoder4(h[2]),
                            self.m.encoder10(h[4])])


def _bench_pair(fs: int, side: int, batch: int, compiled: bool, iters: int = 10) -> dict[str, Any]:
    """Ours vs MONAI SwinUNETR(use_v2) encoder, same weights and input, bf16 autocast, forward+backward."""
    SwinUNETR = api("monai.networks.nets:SwinUNETR")
    build_encoder, load_encoder = api("voco_lib.backbone:build_encoder"), api("voco_lib.checkpoints:load_encoder")
    torch.manual_seed(0)
    ref = SwinUNETR(in_channels=1, out_channels=2, feature_size=fs, use_v2=True)
    ours = build_encoder(fs)
    load_encoder(ours, ref.state_dict(), name="MONAI SwinUNETR")  # full encoder coverage or an error
    x = torch.randn(batch, 1, side, side, side, generator=torch.Generator().manual_seed(1)).cuda()
    out: dict[str, Any] = {}
    emb, grad = {}, {}
    for name, model in (("monai", ref), ("ours", ours)):
        model.cuda().train()
        net = Embedder(model, monai=name == "monai")
        if compiled:
            net = torch.compile(net)
        fresh_gpu()
        base = torch.cuda.memory_allocated()

        def step() -> Any:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                e = net(x)
            e.float().square().mean().backward()
            return e

        t0 = time.perf_counter()
        e = step()
        torch.cuda.synchronize()
        first_s = time.perf_counter() - t0
        emb[name] = e.detach().float()
        grad[name] = model.swinViT.patch_embed.proj.weight.grad.detach().float().clone()
        model.zero_grad(set_to_none=True)
        step()
        model.zero_grad(set_to_none=True)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        for _ in range(iters):
            step()
            model.zero_grad(set_to_none=True)
        end.record()
        torch.cuda.synchronize()
        out[name] = {"s_per_it": start.elapsed_time(end) / 1000 / iters, "first_it_s": first_s,
                     "peak_gb": peak_gb(), "activations_gb": (torch.cuda.max_memory_allocated() - base) / 2**30}
        model.cpu()
        del net
        fresh_gpu()
    out["speedup"] = out["monai"]["s_per_it"] / out["ours"]["s_per_it"]
    out["memory_ratio"] = out["ours"]["activations_gb"] / max(out["monai"]["activations_gb"], 1e-9)
    out["embedding_rel_diff"] = rel_diff(emb["ours"], emb["monai"])
    out["grad_rel_diff"] = rel_diff(grad["ours"], grad["monai"])
    return out


def _backbone(ctx: Ctx, sizes: Sequence[tuple[int, int, int]], compiled: bool) -> dict[str, Any]:
    for ref in ("voco_lib.backbone:build_encoder", "voco_lib.backbone:pooled_embedding",
                "voco_lib.checkpoints:load_encoder", "monai.networks.nets:SwinUNETR", "torch:compile"):
        api(ref)
    if ctx.dry:
        return {"figures": {"sizes": [f"f{f} {s}³ b{b}" for f, s, b in sizes]}}
    checks = {}
    for fs, side, batch in sizes:
        key = f"f{fs}_{side}^3_b{batch}"
        if ctx.left() < 20:
            ctx.partial[key] = "skipped: the section's time is used up"
            continue
        r = ctx.partial[key] = _bench_pair(fs, side, batch, compiled)
        checks[f"{key} agrees (bf16)"] = r["embedding_rel_diff"] < BF16_RTOL and r["grad_rel_diff"] < BF16_RTOL
    return outcome(checks, **ctx.partial)


def backbone(ctx: Ctx) -> dict[str, Any]:
    return _backbone(ctx, BACKBONE_SIZES, compiled=False)


def backbone_compile(ctx: Ctx) -> dict[str, Any]:
    return _backbone(ctx, COMPILE_SIZES, compiled=True)


def _geometry_ok(cfg: Any) -> None:
    if (tuple(cfg.views.region), tuple(cfg.views.grid), tuple(cfg.views.base_size)) != ((192, 192, 64), (3, 3, 1), (64, 64, 64)):
        raise ValueError(f"the gpu profile's views are {cfg.views}, not the TPAMI geometry (3x3x1 of 64³ over 192x192x64)")


def pretrain(ctx: Ctx) -> dict[str, Any]:
    run_pretraining = api("voco_lib.pretrain:run_pretraining")
    cfg = build_config("gpu", PRETRAIN)
    _geometry_ok(cfg)
    if ctx.dry:
        return {"figures": {"steps": cfg.steps, "feature_size": cfg.feature_size, "amp": cfg.train.amp}}
    out = ctx.work / "pretrain"
    fresh_gpu()
    t0 = time.perf_counter()
    run_pretraining("gpu", "phantom", out, list(PRETRAIN), show_progress=False)
    wall = time.perf_counter() - t0
    train, evals = train_records(out)
    top1 = [r["top1"] for r in evals if "top1" in r]
    loss = [r["loss"] for r in train]
    first, last = statistics.mean(loss[:2]), statistics.mean(loss[-2:])
    return outcome({"loss falls": last < first, "position top-1 rises": len(top1) > 1 and top1[-1] > top1[0],
                    "encoder.pt written": (out / "encoder.pt").is_file()},
                   wall_s=wall, steps=cfg.steps, **perf_figures(train, "volumes"), peak_gpu_gb=peak_gb(),
                   loss_first=first, loss_last=last, top1=top1, chance=evals[0].get("chance") if evals else None)


def finetune(ctx: Ctx, init: str = "scratch") -> dict[str, Any]:
    finetune_ = api("voco_lib.tasks:finetune")
    task = api("voco_lib.tasks.registry:load_task")(FINETUNE_TASK)
    cfg = build_config("gpu", FINETUNE)
    if tuple(cfg.finetune.roi) != (96, 96, 96):
        raise ValueError(f"finetune.roi resolved to {cfg.finetune.roi}, not 96³")
    if ctx.dry:
        return {"figures": {"task": task.name, "steps": cfg.finetune.steps, "roi": list(cfg.finetune.roi),
                            "amp": cfg.finetune.amp, "init": init}}
    if init != "scratch":
        encoder = ctx.work / "pretrain" / "encoder.pt"
        if not encoder.is_file():
            return {"status": "skipped", "error": "needs the pretrain section's run (its encoder.pt is missing)"}
        init = str(encoder.parent)
    out = ctx.work / f"finetune-{'voco' if init != 'scratch' else 'scratch'}"
    fresh_gpu()
    t0 = time.perf_counter()
    res = finetune_(FINETUNE_TASK, init=init, profile="gpu", out=out, overrides=list(FINETUNE), show_progress=False)
    wall = time.perf_counter() - t0
    train, evals = train_records(out)
    loss = [r["loss"] for r in train]
    dice = [r["dice"] for r in evals if "dice" in r]
    figures = dict(wall_s=wall, **perf_figures(train, "crops"), peak_gpu_gb=peak_gb(), loss_first=loss[0] if loss else None,
                   loss_last=loss[-1] if loss else None, val_dice=dice, metric=res.get("metric"), value=res.get("value"))
    if init != "scratch":
        figures["scratch_value"] = ctx.results.get("finetune-scratch", {}).get("figures", {}).get("value")
    return outcome({"loss falls": len(loss) > 1 and loss[-1] < loss[0],
                    "sliding-window validation ran": len(dice) > 0 and all(math.isfinite(d) for d in dice)}, **figures)


def finetune_voco(ctx: Ctx) -> dict[str, Any]:
    return finetune(ctx, init="voco")


def fp16(ctx: Ctx) -> dict[str, Any]:
    run_pretraining = api("voco_lib.pretrain:run_pretraining")
    latest = api("voco_lib.runs:latest_checkpoint")
    cfg = build_config("gpu", FP16)
    if ctx.dry:
        return {"figures": {"steps": cfg.steps, "amp": cfg.train.amp}}
    out = ctx.work / "fp16"
    fresh_gpu()
    t0 = time.perf_counter()
    run_pretraining("gpu", "phantom", out, list(FP16), show_progress=False)
    train, _ = train_records(out)
    found = latest(out, set_aside=False)
    scale = found[1].get("scaler", {}).get("scale") if found else None
    # loss terms only: an inf gradient norm is a step the GradScaler skipped, as designed
    terms = [v for r in train for k, v in r.items() if isinstance(v, float) and k not in ("lr", "grad_norm")]
    skipped = sum(1 for r in train if not math.isfinite(r.get("grad_norm", 0.0)))
    return outcome({"no inf/NaN in the logged loss terms": all(math.isfinite(v) for v in terms),
                    "GradScaler was active": scale is not None},
                   wall_s=time.perf_counter() - t0, steps=cfg.steps, grad_scale=scale,
                   logged_steps_with_inf_grad=skipped, **perf_figures(train, "volumes"),
                   loss_first=train[0]["loss"] if train else None, loss_last=train[-1]["loss"] if train else None)


def resume(ctx: Ctx) -> dict[str, Any]:
    """An uninterrupted run vs one SIGKILLed after its first checkpoint and resumed; both in fresh processes
    with deterministic kernels, so any difference beyond bf16 rounding is the resume's."""
    load_checkpoint = api("voco_lib.checkpoints:load_checkpoint")
    api("voco_lib.cli:main")
    cfg = build_config("gpu", RESUME)
    if ctx.dry:
        return {"figures": {"steps": cfg.steps, "kill after checkpoint step": cfg.train.checkpoint_every}}
    whole, killed, log = ctx.work / "resume-whole", ctx.work / "resume-killed", ctx.work / "resume.log"
    base = ["pretrain", "--profile", "gpu", "--data", "phantom"]
    rc = run_child(voco_cli([*base, "--out", str(whole), *RESUME], deterministic=True), ctx, log)
    if rc != 0:
        raise RuntimeError(f"uninterrupted run exited {rc}: {tail(log)}")
    first = killed / "checkpoints" / f"step_{cfg.train.checkpoint_every:08d}.pt"
    with open(log, "ab") as f:
        proc = subprocess.Popen(voco_cli([*base, "--out", str(killed), *RESUME], deterministic=True), stdout=f,
                                stderr=subprocess.STDOUT, env=child_env(), start_new_session=True)
        while proc.poll() is None and not first.is_file() and ctx.left() > 5:
            time.sleep(0.05)
        finished_before_kill = proc.poll() is not None
        if not finished_before_kill:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    if not first.is_file():
        raise RuntimeError(f"the run to kill wrote no checkpoint {first.name} (exit {proc.returncode}): {tail(log)}")
    rc = run_child(voco_cli([*base, "--out", str(killed), "--resume", *RESUME], deterministic=True), ctx, log)
    if rc != 0:
        raise RuntimeError(f"resumed run exited {rc}: {tail(log)}")
    a, _ = train_records(whole)
    b, _ = train_records(killed)
    loss_a, loss_b = {r["step"]: r["loss"] for r in a}, {r["step"]: r["loss"] for r in b}
    steps = sorted(set(loss_a) & set(loss_b))
    loss_diff = max(abs(loss_a[s] - loss_b[s]) / max(abs(loss_a[s]), 1e-12) for s in steps) if steps else math.inf
    wa, wb = load_checkpoint(whole / "encoder.pt"), load_checkpoint(killed / "encoder.pt")
    weight_diff = max(rel_diff(wb[k], wa[k]) for k in wa if wa[k].is_floating_point())
    identical = wa.keys() == wb.keys() and all(bool((wa[k] == wb[k]).all()) for k in wa)
    every = list(range(1, cfg.steps + 1))
    return outcome({"killed before it finished": not finished_before_kill,
                    "every step logged once": [r["step"] for r in b] == every == [r["step"] for r in a],
                    "losses equal within bf16 tolerance": loss_diff < BF16_RTOL,
                    "weights equal within bf16 tolerance": weight_diff < BF16_RTOL},
                   killed_after_step=cfg.train.checkpoint_every, max_loss_rel_diff=loss_diff,
                   max_weight_rel_diff=weight_diff, bit_identical=identical)


def ddp(ctx: Ctx) -> dict[str, Any]:
    """One process under torchrun (world size 1): the library's pre-training there, then a direct NCCL DDP
    step on our encoder (the library wraps DDP only when world > 1, so the NCCL path is exercised directly)."""
    api("torch.distributed.run:main")
    api("voco_lib.distributed:init_runtime")
    cfg = build_config("gpu", DDP)
    if ctx.dry:
        return {"figures": {"launcher": "torchrun --standalone --nproc_per_node=1", "steps": cfg.steps}}
    result, log = ctx.work / "ddp.json", ctx.work / "ddp.log"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", str(Path(__file__)),
           "--ddp-child", str(ctx.work)]
    rc = run_child(cmd, ctx, log)
    if not result.is_file():
        raise RuntimeError(f"torchrun exited {rc} before its child wrote a result: {tail(log)}")
    r = ctx.partial = json.loads(result.read_text())
    if rc != 0 or "error" in r:
        raise RuntimeError(f"torchrun exited {rc}: {r.get('error', tail(log))}")
    return outcome({"library run under torchrun finished": r["library_run"], "NCCL all_reduce correct": r["all_reduce_ok"],
                    "DDP step finite": r["ddp_loss_finite"]}, **r)


def ddp_child(work: Path) -> int:
    """The torchrun side of `ddp`: writes work/ddp.json (what it got to, and its error if any)."""
    r: dict[str, Any] = {}
    try:
        _ddp_steps(work, r)
        return 0
    except Exception as e:
        r["error"] = f"{type(e).__name__}: {e}"[:2000]
        return 1
    finally:
        api("voco_lib.files:write_text")(work / "ddp.json", json.dumps(r))


def _ddp_steps(work: Path, r: dict[str, Any]) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from voco_lib.backbone import build_encoder
    from voco_lib.distributed import init_runtime
    from voco_lib.pretrain import run_pretraining

    out = work / "ddp-pretrain"
    run_pretraining("gpu", "phantom", out, list(DDP), show_progress=False)
    rt = init_runtime()
    r.update(library_run=(out / "encoder.pt").is_file(), world=rt.world, library_uses_ddp_at_world_1=rt.distributed,
             process_group_by_library=dist.is_initialized())
    if not dist.is_initialized():
        dist.init_process_group("nccl", device_id=rt.device)
    r["backend"] = dist.get_backend()
    net = DistributedDataParallel(build_encoder(48).to(rt.device), device_ids=[rt.device.index])
    x = torch.randn(2, 1, 64, 64, 64, device=rt.device)
    losses = []
    for _ in range(3):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = sum(m.float().square().mean() for m in net(x))
        loss.backward()
        losses.append(float(loss))
    ones = torch.ones(4, device=rt.device)
    dist.all_reduce(ones)
    r.update(all_reduce_ok=bool((ones == dist.get_world_size()).all()), ddp_losses=losses,
             ddp_loss_finite=all(math.isfinite(v) for v in losses))
    dist.destroy_process_group()


SECTIONS = (
    Section("environment", 5, "GPU model, memory, versions, bf16 / NCCL / SDPA backends", environment),
    Section("backbone", 45, "ours vs MONAI SwinUNETR encoder, same weights, bf16 fwd+bwd at f48 96³ b2, f48 64³ b4, "
            "f96 96³ b1: s/it, peak and activation memory, ratios, embedding and gradient agreement", backbone),
    Section("pretrain", 90, "gpu profile on phantoms at the TPAMI geometry, 200 steps: volumes/s, peak memory, "
            "data-loader share of step time, loss falls, position top-1 rises", pretrain),
    Section("finetune-scratch", 45, f"{FINETUNE_TASK}, 96³ roi, gpu profile (bf16), 200 steps from scratch, "
            "sliding-window validation on CUDA: crops/s, peak memory, Dice", finetune),
    Section("finetune-voco", 45, "the same from the pretrain section's encoder (VoCo init): Dice beside scratch",
            finetune_voco),
    Section("fp16", 35, "fp16 + GradScaler, 50 steps: no inf/NaN, the scaler's scale", fp16),
    Section("resume", 60, "SIGKILL after the step-15 checkpoint, --resume, vs an uninterrupted 30-step run "
            "(deterministic kernels): loss and weight differences, bit-identical or not", resume),
    Section("ddp", 40, "torchrun --nproc_per_node=1: the library's pre-training, then an NCCL DDP step", ddp),
    Section("backbone-compile", 90, "the backbone comparison with torch.compile at f48 96³ b2 and f48 64³ b4: "
            "first-iteration (compile) time, s/it, agreement", backbone_compile),
)


# ------------------------------------------------------------------------------------------------ driver
def plan_text(sections: Sequence[Section]) -> str:
    lines = [f"voco GPU check: {len(sections)} sections, ≈{sum(s.budget_s for s in sections)} s expected on an "
             f"H100/H200, total budget {TOTAL_BUDGET_S} s"]
    lines += [f"  {s.name:17} ~{s.budget_s:>3} s  {s.measures}" for s in sections]
    return "\n".join(lines)


def run_section(s: Section, ctx: Ctx) -> dict[str, Any]:
    """One section, guarded: its result, or its error; always its time."""
    t0 = time.monotonic()
    ctx.section_deadline, ctx.partial = math.inf, {}
    if not ctx.dry and ctx.left() < min(s.budget_s, 20):
        return {"status": "skipped", "error": f"{ctx.left():.0f} s left of the total budget", "seconds": 0.0}
    try:
        if ctx.dry:
            r = s.run(ctx)
        else:
            ctx.section_deadline = time.monotonic() + 2 * s.budget_s
            with time_limit(ctx.left()):
                r = s.run(ctx)
        r.setdefault("status", "ok" if all(r.get("checks", {}).values()) else "failed")
    except Exception as e:  # recorded, and the next section runs
        r = {"status": "error", "error": f"{type(e).__name__}: {e}"[:2000], "figures": ctx.partial,
             "traceback": traceback.format_exc()[-3000:]}
    if not ctx.dry:
        fresh_gpu()
    r["seconds"] = round(time.monotonic() - t0, 1)
    return r


def summary_text(report: dict[str, Any]) -> str:
    env = report["sections"].get("environment", {}).get("figures", {})
    where = "dry run (no GPU work)" if report["dry_run"] else f"on {env.get('gpu', '?')}"
    lines = [f"voco GPU check {report['started']} {where} (torch {env.get('torch', '?')}, CUDA {env.get('cuda', '-')}): "
             f"{report['total_seconds']:.0f} s"]
    for name, r in report["sections"].items():
        f = r.get("figures", {})
        if report["dry_run"]:
            lines.append(f"{name:17} {r['status']:7} {json.dumps(f, ensure_ascii=False)}" + (f"  {r['error']}" if r.get("error") else ""))
            continue
        keys = [k for k in ("volumes_per_s", "crops_per_s", "data_loader_share", "peak_gpu_gb", "loss_first",
                            "loss_last", "top1", "value", "scratch_value", "grad_scale", "max_loss_rel_diff",
                            "max_weight_rel_diff", "bit_identical", "backend") if k in f]
        shown = ", ".join(f"{k}={_short(f[k])}" for k in keys)
        for k, v in f.items():
            if isinstance(v, dict) and "speedup" in v:
                shown += (f" {k}: MONAI {v['monai']['s_per_it']:.3f} vs ours {v['ours']['s_per_it']:.3f} s/it "
                          f"({v['speedup']:.2f}×), activations ×{v['memory_ratio']:.2f}, emb diff {v['embedding_rel_diff']:.1e};")
        lines.append(f"{name:17} {r['status']:7} {r['seconds']:6.1f} s  {shown}")
        lines += [f"{'':17} check failed: {c}" for c, ok in r.get("checks", {}).items() if not ok]
        if r.get("error"):
            lines.append(f"{'':17} {r['error'].splitlines()[0][:300]}")
    return "\n".join(lines) + "\n"


def _short(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, list):
        return "[" + ", ".join(_short(x) for x in v) + "]"
    return str(v)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="gpu-check", help="folder for gpu_check.json and gpu_check.txt")
    p.add_argument("--dry-run", action="store_true", help="print the plan, import and build every section; no GPU")
    p.add_argument("--sections", default=None, help="comma list of section names (default: all, in plan order)")
    p.add_argument("--budget", type=float, default=TOTAL_BUDGET_S, help="total seconds; later sections are skipped")
    p.add_argument("--work", default=None, help="folder for the run directories (default: a temporary one, removed)")
    p.add_argument("--ddp-child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.ddp_child:
        return ddp_child(Path(args.ddp_child))
    names = [s.name for s in SECTIONS]
    wanted = args.sections.split(",") if args.sections else names
    unknown = sorted(set(wanted) - set(names))
    if unknown:
        p.error(f"unknown section(s) {unknown}; choose from {names}")
    sections = [s for s in SECTIONS if s.name in wanted]
    print(plan_text(sections), flush=True)
    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; run it on a GPU machine, or use --dry-run to check the plan",
              file=sys.stderr)
        return 2
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="voco-gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    os.environ["VOCO_DATA_DIR"] = str(work / "data")  # caches and downloads stay out of the user's folders
    out = Path(args.out)
    ctx = Ctx(work, args.dry_run, {}, time.monotonic() + args.budget)
    report: dict[str, Any] = {"check": "voco gpu check", "dry_run": args.dry_run,
                              "started": datetime.datetime.now().isoformat(timespec="seconds"),
                              "plan": {s.name: {"budget_s": s.budget_s, "measures": s.measures} for s in sections},
                              "sections": {}, "total_seconds": 0.0}
    t0 = time.monotonic()
    write_text = api("voco_lib.files:write_text")
    try:
        for s in sections:
            print(f"-> {s.name}", flush=True)
            ctx.results[s.name] = report["sections"][s.name] = r = run_section(s, ctx)
            print(f"   {r['status']} in {r['seconds']} s" + (f": {r['error'].splitlines()[0][:300]}" if r.get("error") else ""),
                  flush=True)
            report["total_seconds"] = round(time.monotonic() - t0, 1)
            if not args.dry_run:
                write_text(out / "gpu_check.json", json.dumps(report, indent=2, default=str) + "\n")
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    text = summary_text(report)
    print(text, end="")
    if args.dry_run:
        return 0 if all(r["status"] == "ok" for r in report["sections"].values()) else 1
    write_text(out / "gpu_check.txt", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
