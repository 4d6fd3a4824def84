"""Fine-tuning: a task type's `Runner` (data, model, loss, evaluation) on the one loop (`voco_lib.loop.fit`).

What is here, once for the four task types:
- init: `scratch`, a released checkpoint by name (`voco-b`, `VoCo_B_SSL_head`), a pre-training run directory
  (its `encoder.pt`, released layout) or a file; loaded with `checkpoints.load_encoder` and its coverage
  report kept in `results.json`;
- AdamW + linear-warmup cosine stepped per iteration (the authors' fine-tuning recipe); every draw seeded;
  `finetune.protocol=full` trains everything (with `encoder_lr_scale` / `layer_decay`: the encoder's parameter
  groups of `probe.param_groups`), `frozen` fixes the encoder and trains a linear read-out (`probe`);
- the run directory (`voco_lib.runs`: config.yaml with the init's sha256, metrics.jsonl, checkpoints/) and
  `results.json` (final metrics + provenance: task, init, checkpoint sha256, seed, profile, n_labeled,
  protocol, the split the metric is on);
- torchrun: every rank draws the step's global batch from the same generator and trains on its share
  (`Context.share`); rank 0 validates and writes. Two ranks compute what one process with
  `finetune.accum=2` computes (tests/test_finetune_ddp.py).
"""

from __future__ import annotations

import json
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from voco_lib.config import FinetuneConfig, Profile, profile_from_dict, resolve, to_dict
from voco_lib.distributed import broadcast_object, init_runtime, main_first, shutdown
from voco_lib.files import sha256, write_text
from voco_lib.loop import LoopSpec, adamw, autocast_for, fit, seed_everything, tune_allocator
from voco_lib.runs import Run, json_safe, latest_checkpoint, open_run, read_config, read_metrics
from voco_lib.tasks.probe import FROZEN_TYPES, param_groups
from voco_lib.tasks.registry import Task, load_task, task_from_dict

RELEASED = {"voco-b": "VoCo_B_SSL_head", "voco-l": "VoCo_L_SSL_head", "voco-h": "VoCo_H_SSL_head"}
FT_TIMEOUT_MIN = 60.0  # torchrun: how long the other ranks may wait for rank 0's validation


# ------------------------------------------------------------------------------------------------ config
@dataclass
class Context:
    """What a runner needs: the task, the resolved profile, the run's seed and label budget, the device."""

    task: Task
    cfg: Profile
    seed: int
    n_labeled: int | None
    datalist: str | None
    device: torch.device
    feature_size: int
    world: int = 1  # torchrun processes
    rank: int = 0
    accum: int = 1  # micro-batches per optimizer step (finetune.accum)

    @property
    def fc(self) -> FinetuneConfig:
        return self.cfg.finetune

    @property
    def roi(self) -> tuple[int, int, int]:
        return tuple(self.fc.roi or self.task.roi)  # type: ignore[return-value]

    @property
    def lr(self) -> float:
        return float(self.fc.lr or self.task.lr)

    @property
    def global_batch(self) -> int:
        """Samples per optimizer step: `finetune.batch_size` per micro-batch × accum × processes."""
        return self.fc.batch_size * self.accum * self.world

    def share(self, items: Sequence[Any], micro: int = 0) -> Sequence[Any]:
        """Micro-batch `micro`'s part of a step's global batch (drawn whole, identically, on every rank).

        Part v = micro·world + rank, as the pre-training's data order: the samples of a step do not depend on
        how they are split, so 2 ranks × accum 1 == 1 process × accum 2, and 1 × 1 draws what it always drew.
        """
        v, b = micro * self.world + self.rank, self.fc.batch_size
        return items[v * b:(v + 1) * b]

    def generator(self, *key: int) -> torch.Generator:
        """A torch Generator seeded from (run seed, *key): every random draw of the run is reproducible."""
        s = np.random.SeedSequence([self.seed, *key]).generate_state(2, np.uint32)
        return torch.Generator().manual_seed(int((int(s[0]) << 31) ^ int(s[1])))


class Runner:
    """Base of the four task types. Subclasses set `model`, `n_train` and implement `loss` and `evaluate`.

    `loss(net, step, micro)` draws `ctx.global_batch` samples and returns the mean loss over
    `ctx.share(..., micro)` of them, computed with `net` (the model as trained: DDP-wrapped under torchrun).
    A runner that does so sets `shards_batches = True`; the others run in one process without accumulation.
    """

    model: nn.Module
    n_train: int
    shards_batches: bool = False

    def __init__(self, ctx: Context):
        self.ctx = ctx

    def init_target(self) -> nn.Module:
        """The module whose parameters carry MONAI SwinUNETR encoder names (for `load_encoder`)."""
        return self.model

    def loss(self, net: nn.Module, step: int, micro: int) -> torch.Tensor:
        raise NotImplementedError

    def evaluate(self, final: bool = False) -> dict[str, Any]:
        raise NotImplementedError


# ------------------------------------------------------------------------------------------------ init
def resolve_init(init: str | Path | None) -> Path | None:
    """`scratch` -> None; a pre-training run dir -> its `encoder.pt`; a file -> itself; a released name -> fetched file."""
    if init is None or str(init).lower() == "scratch":
        return None
    p = Path(init)
    if p.is_dir():
        enc = p / "encoder.pt"
        if not enc.is_file():
            raise FileNotFoundError(f"{p} is a directory without encoder.pt: pass a finished pre-training run "
                                    "(voco pretrain --out DIR writes DIR/encoder.pt) or a checkpoint file")
        return enc
    if p.is_file():
        return p
    name = RELEASED.get(str(init).lower(), str(init))
    from voco_lib.checkpoints import CheckpointError, fetch_weights

    try:
        return Path(fetch_weights(name))
    except CheckpointError as e:
        raise ValueError(f"--init {init}: not a file, not a run directory; as a released checkpoint name: {e}. "
                         "Use scratch, voco-b|voco-l|voco-h, RUN_DIR or PATH") from None


def checkpoint_feature_size(path: Path) -> int:
    """The encoder width of a checkpoint: the output channels of `swinViT.patch_embed.proj.weight`."""
    from voco_lib.checkpoints import load_checkpoint, normalize_state_dict

    sd = normalize_state_dict(load_checkpoint(path))
    if "swinViT.patch_embed.proj.weight" not in sd:
        raise ValueError(f"{path}: no swinViT.patch_embed.proj.weight: not a Swin encoder checkpoint in the released layout")
    return int(sd["swinViT.patch_embed.proj.weight"].shape[0])


def load_init(target: nn.Module, path: Path, min_coverage: float) -> dict[str, Any]:
    """Load the encoder weights into `target`; the coverage report as plain data (for results.json)."""
    from voco_lib.checkpoints import load_encoder

    r = load_encoder(target, path, min_coverage=min_coverage)
    return {"summary": r.summary(), "kind": r.kind, "coverage": r.coverage, "loaded": len(r.loaded),
            "expected": r.expected, "missing": list(r.missing),
            "mismatched": [[k, list(a), list(b)] for k, a, b in r.mismatched], "unexpected": len(r.unexpected)}


# ------------------------------------------------------------------------------------------------ the run
def run(task: str | Task, runner_cls: type[Runner], init: str | Path | None = "scratch", profile: str | None = None,
        n_labeled: int | None = None, seed: int = 0, out: str | Path | None = None,
        overrides: Sequence[str] | dict[str, str] | None = None, resume: bool | str = False, datalist: str | None = None,
        overwrite: bool = False, show_progress: bool = True) -> dict[str, Any]:
    """Fine-tune `task` with `runner_cls`; returns the results dict that is also written to `results.json`.

    One process, or one rank of `torchrun --nproc_per_node=N` (every rank returns rank 0's results).
    """
    task = load_task(task) if not isinstance(task, Task) else task
    cfg = resolve(profile, overrides)
    _check_task(task, datalist)
    _check_protocol(task, cfg.finetune)
    rt = init_runtime(timeout_min=FT_TIMEOUT_MIN)
    with main_first(rt):  # a released checkpoint is fetched once, by rank 0
        init_path = resolve_init(init)
    prov = _provenance(task, cfg, init, init_path, seed, n_labeled, datalist)
    feature_size = prov["feature_size"]
    out = Path(out or Path("runs") / "finetune" / task.name / f"{Path(prov['init']).name}-n{n_labeled or 'all'}-s{seed}")
    if cfg.train.tune_allocator and rt.device.type == "cpu":
        tune_allocator()
    config = {"kind": "finetune", "provenance": prov, "task": task.raw, "profile": to_dict(cfg)}
    with open_run(out, config, resume, overwrite, rt.main) as r:
        seed_everything(seed)  # the same on every rank: identical initial weights
        fc = cfg.finetune
        ctx = Context(task, cfg, seed, n_labeled, datalist, rt.device, feature_size, rt.world, rt.rank, fc.accum)
        if (rt.world > 1 or fc.accum > 1) and not runner_cls.shards_batches:
            raise ValueError(f"task type {task.type} does not split its batches across processes or micro-batches "
                             "yet: run it as one process (no torchrun) with finetune.accum=1")
        runner = runner_cls(ctx)
        model = runner.model.to(rt.device)
        coverage = None if init_path is None else load_init(
            runner.init_target(), init_path, fc.min_coverage if task.in_channels == 1 else min(fc.min_coverage, 0.9))
        spec = _loop_spec(ctx, runner.n_train)
        opt, sched = adamw(model, ctx.lr, fc.weight_decay, _warmup(ctx, runner.n_train), spec.steps,
                           groups=_groups(runner, ctx))
        if rt.main:
            print(f"voco finetune {task.name}: {rt.world} process(es) on {rt.device.type}, global batch "
                  f"{ctx.global_batch} ({fc.batch_size} × accum {fc.accum} × {rt.world}), lr {ctx.lr:g}, "
                  f"{spec.steps} steps, {'resuming at step ' + str(r.start_step) if r.start_step else 'from step 0'}"
                  f" -> {out}", flush=True)
        t0 = time.time()
        fit(model, lambda net, batch, step, micro: runner.loss(net, step, micro), opt, sched, r, rt, spec,
            evaluate=lambda step: runner.evaluate(final=False), ddp=runner_cls.shards_batches,
            show_progress=show_progress)
        results = _results(runner, r, spec, {**prov, "n_train": runner.n_train, "steps": spec.steps, "lr": ctx.lr,
                                            "roi": list(ctx.roi), "overrides": _override_list(overrides),
                                            "torch": str(torch.__version__), "world_size": rt.world,
                                            "accum": fc.accum, "global_batch": ctx.global_batch,
                                            "protocol": fc.protocol, "recipe": _recipe(ctx, runner.n_train),
                                            "split": {"file": datalist or "phantom", "part": "validation"}},
                           coverage, time.time() - t0) if rt.main else None
    results = broadcast_object(results, rt)
    shutdown(rt)
    return results


def _provenance(task: Task, cfg: Profile, init: str | Path | None, init_path: Path | None, seed: int,
                n_labeled: int | None, datalist: str | None) -> dict[str, Any]:
    """What makes this run this run (stored in config.yaml: a resume must match it, the init's sha256 included)."""
    return {"task": task.name, "type": task.type, "dataset": task.dataset, "datalist": datalist,
            "init": "scratch" if init_path is None else str(init),
            "init_path": None if init_path is None else str(init_path),
            "init_sha256": None if init_path is None else sha256(init_path),
            "feature_size": cfg.feature_size if init_path is None else checkpoint_feature_size(init_path),
            "seed": seed, "profile": cfg.name, "n_labeled": n_labeled}


def _check_task(task: Task, datalist: str | None) -> None:
    if not task.is_phantom and datalist is None:
        raise ValueError(f"task {task.name} needs its data: pass a datalist (MSD-style JSON, see "
                         f"data_manifests/datasets/{task.dataset}.yaml for where to get the data), "
                         "or run a phantom task (phantom-seg, phantom-cls, phantom-reg, phantom-vl, phantom-rg)")
    if task.engine == "nnunet":
        warnings.warn(f"task {task.name}: the paper fine-tunes it with nnU-Net; this run uses our SwinUNETR path "
                      f"instead. For the paper's setting: voco nnunet export {task.name} DATALIST OUT --id N (then "
                      "the printed nnUNetv2 commands)", stacklevel=3)


def _check_protocol(task: Task, fc: FinetuneConfig) -> None:
    if fc.protocol == "frozen" and task.type not in FROZEN_TYPES:
        raise ValueError(f"finetune.protocol=frozen is not supported for task {task.name} (type {task.type}); "
                         f"it supports {', '.join(FROZEN_TYPES)}: use finetune.protocol=full")


def _groups(runner: Runner, ctx: Context) -> list[dict[str, Any]] | None:
    """The optimizer's parameter groups: None (one group at lr) unless the full protocol scales the encoder's lr.
    Under the frozen protocol the encoder must have no trainable parameter (its runner froze it)."""
    fc, encoder = ctx.fc, runner.init_target()
    if fc.protocol == "frozen":
        if any(p.requires_grad for p in encoder.parameters()):
            raise RuntimeError(f"finetune.protocol=frozen: the {ctx.task.type} runner left encoder parameters trainable")
        return None
    if fc.encoder_lr_scale == 1.0 and fc.layer_decay == 1.0:
        return None
    return param_groups(runner.model, encoder, ctx.lr, fc.encoder_lr_scale, fc.layer_decay)


def _recipe(ctx: Context, n_train: int) -> dict[str, Any]:
    fc = ctx.fc
    return {"encoder_lr_scale": fc.encoder_lr_scale, "layer_decay": fc.layer_decay,
            "warmup_steps": _warmup(ctx, n_train), "flip_p": fc.flip_p, "weight_decay": fc.weight_decay}


def _loop_spec(ctx: Context, n_train: int) -> LoopSpec:
    """Steps default to the task's epochs × training volumes (one volume per iteration, as upstream)."""
    fc = ctx.fc
    steps = fc.steps if fc.steps is not None else ctx.task.epochs * n_train
    return LoopSpec(steps, fc.accum, 0.0, fc.amp, fc.log_every, fc.eval_every or max(1, 10 * n_train),
                    fc.checkpoint_every, fc.keep_last, eval_at_end=False, eval_kind="val",
                    global_batch=ctx.global_batch, desc=f"finetune {ctx.task.name}")


def _warmup(ctx: Context, n_train: int) -> int:
    fc = ctx.fc
    return fc.warmup_steps if fc.warmup_steps is not None else ctx.task.warmup_epochs * n_train


def _results(runner: Runner, r: Run, spec: LoopSpec, provenance: dict[str, Any], coverage: dict[str, Any] | None,
             wall_s: float) -> dict[str, Any]:
    """Rank 0: the final evaluation (logged as the last `val` line), the curve, `results.json`."""
    runner.model.eval()
    with torch.no_grad(), autocast_for(spec.amp, runner.ctx.device)():
        final = json_safe(runner.evaluate(final=True))
    r.append_metrics({"kind": "val", "step": spec.steps,
                      **{k: v for k, v in final.items() if not isinstance(v, (list, dict))}})
    vals, key = read_metrics(r.path, "val"), runner.ctx.task.metric
    best = max((v for v in vals if v.get(key) is not None), key=lambda v: v[key], default=None)
    results = {"metrics": final, "metric": key, "value": final.get(key),
               "best": None if best is None else {"step": best["step"], key: best[key]},
               "curve": [{"step": v["step"], key: v.get(key)} for v in vals],
               "coverage": coverage, "wall_s": round(wall_s, 1), **provenance, "run_dir": str(r.path)}
    write_text(r.path / "results.json", json.dumps(results, indent=1))
    return results


def _override_list(overrides: Sequence[str] | dict[str, str] | None) -> list[str]:
    if isinstance(overrides, dict):
        return [f"{k}={v}" for k, v in overrides.items()]
    return list(overrides or [])


def load_run(run_dir: str | Path, runner_cls: type[Runner], checkpoint: str | Path | None = None) -> Runner:
    """Rebuild a finished (or interrupted) run's runner with its newest weights, in eval mode (notebooks, analysis).
    The run's own stored config is used (its profile, whatever VOCO_PROFILE says now)."""
    run_dir = Path(run_dir)
    config = read_config(run_dir)
    if config.get("kind") != "finetune":
        raise ValueError(f"{run_dir} is a {config.get('kind')} run, not a fine-tuning run")
    prov, task = config["provenance"], task_from_dict(config["task"])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    runner = runner_cls(Context(task, profile_from_dict(config["profile"]), prov["seed"], prov["n_labeled"],
                                prov["datalist"], device, prov["feature_size"]))
    found = (Path(checkpoint), torch.load(checkpoint, map_location="cpu", weights_only=True)) if checkpoint \
        else latest_checkpoint(run_dir, set_aside=False)
    if found is None:
        raise FileNotFoundError(f"no readable checkpoint in {run_dir / 'checkpoints'}")
    runner.model.load_state_dict(found[1]["model"])
    runner.model.to(device).eval()
    return runner
