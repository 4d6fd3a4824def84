"""What pre-training and fine-tuning share to run as one process or as one rank of a `torchrun` job.

torchrun sets WORLD_SIZE / RANK / LOCAL_RANK; the process group starts from those (env://), NCCL on GPU and
gloo on CPU. Rank 0 is the one that writes (config, metrics, checkpoints, results); the other ranks train
in lockstep. Without torchrun every helper here is a no-op and the code runs as a plain single process.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import os
from typing import Any, Iterator, Sequence

import torch
import torch.distributed as dist
from torch import nn


@dataclasses.dataclass
class Runtime:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    group: bool = False  # a process group is up (any torchrun job, one process included)

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """Under torchrun, even with one process: the DDP and collective code path runs (and is tested)."""
        return self.group


def init_runtime(timeout_min: float | None = None) -> Runtime:
    """One process, or one rank of a `torchrun` job (env://): NCCL on GPU, gloo on CPU.

    `timeout_min`: how long a collective may wait for the slowest rank (None: PyTorch's default); fine-tuning
    raises it because the other ranks wait while rank 0 validates.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    launched = world > 1 or "TORCHELASTIC_RUN_ID" in os.environ  # torchrun sets it, for one process too
    if launched and not dist.is_initialized():
        kw = {} if timeout_min is None else {"timeout": datetime.timedelta(minutes=timeout_min)}
        dist.init_process_group("nccl" if cuda else "gloo", **kw)
    return Runtime(rank, world, local, device, group=dist.is_initialized())


def is_main_process() -> bool:
    """Rank 0 of a torchrun job, or a plain process (for printing once)."""
    return int(os.environ.get("RANK", "0")) == 0


def barrier(rt: Runtime) -> None:
    if rt.distributed:
        dist.barrier()


def shutdown(rt: Runtime) -> None:
    """Wait for every rank, then close the process group (end of a torchrun job)."""
    if rt.distributed and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


@contextlib.contextmanager
def main_first(rt: Runtime) -> Iterator[None]:
    """Rank 0 runs the block first (a download, a cache warm-up), the other ranks after it, reading its result."""
    if not rt.main:
        barrier(rt)
    yield
    if rt.main:
        barrier(rt)


def mean_over_ranks(values: Sequence[float], rt: Runtime) -> list[float]:
    """Average per-rank floats (e.g. the step's losses) so that rank 0 logs the global value."""
    if not rt.distributed:
        return [float(v) for v in values]
    vec = torch.tensor([float(v) for v in values], dtype=torch.float64, device=rt.device)
    dist.all_reduce(vec)
    return (vec / rt.world).tolist()


def gather_objects(obj: Any, rt: Runtime) -> list[Any]:
    """One picklable object per rank, in rank order, on every rank (e.g. RNG states for a checkpoint)."""
    if not rt.distributed:
        return [obj]
    out: list[Any] = [None] * rt.world
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, rt: Runtime) -> Any:
    """Rank 0's object on every rank."""
    if not rt.distributed:
        return obj
    box = [obj if rt.main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


@torch.no_grad()
def check_ranks_in_sync(model: nn.Module) -> None:
    """Every rank must hold bit-identical weights (student, teacher): elementwise max == min across ranks."""
    flat = torch.cat([p.detach().flatten().float() for p in model.state_dict().values() if p.is_floating_point()])
    hi, lo = flat.clone(), flat.clone()
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    if not torch.equal(hi, lo):
        raise RuntimeError(f"DDP ranks diverged: {(hi != lo).sum().item()} weights differ across ranks")


def wrap_ddp(model: nn.Module, rt: Runtime) -> nn.Module:
    """The DDP wrapper under torchrun (gradients all-reduced in backward), the model itself otherwise. Every
    trainable parameter gets a gradient (`backbone.build_backbone` freezes a skipped encoder10), so DDP needs
    no `find_unused_parameters`."""
    if not rt.distributed:
        return model
    return nn.parallel.DistributedDataParallel(model, device_ids=[rt.device.index] if rt.device.type == "cuda" else None)
