"""The one training loop of pre-training and every fine-tuning task.

`fit` owns what both share: mixed precision (bf16, or fp16 with a GradScaler; CUDA only), gradient
accumulation (`no_sync` on all but the last micro-batch), DDP, clipping, SIGTERM/SIGINT (checkpoint, then
`Interrupted`), a non-finite-loss stop, progress, `metrics.jsonl` + TensorBoard, checkpoints and an exact
resume (weights, optimizer, scheduler, scaler, step, every rank's RNG, any extra state such as the data order).
A method supplies only `step_fn(net, batch, step, micro) -> loss | {"loss": ..., other terms}` and an
optional `evaluate(step) -> metrics`; `net` is the model as trained (DDP-wrapped under torchrun).
"""

from __future__ import annotations

import contextlib
import math
import random
import signal
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from voco_lib.distributed import Runtime, barrier, broadcast_object, check_ranks_in_sync, gather_objects, wrap_ddp
from voco_lib.runs import Run, json_safe, truncate_metrics

PERF_KEY = "perf"  # the only non-deterministic field of a metrics.jsonl line (timing, throughput, memory)
StepFn = Callable[[nn.Module, Any, int, int], "torch.Tensor | dict[str, torch.Tensor]"]
Stateful = tuple[Callable[[int], dict[str, Any]], Callable[[dict[str, Any]], None]]  # (state at step, load)


class Interrupted(RuntimeError):
    """SIGTERM/SIGINT: the run checkpointed at `step` and stopped; `exit_code` is 128 + the signal number."""

    def __init__(self, signum: int, step: int, run_dir: Any):
        self.exit_code = 128 + signum
        super().__init__(f"stopped by {signal.Signals(signum).name} at step {step}; "
                         f"continue with --resume --out {run_dir}")


class NonFiniteLoss(RuntimeError):
    """A loss became NaN/inf: the run stops before that step changes any weight."""


# ------------------------------------------------------------------------------------------------ spec
@dataclass(frozen=True)
class LoopSpec:
    """How long and how often: the loop's part of a run's config."""

    steps: int
    accum: int = 1
    clip: float = 0.0  # max gradient norm; 0 = off
    amp: str = "off"  # "off" | "bf16" | "fp16"; forced off on CPU
    log_every: int = 10
    eval_every: int = 0  # 0: only at step 0 (and at the end with eval_at_end)
    checkpoint_every: int = 1000
    keep_last: int = 3
    eval_at_end: bool = True
    eval_kind: str = "eval"  # the `kind` of evaluation lines in metrics.jsonl
    global_batch: int = 1  # samples per optimizer step, for throughput
    desc: str = "train"
    tensorboard: bool = True


# ------------------------------------------------------------------------------------------------ helpers
def warmup_cosine(step: int, warmup: int, total: int) -> float:
    """lr factor: t/W during warmup, then ½(1 + cos(π(t − W)/(T − W))), and 0 from T on (VoCo's and Swin
    UNETR's `WarmupCosineSchedule`, stepped every iteration)."""
    if step < warmup:
        return step / max(1, warmup)
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


def adamw(model: nn.Module, lr: float, weight_decay: float, warmup: int, steps: int, amsgrad: bool = False,
          groups: Sequence[dict[str, Any]] | None = None
          ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over the trainable parameters (an EMA teacher has none) with the warmup-cosine schedule.

    groups: parameter groups ({"params": [...], "lr": ..., any other AdamW option}) that must hold every trainable
    parameter of `model` exactly once; each group's lr follows the same schedule (the logged lr is the first's)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    if groups is None:
        opt = torch.optim.AdamW(trainable, lr=lr, weight_decay=weight_decay, amsgrad=amsgrad)
    else:
        _check_groups(trainable, groups)
        opt = torch.optim.AdamW([dict(g) for g in groups], lr=lr, weight_decay=weight_decay, amsgrad=amsgrad)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, warmup, steps))


def _check_groups(trainable: list[nn.Parameter], groups: Sequence[dict[str, Any]]) -> None:
    """Every trainable parameter in exactly one group, and nothing else (a frozen one would train)."""
    seen = [id(p) for g in groups for p in g["params"]]
    want = {id(p) for p in trainable}
    if len(seen) != len(set(seen)) or set(seen) != want:
        raise ValueError(f"adamw groups: {len(seen)} parameter entries ({len(set(seen))} distinct) for "
                         f"{len(want)} trainable parameters; each trainable parameter must be in exactly one group")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (1 << 32))
    torch.manual_seed(seed)


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


def autocast_for(amp: str, device: torch.device) -> Callable[[], contextlib.AbstractContextManager]:
    """A factory of the run's autocast context (a no-op on CPU or with amp=off)."""
    if amp == "off" or device.type != "cuda":
        return contextlib.nullcontext
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return lambda: torch.autocast("cuda", dtype=dtype)


class _Stop:
    """SIGTERM/SIGINT set a flag; the loop checkpoints at the end of the current step and raises `Interrupted`."""

    def __init__(self) -> None:
        self.signum = 0
        self._old: dict[int, Any] = {}

    def __enter__(self) -> "_Stop":
        for s in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[s] = signal.signal(s, self._handle)
            except ValueError:  # not the main thread (e.g. a notebook worker): no signal handling
                pass
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.signum = signum

    def __exit__(self, *exc: Any) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)


def _memory(device: torch.device) -> dict[str, float]:
    if device.type == "cuda":
        return {"gpu_mem_gb": torch.cuda.max_memory_allocated(device) / 2**30}
    import resource

    return {"cpu_maxrss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


# ------------------------------------------------------------------------------------------------ the loop
@dataclass
class _State:
    """What `fit` threads through its helpers."""

    model: nn.Module
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    run: Run
    rt: Runtime
    spec: LoopSpec
    extra: dict[str, Stateful] = field(default_factory=dict)
    last_checkpoint: Any = None
    writer: Any = None


def fit(model: nn.Module, step_fn: StepFn, opt: torch.optim.Optimizer, sched: torch.optim.lr_scheduler.LambdaLR,
        run: Run, rt: Runtime, spec: LoopSpec, *, batches: Iterable | None = None,
        evaluate: Callable[[int], dict[str, Any]] | None = None, extra_state: dict[str, Stateful] | None = None,
        ddp: bool = True, show_progress: bool = True) -> int:
    """Train `model` (already on `rt.device`) to `spec.steps` in `run`; returns the last step reached.
    `ddp=False`: a method that runs as one process only, never wrapped."""
    st = _State(model, opt, sched, torch.amp.GradScaler("cuda", enabled=spec.amp == "fp16" and rt.device.type == "cuda"),
                run, rt, spec, extra_state or {})
    start = _resume(st)
    run.write_config()
    net = wrap_ddp(model, rt) if ddp else model
    autocast = autocast_for(spec.amp, rt.device)
    it = iter(batches) if batches is not None else None
    if rt.main and spec.tensorboard:
        from torch.utils.tensorboard import SummaryWriter

        st.writer = SummaryWriter(str(run.path / "tb"), purge_step=start or None)
    from tqdm.auto import tqdm

    bar = tqdm(total=spec.steps, initial=start, disable=not (rt.main and show_progress), desc=spec.desc,
               dynamic_ncols=True)
    model.train()
    if start == 0 and evaluate is not None:
        _evaluate(st, evaluate, 0, autocast)
    step, window = start, (time.perf_counter(), 0)
    try:
        with _Stop() as stop:
            while step < spec.steps:
                t0 = time.perf_counter()
                terms, info, signum = _train_step(st, net, step_fn, it, step, autocast, stop)
                step += 1
                window = (window[0], window[1] + 1)
                bar.update(1)
                bar.set_postfix({k: f"{v:.4f}" for k, v in terms.items()}, refresh=False)
                if step % spec.log_every == 0 or step == spec.steps:
                    perf = {"samples_per_s": spec.global_batch * window[1] / (time.perf_counter() - window[0]),
                            "step_s": time.perf_counter() - t0, "data_s": info["data_s"], **_memory(rt.device)}
                    _log(st, {"kind": "train", "step": step, **terms, "lr": info["lr"],
                              "grad_norm": float(info["grad_norm"]), PERF_KEY: perf})
                    window = (time.perf_counter(), 0)
                if evaluate is not None and ((spec.eval_every and step % spec.eval_every == 0 and step != spec.steps)
                                             or (step == spec.steps and spec.eval_at_end)):
                    _evaluate(st, evaluate, step, autocast)
                if step % spec.checkpoint_every == 0 or step == spec.steps or signum:
                    _checkpoint(st, step)
                if signum:
                    raise Interrupted(signum, step, run.path)
    finally:
        bar.close()
        if st.writer is not None:
            st.writer.close()
    return step


def _train_step(st: _State, net: nn.Module, step_fn: StepFn, it: Any, step: int, autocast: Callable,
                stop: _Stop) -> tuple[dict[str, float], dict[str, Any], int]:
    """One optimizer step over `accum` micro-batches; one host sync (terms + stop flag, all-reduced).
    Returns the mean terms, {lr of this step, gradient norm, seconds spent waiting for data}, the signal."""
    spec, rt = st.spec, st.rt
    totals: dict[str, torch.Tensor] = {}
    data_s = 0.0
    for micro in range(spec.accum):
        td = time.perf_counter()
        batch = next(it) if it is not None else None
        data_s += time.perf_counter() - td
        last = micro == spec.accum - 1
        sync = net.no_sync() if isinstance(net, nn.parallel.DistributedDataParallel) and not last \
            else contextlib.nullcontext()
        with sync:
            with autocast():
                out = step_fn(net, batch, step, micro)
            out = {"loss": out} if isinstance(out, torch.Tensor) else out
            st.scaler.scale(out["loss"] / spec.accum).backward()
        for k, v in out.items():
            totals[k] = totals.get(k, 0.0) + v.detach().float() / spec.accum
    vec = torch.stack([*totals.values(), torch.tensor(float(stop.signum), device=rt.device)]).to(rt.device)
    if rt.distributed:
        dist.all_reduce(vec)
    values = vec.tolist()
    terms = {k: v / rt.world for k, v in zip(totals, values[:-1])}
    signum = int(values[-1]) and (stop.signum or signal.SIGTERM)
    if not math.isfinite(terms["loss"]):
        last = st.last_checkpoint or "none (the run had not checkpointed yet)"
        raise NonFiniteLoss(f"loss is {terms['loss']} at step {step + 1} (terms {terms}); no weight was updated by it. "
                            f"Last good checkpoint: {last}. Lower the learning rate or set a gradient clip, then "
                            "--resume (or start a new --out)")
    st.scaler.unscale_(st.opt)
    params = [p for p in st.model.parameters() if p.requires_grad]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, spec.clip if spec.clip > 0 else float("inf"))
    st.scaler.step(st.opt)
    st.scaler.update()
    st.opt.zero_grad(set_to_none=True)
    lr = st.sched.get_last_lr()[0]
    st.sched.step()
    return terms, {"lr": lr, "grad_norm": grad_norm, "data_s": data_s}, int(signum)


def _log(st: _State, record: dict[str, Any]) -> None:
    if not st.rt.main:
        return
    record = json_safe(record)
    st.run.append_metrics(record)
    if st.writer is not None:
        for k, v in record.items():
            if isinstance(v, (int, float)) and k != "step":
                st.writer.add_scalar(f"{record['kind']}/{k}", v, record["step"])
        for k, v in record.get(PERF_KEY, {}).items():
            st.writer.add_scalar(f"perf/{k}", v, record["step"])


def _evaluate(st: _State, evaluate: Callable[[int], dict[str, Any]], step: int, autocast: Callable) -> None:
    """Rank 0 evaluates the bare model (no collectives); the other ranks wait."""
    if st.rt.main:
        st.model.eval()
        with torch.no_grad(), autocast():
            m = evaluate(step)
        st.model.train()
        _log(st, {"kind": st.spec.eval_kind, "step": step,
                  **{k: v for k, v in m.items() if not isinstance(v, (list, dict))}})
    barrier(st.rt)


def _checkpoint(st: _State, step: int) -> None:
    rt = st.rt
    if rt.distributed:
        check_ranks_in_sync(st.model)
    rngs = gather_objects(rng_state(), rt)
    if rt.main:
        state = {"step": step, "model": st.model.state_dict(), "optimizer": st.opt.state_dict(),
                 "scheduler": st.sched.state_dict(), "scaler": st.scaler.state_dict(), "rng": rngs,
                 "world": rt.world, "accum": st.spec.accum, "metrics_lines": st.run.n_metric_lines(),
                 "config": st.run.config,
                 **{k: get(step) for k, (get, _) in st.extra.items()}}
        st.last_checkpoint = st.run.save_checkpoint(state, step, st.spec.keep_last)
    barrier(rt)


def _resume(st: _State) -> int:
    """Load the run's resume checkpoint (rank 0 chose it; the others load the same file); the start step."""
    rt, run = st.rt, st.run
    chosen = broadcast_object(str(run.resumed[0]) if run.resumed else None, rt)
    if chosen is None:
        return 0
    state = run.resumed[1] if rt.main else torch.load(chosen, map_location="cpu", weights_only=True)
    saved = int(state["world"]) * int(state["accum"])
    if saved != rt.world * st.spec.accum:
        raise ValueError(f"{chosen}: saved with processes × accum = {saved}, now {rt.world * st.spec.accum}; resume "
                         "with the same product (it fixes the batch of every step)")
    st.model.load_state_dict(state["model"])
    st.opt.load_state_dict(state["optimizer"])
    st.sched.load_state_dict(state["scheduler"])
    st.scaler.load_state_dict(state["scaler"])
    set_rng_state(state["rng"][rt.rank])
    for k, (_, load) in st.extra.items():
        load(state[k])
    if rt.main:
        truncate_metrics(run.path / "metrics.jsonl", int(state["metrics_lines"]))
    st.last_checkpoint = chosen
    return int(state["step"])
