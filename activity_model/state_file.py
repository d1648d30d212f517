"""The personal state file: what a device learned, in one format that every runtime reads.

The file is a magic number, a SHA-256 of the rest, and a msgpack map of the state's arrays
(float32 bytes and shape), the id of the model it belongs to and a format number. Any flipped or
missing byte fails the checksum. It is written by Python, not by a graph op, so a device that
moves between TensorFlow and LiteRT keeps what it learned. Writes go to a temporary file, fsynced
and renamed: after a crash the old state or the new.

Earlier versions wrote format 2 with TensorFlow's ``Save`` op; ``is_current_format`` tells such a
file apart so the TensorFlow runtime can still read it once.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Final

import msgpack
import numpy as np

from activity_model.values import PersonalState
from shared.errors import ModelError
from shared.fileio import replacing

FORMAT_VERSION: Final = 3
MAGIC: Final = b"HARSTATE"
_ARRAYS: Final = ("align", "kernel_delta", "bias_delta")
_DIGEST_BYTES: Final = 32
MAX_STATE_BYTES: Final = 64 * 1024 * 1024  # a personal state is a few KB to a few hundred


def is_current_format(path: Path) -> bool:
    with Path(path).open("rb") as handle:
        return handle.read(len(MAGIC)) == MAGIC


def write_state(path: Path, state: PersonalState, model_id: str) -> None:
    body: bytes = msgpack.packb(
        {
            "format": FORMAT_VERSION,
            "model_id": model_id,
            "serve": bool(state.serve),
            **{
                name: {
                    "shape": list(np.shape(getattr(state, name))),
                    "data": np.ascontiguousarray(getattr(state, name), np.float32).tobytes(),
                }
                for name in _ARRAYS
            },
        },
        use_bin_type=True,
    )
    with replacing(Path(path), suffix=".tmp") as tmp:
        tmp.write_bytes(MAGIC + hashlib.sha256(body).digest() + body)


def _array(value: Any, name: str, expected: tuple[int, ...]) -> np.ndarray:
    shape = tuple(value["shape"])
    if shape != expected:
        raise ModelError(f"state tensor {name} has the wrong shape {shape}, not {expected}")
    array = np.frombuffer(value["data"], np.float32).reshape(shape).copy()
    if not np.isfinite(array).all():
        raise ModelError(f"state file is corrupt: {name} holds NaN or infinity")
    return array


def read_state(path: Path, model_id: str, blank: PersonalState) -> PersonalState:
    """The state in ``path``, checked against this model; :class:`ModelError` says what is wrong.

    The messages name the problem as the TensorFlow graph did: "state file is corrupt", "state
    belongs to another model", "state file format not supported", "has the wrong shape".
    """
    path = Path(path)
    if path.stat().st_size > MAX_STATE_BYTES:
        raise ModelError(f"state file is corrupt: {path} is larger than any personal state")
    raw = path.read_bytes()
    digest, body = raw[len(MAGIC) : len(MAGIC) + _DIGEST_BYTES], raw[len(MAGIC) + _DIGEST_BYTES :]
    if not raw.startswith(MAGIC) or hashlib.sha256(body).digest() != digest:
        raise ModelError(f"state file is corrupt: {path} does not match its checksum")
    try:
        stored = msgpack.unpackb(body, raw=False)
        fmt = int(stored["format"])
        if fmt != FORMAT_VERSION:
            raise ModelError(f"state file format not supported: {fmt} (expected {FORMAT_VERSION})")
        if stored["model_id"] != model_id:
            raise ModelError(f"state belongs to another model: {path}")
        arrays = [_array(stored[name], name, getattr(blank, name).shape) for name in _ARRAYS]
        serve = bool(stored["serve"])
    except (KeyError, TypeError, ValueError, msgpack.UnpackException) as exc:
        raise ModelError(f"state file is corrupt: {path}: {exc}") from exc
    return PersonalState(arrays[0], arrays[1], arrays[2], serve=serve)
