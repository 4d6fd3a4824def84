"""The one fine-tuning loop shared by the four task types: config, init weights, run directory, resume.

A task type supplies a `Runner` (data + model + loss + evaluation); everything else is here, once:
- init: `scratch`, a released checkpoint by name (`voco-b`, `VoCo_B_SSL_head`), a pre-training run directory
  (its `encoder.pt`, released layout) or a file; loaded with `checkpoints.load_encoder` and its coverage
  report kept in `results.json`;
- AdamW + linear-warmup cosine stepped per iteration (spec §7.2); every step seeded;
- run directory: `config.yaml`, `metrics.jsonl` (train loss and validation curves), `checkpoints/`
  (temp file + rename, newest `keep_last` kept), `results.json` (final metrics + provenance: task, init,
  checkpoint sha256, seed, profile, n_labeled); `--resume` continues from the newest checkpoint exactly;
- torchrun (DDP, `voco_lib.distributed`): every rank draws the step's global batch from the same generator and
  trains on its share (`Context.share`), gradients are all-reduced, rank 0 validates and writes. Two ranks
  compute what one process with `finetune.accum=2` computes (tests/test_finetune_ddp.py).
"""

from __future__ import annotations

import contextlib
import json
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import yaml
from torch import nn

from voco_lib.config import FinetuneConfig, Profile, resolve, to_dict
from voco_lib.files import sha256, write_text
from voco_lib.tasks.registry import Task, load_task

RELEASED = {"voco-b": "VoCo_B_SSL_head", "voco-l": "VoCo_L_SSL_head", "voco-h": "VoCo_H_SSL_head"}


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
    micro: int = 0  # the micro-batch being computed (set by the engine)

    @property
    def fc(self) -> FinetuneConfig:
        return self.cfg.finetune

    @property
    def roi(self) -> tuple[int, int, int]:
        return tuple(self.fc.roi or self.task.roi)  # type: ignore[return-value]

    @property
    def small_crop(self) -> str | None:
        """Below 64³ the deepest Swin map is one voxel: use the backbone's "bypass" variant (as pre-training does)."""
        return "bypass" if min(self.roi) < 64 else None

    @property
    def lr(self) -> float:
        return float(self.fc.lr or self.task.lr)

    @property
    def global_batch(self) -> int:
        """Samples per optimizer step: `finetune.batch_size` per micro-batch × accum × processes."""
        return self.fc.batch_size * self.accum * self.world

    def share(self, items: Sequence[Any]) -> Sequence[Any]:
        """This micro-batch's part of a step's global batch (drawn whole, identically, on every rank).

        Part v = micro·world + rank, as the pre-training's data order: the samples of a step do not depend on
        how they are split, so 2 ranks × accum 1 == 1 process × accum 2, and 1 × 1 draws what it always drew.
        """
        v, b = self.micro * self.world + self.rank, self.fc.batch_size
        return items[v * b:(v + 1) * b]

    def generator(self, *key: int) -> torch.Generator:
        """A torch Generator seeded from (run seed, *key): every random draw of the run is reproducible."""
        s = np.random.SeedSequence([self.seed, *key]).generate_state(2, np.uint32)
        return torch.Generator().manual_seed(int((int(s[0]) << 31) ^ int(s[1])))


class Runner:
    """Base of the four task types. Subclasses set `model`, `n_train` and implement `loss` and `evaluate`.

    `loss(step)` draws `ctx.global_batch` samples and computes the mean loss over `ctx.share(...)` of them,
    calling `self.model(...)` (the engine routes that call through the DDP wrapper). A runner that does so
    sets `shards_batches = True`; the others run in one process without accumulation only.
    """

    model: nn.Module
    n_train: int
    shards_batches: bool = False

    def __init__(self, ctx: Context):
        self.ctx = ctx

    def init_target(self) -> nn.Module:
        """The module whose parameters carry MONAI SwinUNETR encoder names (for `load_encoder`)."""
        return self.model

    def loss(self, step: int) -> torch.Tensor:
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


# ------------------------------------------------------------------------------------------------ run dir
def _append_jsonl(path: Path, record: dict[str, Any]) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def _truncate_jsonl(path: Path, last_step: int) -> None:
    """On resume: drop the lines a stopped run wrote after its checkpoint at `last_step` (they are recomputed).

    Lines at `last_step` itself were written before that checkpoint (log, validation, then checkpoint)."""
    if path.is_file():
        keep = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= last_step]
        write_text(path, "".join(k + "\n" for k in keep))


def read_metrics(run_dir: str | Path, kind: str | None = None) -> list[dict[str, Any]]:
    """Lines of a fine-tuning run's metrics.jsonl (`kind`: "train" or "val")."""
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [r for r in (json.loads(ln) for ln in lines if ln.strip()) if kind is None or r["kind"] == kind]


def _scalars(metrics: dict[str, Any]) -> dict[str, Any]:
    """JSON-safe copy (NaN/inf -> None, arrays -> lists)."""
    def clean(v: Any) -> Any:
        if isinstance(v, (np.ndarray, torch.Tensor)):
            return [clean(x) for x in np.asarray(v).tolist()]
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, (float, np.floating)):
            return float(v) if np.isfinite(v) else None
        if isinstance(v, np.integer):
            return int(v)
        return v
    return clean(metrics)


def _override_list(overrides: Sequence[str] | dict[str, str] | None) -> list[str]:
    if isinstance(overrides, dict):
        return [f"{k}={v}" for k, v in overrides.items()]
    return list(overrides or [])


def load_run(run_dir: str | Path, runner_cls: type[Runner], checkpoint: str | Path | None = None) -> Runner:
    """Rebuild a finished (or interrupted) run's runner with its newest weights, in eval mode (notebooks, analysis)."""
    from voco_lib.pretrain import checkpoint_paths

    run_dir = Path(run_dir)
    cfg_file = run_dir / "config.yaml"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{cfg_file} not found: {run_dir} is not a fine-tuning run directory")
    prov = yaml.safe_load(cfg_file.read_text())["provenance"]
    from voco_lib.tasks.registry import task_from_dict

    task = task_from_dict(yaml.safe_load(cfg_file.read_text())["task"])
    cfg = resolve(prov["profile"], prov["overrides"])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    runner = runner_cls(Context(task, cfg, prov["seed"], prov["n_labeled"], prov["datalist"], device, prov["feature_size"]))
    ckpts = [Path(checkpoint)] if checkpoint else checkpoint_paths(run_dir)
    if not ckpts:
        raise FileNotFoundError(f"no checkpoint in {run_dir / 'checkpoints'}")
    runner.model.load_state_dict(torch.load(ckpts[-1], map_location="cpu", weights_only=True)["model"])
    runner.model.to(device).eval()
    return runner


# ------------------------------------------------------------------------------------------------ the loop
def warmup_cosine(step: int, warmup: int, total: int) -> float:
    from voco_lib.pretrain import warmup_cosine as wc

    return wc(step, warmup, total)


FT_TIMEOUT_MIN = 60.0  # torchrun: how long the other ranks may wait for rank 0's validation


def _has_unused_parameters(ctx: Context) -> bool:
    """At a 32³ roi the "bypass" backbone skips encoder10 (its deepest map is one voxel): DDP must be told."""
    return ctx.small_crop == "bypass" and all(r <= 32 for r in ctx.roi)


@contextlib.contextmanager
def _forward_through(runner: Runner, wrapper: nn.Module):
    """Runners call `self.model(...)` in `loss`; under DDP that call must go through the wrapper (its backward
    all-reduces the gradients). Evaluation and checkpoints keep using the bare model."""
    bare = runner.model
    runner.model = wrapper
    try:
        yield
    finally:
        runner.model = bare


def run(task: str | Task, runner_cls: type[Runner], init: str | Path | None = "scratch", profile: str | None = None,
        n_labeled: int | None = None, seed: int = 0, out: str | Path | None = None,
        overrides: Sequence[str] | dict[str, str] | None = None, resume: bool = False, datalist: str | None = None,
        show_progress: bool = True) -> dict[str, Any]:
    """Fine-tune `task` with `runner_cls`; returns the results dict that is also written to `results.json`.

    One process, or one rank of `torchrun --nproc_per_node=N` (every rank returns rank 0's results).
    """
    from voco_lib.distributed import (barrier, broadcast_object, check_ranks_in_sync, gather_objects, init_runtime,
                                      main_first, mean_over_ranks, shutdown, wrap_ddp)
    from voco_lib.pretrain import (checkpoint_paths, rng_state, save_checkpoint, seed_everything, set_rng_state,
                                   tune_allocator)

    task = load_task(task) if not isinstance(task, Task) else task
    cfg = resolve(profile, overrides)
    fc = cfg.finetune
    if not task.is_phantom and datalist is None:
        raise ValueError(f"task {task.name} needs its data: pass a datalist (MSD-style JSON, see "
                         f"data_manifests/datasets/{task.dataset}.yaml for where to get the data), "
                         "or run a phantom task (phantom-seg, phantom-cls, phantom-reg, phantom-vl, phantom-rg)")
    if task.engine == "nnunet":
        warnings.warn(f"task {task.name}: the paper fine-tunes it with nnU-Net (spec §7.3); this run uses our "
                      f"SwinUNETR path instead. For the paper's setting: voco nnunet export {task.name} DATALIST OUT "
                      "--id N (then the printed nnUNetv2 commands)", stacklevel=2)
    if fc.accum < 1:
        raise ValueError(f"finetune.accum must be >= 1, got {fc.accum}")
    rt = init_runtime(timeout_min=FT_TIMEOUT_MIN)
    with main_first(rt):  # a released checkpoint is fetched once, by rank 0
        init_path = resolve_init(init)
    feature_size = checkpoint_feature_size(init_path) if init_path is not None else cfg.feature_size
    init_label = "scratch" if init_path is None else str(init)
    out = Path(out or Path("runs") / "finetune" / task.name /
               f"{Path(init_label).name}-n{n_labeled or 'all'}-s{seed}")
    out.mkdir(parents=True, exist_ok=True)
    ckpts = checkpoint_paths(out)
    if (out / "results.json").is_file() and not resume:
        raise FileExistsError(f"{out} holds a finished run (results.json); pass a new --out, or --resume to reuse it")
    if cfg.train.tune_allocator and not torch.cuda.is_available():
        tune_allocator()
    seed_everything(seed)  # the same on every rank: identical initial weights
    device = rt.device
    ctx = Context(task, cfg, seed, n_labeled, datalist, device, feature_size, world=rt.world, rank=rt.rank,
                  accum=fc.accum)
    if (rt.world > 1 or fc.accum > 1) and not runner_cls.shards_batches:
        raise ValueError(f"task type {task.type} does not split its batches across processes or micro-batches yet: "
                         "run it as one process (no torchrun) with finetune.accum=1")
    runner = runner_cls(ctx)
    model = runner.model.to(device)

    coverage = None
    if init_path is not None:
        min_cov = fc.min_coverage if task.in_channels == 1 else min(fc.min_coverage, 0.9)
        coverage = load_init(runner.init_target(), init_path, min_cov)
    steps = fc.steps if fc.steps is not None else task.epochs * runner.n_train
    warmup = fc.warmup_steps if fc.warmup_steps is not None else task.warmup_epochs * runner.n_train
    eval_every = fc.eval_every or max(1, 10 * runner.n_train)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=ctx.lr, weight_decay=fc.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, warmup, steps))
    amp = fc.amp if device.type == "cuda" else "off"
    scaler = torch.amp.GradScaler("cuda", enabled=amp == "fp16")
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16 if amp == "bf16" else torch.float16)) \
        if amp != "off" else contextlib.nullcontext

    provenance = {
        "task": task.name, "type": task.type, "dataset": task.dataset, "datalist": datalist, "init": init_label,
        "init_path": None if init_path is None else str(init_path),
        "init_sha256": None if init_path is None else sha256(init_path), "feature_size": feature_size,
        "seed": seed, "profile": cfg.name, "n_labeled": n_labeled, "n_train": runner.n_train, "steps": steps,
        "lr": ctx.lr, "roi": list(ctx.roi), "overrides": _override_list(overrides), "torch": str(torch.__version__),
    }
    if rt.distributed or fc.accum > 1:  # single-process provenance stays as it was
        provenance.update(world_size=rt.world, accum=fc.accum, global_batch=ctx.global_batch)
    start = 0
    if resume and ckpts:
        state = torch.load(ckpts[-1], map_location="cpu", weights_only=True)
        saved = int(state.get("world", 1)) * int(state.get("accum", 1))
        if saved != rt.world * fc.accum:
            raise ValueError(f"{ckpts[-1]}: saved with processes × finetune.accum = {saved}, now {rt.world * fc.accum}; "
                             "resume with the same product (it fixes the global batch of every step)")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        rngs = state["rng"] if isinstance(state["rng"], list) else [state["rng"]]  # one per rank
        set_rng_state(rngs[rt.rank if len(rngs) == rt.world else 0])
        start = int(state["step"])
        if rt.main:
            _truncate_jsonl(out / "metrics.jsonl", start)
    elif rt.main:
        (out / "metrics.jsonl").unlink(missing_ok=True)
        doc = json.loads(json.dumps({"provenance": provenance, "task": task.raw, "profile": to_dict(cfg)}))
        write_text(out / "config.yaml", yaml.safe_dump(doc, sort_keys=False))
    ddp = wrap_ddp(model, rt, find_unused_parameters=_has_unused_parameters(ctx))
    if rt.main:
        print(f"voco finetune {task.name}: {rt.world} process(es) on {device.type}, global batch {ctx.global_batch} "
              f"({fc.batch_size} × accum {fc.accum} × {rt.world}), lr {ctx.lr:g} (warmup {warmup}, cosine to step "
              f"{steps}), amp {amp}, {'resuming at step ' + str(start) if start else 'from step 0'} -> {out}", flush=True)

    def log(record: dict[str, Any]) -> None:
        if rt.main:
            _append_jsonl(out / "metrics.jsonl", record)

    def checkpoint(step: int) -> None:
        if rt.distributed:
            check_ranks_in_sync(model)
        rngs = gather_objects(rng_state(), rt)
        if rt.main:
            save_checkpoint(out, {"model": model.state_dict(), "optimizer": opt.state_dict(),
                                  "scheduler": sched.state_dict(), "scaler": scaler.state_dict(), "rng": rngs,
                                  "step": step, "world": rt.world, "accum": fc.accum}, step, fc.keep_last)
        barrier(rt)

    def validate(step: int) -> None:
        """Rank 0 validates on the bare model (no collectives); the other ranks wait."""
        if rt.main:
            model.eval()
            with torch.no_grad(), autocast():
                m = _scalars(runner.evaluate(final=False))
            model.train()
            log({"step": step, "kind": "val", **m})
        barrier(rt)

    t0 = time.time()
    from tqdm.auto import tqdm

    bar = tqdm(range(start, steps), desc=f"finetune {task.name} ({init_label})",
               disable=not (show_progress and rt.main), initial=start, total=steps)
    model.train()
    if start == 0:
        validate(0)
    for step in bar:
        opt.zero_grad(set_to_none=True)
        losses = []  # detached; read (a device sync) only on the steps that log
        for a in range(fc.accum):
            ctx.micro = a
            sync = ddp.no_sync() if rt.distributed and a < fc.accum - 1 else contextlib.nullcontext()
            with sync:
                with autocast(), _forward_through(runner, ddp):
                    loss = runner.loss(step)
                scaler.scale(loss / fc.accum).backward()
            losses.append(loss.detach())
        ctx.micro = 0
        scaler.step(opt)
        scaler.update()
        sched.step()
        done = step + 1
        if done % fc.log_every == 0 or done == steps:
            train_loss = mean_over_ranks([sum(float(v) for v in losses) / fc.accum], rt)[0]
            log({"step": done, "kind": "train", "loss": train_loss, "lr": sched.get_last_lr()[0]})
            bar.set_postfix(loss=f"{train_loss:.4f}")
        if done % eval_every == 0 and done != steps:
            validate(done)
        if done % fc.checkpoint_every == 0 or done == steps:
            checkpoint(done)

    results = None
    if rt.main:
        model.eval()
        with torch.no_grad(), autocast():
            final = _scalars(runner.evaluate(final=True))
        log({"step": steps, "kind": "val", **{k: v for k, v in final.items() if not isinstance(v, (list, dict))}})
        vals = read_metrics(out, "val")
        key = task.metric
        best = max((v for v in vals if v.get(key) is not None), key=lambda v: v[key], default=None)
        results = {"metrics": final, "metric": key, "value": final.get(key),
                   "best": None if best is None else {"step": best["step"], key: best[key]},
                   "curve": [{"step": v["step"], key: v.get(key)} for v in vals],
                   "coverage": coverage, "wall_s": round(time.time() - t0, 1), **provenance, "run_dir": str(out)}
        write_text(out / "results.json", json.dumps(results, indent=1))
    results = broadcast_object(results, rt)
    shutdown(rt)
    return results
