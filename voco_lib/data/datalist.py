"""`voco datalist DIR`: an MSD-style datalist from a folder of scans, so nobody writes the JSON by hand.

Why it is built this way:
- Headers only (nibabel's lazy header, SimpleITK's `ReadImageInformation`, GDCM's series scan), so a folder of
  thousands of scans is listed in seconds; a broken voxel payload is found later, by the checked loader,
  with a message naming the file.
- One entry per DICOM series, named `FOLDER#SERIES_UID` (`voco_lib.data.volumes` reads it like a file).
- The split keeps every file of one patient (a `--group-by` regex, else the DICOM PatientID) on one side,
  so validation never sees a patient that training saw.
- Whatever is not listed is reported with the reason, in the printed summary.
"""

from __future__ import annotations

import argparse
import fnmatch
import os
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from voco_lib.data.volumes import NIFTI_SUFFIXES, SERIES_SEP

ITK_SUFFIXES = (".nrrd", ".nhdr", ".mha", ".mhd")
KINDS = {"nifti": "NIfTI", "itk": "NRRD/MHA", "dicom": "DICOM series"}
DATALIST_NAME = "datalist.json"


@dataclass
class Scan:
    """One listed volume, from its header: absolute `image` source, geometry, and what the split groups by."""

    image: str
    kind: str
    shape: tuple[int, ...]
    spacing: tuple[float, ...]
    modality: str = "unknown"
    patient: str | None = None
    description: str = ""
    label: str | None = None
    group: str = ""

    def entry(self) -> dict[str, Any]:
        e: dict[str, Any] = {"image": self.image}
        if self.label:
            e["label"] = self.label
        e.update(modality=self.modality, shape=list(self.shape), spacing=[round(s, 4) for s in self.spacing])
        if self.kind == "dicom":
            e.update(description=self.description, patient=self.patient)
        return e


@dataclass
class Listing:
    """The result of a scan of a folder: volumes, labels by name key, and skipped files with the reason."""

    scans: list[Scan] = field(default_factory=list)
    labels: dict[str, str] = field(default_factory=dict)
    skipped: list[tuple[str, str]] = field(default_factory=list)


# ------------------------------------------------------------------------------------------------ headers
def name_key(path: str | Path) -> str:
    """The file name without its volume suffix: what images and labels are paired by."""
    name = Path(path).name
    for suffix in NIFTI_SUFFIXES[::-1] + ITK_SUFFIXES:  # .nii.gz before .nii
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _nifti_header(path: Path) -> Scan:
    import nibabel as nib

    img = nib.load(path)  # reads the header; the voxel data stays on disk
    zooms = img.header.get_zooms()
    return Scan(str(path), "nifti", tuple(int(s) for s in img.shape), tuple(float(z) for z in zooms[:3]))


def _itk_info(path: str | Path) -> Any:
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()  # the header only
    return reader


def _itk_header(path: Path) -> Scan:
    r = _itk_info(path)
    return Scan(str(path), "itk", tuple(r.GetSize()), tuple(r.GetSpacing()))


def _tag(reader: Any, key: str, default: str = "") -> str:
    return reader.GetMetaData(key).strip() if reader.HasMetaDataKey(key) else default


def _dicom_series(folder: Path) -> tuple[list[Scan], set[str]]:
    """One Scan per DICOM series in `folder` (not its subfolders), and the slice files they use."""
    import SimpleITK as sitk

    scans, used = [], set()
    warn = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)  # a folder without DICOM is reported as skipped, not as an ITK warning
    try:
        ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(warn)
    for uid in ids:
        files = list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), uid))
        used.update(os.path.abspath(f) for f in files)
        first = _itk_info(files[0])
        sx, sy = first.GetSpacing()[:2]
        sz = first.GetSpacing()[2] if len(files) < 2 else _slice_gap(first, _itk_info(files[1]))
        modality = _tag(first, "0008|0060", "unknown")
        scans.append(Scan(f"{folder.absolute()}{SERIES_SEP}{uid}", "dicom", (*first.GetSize()[:2], len(files)),
                          (sx, sy, sz), modality, _tag(first, "0010|0020") or None,
                          f"{modality}, {len(files)} slices, {sx:.3g} x {sy:.3g} x {sz:.3g} mm "
                          f"{_tag(first, '0008|103e')}".strip()))
    return scans, used


def _slice_gap(a: Any, b: Any) -> float:
    return float(sum((p - q) ** 2 for p, q in zip(a.GetOrigin(), b.GetOrigin())) ** 0.5)


# ------------------------------------------------------------------------------------------------ walking
def _volume_problem(scan: Scan) -> str | None:
    if len(scan.shape) < 3 or min(scan.shape[:3]) < 2:
        return f"a 2-D image (shape {list(scan.shape)}), not a volume"
    return None


def _read_header(path: Path, listing: Listing) -> None:
    try:
        scan = _nifti_header(path) if path.name.endswith(NIFTI_SUFFIXES) else _itk_header(path)
    except Exception as e:  # noqa: BLE001 - any unreadable header is reported as skipped, with its reason
        listing.skipped.append((str(path), f"unreadable header ({type(e).__name__}: {str(e).strip().splitlines()[-1]})"))
        return
    problem = _volume_problem(scan)
    listing.skipped.append((str(path), problem)) if problem else listing.scans.append(scan)


def _files(root: Path, exclude: Sequence[Path]) -> dict[Path, list[Path]]:
    """Non-hidden files under `root` by folder, leaving out the `exclude` folders/files."""
    out: dict[Path, list[Path]] = {}
    ex = [p.absolute() for p in exclude]
    for d, dirs, names in os.walk(root.absolute()):
        dirs[:] = sorted(x for x in dirs if not x.startswith(".") and Path(d, x) not in ex)
        files = [Path(d, n) for n in sorted(names) if not n.startswith(".") and Path(d, n) not in ex]
        if files:
            out[Path(d)] = files
    return out


def scan_folder(root: Path, label_glob: str | None = None, exclude: Sequence[Path] = (), show: bool = True) -> Listing:
    """Headers of every volume under `root`; files matching `label_glob` become labels (keyed by name)."""
    from tqdm.auto import tqdm

    listing, by_dir = Listing(), _files(root, exclude)
    total = sum(map(len, by_dir.values()))
    with tqdm(total=total, desc="reading headers", unit="file", disable=not (show and total)) as bar:
        for folder, files in by_dir.items():
            others = []
            for f in files:
                if label_glob and fnmatch.fnmatch(f.name, label_glob):
                    _add_label(listing.labels, glob_key(f.name, label_glob), f)
                elif f.name.endswith(NIFTI_SUFFIXES + ITK_SUFFIXES):
                    _read_header(f, listing)
                else:
                    others.append(f)
                bar.update()
            if others:
                _add_dicom(folder, others, listing)
    return listing


def _add_dicom(folder: Path, candidates: list[Path], listing: Listing) -> None:
    series, used = _dicom_series(folder)
    for scan in series:
        problem = _volume_problem(scan)
        listing.skipped.append((scan.image, problem)) if problem else listing.scans.append(scan)
    listing.skipped += [(str(f), "not a volume (neither NIfTI, NRRD/MHA nor a slice of a DICOM series)")
                        for f in candidates if str(f.absolute()) not in used]


def glob_key(name: str, glob: str) -> str:
    """What a label's name adds to the image name: `*_seg.nii.gz` turns `case1_seg.nii.gz` into `case1`."""
    m = re.fullmatch(fnmatch.translate(glob).replace(".*", "(.*)", 1), name)
    return m.group(1) if m and m.groups() else name_key(name)


def _add_label(labels: dict[str, str], key: str, path: Path) -> None:
    if key in labels:
        raise ValueError(f"{path}: label name '{key}' is also used by {labels[key]} — labels are paired with images "
                         "by name, so give each label a unique name (or narrow --labels / --label-pattern)")
    labels[key] = str(path)


def labels_in(folder: Path) -> dict[str, str]:
    """Label files under `folder` (a `--labels DIR`), keyed by name without suffix."""
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: --labels folder not found — pass the folder that holds the label maps")
    labels: dict[str, str] = {}
    for files in _files(folder, ()).values():
        for f in files:
            if f.name.endswith(NIFTI_SUFFIXES + ITK_SUFFIXES):
                _add_label(labels, name_key(f), f)
    return labels


# ------------------------------------------------------------------------------------------------ pairing, split
def pair_labels(listing: Listing) -> None:
    """Give each file scan the label of the same name; a label without an image is reported as skipped."""
    used = set()
    for scan in listing.scans:
        key = name_key(scan.image)
        if scan.kind != "dicom" and key in listing.labels:
            scan.label = listing.labels[key]
            used.add(key)
    listing.skipped += [(p, "label without an image of the same name") for k, p in listing.labels.items() if k not in used]


def assign_groups(scans: list[Scan], root: Path, group_by: str | None) -> int:
    """Set each scan's split group: the `group_by` regex on its path relative to `root` (first capture group, else
    the match), else the DICOM PatientID, else the scan itself. Returns how many scans the regex did not match."""
    try:
        rx = re.compile(group_by) if group_by else None
    except re.error as e:
        raise ValueError(f"--group-by {group_by!r}: not a valid regular expression ({e}) — e.g. '(patient_\\d+)'") from None
    unmatched = 0
    for s in scans:
        rel = Path(os.path.relpath(s.image, root.absolute())).as_posix()
        m = rx.search(rel) if rx else None
        unmatched += bool(rx and not m)
        s.group = (m.group(1) if m.groups() else m.group(0)) if m else (s.patient or rel)
    return unmatched


def split(scans: list[Scan], validation: float, seed: int) -> tuple[list[Scan], list[Scan]]:
    """(training, validation): whole groups, shuffled with `seed`, moved to validation until it holds about
    `validation` of the scans (at least one when `validation` > 0 and there are two groups), never all of them."""
    if not 0.0 <= validation < 1.0:
        raise ValueError(f"--validation {validation}: must be a fraction in [0, 1), e.g. 0.2")
    groups = sorted({s.group for s in scans})
    random.Random(seed).shuffle(groups)
    target = round(validation * len(scans))
    target = max(1, target) if validation > 0 else 0
    held: set[str] = set()
    count = {g: sum(s.group == g for s in scans) for g in groups}
    for g in groups[:-1]:  # the last group always stays in training
        if sum(count[h] for h in held) >= target:
            break
        held.add(g)
    return [s for s in scans if s.group not in held], [s for s in scans if s.group in held]


# ------------------------------------------------------------------------------------------------ summary
def _range(values: list[float], fmt: str) -> str:
    lo, hi = min(values), max(values)
    return format(lo, fmt) if lo == hi else f"{format(lo, fmt)}-{format(hi, fmt)}"


def summary(listing: Listing, train: list[Scan], val: list[Scan], unmatched: int, out: Path) -> str:
    """The table `voco datalist` prints: counts, modalities, shape/spacing ranges, split, skipped files and why."""
    scans = listing.scans
    counts = {k: sum(s.kind == k for s in scans) for k in KINDS}
    mods: dict[str, int] = {}
    for s in scans:
        mods[s.modality] = mods.get(s.modality, 0) + 1
    rows = [(KINDS[k], str(n)) for k, n in counts.items() if n]
    rows += [("modalities", ", ".join(f"{m} {n}" for m, n in sorted(mods.items()))),
             ("shape (voxels)", " x ".join(_range([s.shape[a] for s in scans], "d") for a in range(3))),
             ("spacing (mm)", " x ".join(_range([s.spacing[a] for s in scans], ".3g") for a in range(3))),
             ("labels", f"{sum(bool(s.label) for s in scans)} paired, {sum(not s.label for s in scans)} without"),
             ("training", f"{len(train)} ({len({s.group for s in train})} groups)"),
             ("validation", f"{len(val)} ({len({s.group for s in val})} groups)"),
             ("skipped", str(len(listing.skipped)))]
    if unmatched:
        rows.append(("--group-by", f"{unmatched} path(s) did not match: each is its own group"))
    width = max(len(k) for k, _ in rows)
    lines = [f"wrote {out}: {len(scans)} volumes"] + [f"  {k:<{width}}  {v}" for k, v in rows]
    lines += [f"    {p}: {why}" for p, why in listing.skipped[:20]]
    if len(listing.skipped) > 20:
        lines.append(f"    ... and {len(listing.skipped) - 20} more")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ build, CLI
def build_datalist(folder: str | Path, out: str | Path, labels: str | Path | None = None,
                   label_pattern: str | None = None, validation: float = 0.2, seed: int = 0,
                   group_by: str | None = None, show: bool = True) -> tuple[Path, str]:
    """List the scans under `folder` into datalist `out` (paths relative to it); returns (out, summary table)."""
    from voco_lib.data.manifests import write_datalist

    root, out = Path(folder), Path(out)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: folder not found — pass the folder that holds your scans")
    if labels and label_pattern:
        raise ValueError("--labels and --label-pattern both given — use one: a label folder, or a name pattern")
    exclude = [out] + ([Path(labels)] if labels else [])
    listing = scan_folder(root, label_pattern, exclude, show)
    if labels:
        listing.labels = labels_in(Path(labels))
    if not listing.scans:
        why = "; ".join(f"{p}: {w}" for p, w in listing.skipped[:3]) or "the folder is empty"
        raise ValueError(f"{root}: no volumes found (NIfTI, NRRD/MHA or DICOM series) — {why}")
    pair_labels(listing)
    unmatched = assign_groups(listing.scans, root, group_by)
    train, val = split(listing.scans, validation, seed)
    write_datalist(out, [s.entry() for s in train], [s.entry() for s in val], name=root.absolute().name,
                   description=f"voco datalist {root}", numTraining=len(train))
    return out, summary(listing, train, val, unmatched, out)


def datalist_for_run(folder: str | Path, run_dir: str | Path, show: bool = True) -> Path:
    """`--data DIR`: the folder's datalist (all scans for training), saved as the run's `datalist.json`."""
    try:
        path, table = build_datalist(folder, Path(run_dir) / DATALIST_NAME, validation=0.0, show=show)
    except ValueError as e:
        raise ValueError(f"{e}; --data takes phantom | samples | a datalist JSON | a folder of scans") from None
    if show:
        print(table, flush=True)
    return path


def cli_datalist(args: argparse.Namespace) -> int:
    """`voco datalist DIR [--labels DIR | --label-pattern GLOB] [--validation F] [--seed S] [--group-by RE] --out F`."""
    _, table = build_datalist(args.folder, args.out, args.labels, args.label_pattern, args.validation, args.seed,
                              args.group_by)
    print(table)
    return 0
