"""A model version as one byte string: packing, unpacking, hashing and chunking.

A bundle is a msgpack map of the SavedModel directory's regular files (relative POSIX paths,
sorted, so the same directory gives the same bytes and the same sha256 with the same zlib).
Version 2 deflates each file: a SavedModel is mostly its graph protobuf, which shrinks about
8x, and every device of a fleet downloads every version. Version 1 bundles (files stored as
they are) are still read. Unpacking trusts nothing: paths are checked against traversal, sizes
and counts are bounded (the files' declared sizes are added up and checked before anything is
inflated, and each is held to its declared size while inflating: a small entry cannot inflate
into a huge one), and the files land in a temporary directory that is renamed into place only
when complete.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import msgpack

from shared.errors import ModelVerificationError
from shared.messages import ModelChunk

BUNDLE_KIND = "har-model-bundle"
BUNDLE_VERSION = 2  # what pack_model_dir writes
_READABLE_VERSIONS = (1, 2)
_DEFLATE = "zlib"
_DEFLATE_LEVEL = 9  # the bundle is made once and downloaded by every device
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
        files.append([relative, _DEFLATE, len(data), zlib.compress(data, _DEFLATE_LEVEL)])
    if not files:
        raise ModelVerificationError(f"{directory} holds no files")
    packed: bytes = msgpack.packb(
        {"kind": BUNDLE_KIND, "v": BUNDLE_VERSION, "files": files}, use_bin_type=True
    )
    return packed


def _declared_size(entry: object, version: int) -> int:
    """The size one bundle entry says its file has, once its shape is checked."""
    if version == 1:
        if not (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[1], bytes)):
            raise ModelVerificationError("model bundle entry is not [path, bytes]")
        return len(entry[1])
    if not (
        isinstance(entry, list)
        and len(entry) == 4
        and entry[1] == _DEFLATE
        and isinstance(entry[2], int)
        and isinstance(entry[3], bytes)
    ):
        raise ModelVerificationError("model bundle entry is not [path, 'zlib', size, bytes]")
    return entry[2]


def _check_declared_total(entries: list[Any], version: int, max_bytes: int) -> None:
    """Every entry's declared size, added up before anything is inflated: a bundle announcing
    more than ``max_bytes`` is refused without inflating a byte. (Each entry is still held to
    its declared size while it inflates, so a small entry cannot turn into a huge one.)"""
    declared = 0
    for entry in entries:
        size = _declared_size(entry, version)
        if size < 0:
            raise ModelVerificationError("model bundle entry declares a negative size")
        declared += size
    if declared > max_bytes:
        raise ModelVerificationError(
            f"model bundle's files add up to {declared} bytes, over its size limit of "
            f"{max_bytes} bytes"
        )


def _entry_data(entry: list[Any], version: int, budget: int) -> tuple[object, bytes]:
    """(raw path, file bytes) of one checked bundle entry; the bytes may not exceed ``budget``."""
    if version == 1:
        if len(entry[1]) > budget:
            raise ModelVerificationError("model bundle exceeds its size limit")
        return entry[0], entry[1]
    size = entry[2]
    if not 0 <= size <= budget:
        raise ModelVerificationError("model bundle exceeds its size limit")
    inflater = zlib.decompressobj()
    try:
        data = inflater.decompress(entry[3], size + 1)  # one byte more reveals a liar
    except zlib.error as exc:
        raise ModelVerificationError(f"model bundle entry does not inflate: {exc}") from exc
    if len(data) != size or not inflater.eof or inflater.unused_data:
        raise ModelVerificationError(f"model bundle entry {entry[0]!r} is not the size it says")
    return entry[0], data


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
    version = doc.get("v")
    if version not in _READABLE_VERSIONS:
        raise ModelVerificationError(f"unsupported model bundle version {version!r}")
    entries = doc.get("files")
    if not isinstance(entries, list) or not entries:
        raise ModelVerificationError("model bundle lists no files")
    _check_declared_total(entries, version, max_bytes)
    files: dict[PurePosixPath, bytes] = {}
    total = 0
    for entry in entries:
        raw_path, data = _entry_data(entry, version, max_bytes - total)
        path = _check_relative_path(raw_path)
        if path in files:
            raise ModelVerificationError(f"model bundle lists {path} twice")
        total += len(data)
        files[path] = data
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
    write_files(read_bundle(payload, max_bytes=max_bytes, max_files=max_files), destination)


def write_files(files: Mapping[PurePosixPath, bytes], destination: Path) -> None:
    """Write ``read_bundle``'s files to ``destination`` (which must not exist yet), all or nothing.

    For a caller that has read the bundle already: ``unpack_bundle`` would inflate it again.
    """
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
    max_bytes: int = DEFAULT_MAX_BUNDLE_BYTES  # never holds more, whatever the manifest says
    _parts: dict[int, bytes] = field(default_factory=dict)
    _received: int = 0

    def __post_init__(self) -> None:
        if self.size > self.max_bytes:
            raise ModelVerificationError(
                f"model {self.version} is {self.size} bytes, over the limit of "
                f"{self.max_bytes} bytes"
            )
        if not 1 <= self.count <= max(1, self.size):
            # Each chunk but an empty payload's one holds a byte at least.
            raise ModelVerificationError(
                f"model {self.version}: {self.count} chunks cannot make {self.size} bytes"
            )

    @property
    def received(self) -> int:
        """Distinct chunks held so far."""
        return len(self._parts)

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
            if self._received > min(self.size, self.max_bytes):
                raise ModelVerificationError(
                    f"chunks of {self.version} exceed the manifest's {self.size} bytes"
                )
            self._parts[chunk.index] = chunk.data
        if len(self._parts) < self.count:
            return None
        return b"".join(self._parts[i] for i in range(self.count))
