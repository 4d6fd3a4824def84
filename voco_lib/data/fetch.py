"""Checksummed downloads: one file by URL + sha256 (pooch), the real sample CTs, and `voco fetch`.

A download either ends as a complete file whose sha256 matches the manifest, or leaves nothing behind:
pooch streams into a temporary file in the destination folder and renames it only after the hash check;
on any failure we also remove a stale file of the same name whose hash does not match, so a later run
never mistakes a broken file for a cached one.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from voco_lib.data.manifests import data_dir, list_manifests, load_manifest


class FetchError(RuntimeError):
    """A download that failed or did not match its sha256; the message names the file and what to do."""


def _check_sha256(sha256: str, what: str) -> str:
    sha256 = sha256.lower().removeprefix("sha256:")
    if not re.fullmatch(r"[0-9a-f]{64}", sha256):
        raise ValueError(f"{what}: {sha256!r} is not a sha256 (64 hex digits); fix the manifest entry")
    return sha256


def fetch_file(url: str, sha256: str, dest_dir: str | Path, fname: str | None = None, progress: bool = True) -> Path:
    """Download `url` to `dest_dir/fname` unless a file with that sha256 is already there; return its path.

    Raises FetchError on a hash mismatch or a broken transfer, with no file (complete, partial or temporary)
    left in `dest_dir`.
    """
    import pooch
    import requests

    fname = fname or url.rstrip("/").rsplit("/", 1)[-1]
    sha256 = _check_sha256(sha256, fname)
    dest_dir = Path(dest_dir)
    target = dest_dir / fname
    try:
        path = pooch.retrieve(url, known_hash=f"sha256:{sha256}", fname=fname, path=dest_dir, progressbar=progress)
    except ValueError as e:  # pooch: "... hash of downloaded file (...) does not match the known hash: expected X, got Y"
        _drop_stale(target, sha256)
        got = re.search(r"got\s+([0-9a-f]{64})", str(e))
        raise FetchError(
            f"{fname}: sha256 mismatch for {url}: expected {sha256}, got {got.group(1) if got else '(see: ' + str(e) + ')'}. "
            "Nothing was kept. Retry; if it persists the file changed upstream or the manifest is wrong: "
            "check the source and update the sha256 in data_manifests/ only if you trust the new file") from e
    except (requests.exceptions.RequestException, OSError) as e:
        _drop_stale(target, sha256)
        raise FetchError(f"{fname}: download from {url} failed ({type(e).__name__}: {e}). Nothing was kept in "
                         f"{dest_dir}. Check the network or the URL and run the command again") from e
    return Path(path)


def _drop_stale(target: Path, sha256: str) -> None:
    """Remove a file left at `target` from an earlier run if its hash is not the expected one."""
    import pooch

    if target.is_file() and pooch.file_hash(str(target)) != sha256:
        target.unlink()


def fetch_samples(out_dir: str | Path | None = None, progress: bool = True) -> Path:
    """Download, check, extract and convert the real sample CTs (data_manifests/samples.yaml); return the datalist path.

    A second call with a complete `out_dir` returns at once; the sdists are cached in `out_dir/sdists`.
    """
    from voco_lib.data.samples import build_samples

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
