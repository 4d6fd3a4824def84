"""Per-anatomy preprocessing (MONAI dictionary transforms) and the pretraining region sampler.

Two explicit stages, where upstream hid the boundary behind a dummy `RandShiftIntensityd(prob=0)`
(Luffy03/Large-Scale-Medical Self-supervised/utils/data_trans.py:L81, commit 1ad538b): a deterministic chain (load
and check -> RAS -> spacing -> intensity -> foreground
crop -> pad), whose output `voco_lib.data.cache` stores on disk, and `sample_region`, the random part
that runs every time (random crop of a padded volume, or resize of the whole volume).

Chains, from `Luffy03/Large-Scale-Medical: Self-supervised/utils/data_trans.py` (commit 1ad538b) and
`Luffy03/VoCo: utils/data_utils.py:L151-406` (commit ba7b7bd):

| chain              | spacing (mm)       | intensity                    | region from the volume |
|--------------------|--------------------|------------------------------|------------------------|
| abdomen            | 1.5 iso            | HU [-175, 250] -> [0, 1]     | pad + random crop      |
| abdomen_unlabelled | 1.5 iso            | HU [-175, 250] -> [0, 1]     | resize whole volume    |
| headneck           | 1.5 iso            | HU [-175, 250] -> [0, 1]     | resize whole volume    |
| chest              | 1.25 x 1.25 x 5    | HU [-1000, 500] -> [0, 1]    | pad + random crop      |
| mri                | 1.5 iso (ours)     | z-score of non-zero voxels   | pad + random crop      |
| cvpr               | kept (no Spacingd) | HU [-175, 250], fg > 0.3     | resize fg box (384²x96)|

For pretraining only the image is loaded: upstream loads, resamples and caches the label and then
deletes it (Luffy03/Large-Scale-Medical Self-supervised/utils/voco_trans.py:L23-24), which costs I/O and cache space for nothing.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from monai.data import MetaTensor
from monai.transforms import (
    Compose,
    CropForegroundd,
    MapTransform,
    NormalizeIntensityd,
    Orientationd,
    ScaleIntensityRanged,
    Spacingd,
    SpatialPadd,
)

from voco_lib.data.volumes import Volume, VolumeError, check_volume, load_channels, load_pair, load_volume

Triple = tuple[int, int, int]
# nibabel's axis-code convention: "R" means the first axis increases towards the patient's right (RAS+).
_RAS_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))


@dataclass(frozen=True)
class Chain:
    """Settings of one deterministic preprocessing chain (all of them go into the cache key)."""

    name: str
    modality: str = "CT"  # "CT": HU window; "MRI": non-zero z-score, channel-wise
    spacing: tuple[float, float, float] | None = (1.5, 1.5, 1.5)  # None: keep the file's spacing
    hu_window: tuple[float, float] | None = (-175.0, 250.0)  # mapped to [0, 1] and clipped
    foreground_threshold: float = 0.0  # foreground = normalised image > threshold (MRI: != 0)
    min_size: Triple = (64, 64, 64)  # SpatialPad after the crop (upstream pads to the 64³ crop size)
    region_mode: str = "crop"  # how `sample_region` gets the pretraining region: "crop" | "resize"

    def __post_init__(self) -> None:
        if self.modality not in ("CT", "MRI"):
            raise ValueError(f"chain {self.name!r}: modality must be 'CT' or 'MRI', got {self.modality!r}")
        if self.modality == "CT" and self.hu_window is None:
            raise ValueError(f"chain {self.name!r}: a CT chain needs hu_window")
        if self.region_mode not in ("crop", "resize"):
            raise ValueError(f"chain {self.name!r}: region_mode must be 'crop' or 'resize'")

    def settings(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_ABDOMEN = Chain("abdomen")
CHAINS: dict[str, Chain] = {
    "abdomen": _ABDOMEN,
    "abdomen_unlabelled": dataclasses.replace(_ABDOMEN, name="abdomen_unlabelled", region_mode="resize"),
    "headneck": dataclasses.replace(_ABDOMEN, name="headneck", region_mode="resize"),
    "chest": Chain("chest", spacing=(1.25, 1.25, 5.0), hu_window=(-1000.0, 500.0)),
    "mri": Chain("mri", modality="MRI", hu_window=None),
    "cvpr": Chain("cvpr", spacing=None, foreground_threshold=0.3, region_mode="resize"),
}


def get_chain(name_or_chain: str | Chain) -> Chain:
    if isinstance(name_or_chain, Chain):
        return name_or_chain
    try:
        return CHAINS[name_or_chain]
    except KeyError:
        raise ValueError(f"unknown preprocessing chain {name_or_chain!r}; choose one of {sorted(CHAINS)}") from None


class LoadVolumed(MapTransform):
    """Load `image` (and `label` when listed) with the checks of `voco_lib.data.volumes`, as MetaTensors.

    With `channels=True` (fine-tuning) `image` may also be a 4-D NIfTI (channels last) or a list of files, one
    per channel (`load_channels`): the result is (C, X, Y, Z), and the MRI z-score below normalises each channel
    on its own non-zero voxels. Pre-training keeps `channels=False`: one 3-D volume per file, else a clear error.
    """

    def __init__(self, keys: Sequence[str], modality: str = "CT", channels: bool = False):
        super().__init__(keys)
        self.modality, self.channels = modality, channels

    def __call__(self, data: dict[str, Any]) -> dict[str, Any]:
        d = dict(data)
        if "label" in self.keys:
            vols = dict(zip(("image", "label"), load_pair(d["image"], d["label"], self.modality, self.channels)))
        elif self.channels:
            vols = {"image": load_channels(d["image"], self.modality)}
        else:
            vols = {"image": load_volume(d["image"], self.modality)}
        for key, v in vols.items():
            d[key] = _meta_tensor(v)
        return d


class _Foreground:
    """Picklable foreground selector for CropForegroundd (worker processes pickle transforms)."""

    def __init__(self, threshold: float, nonzero: bool):
        self.threshold, self.nonzero = threshold, nonzero

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x != 0 if self.nonzero else x > self.threshold


def _meta_tensor(v: Volume) -> MetaTensor:
    """(1, X, Y, Z) for a 3-D volume; a (C, X, Y, Z) channel volume keeps its channels."""
    arr = torch.from_numpy(np.ascontiguousarray(v.array, np.float32))
    arr = arr if arr.ndim == 4 else arr[None]
    return MetaTensor(arr, affine=torch.as_tensor(v.affine, dtype=torch.float64), meta={"filename_or_obj": v.path})


def build_chain(chain: str | Chain, keys: Sequence[str] = ("image",), load: bool = True,
                channels: bool = False) -> Compose:
    """The deterministic MONAI chain. `keys=("image",)` for pretraining; add "label" for fine-tuning.

    `load=False` leaves out the file loader, for volumes already in memory (see `preprocess_array`);
    `channels=True` lets an image have several channels (`LoadVolumed`).
    """
    c = get_chain(chain)
    keys = tuple(keys)
    modes = tuple("nearest" if k == "label" else "bilinear" for k in keys)
    t: list[Any] = [LoadVolumed(keys, c.modality, channels)] if load else []
    t.append(Orientationd(keys, axcodes="RAS", labels=_RAS_LABELS))
    if c.spacing is not None:
        t.append(Spacingd(keys, pixdim=c.spacing, mode=modes, dtype=np.float32))
    if c.modality == "CT":
        lo, hi = c.hu_window  # type: ignore[misc]
        t.append(ScaleIntensityRanged("image", a_min=lo, a_max=hi, b_min=0.0, b_max=1.0, clip=True))
    else:
        t.append(NormalizeIntensityd("image", nonzero=True, channel_wise=True))
    t.append(CropForegroundd(keys, source_key="image", select_fn=_Foreground(c.foreground_threshold, c.modality == "MRI"),
                             allow_smaller=True))
    t.append(SpatialPadd(keys, spatial_size=c.min_size))
    return Compose(t)


def preprocess(path_or_entry: str | Path | dict[str, Any], chain: str | Chain = "abdomen",
               channels: bool = False) -> dict[str, MetaTensor]:
    """Run the deterministic chain on one file (or datalist entry): {"image": (C, X, Y, Z) MetaTensor[, "label"]}.

    C = 1 unless `channels=True` (fine-tuning), where an entry's `image` may list one file per channel
    (C = len(list)) or be a 4-D NIfTI with its channels on the last axis.
    """
    entry = {"image": str(path_or_entry)} if not isinstance(path_or_entry, dict) else dict(path_or_entry)
    keys = [k for k in ("image", "label") if k in entry]
    try:
        return build_chain(chain, keys, channels=channels)(entry)
    except RuntimeError as e:  # MONAI's Compose wraps errors; surface our own file-naming one
        cause = e.__cause__
        while cause is not None and not isinstance(cause, VolumeError):
            cause = cause.__cause__
        if cause is None:
            raise
        raise cause from None


def preprocess_array(
    image: np.ndarray, affine: np.ndarray, chain: str | Chain = "abdomen", label: np.ndarray | None = None,
    name: str = "<array>",
) -> dict[str, MetaTensor]:
    """`preprocess` for a volume in memory (e.g. `make_phantom(seed)`), with the same checks and chain."""
    c = get_chain(chain)
    d = {"image": _meta_tensor(check_volume(image, affine, name, c.modality))}
    if label is not None:
        lab = check_volume(label, affine, f"{name} (label)", kind="label")
        if lab.array.shape != d["image"].shape[1:]:
            raise VolumeError(name, f"label shape {lab.array.shape} differs from image shape {tuple(image.shape)}",
                              "pass the label map made on the image's grid")
        d["label"] = _meta_tensor(lab)
    return build_chain(c, list(d), load=False)(d)


def sample_region(
    volume: torch.Tensor, region: Sequence[int], generator: torch.Generator | None = None, mode: str = "crop"
) -> torch.Tensor:
    """The pretraining region (C, *region) from a preprocessed (C, X, Y, Z) volume; pure torch.

    "crop": zero-pad (the normalised minimum) to at least `region`, centred like MONAI's SpatialPad, then
    a crop with a uniformly random start (TPAMI labelled abdomen and chest). "resize": trilinear resize of
    the whole volume (TPAMI head/neck and unlabelled sets; CVPR resizes the foreground box to 384x384x96).
    """
    region = tuple(int(r) for r in region)
    if volume.ndim != 4 or len(region) != 3:
        raise ValueError(f"expected a (C, X, Y, Z) volume and a 3-D region, got {tuple(volume.shape)} and {region}")
    if mode == "resize":
        return F.interpolate(volume[None].float(), size=region, mode="trilinear", align_corners=True)[0]
    if mode != "crop":
        raise ValueError(f"region mode must be 'crop' or 'resize', got {mode!r}")
    deficit = [max(0, r - s) for r, s in zip(region, volume.shape[1:])]
    if any(deficit):
        pad: list[int] = []
        for d in reversed(deficit):  # F.pad wants the last axis first
            pad += [d // 2, d - d // 2]
        volume = F.pad(volume, pad)
    span = torch.tensor([s - r + 1 for s, r in zip(volume.shape[1:], region)])
    start = (torch.rand(3, generator=generator) * span).long().clamp_max(span - 1).tolist()
    return volume[:, start[0]:start[0] + region[0], start[1]:start[1] + region[1], start[2]:start[2] + region[2]]
