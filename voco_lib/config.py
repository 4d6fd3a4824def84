"""Dataclass configs: the TPAMI/CVPR view presets and the named run profiles.

One config path: a named profile plus `key=value` overrides (see `resolve`), `method=NAME` among them (the
pre-training methods of `voco_lib.methods`).
The environment variable `VOCO_PROFILE` (CI sets `smoke`) stands in only where no profile was given. Every
value is range-checked when its section is built, so a bad key fails at once, naming the key and a fix.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import typing
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

Triple = tuple[int, int, int]
AMP = ("off", "bf16", "fp16")


def _check(key: str, value: Any, ok: bool, rule: str, example: Any) -> None:
    """A bad value fails when the config is built (not after work was done), naming the key, the rule and a fix."""
    if not ok:
        raise ValueError(f"{key} must be {rule}, got {value!r}; set e.g. {key}={example}")


def _at_least(key: str, value: float | None, low: float, optional: bool = False) -> None:
    if value is None and optional:
        return
    _check(key, value, value is not None and value >= low, f"≥ {low:g}" + (" (or none)" if optional else ""), low)


def _positive(key: str, value: float | None, example: float, optional: bool = False) -> None:
    if value is None and optional:
        return
    _check(key, value, value is not None and value > 0, "> 0" + (" (or none)" if optional else ""), example)


def _fraction(key: str, value: float, closed: bool = False) -> None:
    ok = 0 <= value <= 1 if closed else 0 <= value < 1
    _check(key, value, ok, "in [0, 1]" if closed else "in [0, 1)", 0)


def _one_of(key: str, value: Any, choices: Collection[Any]) -> None:
    _check(key, value, value in choices, f"one of {sorted(choices, key=str)}", sorted(choices, key=str)[0])


def _voxels(key: str, value: tuple[int, ...] | None) -> None:
    if value is not None:
        _check(key, value, len(value) == 3 and all(v >= 1 for v in value), "three sizes ≥ 1", "64x64x64")


@dataclass(frozen=True)
class ViewConfig:
    """Geometry and per-crop augmentation of VoCo's views.

    The region is tiled by `grid` base crops; random crops have the base-crop size (as upstream) unless
    `crop` says otherwise, and may be resized to `out_size` (CVPR resizes 96³ crops to 64³).
    Augmentation probabilities follow the authors' TPAMI code (Luffy03/Large-Scale-Medical
    Self-supervised/utils/voco_trans.py:L55-64,L89-100, commit 1ad538b).
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
        _voxels("views.crop", self.crop)
        _voxels("views.out_size", self.out_size)
        _at_least("views.n_random", self.n_random, 1)
        for key in ("flip_p", "rot90_p", "shift_p"):
            _fraction(f"views.{key}", getattr(self, key), closed=True)


PRESETS: dict[str, ViewConfig] = {
    # TPAMI: 3x3x1 grid of 64³ base crops over 192x192x64 (Luffy03/Large-Scale-Medical
    # Self-supervised/utils/voco_trans.py:L80-145, commit 1ad538b).
    "tpami": ViewConfig(),
    # CVPR 2024: 4x4x1 grid of 96³ over 384x384x96, every crop resized to 64³; shift p=0.1 (Luffy03/VoCo
    # utils/data_utils.py:L151-406, commit ba7b7bd).
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
    """Weights and variant of the VoCo loss (Luffy03/Large-Scale-Medical Self-supervised/models/voco_head.py:L259-336,
    commit 1ad538b)."""

    variant: str = "tpami"  # "tpami": intra + inter + reg; "cvpr": symmetrised intra, squared negatives, reg
    w_intra: float = 1.0
    w_inter: float = 1.0
    w_reg: float = 1.0
    form: str = "code"  # "code": the released code's losses; "paper": the TPAMI paper's equations

    def __post_init__(self) -> None:
        _one_of("loss.variant", self.variant, ("tpami", "cvpr"))
        _one_of("loss.form", self.form, ("code", "paper"))


@dataclass(frozen=True)
class HeadConfig:
    """Projection heads and EMA teacher (Luffy03/Large-Scale-Medical Self-supervised/models/voco_head.py:L25-55,
    L223-250, commit 1ad538b)."""

    hidden_dim: int = 1024
    out_dim: int = 1024
    ema_momentum: float = 0.9
    teacher_init: str = "random"  # upstream: independently random; "copy" starts equal to the student
    dropout_p: float = 0.2
    dropout_mode: str = "sample"  # "sample": upstream Dropout1d on (N, D) drops whole rows; "feature": per feature

    def __post_init__(self) -> None:
        _at_least("heads.hidden_dim", self.hidden_dim, 1)
        _at_least("heads.out_dim", self.out_dim, 1)
        _fraction("heads.ema_momentum", self.ema_momentum, closed=True)
        _one_of("heads.teacher_init", self.teacher_init, ("random", "copy"))
        _fraction("heads.dropout_p", self.dropout_p)
        _one_of("heads.dropout_mode", self.dropout_mode, ("sample", "feature"))


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation, precision, distribution and logging of a pre-training run (its data: `DataConfig`).

    Defaults follow the authors' TPAMI recipe (Luffy03/Large-Scale-Medical Self-supervised/voco_train.py:L184-191,
    optimizers/lr_scheduler.py:L62-89 and dist_B.sh, commit 1ad538b): AdamW(lr 1e-4, amsgrad, PyTorch's default
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

    def __post_init__(self) -> None:
        _positive("train.lr", self.lr, 1e-4)
        _at_least("train.warmup_steps", self.warmup_steps, 0)
        _at_least("train.weight_decay", self.weight_decay, 0)
        _at_least("train.accum", self.accum, 1)
        _at_least("train.clip", self.clip, 0)
        _one_of("train.amp", self.amp, AMP)
        _one_of("train.ema_scope", self.ema_scope, ("head", "full"))
        for key in ("checkpoint_every", "keep_last", "eval_every", "log_every"):
            _at_least(f"train.{key}", getattr(self, key), 1)


@dataclass(frozen=True)
class DataConfig:
    """Where pre-training volumes come from and how they are prepared (defaults: the TPAMI abdomen recipe)."""

    workers: int = 0  # DataLoader worker processes per rank
    chain: str = "abdomen"  # preprocessing chain (voco_lib.data.preprocess.CHAINS)
    region_mode: str | None = None  # None: the chain's; "crop" | "resize" (whole volume resized to the region)
    cache_dir: str | None = None  # preprocessing cache; None: $VOCO_DATA_DIR (or ~/.cache/voco)/preprocessed
    phantom_shape: Triple = (160, 160, 128)  # voxels, for --data phantom
    phantom_spacing: float = 1.5  # mm; phantoms are made at this spacing and not resampled again
    n_eval: int = 4  # held-out volumes whose fixed views measure position-prediction accuracy

    def __post_init__(self) -> None:
        _at_least("data.workers", self.workers, 0)
        if self.region_mode is not None:
            _one_of("data.region_mode", self.region_mode, ("crop", "resize"))
        _voxels("data.phantom_shape", self.phantom_shape)
        _positive("data.phantom_spacing", self.phantom_spacing, 1.5)
        _at_least("data.n_eval", self.n_eval, 0)


@dataclass(frozen=True)
class FinetuneConfig:
    """Downstream fine-tuning (`voco_lib.tasks`). `None` takes the task manifest's value (the authors' recipe).

    Upstream (Luffy03/Large-Scale-Medical Downstream/monai/<Task>/main.py defaults, commit 1ad538b): AdamW
    lr 3e-4 wd 1e-5, warmup-cosine stepped per iteration, one volume -> 4 crops per
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
    protocol: str = "full"  # "full": fine-tune everything | "frozen": encoder fixed, a probe/head trained on it
    encoder_lr_scale: float = 1.0  # encoder lr = lr x this (full protocol); decoder/head keep lr
    layer_decay: float = 1.0  # layer-wise lr decay over the encoder's stages (1.0: off); deeper stages keep more
    flip_p: float = 0.2  # per-axis flip probability of training crops (segmentation; upstream RandFlipd p=0.2)
    text_encoder: str = "transformer"  # vision-language: "transformer" | "bag" | "module:factory"
    amp: str = "off"  # "off" | "bf16" | "fp16"; CUDA only
    checkpoint_every: int = 500
    keep_last: int = 2
    log_every: int = 10

    def __post_init__(self) -> None:
        _at_least("finetune.steps", self.steps, 1, optional=True)
        _at_least("finetune.batch_size", self.batch_size, 1)
        _at_least("finetune.accum", self.accum, 1)
        _positive("finetune.lr", self.lr, 3e-4, optional=True)
        _at_least("finetune.weight_decay", self.weight_decay, 0)
        _at_least("finetune.warmup_steps", self.warmup_steps, 0, optional=True)
        _voxels("finetune.roi", self.roi)
        _at_least("finetune.eval_every", self.eval_every, 1, optional=True)
        _at_least("finetune.n_train", self.n_train, 1)
        _at_least("finetune.n_val", self.n_val, 1)
        _fraction("finetune.sw_overlap", self.sw_overlap)
        _at_least("finetune.sw_batch_size", self.sw_batch_size, 1)
        _fraction("finetune.min_coverage", self.min_coverage, closed=True)
        _one_of("finetune.protocol", self.protocol, ("full", "frozen"))
        _at_least("finetune.encoder_lr_scale", self.encoder_lr_scale, 0)
        _check("finetune.layer_decay", self.layer_decay, 0 < self.layer_decay <= 1, "in (0, 1]", 0.75)
        _fraction("finetune.flip_p", self.flip_p, closed=True)
        _one_of("finetune.amp", self.amp, AMP)
        for key in ("checkpoint_every", "keep_last", "log_every"):
            _at_least(f"finetune.{key}", getattr(self, key), 1)


@dataclass(frozen=True)
class MaskConfig:
    """`method=mae`: SimMIM-style masked volume modelling (Xie et al., "SimMIM", CVPR 2022).

    SimMIM's Swin recipe masks 60 % of 32-pixel patches of 192-pixel images, replaces the masked patch
    embeddings by a learned token, predicts the pixels with one linear layer from the stride-32 map and takes
    L1 over masked pixels only (microsoft/SimMIM configs/swin_base__100ep/
    simmim_pretrain__swin_base__img192_window6__100ep.yaml, models/simmim.py, commit 0e71746). The phantom
    profiles' crops are 32³, where a 32³ mask patch would mask whole crops: they use 8 (about SimMIM's
    patch/image ratio of 1/6).
    """

    mask_ratio: float = 0.6
    patch: int = 32  # voxels per side of a mask patch: a multiple of the Swin patch (2) dividing every crop side

    def __post_init__(self) -> None:
        _check("mae.mask_ratio", self.mask_ratio, 0 < self.mask_ratio < 1, "in (0, 1)", 0.6)
        _check("mae.patch", self.patch, self.patch >= 2 and self.patch % 2 == 0, "an even size ≥ 2", 16)


@dataclass(frozen=True)
class SwinSSLConfig:
    """`method=swin-ssl`: Swin UNETR's pretext tasks (Tang et al., "Self-Supervised Pre-Training of Swin
    Transformers for 3D Medical Image Analysis", CVPR 2022): inpainting of cut-out blocks (L1), rotation
    prediction (4 classes, cross-entropy) and contrastive coding of two views (NT-Xent).

    Weights 1, 1, 1 and temperature 0.5 as the authors' code (Project-MONAI/research-contributions
    SwinUNETR/Pretrain/losses/loss.py, commit 38d76f2); the cut-outs as its utils/ops.py (commit 57c3c83):
    up to 30 % of the voxels in blocks of up to 1/4 of each side.
    """

    w_rot: float = 1.0
    w_contrast: float = 1.0
    w_recon: float = 1.0
    temperature: float = 0.5
    max_drop: float = 0.3  # largest fraction of a crop's voxels cut out (drawn uniformly in [0, max_drop))
    max_block: float = 0.25  # largest cut-out block side, as a fraction of the crop side
    contrast_dim: int = 512

    def __post_init__(self) -> None:
        for key in ("w_rot", "w_contrast", "w_recon"):
            _at_least(f"swinssl.{key}", getattr(self, key), 0)
        _positive("swinssl.temperature", self.temperature, 0.5)
        _fraction("swinssl.max_drop", self.max_drop)
        _check("swinssl.max_block", self.max_block, 0 < self.max_block <= 1, "in (0, 1]", 0.25)
        _at_least("swinssl.contrast_dim", self.contrast_dim, 1)


# The pre-training methods (their code: `voco_lib.methods.REGISTRY`, same names) and the overrides each
# expands to. voco-cvpr (Luffy03/VoCo models/voco_head.py, commit ba7b7bd): full-network EMA, 2048-wide head
# without the embedding dropout, the CVPR loss; on the profiles with real data (`CVPR_VIEWS_ON`) also the
# CVPR views (4x4 grid of 96³ -> 64³), which the phantom profiles cannot afford. `voco` is the default.
METHODS: dict[str, dict[str, str]] = {
    "voco": {},
    "voco-cvpr": {"loss.variant": "cvpr", "train.ema_scope": "full", "train.sync_bn": "true", "heads.dropout_p": "0",
                  "heads.hidden_dim": "2048", "heads.out_dim": "2048"},
    "voco-single": {},
    "mae": {},
    "swin-ssl": {},
}
METHOD_ALIASES = {"tpami": "voco", "cvpr": "voco-cvpr"}  # the names `method=` took before the registry
CVPR_VIEWS_ON = ("gpu", "paper")


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
    data: DataConfig = field(default_factory=DataConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    mae: MaskConfig = field(default_factory=MaskConfig)
    swinssl: SwinSSLConfig = field(default_factory=SwinSSLConfig)
    method: str = "voco"  # the pre-training method (`voco_lib.methods`); set by `method=NAME` in `resolve`

    def __post_init__(self) -> None:
        _one_of("method", self.method, METHODS)
        # MONAI's SwinUNETR (whose parameter names and released weights we share) needs feature_size % 12 == 0
        _check("feature_size", self.feature_size, self.feature_size >= 12 and self.feature_size % 12 == 0,
               "a positive multiple of 12", 48)
        _at_least("batch_size", self.batch_size, 1)
        _at_least("n_volumes", self.n_volumes, 0)
        _at_least("steps", self.steps, 1)


# Phantom runs: a torso scan range at 3 mm (80x80x64 voxels) resized to the region (the TPAMI head/neck "resize"
# mode), so base crops are anatomical quadrants and position is learnable in minutes on a CPU. Per-crop
# flips/rot90 are off there: with them, held-out position accuracy stayed at chance for 100+ steps (even
# with a toy CNN encoder), without them a toy CNN reached 0.6-0.7 top-1 (chance 0.25) in 30 steps.
# Fine-tuning on smoke/cpu is sized for the phantom tasks: 64x64x32 volumes, 32³ crops/windows/inputs (the
# pre-training's crop size); gpu/paper keep the authors' recipe from the task manifest.
PROFILES: dict[str, Profile] = {
    "smoke": Profile(
        "smoke", ViewConfig(region=(64, 64, 32), grid=(2, 2, 1), n_random=2, augment=False), feature_size=12,
        batch_size=2, n_volumes=4, steps=4, heads=HeadConfig(hidden_dim=256, out_dim=256),
        train=TrainConfig(lr=5e-4, warmup_steps=2, checkpoint_every=2, eval_every=2, log_every=1),
        data=DataConfig(region_mode="resize", phantom_shape=(80, 80, 64), phantom_spacing=3.0, n_eval=2),
        finetune=FinetuneConfig(steps=4, batch_size=1, roi=(32, 32, 32), eval_every=2, n_train=2, n_val=2,
                                sw_overlap=0.25, checkpoint_every=2, log_every=1),
        mae=MaskConfig(patch=8),
    ),
    "cpu": Profile(
        "cpu", ViewConfig(region=(64, 64, 32), grid=(2, 2, 1), n_random=2, augment=False), feature_size=12,
        batch_size=2, n_volumes=32, steps=100, heads=HeadConfig(hidden_dim=512, out_dim=512),
        train=TrainConfig(lr=5e-4, warmup_steps=10, checkpoint_every=25, eval_every=20, log_every=5),
        data=DataConfig(region_mode="resize", phantom_shape=(80, 80, 64), phantom_spacing=3.0, n_eval=4),
        finetune=FinetuneConfig(steps=80, batch_size=2, roi=(32, 32, 32), eval_every=20, n_train=8, n_val=4,
                                sw_overlap=0.25, checkpoint_every=40, log_every=5),
        mae=MaskConfig(patch=8),
    ),
    # One GPU: TPAMI views (3x3 grid of 64³), Swin-B, bf16, gradient checkpointing, user data.
    "gpu": Profile(
        "gpu", PRESETS["tpami"], feature_size=48, batch_size=2, n_volumes=0, steps=100_000,
        train=TrainConfig(amp="bf16", grad_checkpoint=True, warmup_steps=5000, checkpoint_every=2000,
                          eval_every=2000, log_every=50),
        data=DataConfig(workers=8),
        finetune=FinetuneConfig(amp="bf16"),
    ),
    # The authors' TPAMI recipe (Large-Scale-Medical voco_train.py:L184-191, dist_B.sh): 2 volumes per GPU x 8
    # GPUs (torchrun --nproc_per_node=8), AdamW lr 1e-4 amsgrad wd 0.01, 5,000 warmup steps, 2,000,000 steps (their default), fp16 AMP with a
    # GradScaler, gradient checkpointing, 16 workers, a checkpoint every 20,000 steps. feature_size=96|192: L|H.
    "paper": Profile(
        "paper", PRESETS["tpami"], feature_size=48, batch_size=2, n_volumes=0, steps=2_000_000,
        train=TrainConfig(amp="fp16", grad_checkpoint=True, warmup_steps=5000, checkpoint_every=20_000,
                          eval_every=20_000, log_every=100),
        data=DataConfig(workers=16),
        finetune=FinetuneConfig(amp="fp16"),
    ),
}



def profile_name(requested: str | None = None) -> str:
    """The requested profile; when none is given, `VOCO_PROFILE` (said on stderr) or else `cpu`.

    An explicit profile always wins, so CI's `VOCO_PROFILE=smoke` cannot change what a caller asked for,
    nor a finished run that is reloaded with its stored profile."""
    name = requested
    if name is None:
        name = os.environ.get("VOCO_PROFILE") or None
        if name is not None:
            print(f"voco: profile {name} from VOCO_PROFILE (no profile given)", file=sys.stderr)
    name = name or "cpu"
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


def _pairs(assignments: dict[str, Any] | Sequence[str]) -> dict[str, Any]:
    """`["a.b=1", ...]` as `{"a.b": "1"}` (a dict passes through); later assignments of a key win."""
    if isinstance(assignments, dict):
        return dict(assignments)
    pairs = {}
    for item in assignments:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not of the form key=value")
        k, v = item.split("=", 1)
        pairs[k.strip()] = v.strip()
    return pairs


def override(obj: Any, assignments: dict[str, Any] | Sequence[str], _prefix: str = "") -> Any:
    """Apply `a.b=value` overrides to nested frozen dataclasses, with typed coercion (no truthy strings).

    All assignments to one section are applied together, so the section is validated once, in its final
    state (`views.grid=3x3x1 views.region=...` works in either order)."""
    assignments = _pairs(assignments)
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


def method_name(name: str) -> str:
    """The registry name of `method=name` (old aliases tpami/cvpr accepted); a clear error for an unknown one."""
    key = str(name).strip().lower()
    key = METHOD_ALIASES.get(key, key)
    if key not in METHODS:
        raise ValueError(f"unknown method={name!r}; choose one of {sorted(METHODS)} (aliases: "
                         f"{', '.join(f'{a}={b}' for a, b in METHOD_ALIASES.items())})")
    return key


def resolve(profile: str | None = None, overrides: dict[str, Any] | Sequence[str] | None = None) -> Profile:
    """The one config path: a named profile (None: see `profile_name`) plus overrides.

    `method=NAME` among the overrides expands to `METHODS[NAME]` (plus the CVPR views on `CVPR_VIEWS_ON` for
    voco-cvpr) before the other overrides, so an explicit key still beats the method's; the name is stored in
    the profile (and so in a run's config.yaml)."""
    items = _pairs(overrides or {})
    method = method_name(items.pop("method", "voco"))
    base = PROFILES[profile_name(profile)]
    if method == "voco-cvpr" and base.name in CVPR_VIEWS_ON:
        base = replace(base, views=PRESETS["cvpr"])
    return override(base, {"method": method, **METHODS[method], **items})


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
                "data": DataConfig, "finetune": FinetuneConfig, "mae": MaskConfig, "swinssl": SwinSSLConfig}
    for k, cls in sections.items():
        if isinstance(d.get(k), dict):
            d[k] = build(cls, d[k])
    return Profile(**d)
