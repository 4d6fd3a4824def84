"""Safe loading of 3-D volumes (NIfTI via nibabel; MHA/NRRD/DICOM series via SimpleITK) with checks that name the fix.

A DICOM series is named by its folder, or `FOLDER#SERIES_UID` when the folder holds several series (what
`voco datalist` writes): one string, so datalists, the cache and the preprocessing chain treat it like a file.

A broken or surprising file should stop a run at load time with a message that says which file and what
to do, not hours later as NaN losses or a shape error deep in a transform. Every check raises
`VolumeError` (a ValueError, so the CLI reports it cleanly); the one soft check, CT intensities that do
not look like Hounsfield units (e.g. an MRI listed as CT), only warns with `HURangeWarning`.
"""

from __future__ import annotations

import gzip
import re
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

# Voxel sizes outside this range (mm) are almost certainly a broken header (metres, microns, 0 or NaN).
SPACING_RANGE_MM = (0.05, 20.0)
NIFTI_SUFFIXES = (".nii", ".nii.gz")
SERIES_SEP = "#"


class VolumeError(ValueError):
    """A volume file that cannot be used as it is; the message names the file and the fix."""

    def __init__(self, path: str | Path, problem: str, fix: str):
        self.path, self.problem, self.fix = str(path), problem, fix
        super().__init__(f"{path}: {problem}. Fix: {fix}")


class HURangeWarning(UserWarning):
    """A CT volume whose intensities do not look like Hounsfield units."""


@dataclass
class Volume:
    """A loaded volume: float32 array in the file's voxel order ((X, Y, Z); (C, X, Y, Z) from `load_channels`),
    and its voxel -> RAS+ affine (mm)."""

    array: np.ndarray
    affine: np.ndarray
    path: str

    @property
    def spacing(self) -> tuple[float, float, float]:
        return tuple(float(v) for v in np.linalg.norm(self.affine[:3, :3], axis=0))  # type: ignore[return-value]


def _read_nifti(path: Path) -> tuple[np.ndarray, np.ndarray]:
    import nibabel as nib
    from nibabel.filebasedimages import ImageFileError

    try:
        img = nib.load(path)
    except (gzip.BadGzipFile, zlib.error, ImageFileError, EOFError, OSError, ValueError) as e:
        if isinstance(e, (gzip.BadGzipFile, zlib.error)) or "gzip" in str(e):
            raise VolumeError(path, f"is not a readable gzip file ({e})",
                              "re-download or re-export it; `gzip -t FILE` shows whether the archive is intact") from None
        raise VolumeError(path, f"has no readable NIfTI header ({type(e).__name__}: {e})",
                          "re-download or re-export it as NIfTI (.nii/.nii.gz)") from None
    try:
        data = np.asarray(img.dataobj)
    except (EOFError, OSError, ValueError, zlib.error) as e:
        raise VolumeError(path, f"is truncated or corrupt: the header promises shape {img.shape} "
                          f"but the voxel data cannot be read ({type(e).__name__}: {e})",
                          "re-download or re-export it (an interrupted copy leaves such files)") from None
    return data, np.asarray(img.affine, np.float64)


def _sitk_arrays(img: Any) -> tuple[np.ndarray, np.ndarray]:
    """(array (x, y, z), RAS+ affine) of a SimpleITK image."""
    import SimpleITK as sitk

    data = sitk.GetArrayFromImage(img).T  # SimpleITK gives (z, y, x); we keep (x, y, z)
    if img.GetDimension() != 3:
        return data, np.eye(4)  # the dimension check reports it
    direction = np.asarray(img.GetDirection()).reshape(3, 3)
    lps = np.eye(4)
    lps[:3, :3] = direction * np.asarray(img.GetSpacing())
    lps[:3, 3] = img.GetOrigin()
    return data, np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps  # ITK works in LPS+; NIfTI and we in RAS+


def _read_sitk(path: Path) -> tuple[np.ndarray, np.ndarray]:
    import SimpleITK as sitk

    try:
        img = sitk.ReadImage(str(path))
    except RuntimeError as e:
        raise VolumeError(path, f"cannot be read by SimpleITK ({str(e).strip().splitlines()[-1]})",
                          "check the format and re-export it, e.g. as NIfTI (.nii.gz)") from None
    return _sitk_arrays(img)


def dicom_source(path: str | Path) -> tuple[Path, str | None] | None:
    """(folder, series UID or None) when `path` names a DICOM series (`FOLDER` or `FOLDER#UID`), else None."""
    folder, sep, uid = str(path).rpartition(SERIES_SEP)
    if sep and re.fullmatch(r"[0-9.]+", uid) and Path(folder).is_dir():
        return Path(folder), uid
    return (Path(path), None) if Path(path).is_dir() else None


def source_exists(path: str | Path) -> bool:
    """A volume file, or a folder (+ series UID) that may hold a DICOM series."""
    return Path(path).is_file() or dicom_source(path) is not None


def series_files(folder: Path, uid: str | None) -> list[str]:
    """The sorted slice files of series `uid` in `folder` (the only series when `uid` is None); errors name the fix."""
    import SimpleITK as sitk

    ids = list(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)))
    if not ids:
        raise VolumeError(folder, "holds no DICOM series (no readable DICOM slices in it)",
                          "point the datalist at the folder that holds the .dcm slices, or convert the scan to NIfTI")
    if uid is None and len(ids) > 1:
        raise VolumeError(folder, f"holds {len(ids)} DICOM series ({', '.join(ids)})",
                          f"name one as FOLDER{SERIES_SEP}SERIES_UID (`voco datalist` writes such entries)")
    if uid is not None and uid not in ids:
        raise VolumeError(folder, f"has no DICOM series {uid} (it holds {', '.join(ids)})",
                          "fix the series UID in the datalist, or rebuild it with `voco datalist`")
    return list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), uid or ids[0]))


def _read_dicom(folder: Path, uid: str | None) -> tuple[np.ndarray, np.ndarray]:
    """A DICOM series in HU (GDCM applies rescale slope/intercept), slices sorted by position."""
    import SimpleITK as sitk

    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(series_files(folder, uid))
    try:
        img = reader.Execute()
    except RuntimeError as e:
        raise VolumeError(folder, f"DICOM series cannot be read ({str(e).strip().splitlines()[-1]})",
                          "check that every slice copied completely, or convert the series to NIfTI (e.g. dcm2niix)") from None
    return _sitk_arrays(img)


def load_volume(path: str | Path, modality: str = "CT", kind: str = "image") -> Volume:
    """Read a 3-D volume and check it: 3-D, finite, not constant, sane spacing; CT looks like HU (else warn).

    `kind="label"` skips the intensity checks that only make sense for images (a label map may be all zero).
    """
    series = dicom_source(path)
    path = Path(path)
    if series is not None:
        data, affine = _read_dicom(*series)
    elif not path.is_file():
        raise VolumeError(path, "does not exist", "check the path (and the data root / VOCO_DATA_DIR it is relative to)")
    else:
        data, affine = _read_nifti(path) if path.name.endswith(NIFTI_SUFFIXES) else _read_sitk(path)
    return check_volume(data, affine, path, modality, kind)


def check_volume(data: np.ndarray, affine: np.ndarray, path: str | Path, modality: str = "CT",
                 kind: str = "image") -> Volume:
    """The checks of `load_volume` on an array already in memory (`path` names it in messages)."""
    affine = np.asarray(affine, np.float64)
    shape = data.shape
    # Trailing singleton axes (x, y, z, 1) are common in NIfTI and harmless.
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim > 3:
        raise VolumeError(path, f"is {data.ndim}-D with shape {shape}, not a single 3-D volume",
                          "split it into 3-D volumes (one channel / time point each), e.g. nibabel's "
                          "img.slicer[..., i] or `fslsplit`, and list those")
    if data.ndim < 3 or min(data.shape) < 2:
        raise VolumeError(path, f"is a 2-D image (shape {shape}), not a volume",
                          "VoCo needs 3-D volumes; stack the slices into one volume (e.g. convert the DICOM series) "
                          "or drop the file from the datalist")
    if not np.isfinite(affine).all() or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise VolumeError(path, "has a missing or singular affine (voxel -> world matrix)",
                          "re-export it with its geometry (qform/sform in NIfTI)")
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    lo, hi = SPACING_RANGE_MM
    if ((spacing < lo) | (spacing > hi)).any():
        raise VolumeError(path, f"has an implausible voxel size {np.round(spacing, 4).tolist()} mm "
                          f"(expected {lo}-{hi} mm per axis)",
                          "fix the header's pixdim/affine (a value in metres or microns, or a scale lost in conversion)")
    if kind == "label":
        if not np.issubdtype(data.dtype, np.integer) and not np.array_equal(data, np.round(data)):
            raise VolumeError(path, "is listed as a label map but holds non-integer values",
                              "check that image and label are not swapped in the datalist")
        return Volume(np.ascontiguousarray(data), affine, str(path))
    data = np.asarray(data, np.float32)
    bad = ~np.isfinite(data)
    if bad.any():
        raise VolumeError(path, f"has {int(bad.sum())} NaN/inf voxels",
                          "re-export it, or replace them explicitly (e.g. np.nan_to_num(x, nan=-1024) for CT) "
                          "and save a cleaned copy")
    vmin, vmax = float(data.min()), float(data.max())
    if vmin == vmax:
        raise VolumeError(path, f"is constant (every voxel is {vmin:g})",
                          "the export failed or the file is a blank placeholder; re-export it or drop it from the datalist")
    if modality.upper() == "CT":
        check_hu_range(data, path)
    return Volume(data, affine, str(path))


def check_hu_range(data: np.ndarray, path: str | Path) -> bool:
    """Warn (and return False) when a 'CT' volume does not look like Hounsfield units.

    A CT of the body has air around it (about -1000 HU); MRI and unrescaled CT start near 0.
    """
    p1, p99 = np.percentile(data.reshape(-1)[:: max(1, data.size // 2_000_000)], [1, 99])  # a subsample suffices
    if p1 > -500 or p99 > 4000:
        warnings.warn(
            f"{path}: intensities (1st-99th percentile {p1:.0f} to {p99:.0f}) do not look like CT in Hounsfield "
            "units, where air is about -1000. If it is MRI, use the 'mri' preprocessing chain; if it is CT "
            "stored without its rescale slope/intercept, convert it to HU first.",
            HURangeWarning, stacklevel=2,
        )
        return False
    return True


ImageSource = str | Path | Sequence[str | Path]  # one file (3-D, or 4-D NIfTI with channels last) or one file per channel


def _one_channel(v: Volume) -> Volume:
    return Volume(v.array[None], v.affine, v.path)


def _same_grid(a: Volume, b: Volume) -> bool:
    return a.array.shape[-3:] == b.array.shape[-3:] and np.allclose(a.affine, b.affine, atol=1e-3 * max(a.spacing))


def load_channels(source: ImageSource, modality: str = "CT") -> Volume:
    """An image of C channels as a Volume whose array is (C, X, Y, Z), every channel checked like `load_volume`.

    `source` is one 3-D file (C = 1), a 4-D NIfTI with the channels on its last axis (as the Medical
    Segmentation Decathlon ships BraTS and prostate), or a list of 3-D files, one per channel, on one grid
    (as BraTS 2021 ships t1, t1ce, t2, flair). Channel order is the list order (or the file's).
    """
    if not isinstance(source, (str, Path)):
        paths = [Path(p) for p in source]
        if not paths:
            raise VolumeError("<datalist entry>", "lists an empty 'image' list", "list one file per channel")
        vols = [load_volume(p, modality) for p in paths]
        for p, v in zip(paths[1:], vols[1:]):
            if v.array.shape != vols[0].array.shape:
                raise VolumeError(p, f"has shape {v.array.shape} but {paths[0]} (channel 0 of the same image) has "
                                  f"{vols[0].array.shape}", "list channels made on one voxel grid, or resample "
                                  "them onto the first channel's grid (e.g. with SimpleITK or nibabel.processing)")
            if not _same_grid(vols[0], v):
                raise VolumeError(p, f"is on a different grid (affine) than {paths[0]} (channel 0 of the same image)",
                                  "register/resample the channels onto one grid before listing them together")
        return Volume(np.stack([v.array for v in vols]), vols[0].affine, str(paths[0]))
    path = Path(source)
    if not (path.is_file() and path.name.endswith(NIFTI_SUFFIXES)):  # load_volume names a missing file
        return _one_channel(load_volume(path, modality))
    data, affine = _read_nifti(path)
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim != 4:
        return _one_channel(check_volume(data, affine, path, modality))
    chans = [check_volume(data[..., c], affine, f"{path} (channel {c})", modality) for c in range(data.shape[-1])]
    return Volume(np.stack([c.array for c in chans]), chans[0].affine, str(path))


def load_pair(image_path: ImageSource, label_path: str | Path, modality: str = "CT",
              channels: bool = True) -> tuple[Volume, Volume]:
    """Image ((C, X, Y, Z); `channels=False`: one 3-D file only, C = 1) and label map, checked to share one voxel
    grid (shape and affine)."""
    image = (load_channels(image_path, modality) if channels
             else _one_channel(load_volume(image_path, modality)))  # type: ignore[arg-type]
    label = load_volume(label_path, kind="label")
    if image.array.shape[1:] != label.array.shape:
        raise VolumeError(label_path, f"has shape {label.array.shape} but its image {image.path} has "
                          f"{image.array.shape[1:]}", "pair each image with the label map made on the same grid "
                          "(or resample the label with nearest-neighbour onto the image grid)")
    if not _same_grid(image, label):
        raise VolumeError(label_path, f"is on a different grid (affine) than its image {image.path}",
                          "resample the label with nearest-neighbour onto the image grid")
    return image, label


def check_datalist_files(entries: list[dict[str, Any]], root: str | Path, datalist: str | Path = "datalist",
                         split: str | None = None) -> None:
    """Every `image`/`label` path (or list of paths) of the datalist's entries exists under `root`; else one error
    naming each missing file with its entry index and key."""
    root = Path(root)
    missing = [f"entry {i} '{k}' {p}" for i, e in enumerate(entries) for k in ("image", "label") if k in e
               for p in (e[k] if isinstance(e[k], list) else [e[k]]) if not source_exists(root / p)]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise VolumeError(datalist, f"{f'{split!r} ' if split else ''}lists {len(missing)} file(s) that do not exist "
                          f"under {root}: {shown}",
                          "fetch or copy the data there, set the data root (VOCO_DATA_DIR), or remove the entries")
