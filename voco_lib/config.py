"""Dataclass configs: the TPAMI/CVPR view presets and the named run profiles.

One config path: a named profile plus `key=value` overrides (see `resolve`). The environment variable
`VOCO_PROFILE` lets CI force the `smoke` profile everywhere.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import dataclass, field, replace
from typing import Any

Triple = tuple[int, int, int]


@dataclass(frozen=True)
class ViewConfig:
    """Geometry and per-crop augmentation of VoCo's views.

    The region is tiled by `grid` base crops; random crops have the base-crop size (as upstream) unless
    `crop` says otherwise, and may be resized to `out_size` (CVPR resizes 96³ crops to 64³).
    Augmentation probabilities follow the authors' TPAMI code (method spec §1.2).
    """

    region: Triple = (192, 192, 64)
    grid: Triple = (3, 3, 1)
    crop: Triple | None = None  # None: region // grid (the base-crop size)
    out_size: Triple | None = None  # None: no resize
    n_random: int = 2  # S, random crops per volume
    augment: bool = True
    flip_p: float = 0.2  # per spatial axis
    rot90_p: float = 0.2  # k in {1,2,3}, axial plane
    shift_p: float = 0.5
    shift_offset: float = 0.1

    @property
    def base_size(self) -> Triple:
        return tuple(r // g for r, g in zip(self.region, self.grid))  # type: ignore[return-value]

    @property
    def crop_size(self) -> Triple:
        return self.crop if self.crop is not None else self.base_size

    @property
    def n_bases(self) -> int:
        return self.grid[0] * self.grid[1] * self.grid[2]

    def __post_init__(self) -> None:
        for r, g in zip(self.region, self.grid):
            if g < 1 or r % g:
                raise ValueError(f"region {self.region} is not divisible by grid {self.grid}")
        if any(c > r for c, r in zip(self.crop_size, self.region)):
            raise ValueError(f"crop {self.crop_size} is larger than region {self.region}")


PRESETS: dict[str, ViewConfig] = {
    # TPAMI: 3x3x1 grid of 64³ base crops over 192x192x64 (method spec §1.1).
    "tpami": ViewConfig(),
    # CVPR 2024: 4x4x1 grid of 96³ over 384x384x96, every crop resized to 64³; shift p=0.1 (spec §1.7).
    "cvpr": ViewConfig(region=(384, 384, 96), grid=(4, 4, 1), out_size=(64, 64, 64), shift_p=0.1),
}


def view_preset(name_or_config: str | ViewConfig) -> ViewConfig:
    if isinstance(name_or_config, ViewConfig):
        return name_or_config
    try:
        return PRESETS[name_or_config.lower()]
    except KeyError:
        raise ValueError(f"unknown view preset {name_or_config!r}; choose one of {sorted(PRESETS)}") from None


@dataclass(frozen=True)
class LossConfig:
    """Weights and variant of the VoCo loss (method spec §3)."""

    variant: str = "tpami"  # "tpami": intra + inter + reg; "cvpr": symmetrised intra, squared negatives, reg
    w_intra: float = 1.0
    w_inter: float = 1.0
    w_reg: float = 1.0
    form: str = "code"  # "code": the released code's losses; "paper": the paper's equations (spec §3.9)


@dataclass(frozen=True)
class HeadConfig:
    """Projection heads and EMA teacher (method spec §2.3–2.4)."""

    hidden_dim: int = 1024
    out_dim: int = 1024
    ema_momentum: float = 0.9
    teacher_init: str = "random"  # upstream: independently random; "copy" starts equal to the student
    dropout_p: float = 0.2
    dropout_mode: str = "sample"  # "sample": upstream Dropout1d on (N, D) drops whole rows; "feature": per feature


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation, precision, distribution, logging and data settings of a pre-training run.

    Defaults follow the authors' TPAMI recipe (method spec §5.1): AdamW(lr 1e-4, amsgrad, PyTorch's default
    weight decay 0.01), 5,000 linear warmup steps then a half cosine to 0, stepped every iteration. Where we
    differ on purpose: AMP is a real choice (upstream forces it on), every step is seeded, resume is exact.
    """

    lr: float = 1e-4  # for the effective batch below; not rescaled automatically
    warmup_steps: int = 5000
    weight_decay: float = 0.01
    amsgrad: bool = True
    accum: int = 1  # micro-batches per optimizer step (effective batch = batch_size * accum * world size)
    clip: float = 0.0  # max gradient norm; 0 = off
    amp: str = "off"  # "off" | "bf16" | "fp16" (fp16 adds a GradScaler); CUDA only, forced off on CPU
    grad_checkpoint: bool = False  # recompute each encoder stage in backward (memory for time)
    compile: bool = False  # torch.compile the encoder (opt-in)
    ema_scope: str = "head"  # "head": TPAMI, EMA teacher head, shared backbone; "full": CVPR, EMA of backbone+head
    sync_bn: bool = False  # SyncBatchNorm in the heads under DDP on GPUs (the CVPR code does this)
    seed: int = 0
    checkpoint_every: int = 1000  # steps; also on SIGTERM/SIGINT and at the end
    keep_last: int = 3  # full-state checkpoints kept
    eval_every: int = 500  # steps between held-out position-prediction evaluations (also at 0 and the end)
    log_every: int = 10  # steps between metrics.jsonl lines
    tune_allocator: bool = True  # CPU/glibc: keep freed memory instead of unmapping it (≈1.7x faster steps)
    # data
    workers: int = 0  # DataLoader worker processes per rank
    chain: str = "abdomen"  # preprocessing chain (voco_lib.data.preprocess.CHAINS)
    region_mode: str | None = None  # None: the chain's; "crop" | "resize" (whole volume resized to the region)
    cache_dir: str | None = None  # preprocessing cache; None: $VOCO_DATA_DIR (or ~/.cache/voco)/preprocessed
    phantom_shape: Triple = (160, 160, 128)  # voxels, for --data phantom
    phantom_spacing: float = 1.5  # mm; phantoms are made at this spacing and not resampled again
    n_eval: int = 4  # held-out volumes whose fixed views measure position-prediction accuracy


@dataclass(frozen=True)
class FinetuneConfig:
    """Downstream fine-tuning (`voco_lib.tasks`). `None` takes the task manifest's value (the authors' recipe).

    Upstream (spec §7.2): AdamW lr 3e-4 wd 1e-5, warmup-cosine stepped per iteration, one volume -> 4 crops per
    iteration, validation every 10 epochs with a 0.75-overlap sliding window.
    """

    steps: int | None = None  # None: task epochs x training volumes (one volume per iteration, as upstream)
    batch_size: int = 4  # crops (segmentation) or volumes/pairs per micro-batch and process
    accum: int = 1  # micro-batches per optimizer step (global batch = batch_size * accum * torchrun processes)
    lr: float | None = None  # None: the task's
    weight_decay: float = 1e-5
    warmup_steps: int | None = None  # None: the task's warmup epochs x training volumes (0 if not known)
    roi: Triple | None = None  # None: the task's
    eval_every: int | None = None  # steps; None: every 10 epochs
    n_train: int = 8  # phantom tasks: labelled pool (--n-labeled K keeps the first K)
    n_val: int = 4  # phantom tasks: validation volumes (pairs for registration)
    sw_overlap: float = 0.75
    sw_batch_size: int = 2
    hd95: bool = True  # HD95 in the final evaluation (segmentation)
    min_coverage: float = 1.0  # encoder keys an init checkpoint must cover (in_channels != 1 lowers it, listed)
    text_encoder: str = "transformer"  # vision-language: "transformer" | "bag" | "module:factory"
    amp: str = "off"  # "off" | "bf16" | "fp16"; CUDA only
    checkpoint_every: int = 500
    keep_last: int = 2
    log_every: int = 10


@dataclass(frozen=True)
class Profile:
    """A named run profile: where it runs and what it costs. Later modules add their own sections."""

    name: str
    views: ViewConfig
    feature_size: int
    batch_size: int  # volumes per step (per process)
    n_volumes: int  # phantoms generated for the run
    steps: int
    loss: LossConfig = field(default_factory=LossConfig)
    heads: HeadConfig = field(default_factory=HeadConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)


# Phantom runs: a whole torso at 3 mm (80x80x64 voxels) resized to the region (the TPAMI head/neck "resize"
# mode), so base crops are anatomical quadrants and position is learnable in minutes on a CPU. Per-crop
# flips/rot90 are off there: with them, held-out position accuracy stayed at chance for 100+ steps (even
# with a toy CNN encoder), without them a toy CNN reached 0.6-0.7 top-1 (chance 0.25) in 30 steps.
_PHANTOM = dict(region_mode="resize", phantom_shape=(80, 80, 64), phantom_spacing=3.0)

PROFILES: dict[str, Profile] = {
    "smoke": Profile(
        "smoke", ViewConfig(region=(64, 64, 32), grid=(2, 2, 1), n_random=2, augment=False), feature_size=12,
        batch_size=2, n_volumes=4, steps=4, heads=HeadConfig(hidden_dim=256, out_dim=256),
        train=TrainConfig(lr=5e-4, warmup_steps=2, checkpoint_every=2, eval_every=2, log_every=1, n_eval=2,
                          **_PHANTOM),
    ),
    "cpu": Profile(
        "cpu", ViewConfig(region=(64, 64, 32), grid=(2, 2, 1), n_random=2, augment=False), feature_size=12,
        batch_size=2, n_volumes=32, steps=100, heads=HeadConfig(hidden_dim=512, out_dim=512),
        train=TrainConfig(lr=5e-4, warmup_steps=10, checkpoint_every=25, eval_every=20, log_every=5, n_eval=4,
                          **_PHANTOM),
    ),
    # One GPU: TPAMI views (3x3 grid of 64³), Swin-B, bf16, gradient checkpointing, user data.
    "gpu": Profile(
        "gpu", PRESETS["tpami"], feature_size=48, batch_size=2, n_volumes=0, steps=100_000,
        train=TrainConfig(amp="bf16", grad_checkpoint=True, warmup_steps=5000, checkpoint_every=2000,
                          eval_every=2000, log_every=50, workers=8),
    ),
    # The authors' TPAMI recipe (spec §5.1): 2 volumes per GPU x 8 GPUs (torchrun --nproc_per_node=8),
    # AdamW lr 1e-4 amsgrad wd 0.01, 5,000 warmup steps, 2,000,000 steps (their default), fp16 AMP with a
    # GradScaler, gradient checkpointing, 16 workers, a checkpoint every 20,000 steps. feature_size=96|192: L|H.
    "paper": Profile(
        "paper", PRESETS["tpami"], feature_size=48, batch_size=2, n_volumes=0, steps=2_000_000,
        train=TrainConfig(amp="fp16", grad_checkpoint=True, warmup_steps=5000, checkpoint_every=20_000,
                          eval_every=20_000, log_every=100, workers=16),
    ),
}


# Fine-tuning per profile (voco_lib.tasks), set here so each module edits its own lines. smoke/cpu are sized
# for the phantom tasks: 64x64x32 volumes, 32³ crops/windows/inputs (the pre-training's crop size);
# gpu/paper keep the authors' recipe from the task manifest.
_FINETUNE = {
    "smoke": FinetuneConfig(steps=4, batch_size=1, roi=(32, 32, 32), eval_every=2, n_train=2, n_val=2,
                            sw_overlap=0.25, checkpoint_every=2, log_every=1),
    "cpu": FinetuneConfig(steps=80, batch_size=2, roi=(32, 32, 32), eval_every=20, n_train=8, n_val=4,
                          sw_overlap=0.25, checkpoint_every=40, log_every=5),
    "gpu": FinetuneConfig(amp="bf16"),
    "paper": FinetuneConfig(amp="fp16"),
}
PROFILES = {k: replace(p, finetune=_FINETUNE.get(k, p.finetune)) for k, p in PROFILES.items()}


def profile_name(requested: str | None = None) -> str:
    """`VOCO_PROFILE` (CI sets `smoke`) wins over the requested profile."""
    name = os.environ.get("VOCO_PROFILE") or requested or "cpu"
    if name not in PROFILES:
        raise ValueError(f"unknown profile {name!r}; choose one of {sorted(PROFILES)}")
    return name


def _coerce(value: str, current: Any, hint: str = "") -> Any:
    """A command-line string as the type of the field: its current value's, or its declared type when unset."""
    if value.lower() == "none" and (current is None or "None" in hint):
        return None
    kind = type(current) if current is not None else next(
        (t for t in (bool, tuple, float, int) if t.__name__ in hint or (t is tuple and "Triple" in hint)), str)
    if kind is bool:
        if value.lower() in {"1", "true", "yes", "on"}:
            return True
        if value.lower() in {"0", "false", "no", "off"}:
            return False
        raise ValueError(f"expected a boolean, got {value!r}")
    if kind is tuple:
        return tuple(int(v) for v in value.replace("x", ",").split(","))
    return kind(value) if kind in (int, float) else value


def override(obj: Any, assignments: dict[str, str] | list[str], _prefix: str = "") -> Any:
    """Apply `a.b=value` overrides to nested frozen dataclasses, with typed coercion (no truthy strings).

    All assignments to one section are applied together, so the section is validated once, in its final
    state (`views.grid=3x3x1 views.region=...` works in either order)."""
    if isinstance(assignments, list):
        pairs = {}
        for item in assignments:
            if "=" not in item:
                raise ValueError(f"override {item!r} is not of the form key=value")
            k, v = item.split("=", 1)
            pairs[k.strip()] = v.strip()
        assignments = pairs
    names = {f.name for f in dataclasses.fields(obj)}
    changes: dict[str, Any] = {}
    nested: dict[str, dict[str, str]] = {}
    for key, value in assignments.items():
        head, _, rest = key.partition(".")
        if head not in names:
            raise ValueError(f"unknown config key {_prefix + key!r}; known: {sorted(names)}")
        if rest:
            nested.setdefault(head, {})[rest] = value
        else:
            hint = str(typing.get_type_hints(type(obj)).get(head, ""))
            changes[head] = value if not isinstance(value, str) else _coerce(value, getattr(obj, head), hint)
    for head, sub in nested.items():
        changes[head] = override(changes.get(head, getattr(obj, head)), sub, f"{_prefix}{head}.")
    return replace(obj, **changes) if changes else obj


def resolve(profile: str | None = None, overrides: dict[str, str] | list[str] | None = None) -> Profile:
    """The one config path: named profile (or `VOCO_PROFILE`) plus overrides."""
    return override(PROFILES[profile_name(profile)], overrides or {})


def to_dict(obj: Any) -> dict[str, Any]:
    return dataclasses.asdict(obj)


def profile_from_dict(d: dict[str, Any]) -> Profile:
    """Inverse of `to_dict` (a run's config.yaml -> Profile): every section rebuilt, lists back to tuples."""

    def build(cls: type, values: dict[str, Any]) -> Any:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown {cls.__name__} keys in config: {unknown}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})

    d = dict(d)
    sections = {"views": ViewConfig, "loss": LossConfig, "heads": HeadConfig, "train": TrainConfig,
                "finetune": FinetuneConfig}
    for k, cls in sections.items():
        if isinstance(d.get(k), dict):
            d[k] = build(cls, d[k])
    return Profile(**d)
