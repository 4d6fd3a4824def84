"""The pre-training data path: volumes -> preprocessing cache -> region -> views, in a resumable order.

Why it looks like this:
- Every sample's randomness (region position, crop centres, augmentations) comes from its own
  `torch.Generator`, seeded from (seed, epoch, index). The views of a sample therefore do not depend on the
  number of workers, on which process loads it, or on a restart (upstream drew from the unseeded global
  `np.random`, Luffy03/Large-Scale-Medical Self-supervised/voco_train.py sets no seed).
- The order is infinite and a pure function of the step: per epoch a `DistributedSampler` permutation
  (`set_epoch` is called for every epoch; Luffy03/Large-Scale-Medical Self-supervised/voco_train.py never calls
  it); a micro-batch that
  runs past the end of an epoch continues into the next one. Its state is one integer, checkpointed.
- Gradient accumulation and data parallelism are the same thing to the order: micro-batch `a` of rank `r`
  reads "virtual replica" v = a·world + r of a `DistributedSampler` with world·accum replicas. One process
  with accum = 2 therefore sees exactly the micro-batches that two DDP ranks with accum = 1 see.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from voco_lib.config import Profile, ViewConfig
from voco_lib.crops import Views, collate_views, make_views
from voco_lib.data.preprocess import get_chain, preprocess_array, sample_region

TRAIN_STREAM, EVAL_STREAM = 0, 1
EVAL_SEED_OFFSET = 1_000_000  # phantom seeds of the held-out volumes: never used for training


def sample_seed(seed: int, epoch: int, index: int, stream: int = TRAIN_STREAM) -> int:
    """A well-mixed 63-bit seed for one sample (NumPy's SeedSequence hashes the tuple)."""
    state = np.random.SeedSequence([seed, stream, epoch, index]).generate_state(2, np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1])) & ((1 << 63) - 1)


def default_cache_dir() -> Path:
    from voco_lib.data.manifests import data_dir

    return data_dir() / "preprocessed"


# ---------------------------------------------------------------------------------------------- volumes
class PhantomVolumes:
    """Preprocessed phantom volumes held in memory (uint16, shared copy-on-write with forked workers).

    Phantoms are generated directly at `spacing` and the chain keeps it (no resampling): the phantom plays a
    CT already resampled; a coarse spacing (3 mm) makes a whole torso in a few voxels, cheaply.
    """

    def __init__(self, seeds: Sequence[int], shape: Sequence[int], chain: str = "abdomen", spacing: float = 1.5):
        from voco_lib.data.phantom import make_phantom

        spacing = (float(spacing),) * 3
        c = dataclasses.replace(get_chain(chain), spacing=spacing)
        self.seeds = list(seeds)
        self.volumes: list[torch.Tensor] = []
        for s in self.seeds:
            image, _, affine = make_phantom(s, tuple(shape), spacing)
            vol = preprocess_array(image, affine, c, name=f"phantom {s}")["image"].as_tensor()
            self.volumes.append(torch.from_numpy(np.rint(vol.clamp(0, 1).numpy() * 65535).astype(np.uint16)))

    def __len__(self) -> int:
        return len(self.volumes)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.volumes[i].to(torch.float32) / 65535.0


class CachedVolumes:
    """Datalist volumes read through the on-disk preprocessing cache (`voco_lib.data.cache`)."""

    def __init__(self, paths: Sequence[str | Path], chain: str, cache_dir: str | Path):
        self.paths, self.chain, self.cache_dir = [str(p) for p in paths], chain, str(cache_dir)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        from voco_lib.data.cache import load_preprocessed

        return load_preprocessed(self.paths[i], self.chain, self.cache_dir)

    def warm(self, show: bool = True) -> None:
        """Preprocess every volume into the cache once, before workers start (rank 0 does this)."""
        from tqdm.auto import tqdm

        for i in tqdm(range(len(self)), desc="preprocessing cache", disable=not show):
            self[i]


def datalist_images(datalist: str | Path, split: str) -> list[Path]:
    """The image paths of one split of a datalist; an absent split is empty."""
    from voco_lib.data.manifests import read_datalist

    try:
        entries = read_datalist(datalist, split=split)
    except KeyError:
        return []
    return [Path(e["image"]) for e in entries]


def build_volumes(data: str, cfg: Profile, run_dir: str | Path | None = None) -> tuple[object, object]:
    """(train volumes, held-out volumes) for `--data phantom | samples | DATALIST | FOLDER`.

    A folder of scans is listed on the fly (`voco_lib.data.datalist`) into `run_dir`/datalist.json, so the run
    records exactly what it read; without `run_dir` a folder is refused as before.

    Held-out volumes: phantoms with seeds from EVAL_SEED_OFFSET; for a datalist its `validation` split,
    or else its last `n_eval` training entries (removed from training when at least two remain).
    """
    d, seed = cfg.data, cfg.train.seed
    if data == "phantom":
        train = PhantomVolumes(range(seed, seed + cfg.n_volumes), d.phantom_shape, d.chain, d.phantom_spacing)
        held = PhantomVolumes(range(EVAL_SEED_OFFSET + seed, EVAL_SEED_OFFSET + seed + d.n_eval),
                              d.phantom_shape, d.chain, d.phantom_spacing)
        return train, held
    if data == "samples":
        from voco_lib.data.fetch import fetch_samples

        data = str(fetch_samples())
    from voco_lib.data.manifests import datalist_file

    if run_dir is not None and Path(data).is_dir():
        from voco_lib.data.datalist import datalist_for_run

        data = str(datalist_for_run(data, run_dir))
    path = datalist_file(data)
    cache = d.cache_dir or default_cache_dir()
    paths = datalist_images(path, "training")
    held_paths = datalist_images(path, "validation")[: d.n_eval]
    if not held_paths:
        if len(paths) - d.n_eval >= 2:
            paths, held_paths = paths[: -d.n_eval], paths[-d.n_eval:]
        else:  # too few volumes to spare: evaluate on (fixed, separately drawn) views of training volumes
            held_paths = paths[: d.n_eval]
    if not paths:
        raise ValueError(f"{path}: the 'training' list is empty; add volumes to it")
    return CachedVolumes(paths, d.chain, cache), CachedVolumes(held_paths, d.chain, cache)


# ---------------------------------------------------------------------------------------------- samples
class ViewsDataset(Dataset):
    """Map-style dataset indexed by (epoch, index): the views of one region of volume `index`."""

    def __init__(self, volumes, views: ViewConfig, region_mode: str, seed: int, stream: int = TRAIN_STREAM):
        self.volumes, self.views, self.region_mode, self.seed, self.stream = volumes, views, region_mode, seed, stream

    def __len__(self) -> int:
        return len(self.volumes)

    def __getitem__(self, key: tuple[int, int]) -> Views:
        epoch, index = key
        g = torch.Generator().manual_seed(sample_seed(self.seed, epoch, index, self.stream))
        region = sample_region(self.volumes[index], self.views.region, g, self.region_mode)
        return make_views(region.contiguous(), self.views, g)


def region_mode_of(cfg: Profile) -> str:
    return cfg.data.region_mode or get_chain(cfg.data.chain).region_mode


def held_out_views(volumes, cfg: Profile, per_volume: int = 4) -> list[Views]:
    """The fixed evaluation set: `per_volume` independently drawn view sets of every held-out volume."""
    ds = ViewsDataset(volumes, cfg.views, region_mode_of(cfg), cfg.train.seed, EVAL_STREAM)
    return [ds[(rep, i)] for rep in range(per_volume) for i in range(len(volumes))]


# ---------------------------------------------------------------------------------------------- order
class InfiniteOrder:
    """Infinite, resumable batch sampler: yields this rank's micro-batches as lists of (epoch, index).

    Step t, micro-batch a of rank r reads positions [t·B, (t+1)·B) of virtual replica v = a·world + r of a
    `DistributedSampler(num_replicas=world·accum, shuffle=True, seed)`, epoch after epoch (`set_epoch`).
    State: the next step (`state_dict`); the order is a pure function of it.
    """

    def __init__(self, n: int, batch_size: int, seed: int, world: int = 1, rank: int = 0, accum: int = 1,
                 start_step: int = 0):
        if n < 1:
            raise ValueError("the dataset is empty")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.world, self.rank, self.accum = world, rank, accum
        self.replicas = world * accum
        self.per_replica = math.ceil(n / self.replicas)  # DistributedSampler pads by repeating
        self.next_step = start_step
        self._epochs: dict[tuple[int, int], list[int]] = {}

    def _stream(self, replica: int, epoch: int) -> list[int]:
        key = (replica, epoch)
        if key not in self._epochs:
            if len(self._epochs) > 4 * self.replicas:
                self._epochs.clear()
            s = DistributedSampler(range(self.n), num_replicas=self.replicas, rank=replica, shuffle=True,
                                   seed=self.seed, drop_last=False)
            s.set_epoch(epoch)
            self._epochs[key] = list(s)
        return self._epochs[key]

    def micro_batch(self, step: int, micro: int) -> list[tuple[int, int]]:
        replica = micro * self.world + self.rank
        out = []
        for p in range(step * self.batch_size, (step + 1) * self.batch_size):
            epoch, j = divmod(p, self.per_replica)
            out.append((epoch, self._stream(replica, epoch)[j]))
        return out

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        step = self.next_step
        while True:
            for a in range(self.accum):
                yield self.micro_batch(step, a)
            step += 1

    def state_dict(self) -> dict[str, int]:
        return {"next_step": self.next_step, "n": self.n, "batch_size": self.batch_size, "seed": self.seed,
                "replicas": self.replicas, "epoch": self.next_step * self.batch_size // self.per_replica}

    def load_state_dict(self, state: dict[str, int]) -> None:
        for k in ("n", "batch_size", "seed", "replicas"):
            if state[k] != getattr(self, k):
                raise ValueError(f"cannot resume the data order: checkpoint has {k}={state[k]}, this run "
                                 f"{getattr(self, k)}; resume with the same data, batch size, seed and world·accum")
        self.next_step = int(state["next_step"])


def make_loader(dataset: ViewsDataset, order: InfiniteOrder, workers: int = 0, pin_memory: bool = False) -> DataLoader:
    """A DataLoader over the infinite order; per-sample generators make the worker count irrelevant."""
    # An own generator: creating the iterator draws a base seed, which would otherwise advance the global
    # torch RNG (the embedding dropout's) and break bit-exact resume. Samples use their own generators anyway.
    return DataLoader(dataset, batch_sampler=order, num_workers=workers, collate_fn=collate_views,
                      pin_memory=pin_memory, persistent_workers=False, generator=torch.Generator().manual_seed(0),
                      prefetch_factor=4 if workers else None)


def views_to(views: Views, device: torch.device, non_blocking: bool = True) -> Views:
    return Views(*(getattr(views, f.name).to(device, non_blocking=non_blocking) for f in dataclasses.fields(Views)))
