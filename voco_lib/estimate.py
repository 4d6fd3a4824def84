"""`voco estimate`: what a pre-training run will cost before it starts: cache disk, loader RAM, memory and time per step.

Why: the authors needed a ~30 TB preprocessing cache for 160K volumes and about a week on 8 GPUs for the Base
model (Luffy03/Large-Scale-Medical README, commit 1ad538b). Users should know their own figure first.

- Cache bytes come from the cache format (`voco_lib.data.cache`: one `.npy` of the store dtype plus a `.json`
  sidecar per volume) and each volume's preprocessed shape. By default the shape comes from the file's header
  only (NIfTI via nibabel, MHA/NRRD via SimpleITK's ReadImageInformation), run through the chain's orientation
  and spacing lazily (MONAI computes the output grid without touching voxels). That is an upper bound: the
  foreground crop needs the voxels. `exact=True` runs the deterministic chain on the sampled volumes instead and
  then equals what the cache writes. Huge datalists are sampled (seeded) and the mean entry is extrapolated.
- Memory and FLOPs of a step come from one pass of the method's real step on the meta device (shapes only, no
  compute): FLOPs from `torch.utils.flop_counter.FlopCounterMode` (matmuls and convolutions), activations as
  the bytes autograd saves for backward, plus weights, gradients and AdamW states. On a CUDA device the peak
  memory is measured on real steps instead.
- Step time is measured: a few real steps (views, forward, backward, optimizer) on this machine's device after
  one warm-up step, on random volumes of the region's size (the disk read and resampling are excluded: the
  cache and the loader's workers take them off the step).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import nibabel as nib
import numpy as np
import SimpleITK as sitk
import torch
import torch.fx.experimental._config as fx_config
from monai.data import MetaTensor
from monai.transforms import Orientation, Spacing
from torch.utils.flop_counter import FlopCounterMode

from voco_lib.config import Profile, resolve
from voco_lib.crops import Views, collate_views, make_views
from voco_lib.data.cache import CACHE_VERSION, store_dtype_for
from voco_lib.data.loader import EVAL_SEED_OFFSET, PhantomVolumes, ViewsDataset, datalist_images, views_to
from voco_lib.data.manifests import data_dir, datalist_file
from voco_lib.data.preprocess import _RAS_LABELS, Chain, get_chain, preprocess
from voco_lib.data.volumes import NIFTI_SUFFIXES, dicom_source
from voco_lib.files import write_text
from voco_lib.loop import adamw
from voco_lib.methods import get_method

SAMPLE = 64  # volumes whose shapes are read when a datalist is larger
PREFETCH = 4  # batches in flight per loader worker (`voco_lib.data.loader.make_loader`)
CPU_STEP_FLOP_LIMIT = 1e12  # above this a CPU step takes minutes: not measured (the gpu/paper profiles)
GPU_COUNTS = (1, 8)


@dataclass
class Estimate:
    """The predicted cost of one pre-training run (`estimate`); bytes and seconds, `notes` say what was assumed."""

    profile: str
    data: str
    n_volumes: int  # distinct volumes the run reads (training + held-out)
    sampled_shapes: list[tuple[int, ...]]  # preprocessed (C, X, Y, Z) of the sampled volumes
    shapes_from: str  # "header" (upper bound) | "data" (exact) | "phantom" (generated, exact)
    cache_bytes: int  # on disk, whole datalist (extrapolated from the sample when sampled)
    loader_ram_bytes: int  # resident volumes + samples in flight in the loader
    step_memory_bytes: int
    step_memory_how: str  # "measured" | "modelled"
    flops_per_step: float
    step_seconds: float | None  # None: not measured (see notes)
    device: str
    steps: int
    wall_seconds: dict[int, float | None] = field(default_factory=dict)  # GPU count -> seconds for `steps`
    notes: list[str] = field(default_factory=list)


# ------------------------------------------------------------------------------------------------ shapes
def header_geometry(path: str | Path) -> tuple[tuple[int, ...], np.ndarray]:
    """(shape, RAS+ affine) from the file's header only; a DICOM series or unknown format raises ValueError."""
    path = Path(path)
    if dicom_source(path) is not None:
        raise ValueError(f"{path}: a DICOM series has no single header; read it with exact=True (--exact)")
    if path.name.endswith(NIFTI_SUFFIXES):
        img = nib.load(path)  # reads the header; voxels stay on disk until dataobj is read
        return tuple(int(s) for s in img.shape), np.asarray(img.affine, np.float64)
    r = sitk.ImageFileReader()
    r.SetFileName(str(path))
    try:
        r.ReadImageInformation()
    except RuntimeError as e:
        raise ValueError(f"{path}: SimpleITK cannot read its header ({str(e).strip().splitlines()[-1]}); "
                         "re-export it as NIfTI or use exact=True") from None
    lps = np.eye(4)
    lps[:3, :3] = np.asarray(r.GetDirection()).reshape(3, 3) * np.asarray(r.GetSpacing())
    lps[:3, 3] = r.GetOrigin()
    return tuple(int(s) for s in r.GetSize()), np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps


def gridded_shape(shape: Sequence[int], affine: np.ndarray, chain: str | Chain) -> tuple[tuple[int, ...], np.ndarray]:
    """(C, X, Y, Z) and affine after the chain's RAS orientation, spacing and pad, without the foreground crop.

    MONAI's lazy mode computes the output grid of the real transforms; the voxels are a zero-stride view.
    """
    c = get_chain(chain)
    spatial = [int(s) for s in shape]
    while len(spatial) > 3 and spatial[-1] == 1:  # (X, Y, Z, 1) is a 3-D volume, as `check_volume` reads it
        spatial.pop()
    if len(spatial) != 3:
        raise ValueError(f"a pre-training volume must be 3-D, got a header shape {tuple(shape)}; split it into 3-D files")
    x = MetaTensor(torch.zeros(1, 1, 1, 1).expand(1, *spatial), affine=torch.as_tensor(affine, dtype=torch.float64))
    x = Orientation(axcodes="RAS", labels=_RAS_LABELS, lazy=True)(x)
    if c.spacing is not None:
        x = Spacing(pixdim=c.spacing, lazy=True)(x)
    grid = [int(s) for s in x.peek_pending_shape()]
    affine = np.asarray(x.peek_pending_affine(), np.float64)
    before = [max(0, m - s) // 2 for s, m in zip(grid, c.min_size)]  # SpatialPad centres: the origin moves back
    affine[:3, 3] -= affine[:3, :3] @ np.asarray(before, np.float64)
    return (1, *(max(s, m) for s, m in zip(grid, c.min_size))), affine


# ------------------------------------------------------------------------------------------------ cache bytes
def npy_bytes(shape: Sequence[int], dtype: str) -> int:
    """Size of `np.save` of an array: its header (padded by numpy's format) plus the raw data."""
    d = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False,
         "shape": tuple(int(s) for s in shape)}
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, d)
    return buf.tell() + int(np.prod(shape)) * np.dtype(dtype).itemsize


def sidecar_bytes(source: str, shape: Sequence[int], store: str, affine: np.ndarray, chain: Chain) -> int:
    """Size of the cache's `.json` beside an entry (the same fields `voco_lib.data.cache.load_preprocessed` writes)."""
    info = {"source": source, "shape": [int(s) for s in shape], "store": store,
            "affine": np.asarray(affine, np.float64).tolist(), "chain": chain.settings(), "version": CACHE_VERSION}
    return len(json.dumps(info, indent=1).encode())


def entry_geometry(path: str | Path, chain: str | Chain, exact: bool) -> tuple[tuple[int, ...], np.ndarray]:
    """Preprocessed (C, X, Y, Z) and affine of one volume: the chain's real output (exact, and for a DICOM series,
    which has no single header) or from its header."""
    if exact or dicom_source(path) is not None:
        out = preprocess(path, chain)["image"]
        return tuple(int(s) for s in out.shape), np.asarray(out.affine, np.float64)
    return gridded_shape(*header_geometry(path), chain)


def cache_entry_bytes(path: str | Path, chain: str | Chain, store: str | None = None,
                      exact: bool = False) -> tuple[int, tuple[int, ...]]:
    """(bytes of the cache entry, preprocessed shape) of one volume file."""
    c = get_chain(chain)
    store = store_dtype_for(c, store)
    shape, affine = entry_geometry(path, c, exact)
    return npy_bytes(shape, store) + sidecar_bytes(str(path), shape, store, affine, c), shape


# ------------------------------------------------------------------------------------------------ data
@dataclass
class DataCost:
    n_volumes: int
    shapes: list[tuple[int, ...]]
    shapes_from: str
    cache_bytes: int
    resident_bytes: int  # held in the loader's memory for the whole run (phantoms)
    notes: list[str]


def _sample(n: int, k: int, seed: int) -> list[int]:
    return sorted(np.random.default_rng(seed).choice(n, size=k, replace=False).tolist()) if n > k else list(range(n))


def phantom_cost(cfg: Profile, sample: int, seed: int) -> DataCost:
    """Phantoms live in memory as uint16 (`PhantomVolumes`): no disk cache; shapes from generating a sample."""
    s = cfg.train.seed
    seeds = [*range(s, s + cfg.n_volumes), *range(EVAL_SEED_OFFSET + s, EVAL_SEED_OFFSET + s + cfg.data.n_eval)]
    picked = [seeds[i] for i in _sample(len(seeds), sample, seed)]
    vols = PhantomVolumes(picked, cfg.data.phantom_shape, cfg.data.chain, cfg.data.phantom_spacing)
    shapes = [tuple(int(x) for x in v.shape) for v in vols.volumes]
    mean = statistics.fmean(v.numel() * v.element_size() for v in vols.volumes) if shapes else 0.0
    notes = ["phantoms are generated in memory (uint16); nothing is cached on disk"]
    if len(picked) < len(seeds):
        notes.append(f"resident phantom memory extrapolated from {len(picked)} of {len(seeds)} phantoms")
    return DataCost(len(seeds), shapes, "phantom", 0, round(mean * len(seeds)), notes)


def datalist_cost(data: str, cfg: Profile, sample: int, seed: int, exact: bool) -> DataCost:
    """Cache bytes of a datalist's training + held-out volumes, from a seeded sample of their headers (or data)."""
    if data == "samples":  # what `voco pretrain --data samples` reads; the estimate does not download it
        data = str(data_dir() / "samples" / "dataset.json")
        if not Path(data).is_file():
            raise FileNotFoundError(f"{data}: the sample CTs are not fetched yet; run `voco fetch samples` first")
    path = datalist_file(data)
    paths = list(dict.fromkeys(str(p) for p in [*datalist_images(path, "training"),
                                                  *datalist_images(path, "validation")[: cfg.data.n_eval]]))
    if not paths:
        raise ValueError(f"{path}: the 'training' list is empty; add volumes to it")
    picked = [paths[i] for i in _sample(len(paths), sample, seed)]
    sizes, shapes = zip(*(cache_entry_bytes(p, cfg.data.chain, exact=exact) for p in picked))
    total = sum(sizes) if len(picked) == len(paths) else round(statistics.fmean(sizes) * len(paths))
    notes = [] if exact else ["cache from headers: an upper bound (the foreground crop needs the voxels; --exact "
                              "runs the chain on the sample)"]
    if len(picked) < len(paths):
        notes.append(f"cache extrapolated from {len(picked)} of {len(paths)} volumes (seed {seed}): "
                     f"mean entry {statistics.fmean(sizes) / 2**20:.1f} MiB x {len(paths)}")
    return DataCost(len(paths), list(shapes), "data" if exact else "header", int(total), 0, notes)


def loader_ram(cfg: Profile, shapes: Sequence[tuple[int, ...]], resident: int) -> int:
    """Resident volumes plus the samples in flight: each holds a float32 copy of its volume, its region and its crops."""
    v = cfg.views
    crop = v.out_size or v.crop_size
    per_sample = 4 * (max((int(np.prod(s)) for s in shapes), default=0) + int(np.prod(v.region))
                      + (v.n_random + v.n_bases) * int(np.prod(crop)))
    in_flight = cfg.batch_size * (cfg.data.workers * PREFETCH if cfg.data.workers else 1)
    return resident + in_flight * per_sample


# ------------------------------------------------------------------------------------------------ the step
def _views_batch(cfg: Profile, seed: int) -> Any:
    """One batch of views made from random volumes of the region's size (as the loader makes them)."""
    g = torch.Generator().manual_seed(seed)
    vols = [torch.rand((1, *cfg.views.region), generator=g) for _ in range(cfg.batch_size)]
    ds = ViewsDataset(vols, cfg.views, "crop", seed)
    return collate_views([ds[(0, i)] for i in range(cfg.batch_size)])


@contextlib.contextmanager
def _meta_autocast() -> Iterator[None]:
    """Let `torch.autocast("meta", ...)` (a method's float32 blocks) be a no-op: autocast has no meta backend."""
    real = torch.autocast

    def shim(device_type: str, *args: Any, **kwargs: Any) -> Any:
        return contextlib.nullcontext() if device_type == "meta" else real(device_type, *args, **kwargs)

    torch.autocast = shim  # type: ignore[assignment,misc]
    try:
        with fx_config.patch(meta_nonzero_assume_all_nonzero=True):
            yield
    finally:
        torch.autocast = real  # type: ignore[misc]


def modelled_step(cfg: Profile) -> tuple[float, int]:
    """(FLOPs, memory bytes) of one training step from a meta-device pass of the method's real step.

    Memory = weights + gradients + AdamW states (2 per trainable parameter, 3 with amsgrad), all float32, plus
    the activations autograd saves in float32 (under AMP they are smaller: an upper bound there).
    """
    method = get_method(cfg.method)
    with torch.device("meta"):
        model = method.build_model(cfg)
    model.train()
    views = _views_batch(cfg, 0)
    views = Views(*(getattr(views, f.name).to("meta") for f in dataclasses.fields(Views)))
    saved = [0]

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved[0] += t.numel() * t.element_size()
        return t

    with _meta_autocast(), FlopCounterMode(display=False) as counter, \
            torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss, _ = method.step(model, model, views, True)
        loss.backward()
    params = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    states = 3 if cfg.train.amsgrad else 2
    return float(counter.get_total_flops()), 4 * (params + trainable * (1 + states)) + saved[0]


def measure_step(cfg: Profile, device: torch.device, steps: int = 3) -> tuple[float, int | None]:
    """(median seconds of `steps` real steps after one warm-up, peak CUDA memory or None on CPU)."""
    torch.manual_seed(0)
    method = get_method(cfg.method)
    model = method.build_model(cfg).to(device).train()
    t = cfg.train
    opt, sched = adamw(model, t.lr, t.weight_decay, t.warmup_steps, cfg.steps, amsgrad=t.amsgrad)
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(t.amp) if device.type == "cuda" else None
    g = torch.Generator().manual_seed(0)
    vols = [torch.rand((1, *cfg.views.region), generator=g) for _ in range(cfg.batch_size)]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for i in range(steps + 1):
        t0 = time.perf_counter()
        v = views_to(collate_views([make_views(x, cfg.views, g) for x in vols]), device)
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            loss, _ = method.step(model, model, v, True)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i:
            times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return statistics.median(times), peak


# ------------------------------------------------------------------------------------------------ API
def estimate(data: str = "phantom", profile: str | None = None, overrides: Sequence[str] | None = None,
             sample: int = SAMPLE, exact: bool = False, measure: bool | None = None, seed: int = 0,
             timed_steps: int = 3) -> Estimate:
    """The predicted cost of `voco pretrain --data DATA --profile PROFILE [overrides]`.

    `measure=None` times real steps unless this is a CPU and a step exceeds CPU_STEP_FLOP_LIMIT FLOPs.
    """
    if sample < 1:
        raise ValueError(f"sample must be ≥ 1, got {sample}; pass e.g. --sample {SAMPLE}")
    cfg = resolve(profile, list(overrides or []))
    cost = phantom_cost(cfg, sample, seed) if data == "phantom" else datalist_cost(data, cfg, sample, seed, exact)
    notes = list(cost.notes)
    flops, modelled_mem = modelled_step(cfg)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if measure is None:
        measure = device.type == "cuda" or flops <= CPU_STEP_FLOP_LIMIT
    step_s, peak = measure_step(cfg, device, timed_steps) if measure else (None, None)
    if step_s is None:
        notes.append(f"step time not measured: {flops / 1e12:.1f} TFLOP per step on {device.type}; "
                     "run `voco estimate` on the GPU")
    else:
        notes.append(f"step time: median of {timed_steps} steps after a warm-up on {device.type}, disk reads excluded")
    accum = cfg.train.accum
    wall = {g: (None if step_s is None else cfg.steps * accum * step_s) for g in GPU_COUNTS}
    notes.append(f"wall time: {cfg.steps} steps x accum {accum}, ideal data parallel (no all-reduce cost): the same on "
                 f"every GPU count, which sees {cfg.batch_size * accum} volumes per step per GPU")
    if peak is None:
        notes.append("step memory modelled: weights + grads + AdamW states + saved activations (float32)")
    return Estimate(cfg.name, str(data), cost.n_volumes, cost.shapes, cost.shapes_from, cost.cache_bytes,
                    loader_ram(cfg, cost.shapes, cost.resident_bytes), peak if peak is not None else modelled_mem,
                    "measured" if peak is not None else "modelled", flops, step_s, device.type, cfg.steps, wall, notes)


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024 or unit == "PiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} PiB"


def _duration(s: float | None) -> str:
    if s is None:
        return "not measured"
    for unit, div in (("d", 86400), ("h", 3600), ("min", 60)):
        if s >= div:
            return f"{s / div:.1f} {unit}"
    return f"{s:.2f} s"


def format_table(e: Estimate) -> str:
    """A short readable table of an estimate."""
    shape = e.sampled_shapes[0] if e.sampled_shapes else ()
    rows = [("profile / data", f"{e.profile} / {e.data}"),
            ("volumes", f"{e.n_volumes} ({len(e.sampled_shapes)} sampled, shapes from {e.shapes_from}, "
                        f"e.g. {'x'.join(map(str, shape[1:]))})"),
            ("preprocessed cache", _size(e.cache_bytes)),
            ("loader RAM", _size(e.loader_ram_bytes)),
            (f"step memory ({e.step_memory_how})", _size(e.step_memory_bytes)),
            ("FLOPs per step", f"{e.flops_per_step / 1e9:.1f} GFLOP"),
            (f"step time ({e.device})", _duration(e.step_seconds)),
            *((f"wall, {g} GPU{'s' if g > 1 else ''}", _duration(s)) for g, s in e.wall_seconds.items())]
    width = max(len(k) for k, _ in rows)
    return "\n".join([*(f"{k:<{width}}  {v}" for k, v in rows), *(f"note: {n}" for n in e.notes)])


def cli_estimate(args: argparse.Namespace) -> int:
    """`voco estimate --data phantom|DATALIST [--profile P] [--sample N] [--exact] [--no-measure] [--json FILE]
    [key=value ...]`."""
    e = estimate(args.data, args.profile, args.overrides, sample=getattr(args, "sample", SAMPLE),
                 exact=getattr(args, "exact", False), measure=getattr(args, "measure", None))
    print(format_table(e))
    if getattr(args, "json", None):
        write_text(args.json, json.dumps(dataclasses.asdict(e), indent=1) + "\n")
    return 0
