"""`voco fetch`: the real sample CTs (`samples.py`) or the files a dataset manifest lists (each through `download.py`).

Both raise `FetchError` (from `download.py`) with the file and the fix; nothing half-downloaded is kept.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from voco_lib.data.download import FetchError, fetch_file
from voco_lib.data.manifests import data_dir, list_manifests, load_manifest
from voco_lib.data.samples import build_samples


def fetch_samples(out_dir: str | Path | None = None, progress: bool = True) -> Path:
    """Download, check, extract and convert the real sample CTs (data_manifests/samples.yaml); return the datalist path.

    A second call with a complete `out_dir` returns at once; the sdists are cached in `out_dir/sdists`.
    """
    return build_samples(Path(out_dir) if out_dir is not None else data_dir() / "samples", progress=progress)


def fetch_dataset(name: str, out_dir: str | Path | None = None, progress: bool = True) -> list[Path]:
    """Download the files a dataset manifest lists (url + sha256); datasets behind a registration raise with the steps."""
    m = load_manifest("datasets", name)
    files = m.get("files") or []
    if not files:
        acc = m["access"]
        raise FetchError(f"{name}: no direct download (access: {acc['how']}). Get it from {acc['url']}"
                         + (f" ({acc['notes']})" if acc.get("notes") else "")
                         + f", then point a datalist at it (VOCO_DATA_DIR={data_dir()})")
    dest = Path(out_dir) if out_dir is not None else data_dir() / name
    return [fetch_file(f["url"], f["sha256"], dest, f.get("fname"), progress) for f in files]


def cli_fetch(args: argparse.Namespace) -> int:
    """`voco fetch samples|DATASET [--out DIR]`."""
    if args.what == "samples":
        path = fetch_samples(args.out)
        print(f"sample CTs ready; datalist: {path}")
        return 0
    if args.what not in list_manifests("datasets"):
        raise ValueError(f"unknown dataset {args.what!r}; choose 'samples' or one of: {', '.join(list_manifests('datasets'))}")
    for p in fetch_dataset(args.what, args.out):
        print(p)
    return 0
