"""Pre-training: any method of `voco_lib.methods` (`method=NAME`, default `voco`) on the one loop (`voco_lib.loop.fit`).

A method brings its model, step and pretext evaluation; this module builds the run around it (data order,
views, optimizer, schedule, held-out views, the start line with the equal-budget figure, the exported
`encoder.pt`). Everything else (precision, accumulation, DDP, signals, logs, checkpoints, resume) is
`voco_lib.loop`. VoCo's own model and step live in `voco_lib.methods.voco` and are re-exported here.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from voco_lib.config import Profile, profile_from_dict, resolve, to_dict
from voco_lib.data.loader import (InfiniteOrder, ViewsDataset, build_volumes, held_out_views, make_loader,
                                  region_mode_of, views_to)
from voco_lib.distributed import init_runtime, main_first, shutdown
from voco_lib.loop import LoopSpec, adamw, fit, seed_everything, tune_allocator
from voco_lib.methods import Method, budget, get_method
from voco_lib.methods.voco import VoCoModel, evaluate, position_metrics, predict_positions, training_step
from voco_lib.runs import checkpoint_paths, latest_checkpoint, open_run, read_config, read_metrics

__all__ = ["VoCoModel", "training_step", "run_pretraining", "load_run", "read_metrics", "predict_positions",
           "position_metrics", "evaluate", "checkpoint_paths"]


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
        method = get_method(cfg.method)
        model = method.build_model(cfg).to(rt.device)
        if t.sync_bn and rt.distributed and rt.device.type == "cuda":  # SyncBatchNorm has no CPU kernel
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        opt, sched = adamw(model, t.lr, t.weight_decay, t.warmup_steps, cfg.steps, amsgrad=t.amsgrad)
        if t.compile:
            model.encoder.compile()
        seed_everything(t.seed + 1 + rt.rank)  # per-rank stream for dropout, masks, rotations, cut-outs
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
        fit(model, lambda net, batch, step, micro: _terms(method, net, model, views_to(batch, rt.device), micro),
            opt, sched, run, rt, spec, batches=make_loader(dataset, order, cfg.data.workers, rt.device.type == "cuda"),
            evaluate=lambda step: method.evaluate(model, eval_views, cfg.batch_size),
            extra_state={"data": (lambda step: _order_state(order, step), order.load_state_dict)},
            show_progress=show_progress)
        if rt.main:
            _finish(method, model, run.path)
    shutdown(rt)
    return Path(out)


def _terms(method: Method, net: nn.Module, model: nn.Module, views: Any, micro: int) -> dict[str, torch.Tensor]:
    loss, logs = method.step(net, model, views, micro == 0)
    return {"loss": loss, **logs}


def _order_state(order: InfiniteOrder, step: int) -> dict[str, int]:
    order.next_step = step
    return order.state_dict()


def _print_start(cfg: Profile, spec: LoopSpec, n_volumes: int, rt: Any, start: int, out: Path) -> None:
    amp = spec.amp if rt.device.type == "cuda" else "off"
    print(f"voco pretrain: method {cfg.method}, profile {cfg.name}, {n_volumes} volumes, "
          f"{rt.world} process(es) on {rt.device.type}, "
          f"effective batch {spec.global_batch} volumes ({cfg.batch_size} × accum {spec.accum} × {rt.world}), "
          f"lr {cfg.train.lr:g} (warmup {cfg.train.warmup_steps}, cosine to step {cfg.steps}), amp {amp}, "
          f"{budget(cfg, spec.global_batch)}, "
          f"{'resuming at step ' + str(start) if start else 'from scratch'} -> {out}", flush=True)


def _finish(method: Method, model: nn.Module, out: Path) -> None:
    """The released-layout encoder.pt and figures/metrics.png of a finished run."""
    from voco_lib.viz import plot_metrics

    method.export(model, out / "encoder.pt")
    plot_metrics(out / "metrics.jsonl", out / "figures")


# ------------------------------------------------------------------------------------------------ API
def run_pretraining(profile: str | None = None, data: str = "phantom", out: str | Path = "runs/pretrain",
                    overrides: Sequence[str] | dict[str, str] | None = None, resume: bool | str = False,
                    overwrite: bool = False, show_progress: bool = True) -> Path:
    """The notebooks' entry point: resolve the profile (+ overrides, `method=NAME`), train, return the run dir."""
    return train(resolve(profile, overrides), data, out, resume=resume, overwrite=overwrite,
                 show_progress=show_progress)


def load_run(run_dir: str | Path, checkpoint: str | Path | None = None, device: str = "cpu") -> nn.Module:
    """The trained model of a run, its method's (newest readable checkpoint unless given), in eval mode."""
    run_dir = Path(run_dir)
    config = read_config(run_dir)
    if config.get("kind") != "pretrain":
        raise ValueError(f"{run_dir} is a {config.get('kind')} run, not a pre-training run")
    cfg = profile_from_dict(config["profile"])
    model = get_method(cfg.method).build_model(cfg)
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
    """`voco pretrain --profile P --data phantom|samples|DATALIST --out RUN_DIR [--resume|--overwrite] [k=v ...]`;
    `method=omni` is VoComni's pre-training (`voco_lib.omni.cli_omni`)."""
    if _wants_omni(args.overrides or []):
        try:
            from voco_lib.omni import cli_omni
        except ModuleNotFoundError as e:
            if e.name != "voco_lib.omni":
                raise
            raise RuntimeError("method=omni: omni not available (no voco_lib.omni in this installation); use "
                               "another method (voco, voco-cvpr, voco-single, mae, swin-ssl)") from None
        return cli_omni(args)
    run_pretraining(args.profile, args.data, args.out, args.overrides, resume=args.resume,
                    overwrite=getattr(args, "overwrite", False))
    return 0


def _wants_omni(overrides: Sequence[str]) -> bool:
    return any(o.split("=", 1)[0].strip() == "method" and o.split("=", 1)[-1].strip().lower() == "omni"
               for o in overrides)
