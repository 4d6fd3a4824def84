"""VoCo pre-training: the model, its training step, and a run on the one loop (`voco_lib.loop.fit`).

The step (Wu, Zhuang, Chen, "Large-Scale 3D Medical Image Pre-training with Geometric Context Priors",
TPAMI; the authors' `Luffy03/Large-Scale-Medical: Self-supervised/models/voco_head.py` at commit 1ad538b,
L211-294), in `training_step`:
1. EMA teacher: θ_t ← m·θ_t + (1 − m)·θ_s (m = 0.9), once per optimizer step, before the teacher is used.
   The teacher gets no gradient (stop-gradient): it is a slowly moving target that keeps the student's
   similarities from collapsing to a constant.
2. One encoder call over all crops of the batch (S random + K base crops per volume), pooled multi-scale.
3. Student head on the embeddings after dropout (the "feature augmentation"), teacher head on clean ones.
4. `voco_loss`: intra (position of each random crop among its volume's bases), inter (the next volume's
   bases, student vs teacher similarities) and the base-crop regulariser.
Everything else (precision, accumulation, DDP, signals, logs, checkpoints, resume) is `voco_lib.loop`.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from voco_lib.backbone import build_backbone
from voco_lib.config import LossConfig, Profile, profile_from_dict, resolve, to_dict
from voco_lib.crops import Views, collate_views
from voco_lib.data.loader import (InfiniteOrder, ViewsDataset, build_volumes, held_out_views, make_loader,
                                  region_mode_of, views_to)
from voco_lib.distributed import init_runtime, main_first, shutdown
from voco_lib.heads import EMATeacher, EmbeddingDropout, ProjectionHead
from voco_lib.loop import LoopSpec, adamw, fit, seed_everything, tune_allocator
from voco_lib.losses import similarity, voco_loss
from voco_lib.runs import checkpoint_paths, latest_checkpoint, open_run, read_config, read_metrics

__all__ = ["VoCoModel", "training_step", "run_pretraining", "load_run", "read_metrics", "predict_positions",
           "checkpoint_paths"]


# ------------------------------------------------------------------------------------------------ model
class _Embedder(nn.Module):
    """Backbone + projection head as one network: what the CVPR teacher is an EMA copy of."""

    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone.embed(x))


class VoCoModel(nn.Module):
    """Encoder + student head + EMA teacher. `forward(random, bases)` returns the four embeddings.

    ema_scope "head" (TPAMI): one shared backbone; the teacher is an EMA copy of the student head.
    ema_scope "full" (CVPR, `Luffy03/VoCo: models/voco_head.py`): the teacher copies backbone + head.
    """

    def __init__(self, cfg: Profile):
        super().__init__()
        self.ema_scope = cfg.train.ema_scope
        self.backbone = build_backbone(cfg.feature_size, cfg.views.out_size or cfg.views.crop_size,
                                       grad_checkpoint=cfg.train.grad_checkpoint)
        h = cfg.heads
        self.student = ProjectionHead(self.backbone.embed_dim, h.hidden_dim, h.out_dim)
        self.dropout = EmbeddingDropout(h.dropout_p, h.dropout_mode)
        online = self.student if self.ema_scope == "head" else _Embedder(self.backbone, self.student)
        self.teacher = EMATeacher(online, h.ema_momentum, h.teacher_init)
        self._online = [online]  # not a submodule: its parameters are already registered above

    @property
    def encoder(self) -> nn.Module:
        """The student backbone: what gets exported."""
        return self.backbone

    @property
    def online(self) -> nn.Module:
        """What the teacher is an EMA of: the student head (TPAMI) or backbone + head (CVPR)."""
        return self._online[0]

    @torch.no_grad()
    def ema_update(self) -> None:
        self.teacher.update(self.online)

    def forward(self, random: torch.Tensor, bases: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """random (B, S, C, ...), bases (B, K, C, ...) -> student/teacher embeddings of both, (B, S|K, D)."""
        b, s, k = random.shape[0], random.shape[1], bases.shape[1]
        x = torch.cat([random.flatten(0, 1), bases.flatten(0, 1)])  # random crops first, as upstream
        e = self.backbone.embed(x)  # one encoder call for every crop
        zs = self.student(self.dropout(e)).float()
        zt = self.teacher(e if self.ema_scope == "head" else x).float()  # TPAMI: teacher head on clean e
        return (zs[: b * s].unflatten(0, (b, s)), zs[b * s:].unflatten(0, (b, k)),
                zt[: b * s].unflatten(0, (b, s)), zt[b * s:].unflatten(0, (b, k)))


def training_step(net: nn.Module, model: VoCoModel, views: Views, loss_cfg: LossConfig,
                  first_micro: bool) -> dict[str, torch.Tensor]:
    """One VoCo step on a batch of views; `net` is `model` as trained (DDP-wrapped under torchrun)."""
    if first_micro:
        model.ema_update()  # once per optimizer step, before the teacher is used
    zs_rand, zs_base, zt_rand, zt_base = net(views.random, views.bases)
    with torch.autocast(views.random.device.type, enabled=False):  # similarities and logs in float32
        return voco_loss(zs_rand, zs_base, zt_rand, zt_base, views.labels, loss_cfg)


# ------------------------------------------------------------------------------------------------ evaluation
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


# ------------------------------------------------------------------------------------------------ the run
def train(cfg: Profile, data: str, out: str | Path, resume: bool | str = False, overwrite: bool = False,
          show_progress: bool = True) -> Path:
    """Run (or resume) pre-training into run directory `out`; returns it. One process or one torchrun rank."""
    rt = init_runtime()
    t = cfg.train
    if rt.device.type == "cpu" and t.tune_allocator:
        tune_allocator()
    with open_run(out, {"kind": "pretrain", "data": str(data), "profile": to_dict(cfg)}, resume, overwrite,
                  rt.main) as run:
        seed_everything(t.seed)  # the same on every rank: identical initial weights
        model = VoCoModel(cfg).to(rt.device)
        if t.sync_bn and rt.distributed and rt.device.type == "cuda":  # SyncBatchNorm has no CPU kernel
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        opt, sched = adamw(model, t.lr, t.weight_decay, t.warmup_steps, cfg.steps, amsgrad=t.amsgrad)
        if t.compile:
            model.encoder.compile()
        seed_everything(t.seed + 1 + rt.rank)  # per-rank stream for the embedding dropout
        with main_first(rt):  # rank 0 fills the preprocessing cache, the others then read it
            vols, held = build_volumes(data, cfg, run.path)
            for v in (vols, held) if rt.main else ():
                if hasattr(v, "warm"):
                    v.warm(show_progress)
        order = InfiniteOrder(len(vols), cfg.batch_size, t.seed, rt.world, rt.rank, t.accum)
        dataset = ViewsDataset(vols, cfg.views, region_mode_of(cfg), t.seed)
        eval_views = held_out_views(held, cfg)
        spec = LoopSpec(cfg.steps, t.accum, t.clip, t.amp, t.log_every, t.eval_every, t.checkpoint_every,
                        t.keep_last, eval_kind="eval", global_batch=cfg.batch_size * t.accum * rt.world,
                        desc="pretrain")
        if rt.main:
            _print_start(cfg, spec, len(vols), rt, run.start_step, run.path)
        fit(model, lambda net, batch, step, micro: training_step(net, model, views_to(batch, rt.device), cfg.loss,
                                                                 micro == 0),
            opt, sched, run, rt, spec, batches=make_loader(dataset, order, cfg.data.workers, rt.device.type == "cuda"),
            evaluate=lambda step: evaluate(model, eval_views, cfg.batch_size),
            extra_state={"data": (lambda step: _order_state(order, step), order.load_state_dict)},
            show_progress=show_progress)
        if rt.main:
            _finish(model, run.path)
    shutdown(rt)
    return Path(out)


def _order_state(order: InfiniteOrder, step: int) -> dict[str, int]:
    order.next_step = step
    return order.state_dict()


def _print_start(cfg: Profile, spec: LoopSpec, n_volumes: int, rt: Any, start: int, out: Path) -> None:
    amp = spec.amp if rt.device.type == "cuda" else "off"
    print(f"voco pretrain: profile {cfg.name}, {n_volumes} volumes, {rt.world} process(es) on {rt.device.type}, "
          f"effective batch {spec.global_batch} volumes ({cfg.batch_size} × accum {spec.accum} × {rt.world}), "
          f"lr {cfg.train.lr:g} (warmup {cfg.train.warmup_steps}, cosine to step {cfg.steps}), amp {amp}, "
          f"{'resuming at step ' + str(start) if start else 'from scratch'} -> {out}", flush=True)


def _finish(model: VoCoModel, out: Path) -> None:
    """The released-layout encoder.pt and figures/metrics.png of a finished run."""
    from voco_lib.checkpoints import export_encoder
    from voco_lib.viz import plot_metrics

    export_encoder(model.encoder, out / "encoder.pt")
    plot_metrics(out / "metrics.jsonl", out / "figures")


# ------------------------------------------------------------------------------------------------ API
def run_pretraining(profile: str | None = None, data: str = "phantom", out: str | Path = "runs/pretrain",
                    overrides: Sequence[str] | dict[str, str] | None = None, resume: bool | str = False,
                    overwrite: bool = False, show_progress: bool = True) -> Path:
    """The notebooks' entry point: resolve the profile (+ overrides, `method=cvpr`), train, return the run dir."""
    return train(resolve(profile, overrides), data, out, resume=resume, overwrite=overwrite,
                 show_progress=show_progress)


def load_run(run_dir: str | Path, checkpoint: str | Path | None = None, device: str = "cpu") -> VoCoModel:
    """The trained VoCo model of a run (newest readable checkpoint unless given), in eval mode."""
    run_dir = Path(run_dir)
    config = read_config(run_dir)
    if config.get("kind") != "pretrain":
        raise ValueError(f"{run_dir} is a {config.get('kind')} run, not a pre-training run")
    model = VoCoModel(profile_from_dict(config["profile"]))
    if checkpoint is not None:
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    else:
        found = latest_checkpoint(run_dir, set_aside=False)
        if found is None:
            raise FileNotFoundError(f"no readable checkpoint in {run_dir / 'checkpoints'}; train first "
                                    f"(voco pretrain --out {run_dir})")
        state = found[1]
    model.load_state_dict(state["model"])
    return model.to(device).eval()


def cli_pretrain(args: argparse.Namespace) -> int:
    """`voco pretrain --profile P --data phantom|samples|DATALIST --out RUN_DIR [--resume|--overwrite] [k=v ...]`."""
    run_pretraining(args.profile, args.data, args.out, args.overrides, resume=args.resume,
                    overwrite=getattr(args, "overwrite", False))
    return 0
