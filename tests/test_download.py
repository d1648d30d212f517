"""``download_wisdm`` against a real HTTP server on 127.0.0.1 serving an archive built here."""

from __future__ import annotations

import argparse
import functools
import hashlib
import io
import json
import tarfile
import threading
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from activity_model.wisdm import download_wisdm, load_wisdm
from har.data_cli import register as register_data
from shared.errors import DataError

RAW = "".join(
    f"{u},Walking,{1_000_000 + i * 50_000_000},0.{i},9.8,-0.{i};\n"
    for i, u in enumerate([3] * 20 + [4] * 20)
)


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def archive(tmp_path: Path) -> Path:
    served = tmp_path / "served"
    served.mkdir()
    path = served / "WISDM_ar_latest.tar.gz"
    data = RAW.encode()
    with tarfile.open(path, "w:gz") as tar:
        info = tarfile.TarInfo("WISDM_ar_v1.1/WISDM_ar_v1.1_raw.txt")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return path


@pytest.fixture
def server(archive: Path) -> Iterator[str]:
    handler = functools.partial(_QuietHandler, directory=str(archive.parent))
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_good_checksum_downloads_and_loads(server: str, archive: Path, tmp_path: Path) -> None:
    dest = tmp_path / "out" / "WISDM_ar_latest.tar.gz"
    got = download_wisdm(f"{server}/{archive.name}", dest, sha256=_sha256(archive), timeout=10)
    assert got == dest
    assert dest.read_bytes() == archive.read_bytes()
    assert [p.name for p in dest.parent.iterdir()] == [dest.name]  # no temporary left
    data = load_wisdm(dest)
    assert len(data) == 40
    assert sorted(set(data.users.tolist())) == [3, 4]
    np.testing.assert_allclose(data.xyz[:, 1], 9.8, rtol=1e-6)


def test_bad_checksum_fails_clearly_and_keeps_nothing(
    server: str, archive: Path, tmp_path: Path
) -> None:
    dest = tmp_path / "out" / "WISDM_ar_latest.tar.gz"
    with pytest.raises(DataError, match="checksum mismatch") as caught:
        download_wisdm(f"{server}/{archive.name}", dest, sha256="0" * 64, timeout=10)
    assert _sha256(archive) in str(caught.value)
    assert list(dest.parent.iterdir()) == []


def test_http_404_is_a_data_error(server: str, tmp_path: Path) -> None:
    dest = tmp_path / "out" / "archive.tar.gz"
    with pytest.raises(DataError, match="HTTP 404"):
        download_wisdm(f"{server}/missing.tar.gz", dest, sha256="0" * 64, timeout=10)
    assert list(dest.parent.iterdir()) == []  # neither the file nor a temporary


def test_refuses_without_checksum_unless_explicitly_allowed(
    server: str, archive: Path, tmp_path: Path
) -> None:
    dest = tmp_path / "archive.tar.gz"
    with pytest.raises(DataError, match="no sha256 given"):
        download_wisdm(f"{server}/{archive.name}", dest, sha256=None, timeout=10)
    assert not dest.exists()
    download_wisdm(f"{server}/{archive.name}", dest, sha256=None, timeout=10, allow_unverified=True)
    assert _sha256(dest) == _sha256(archive)


def test_malformed_checksum_is_refused_before_any_request(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="64 hex digits"):
        download_wisdm("http://127.0.0.1:9/x", tmp_path / "x", sha256="abc")


def test_download_command_prints_path_and_digest(
    server: str, archive: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    parser = argparse.ArgumentParser()
    register_data(parser.add_subparsers(dest="command"))
    dest = tmp_path / "cli.tar.gz"
    args = parser.parse_args(
        ["data", "download", f"{server}/{archive.name}", str(dest), "--sha256", _sha256(archive)]
    )
    assert args.func(args) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == {
        "path": str(dest),
        "sha256": _sha256(archive),
        "bytes": archive.stat().st_size,
    }
