"""A model version as one byte string: packing, unpacking, hashing and chunking.

A bundle is a msgpack map of the SavedModel directory's regular files (relative POSIX paths,
sorted, so the same directory always gives the same bytes and the same sha256). Unpacking trusts
nothing: paths are checked against traversal, sizes and counts are bounded, and the files land in
a temporary directory that is renamed into place only when complete.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import msgpack

from shared.errors import ModelVerificationError
from shared.messages import ModelChunk

BUNDLE_KIND = "har-model-bundle"
BUNDLE_VERSION = 1
DEFAULT_MAX_BUNDLE_BYTES = 256 * 1024 * 1024
DEFAULT_MAX_FILES = 10_000
_MAX_PATH = 512


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def pack_model_dir(directory: Path, *, max_bytes: int = DEFAULT_MAX_BUNDLE_BYTES) -> bytes:
    """The bundle bytes of every regular file under ``directory``."""
    if not directory.is_dir():
        raise ModelVerificationError(f"{directory} is not a directory")
    files: list[list[Any]] = []
    total = 0
    for path in sorted(directory.rglob("*")):
        relative = path.relative_to(directory).as_posix()
        if path.is_symlink():
            raise ModelVerificationError(f"refusing to pack symlink {relative}")
        if path.is_dir():
            continue
        if not path.is_file():
            raise ModelVerificationError(f"refusing to pack special file {relative}")
        data = path.read_bytes()
        total += len(data)
        if total > max_bytes:
            raise ModelVerificationError(f"model directory exceeds {max_bytes} bytes")
        files.append([relative, data])
    if not files:
        raise ModelVerificationError(f"{directory} holds no files")
    packed: bytes = msgpack.packb(
        {"kind": BUNDLE_KIND, "v": BUNDLE_VERSION, "files": files}, use_bin_type=True
    )
    return packed


def _check_relative_path(raw: object) -> PurePosixPath:
    if not isinstance(raw, str) or not raw or len(raw) > _MAX_PATH:
        raise ModelVerificationError(f"bundle path {raw!r} is not a short non-empty string")
    if "\\" in raw or "\0" in raw:
        raise ModelVerificationError(f"bundle path {raw!r} has a backslash or NUL")
    path = PurePosixPath(raw)
    if path.is_absolute() or any(part in ("", ".", "..") for part in raw.split("/")):
        raise ModelVerificationError(f"bundle path {raw!r} escapes the model directory")
    return path


def read_bundle(
    payload: bytes,
    *,
    max_bytes: int = DEFAULT_MAX_BUNDLE_BYTES,
    max_files: int = DEFAULT_MAX_FILES,
) -> dict[PurePosixPath, bytes]:
    """The files of a bundle, validated; raises ``ModelVerificationError`` on anything odd."""
    if len(payload) > max_bytes + 1024 * 1024:
        raise ModelVerificationError(f"bundle of {len(payload)} bytes exceeds the limit")
    try:
        doc = msgpack.unpackb(
            payload,
            raw=False,
            strict_map_key=True,
            max_bin_len=max_bytes,
            max_str_len=_MAX_PATH * 4,
            max_array_len=max_files,
            max_map_len=8,
            max_ext_len=0,
        )
    except Exception as exc:  # msgpack's many error types: all mean "not a bundle"
        raise ModelVerificationError(f"model bundle is not valid msgpack: {exc}") from exc
    if not isinstance(doc, dict) or doc.get("kind") != BUNDLE_KIND:
        raise ModelVerificationError("payload is not a model bundle")
    if doc.get("v") != BUNDLE_VERSION:
        raise ModelVerificationError(f"unsupported model bundle version {doc.get('v')!r}")
    entries = doc.get("files")
    if not isinstance(entries, list) or not entries:
        raise ModelVerificationError("model bundle lists no files")
    files: dict[PurePosixPath, bytes] = {}
    total = 0
    for entry in entries:
        if not (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[1], bytes)):
            raise ModelVerificationError("model bundle entry is not [path, bytes]")
        path = _check_relative_path(entry[0])
        if path in files:
            raise ModelVerificationError(f"model bundle lists {path} twice")
        total += len(entry[1])
        if total > max_bytes:
            raise ModelVerificationError(f"model bundle exceeds {max_bytes} bytes")
        files[path] = entry[1]
    for path in files:
        for parent in path.parents:
            if parent in files:
                raise ModelVerificationError(f"{parent} is both a file and a directory")
    return files


def unpack_bundle(
    payload: bytes,
    destination: Path,
    *,
    max_bytes: int = DEFAULT_MAX_BUNDLE_BYTES,
    max_files: int = DEFAULT_MAX_FILES,
) -> None:
    """Write the bundle's files to ``destination`` (which must not exist yet), all or nothing."""
    files = read_bundle(payload, max_bytes=max_bytes, max_files=max_files)
    if destination.exists():
        raise ModelVerificationError(f"{destination} already exists")
    destination.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{destination.name}.", dir=destination.parent))
    try:
        for relative, data in files.items():
            target = staging.joinpath(*relative.parts)
            target.parent.mkdir(parents=True, exist_ok=True)
            with open(target, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
        os.rename(staging, destination)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def split_chunks(version: str, payload: bytes, chunk_size: int) -> list[ModelChunk]:
    """Cut ``payload`` into chunks of at most ``chunk_size`` bytes (at least one chunk)."""
    if chunk_size <= 0:
        raise ValueError("chunk_size must be positive")
    pieces = [payload[i : i + chunk_size] for i in range(0, len(payload), chunk_size)] or [b""]
    return [
        ModelChunk(version=version, index=i, count=len(pieces), data=piece)
        for i, piece in enumerate(pieces)
    ]


@dataclass
class ChunkAssembler:
    """Collects the chunks of one model version, in any order, until the payload is whole."""

    version: str
    count: int
    size: int
    _parts: dict[int, bytes] = field(default_factory=dict)
    _received: int = 0

    def add(self, chunk: ModelChunk) -> bytes | None:
        """Store ``chunk``; return the whole payload once every chunk has arrived."""
        if chunk.version != self.version:
            raise ModelVerificationError(
                f"chunk of version {chunk.version} given to the assembler of {self.version}"
            )
        if chunk.count != self.count:
            raise ModelVerificationError(
                f"chunk says {chunk.count} chunks, the manifest says {self.count}"
            )
        if chunk.index not in self._parts:
            self._received += len(chunk.data)
            if self._received > self.size:
                raise ModelVerificationError(
                    f"chunks of {self.version} exceed the manifest's {self.size} bytes"
                )
            self._parts[chunk.index] = chunk.data
        if len(self._parts) < self.count:
            return None
        return b"".join(self._parts[i] for i in range(self.count))

    @property
    def missing(self) -> int:
        return self.count - len(self._parts)
