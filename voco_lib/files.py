"""Files: atomic writes and content hashes.

Atomic writes: a reader sees the old file or the complete new one, never a partial one.

Every file voco writes that someone may read while it is written (checkpoints, caches, figures, configs,
metrics summaries, downloads) goes through here: write to a hidden temporary file in the same folder, flush
and fsync, give it normal permissions, rename it over the target; on any error the temporary file is removed.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from pathlib import Path
from typing import IO, Any, Iterator

import yaml


def publish(tmp: str | Path, path: str | Path) -> None:
    """Atomically move a finished temporary file into place, with normal permissions (mkstemp makes it 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    os.replace(tmp, path)


@contextlib.contextmanager
def atomic_write(path: str | Path, mode: str = "wb", **open_kwargs) -> Iterator[IO]:
    """`with atomic_write(p) as f: ...` writes `p` atomically (folders created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode, **open_kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        publish(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text(path: str | Path, text: str) -> Path:
    with atomic_write(path, "w", encoding="utf-8") as f:
        f.write(text)
    return Path(path)


def sha256(path: str | Path) -> str:
    """Hex sha256 of a file's content, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_yaml(path: str | Path, fix: str) -> Any:
    """A YAML file's content; a missing or unparsable file is one ValueError/FileNotFoundError naming it and `fix`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found — {fix}")
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: not valid YAML ({e.__class__.__name__}: {e}) — {fix}") from None
