"""One checksummed download: a file by URL + sha256 (pooch), and `FetchError`, which every download raises.

A download either ends as a complete file whose sha256 matches the manifest, or leaves nothing behind:
pooch streams into a temporary file in the destination folder and renames it only after the hash check;
on any failure we also remove a stale file of the same name whose hash does not match, so a later run
never mistakes a broken file for a cached one. `fetch.py` (what to fetch) and `samples.py` (sdists via pip)
both build on this module, which depends on neither.
"""

from __future__ import annotations

import re
from pathlib import Path


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
