"""VoCo pre-training: the model (encoder + student/EMA-teacher heads), one step, and the resumable loop.

One code path for a laptop run of minutes and a week on 8 GPUs (`torchrun`): the step of method spec §4,
AdamW (amsgrad) with linear warmup + cosine stepped every iteration (§5.1), gradient accumulation and
clipping, optional AMP (bf16, or fp16 with a GradScaler), per-stage gradient checkpointing, opt-in
`torch.compile`, DDP (NCCL on GPU, gloo on CPU). Unlike upstream (§10.1 items 4, 13) every run is seeded and
a resume restores everything: weights, teacher, optimizer, scheduler, scaler, step, RNG states of every
rank and the data order.

Run directory: config.yaml, metrics.jsonl, checkpoints/, figures/, tb/, encoder.pt (released layout).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import random
import signal
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.distributed as dist
import yaml
from torch import nn

from voco_lib.config import Profile, profile_from_dict, resolve, to_dict
from voco_lib.crops import Views, collate_views
from voco_lib.distributed import (barrier, check_ranks_in_sync, gather_objects, init_runtime, main_first, shutdown,
                                  wrap_ddp)
from voco_lib.data.loader import (InfiniteOrder, ViewsDataset, build_volumes, held_out_views, make_loader,
                                  region_mode_of, views_to)
from voco_lib.files import atomic_write, write_text
from voco_lib.heads import EMATeacher, EmbeddingDropout, ProjectionHead, VoCoHeads
from voco_lib.losses import similarity, voco_loss

PERF_KEY = "perf"  # the only non-deterministic field of a metrics.jsonl line (timing, throughput, memory)


# ------------------------------------------------------------------------------------------------ model
def build_backbone(cfg: Profile) -> nn.Module:
    """The Swin encoder (MONAI SwinUNETR parameter names); below 64³ the backbone's "bypass" small-crop variant.

    With "bypass" the deepest map of a 32³ crop is 1³ and encoder10 is skipped (its InstanceNorm cannot
    train on one voxel), so its weights would get no gradient; they are frozen, which also spares DDP from
    `find_unused_parameters`. They stay in the exported encoder (at their initial values).
    """
    from voco_lib.backbone import build_encoder

    small = min(cfg.views.out_size or cfg.views.crop_size) < 64
    enc = build_encoder(cfg.feature_size, in_channels=1, grad_checkpoint=cfg.train.grad_checkpoint,
                        small_crop="bypass" if small else None)
    if small:
        enc.encoder10.requires_grad_(False)
    return enc


class _Embedder(nn.Module):
    """Backbone + projection head as one network (the CVPR student, whose EMA copy is the teacher)."""

    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone.embed(x))


class VoCoModel(nn.Module):
    """Encoder + student head + EMA teacher. `forward(random, bases)` returns the four embeddings.

    ema_scope "head" (TPAMI): one shared backbone; the teacher is an EMA of the student head (spec §2.4).
    ema_scope "full" (CVPR): the teacher is an EMA of backbone + head (spec §2.6).
    The EMA update is `ema_update()`, called once per optimizer step before the forward that uses the
    teacher (as upstream); with gradient accumulation it must not run once per micro-batch.
    """

    def __init__(self, cfg: Profile):
        super().__init__()
        self.ema_scope = cfg.train.ema_scope
        backbone = build_backbone(cfg)
        in_dim = embed_dim(backbone)
        h = cfg.heads
        if self.ema_scope == "head":
            self.backbone = backbone
            self.heads = VoCoHeads(in_dim, h)
        elif self.ema_scope == "full":
            self.net = _Embedder(backbone, ProjectionHead(in_dim, h.hidden_dim, h.out_dim))
            self.teacher = EMATeacher(self.net, h.ema_momentum, h.teacher_init)
            self.dropout = EmbeddingDropout(h.dropout_p, h.dropout_mode)
        else:
            raise ValueError(f"train.ema_scope must be 'head' (TPAMI) or 'full' (CVPR), got {self.ema_scope!r}")

    @property
    def encoder(self) -> nn.Module:
        """The student backbone: what gets exported."""
        return self.backbone if self.ema_scope == "head" else self.net.backbone

    @torch.no_grad()
    def ema_update(self) -> None:
        if self.ema_scope == "head":
            self.heads.teacher.update(self.heads.student)
        else:
            self.teacher.update(self.net)

    def embed_crops(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(student z, teacher z) of a flat batch of crops (N, C, X, Y, Z): one backbone call for all."""
        if self.ema_scope == "head":
            e = self.backbone.embed(x)
            return self.heads.student(self.heads.dropout(e)), self.heads.teacher(e)
        zs = self.net.head(self.dropout(self.net.backbone.embed(x)))
        return zs, self.teacher(x)

    def forward(self, random: torch.Tensor, bases: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """random (B, S, C, ...), bases (B, K, C, ...) -> student/teacher embeddings of both, (B, S|K, D)."""
        b, s, k = random.shape[0], random.shape[1], bases.shape[1]
        x = torch.cat([random.flatten(0, 1), bases.flatten(0, 1)])  # random crops first, as upstream
        zs, zt = self.embed_crops(x)
        zs, zt = zs.float(), zt.float()
        return (zs[: b * s].unflatten(0, (b, s)), zs[b * s:].unflatten(0, (b, k)),
                zt[: b * s].unflatten(0, (b, s)), zt[b * s:].unflatten(0, (b, k)))


def embed_dim(backbone: nn.Module) -> int:
    dim = getattr(backbone, "embed_dim", None)
    if isinstance(dim, int):
        return dim
    raise AttributeError("the backbone must expose `embed_dim` (the pooled embedding size)")


@torch.no_grad()
def predict_positions(model: VoCoModel, views: Views | list[Views]) -> torch.Tensor:
    """Predicted position matrix P = ReLU(cos(student(random), teacher(bases))): (S, K), or (B, S, K) for a list.

    The heads' BatchNorm always uses the statistics of the crops passed together, so predictions depend
    (a little) on which volumes are predicted together; predict a list to use batch statistics over all.
    """
    single = isinstance(views, Views)
    batch = collate_views([views] if single else list(views))
    was = model.training
    model.eval()
    dev = next(model.parameters()).device
    zs_r, _, _, zt_b = model(batch.random.to(dev), batch.bases.to(dev))
    model.train(was)
    p = similarity(zs_r, zt_b).cpu()
    return p[0] if single else p


def position_metrics(pred: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Top-1 accuracy (predicted base = most-overlapped base) and mean |label − prediction|."""
    top1 = (pred.argmax(-1) == labels.argmax(-1)).float().mean().item()
    return {"top1": top1, "mae": (labels - pred).abs().mean().item(), "chance": 1.0 / labels.shape[-1]}


def evaluate(model: VoCoModel, views: list[Views], batch_size: int) -> dict[str, float]:
    """Position prediction on the fixed held-out views, in fixed batches of `batch_size` volumes."""
    preds = [predict_positions(model, views[i:i + batch_size]) for i in range(0, len(views), batch_size)]
    labels = torch.stack([v.labels for v in views])
    return position_metrics(torch.cat(preds), labels)


# ------------------------------------------------------------------------------------------------ optim
def warmup_cosine(step: int, warmup: int, total: int) -> float:
    """lr factor: t/W during warmup, then ½(1 + cos(π(t − W)/(T − W))), and 0 from T on (spec §5.1)."""
    if step < warmup:
        return step / max(1, warmup)
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


def build_optimizer(model: VoCoModel, cfg: Profile) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    t = cfg.train
    params = [p for p in model.parameters() if p.requires_grad]  # the EMA teacher has none
    opt = torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay, amsgrad=t.amsgrad)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, t.warmup_steps, cfg.steps))
    return opt, sched


# ------------------------------------------------------------------------------------------------ runtime
def tune_allocator() -> bool:
    """glibc: keep freed blocks instead of unmapping them (a Swin step allocates GBs; ≈1.7x on 2 cores)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(-4, 0)) and bool(libc.mallopt(-1, 1 << 30))  # M_MMAP_MAX, M_TRIM_THRESHOLD
    except OSError:
        return False


def rng_state() -> dict[str, Any]:
    """RNG states as plain tensors/lists so checkpoints load with weights_only=True."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    out = {"torch": torch.get_rng_state(), "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)),
                                                      *np_state[2:]],
           "python": [py_state[0], list(py_state[1]), py_state[2]]}
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state()
    return out


def set_rng_state(s: dict[str, Any]) -> None:
    torch.set_rng_state(s["torch"])
    n = s["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), *n[2:]))
    p = s["python"]
    random.setstate((p[0], tuple(p[1]), p[2]))
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state(s["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (1 << 32))
    torch.manual_seed(seed)


# ------------------------------------------------------------------------------------------------ run dir
def checkpoint_paths(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary files are hidden dot-files and never listed)."""
    return sorted((run_dir / "checkpoints").glob("step_*.pt"))


def save_checkpoint(run_dir: Path, state: dict[str, Any], step: int, keep_last: int) -> Path:
    """Write to a hidden temp file, fsync, rename: a reader never sees a partial `step_*.pt`."""
    path = run_dir / "checkpoints" / f"step_{step:08d}.pt"
    with atomic_write(path) as f:
        torch.save(state, f)
    for old in checkpoint_paths(run_dir)[:-keep_last] if keep_last > 0 else []:
        old.unlink(missing_ok=True)
    return path


def _truncate_jsonl(path: Path, before_step: int) -> None:
    """On resume, drop lines a killed run wrote after its last checkpoint (they are recomputed)."""
    if not path.is_file():
        return
    keep = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] < before_step]
    write_text(path, "\n".join(keep) + "\n" if keep else "")


def _config_changes(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> dict[str, tuple[Any, Any]]:
    out: dict[str, tuple[Any, Any]] = {}
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out.update(_config_changes(a, b, f"{prefix}{k}."))
        elif (list(a) if isinstance(a, (list, tuple)) else a) != (list(b) if isinstance(b, (list, tuple)) else b):
            out[prefix + k] = (a, b)
    return out


# ------------------------------------------------------------------------------------------------ the loop
class _Stop:
    """SIGTERM/SIGINT set a flag; the loop checkpoints at the end of the current step and exits."""

    def __init__(self):
        self.requested = False
        self._old: dict[int, Any] = {}

    def __enter__(self):
        for s in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[s] = signal.signal(s, self._handle)
            except ValueError:  # not the main thread (e.g. a notebook worker): no signal handling
                pass
        return self

    def _handle(self, signum, frame):
        self.requested = True

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)


def _perf_memory(device: torch.device) -> dict[str, float]:
    if device.type == "cuda":
        return {"gpu_mem_gb": torch.cuda.max_memory_allocated(device) / 2**30}
    import resource

    return {"cpu_maxrss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def train(cfg: Profile, data: str, out: str | Path, resume: bool = False, show_progress: bool = True) -> Path:
    """Run (or resume) pre-training into run directory `out`; returns it. Works as one process or under torchrun."""
    rt = init_runtime()
    out = Path(out)
    t = cfg.train
    if t.amp not in ("off", "bf16", "fp16"):
        raise ValueError(f"train.amp must be off | bf16 | fp16, got {t.amp!r}")
    amp = t.amp if rt.device.type == "cuda" else "off"
    if rt.device.type == "cpu" and t.tune_allocator:
        tune_allocator()
    ckpts = checkpoint_paths(out) if resume else []
    if resume and not ckpts:
        raise FileNotFoundError(f"--resume: no checkpoint in {out / 'checkpoints'}; start without --resume")
    if not resume and (out / "metrics.jsonl").exists():
        raise ValueError(f"{out} already holds a run; pass --resume to continue it or choose a new --out")
    if rt.main:
        for sub in ("checkpoints", "figures", "tb"):
            (out / sub).mkdir(parents=True, exist_ok=True)
        for tmp in (out / "checkpoints").glob(".*.tmp"):  # left by a killed run
            tmp.unlink()
        write_text(out / "config.yaml", yaml.safe_dump(to_dict(cfg), sort_keys=False))

    # model, optimizer: same seed on every rank -> identical initial weights (DDP also broadcasts them)
    seed_everything(t.seed)
    model = VoCoModel(cfg).to(rt.device)
    if t.sync_bn and rt.distributed and rt.device.type == "cuda":  # SyncBatchNorm has no CPU kernel
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    opt, sched = build_optimizer(model, cfg)
    scaler = torch.amp.GradScaler("cuda", enabled=amp == "fp16")
    if t.compile:
        model.encoder.compile()
    seed_everything(t.seed + 1 + rt.rank)  # per-rank stream for the embedding dropout

    # data
    with main_first(rt):  # rank 0 fills the preprocessing cache, the others then read it
        vols, held = build_volumes(data, cfg)
        for v in (vols, held) if rt.main else ():
            if hasattr(v, "warm"):
                v.warm(show_progress)
    dataset = ViewsDataset(vols, cfg.views, region_mode_of(cfg), t.seed)
    eval_views = held_out_views(held, cfg)

    start = 0
    if ckpts:
        state = torch.load(ckpts[-1], map_location="cpu", weights_only=True)
        if state["world"] * state["accum"] != rt.world * t.accum:
            raise ValueError(f"{ckpts[-1]}: saved with world·accum = {state['world'] * state['accum']}, "
                             f"now {rt.world * t.accum}; resume with the same number of processes × train.accum")
        changed = _config_changes(state["config"], to_dict(cfg))
        if changed and rt.main:
            print(f"resuming with a changed config (was -> now): {changed}", flush=True)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"][rt.rank])
        start = int(state["step"])
        order = InfiniteOrder(len(vols), cfg.batch_size, t.seed, rt.world, rt.rank, t.accum)
        order.load_state_dict(state["data"])
        if rt.main:
            _truncate_jsonl(out / "metrics.jsonl", start + 1)
    else:
        order = InfiniteOrder(len(vols), cfg.batch_size, t.seed, rt.world, rt.rank, t.accum)
    ddp = wrap_ddp(model, rt)

    eff_batch = cfg.batch_size * t.accum * rt.world
    if rt.main:
        print(f"voco pretrain: profile {cfg.name}, {len(vols)} volumes, {rt.world} process(es) on {rt.device.type}, "
              f"effective batch {eff_batch} volumes ({cfg.batch_size} × accum {t.accum} × {rt.world}), "
              f"lr {t.lr:g} (warmup {t.warmup_steps}, cosine to step {cfg.steps}), amp {amp}, "
              f"{'resuming at step ' + str(start) if start else 'from scratch'} -> {out}", flush=True)
    writer = None
    if rt.main:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(out / "tb"), purge_step=start if start else None)
    metrics_f = open(out / "metrics.jsonl", "a") if rt.main else None

    def log(rec: dict[str, Any]) -> None:
        if not rt.main:
            return
        metrics_f.write(json.dumps(rec) + "\n")
        metrics_f.flush()
        for k, v in rec.items():
            if isinstance(v, (int, float)) and k != "step":
                writer.add_scalar(f"{rec['kind']}/{k}", v, rec["step"])
        for k, v in rec.get(PERF_KEY, {}).items():
            writer.add_scalar(f"perf/{k}", v, rec["step"])

    def do_eval(step: int) -> dict[str, float]:
        m = evaluate(model, eval_views, cfg.batch_size)
        log({"kind": "eval", "step": step, **m})
        return m

    def checkpoint(step: int) -> None:
        order.next_step = step
        if rt.distributed:
            check_ranks_in_sync(model)
        rngs = gather_objects(rng_state(), rt)
        if rt.main:
            state = {"step": step, "model": model.state_dict(), "optimizer": opt.state_dict(),
                     "scheduler": sched.state_dict(), "scaler": scaler.state_dict(), "rng": rngs,
                     "data": order.state_dict(), "world": rt.world, "accum": t.accum, "config": to_dict(cfg)}
            save_checkpoint(out, state, step, t.keep_last)
        barrier(rt)

    autocast = (torch.autocast("cuda", dtype=torch.bfloat16 if amp == "bf16" else torch.float16)
                if amp != "off" else contextlib.nullcontext())
    loader = make_loader(dataset, order, cfg.data.workers, pin_memory=rt.device.type == "cuda")
    batches = iter(loader)
    model.train()
    if start == 0:
        do_eval(0)
    from tqdm.auto import tqdm

    bar = tqdm(total=cfg.steps, initial=start, disable=not (rt.main and show_progress), desc="pretrain",
               dynamic_ncols=True)
    step = start
    window_t, window_n = time.perf_counter(), 0
    with _Stop() as stop:
        while step < cfg.steps:
            t0 = time.perf_counter()
            data_s = 0.0
            model.ema_update()  # once per optimizer step, before the teacher is used (spec §4)
            terms = {"loss": 0.0, "intra": 0.0, "inter": 0.0, "reg": 0.0}
            for a in range(t.accum):
                td = time.perf_counter()
                views = views_to(next(batches), rt.device)
                data_s += time.perf_counter() - td
                sync = ddp.no_sync() if rt.distributed and a < t.accum - 1 else contextlib.nullcontext()
                with sync:
                    with autocast:
                        emb = ddp(views.random, views.bases)
                    losses = voco_loss(*emb, views.labels, cfg.loss)
                    scaler.scale(losses["loss"] / t.accum).backward()
                for k in terms:
                    terms[k] += losses[k].item() / t.accum
            scaler.unscale_(opt)
            params = [p for p in model.parameters() if p.requires_grad]
            grad_norm = torch.nn.utils.clip_grad_norm_(params, t.clip if t.clip > 0 else float("inf"))
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=True)
            lr = sched.get_last_lr()[0]
            sched.step()
            step += 1
            window_n += 1
            if rt.distributed:
                vec = torch.tensor([*terms.values(), float(stop.requested)], device=rt.device)
                dist.all_reduce(vec)
                terms = {k: v / rt.world for k, v in zip(terms, vec[:-1].tolist())}
                stop.requested = bool(vec[-1].item())
            step_s = time.perf_counter() - t0
            if rt.main:
                bar.update(1)
                bar.set_postfix(loss=f"{terms['loss']:.4f}", intra=f"{terms['intra']:.3f}",
                                inter=f"{terms['inter']:.3f}", reg=f"{terms['reg']:.3f}", lr=f"{lr:.2e}",
                                sps=f"{eff_batch / step_s:.2f}")
            if step % t.log_every == 0 or step == cfg.steps:
                elapsed = time.perf_counter() - window_t
                perf = {"samples_per_s": eff_batch * window_n / elapsed, "step_s": step_s, "data_s": data_s,
                        **_perf_memory(rt.device)}
                log({"kind": "train", "step": step, **terms, "lr": lr, "grad_norm": float(grad_norm),
                     PERF_KEY: perf})
                window_t, window_n = time.perf_counter(), 0
            if step % t.eval_every == 0 or step == cfg.steps:
                do_eval(step)
            if step % t.checkpoint_every == 0 or step == cfg.steps or stop.requested:
                checkpoint(step)
            if stop.requested:
                if rt.main:
                    print(f"\nstopped by a signal at step {step}; continue with --resume", flush=True)
                break
    bar.close()
    if rt.main:
        metrics_f.close()
        writer.close()
        if step == cfg.steps:
            from voco_lib.checkpoints import export_encoder

            export_encoder(model.encoder, out / "encoder.pt")
            from voco_lib.viz import plot_metrics

            plot_metrics(out / "metrics.jsonl", out / "figures")  # figures/metrics.png
    shutdown(rt)
    return out


# ------------------------------------------------------------------------------------------------ API
def run_pretraining(profile: str | None = None, data: str = "phantom", out: str | Path = "runs/pretrain",
                    overrides: Sequence[str] | dict[str, str] | None = None, resume: bool = False,
                    show_progress: bool = True) -> Path:
    """The notebooks' entry point: resolve the profile (+ overrides, `method=cvpr`), train, return the run dir."""
    return train(resolve(profile, overrides), data, out, resume=resume, show_progress=show_progress)


def load_run(run_dir: str | Path, checkpoint: str | Path | None = None, device: str = "cpu") -> VoCoModel:
    """The trained VoCo model of a run (newest checkpoint unless given), in eval mode, for `predict_positions`."""
    run_dir = Path(run_dir)
    cfg_path = run_dir / "config.yaml"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{cfg_path} not found: {run_dir} is not a pre-training run directory")
    cfg = profile_from_dict(yaml.safe_load(cfg_path.read_text()))
    ckpts = [Path(checkpoint)] if checkpoint else checkpoint_paths(run_dir)
    if not ckpts:
        raise FileNotFoundError(f"no checkpoint in {run_dir / 'checkpoints'}; train first (voco pretrain --out {run_dir})")
    model = VoCoModel(cfg)
    model.load_state_dict(torch.load(ckpts[-1], map_location="cpu", weights_only=True)["model"])
    return model.to(device).eval()


def read_metrics(run_dir: str | Path, kind: str | None = None) -> list[dict[str, Any]]:
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    recs = [json.loads(ln) for ln in lines if ln.strip()]
    return [r for r in recs if kind is None or r["kind"] == kind]


def cli_pretrain(args: argparse.Namespace) -> int:
    """`voco pretrain --profile P --data phantom|samples|DATALIST --out RUN_DIR [--resume] [key=value ...]`."""
    run_pretraining(args.profile, args.data, args.out, args.overrides, resume=args.resume)
    return 0
