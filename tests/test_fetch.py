"""The real fetcher (pooch) against a local HTTP server: good hash, wrong hash, broken transfer, CLI."""

from __future__ import annotations

import argparse
import hashlib
import http.server
import os
import shutil
import threading

import pytest
import yaml

from voco_lib.data import fetch as F
from voco_lib.data import manifests as M
from voco_lib.data.download import FetchError, fetch_file

BODY = os.urandom(200_000)
SHA = hashlib.sha256(BODY).hexdigest()


class _Handler(http.server.BaseHTTPRequestHandler):
    hits: dict[str, int] = {}

    def do_GET(self):  # noqa: N802
        _Handler.hits[self.path] = _Handler.hits.get(self.path, 0) + 1
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(BODY)))
        self.end_headers()
        if self.path.startswith("/broken"):  # promise the whole body, send a third, hang up
            self.wfile.write(BODY[: len(BODY) // 3])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(BODY)

    def log_message(self, *args):  # keep test output clean
        pass


@pytest.fixture(scope="module")
def server():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


def test_good_hash_downloads_once(server, tmp_path):
    p = fetch_file(f"{server}/good/vol.bin", SHA, tmp_path, progress=False)
    assert p == tmp_path / "vol.bin" and p.read_bytes() == BODY
    hits = _Handler.hits["/good/vol.bin"]
    assert fetch_file(f"{server}/good/vol.bin", f"sha256:{SHA.upper()}", tmp_path, progress=False) == p
    assert _Handler.hits["/good/vol.bin"] == hits  # cached: no second request
    assert sorted(os.listdir(tmp_path)) == ["vol.bin"]


def test_wrong_hash_leaves_nothing_and_says_what(server, tmp_path):
    wrong = "0" * 64
    with pytest.raises(FetchError) as e:
        fetch_file(f"{server}/good/other.bin", wrong, tmp_path, fname="renamed.bin", progress=False)
    msg = str(e.value)
    assert "renamed.bin" in msg and f"expected {wrong}" in msg and f"got {SHA}" in msg and "Retry" in msg
    assert os.listdir(tmp_path) == []


def test_wrong_hash_also_drops_a_stale_file(server, tmp_path):
    (tmp_path / "vol.bin").write_bytes(b"old and wrong")
    with pytest.raises(FetchError):
        fetch_file(f"{server}/good/vol.bin", "1" * 64, tmp_path, progress=False)
    assert os.listdir(tmp_path) == []


def test_broken_transfer_leaves_nothing(server, tmp_path):
    with pytest.raises(FetchError) as e:
        fetch_file(f"{server}/broken/vol.bin", SHA, tmp_path, progress=False)
    assert "vol.bin" in str(e.value) and "Nothing was kept" in str(e.value)
    assert os.listdir(tmp_path) == []


def test_bad_sha256_in_manifest_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="not a sha256"):
        fetch_file("http://127.0.0.1:9/x", "abc", tmp_path, progress=False)


def test_cli_fetch_dataset(server, tmp_path, monkeypatch, capsys):
    root = tmp_path / "data_manifests"
    shutil.copytree(M.manifests_dir(), root)
    monkeypatch.setattr(M, "manifests_dir", lambda: root)
    f = root / "datasets" / "btcv.yaml"
    doc = yaml.safe_load(f.read_text())
    doc["files"] = [{"url": f"{server}/good/btcv.bin", "sha256": SHA, "source": "test server"}]
    f.write_text(yaml.safe_dump(doc))
    assert F.cli_fetch(argparse.Namespace(what="btcv", out=str(tmp_path / "out"))) == 0
    assert (tmp_path / "out" / "btcv.bin").read_bytes() == BODY
    assert str(tmp_path / "out" / "btcv.bin") in capsys.readouterr().out
    with pytest.raises(FetchError, match="word: no direct download .*github.com/HiLab-git/WORD"):
        F.cli_fetch(argparse.Namespace(what="word", out=str(tmp_path / "out")))
    with pytest.raises(ValueError, match="unknown dataset 'nope'"):
        F.cli_fetch(argparse.Namespace(what="nope", out=None))
