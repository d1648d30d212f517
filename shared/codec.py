"""Bytes on the wire <-> the message types of ``shared.messages``.

Machine-to-machine payloads (sensor batches, model chunks) are msgpack: compact, binary-safe,
arrays as raw little-endian bytes. Human-facing payloads (predictions, confirmations, status,
errors, manifests, commands) are UTF-8 JSON so that ``mosquitto_sub`` and stock dashboards read
them. Every decoder enforces size and type limits and raises ``PayloadError`` -- and only
``PayloadError`` -- for any bad input, with a message that says what was wrong.

Receivers ignore fields they do not know (additive changes stay compatible); an incompatible
change bumps the schema version ``v``, which decoders check.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import msgpack
import numpy as np
import numpy.typing as npt

from shared.errors import PayloadError
from shared.messages import (
    MAX_SAMPLES_PER_BATCH,
    SCHEMA_VERSION,
    Confirmation,
    DeviceCommand,
    DeviceStatus,
    ErrorEvent,
    InputSpec,
    ModelChunk,
    ModelManifest,
    Prediction,
    Receipt,
    SensorBatch,
    TrainerCommand,
    WindowRef,
)

CONTENT_TYPE_MSGPACK = "application/msgpack"
CONTENT_TYPE_JSON = "application/json"

_SAMPLE_DTYPE = np.dtype("<f4")
_OFFSET_DTYPE = np.dtype("<u4")
_BYTES_PER_SAMPLE = 3 * _SAMPLE_DTYPE.itemsize


def samples_to_bytes(samples: npt.NDArray[np.floating[Any]]) -> bytes:
    """(n, 3) accelerations as raw little-endian float32: the layout on the wire and on disk."""
    return np.ascontiguousarray(samples, dtype=_SAMPLE_DTYPE).tobytes()


def samples_from_bytes(raw: bytes) -> npt.NDArray[np.float32]:
    """The (n, 3) float32 array of ``samples_to_bytes`` output (a copy, native byte order)."""
    return np.frombuffer(raw, dtype=_SAMPLE_DTYPE).reshape(-1, 3).astype(np.float32)


@dataclass(frozen=True, slots=True)
class Limits:
    """Upper bounds a decoder enforces before it looks inside a payload."""

    max_batch_bytes: int = 128 * 1024
    max_json_bytes: int = 64 * 1024
    max_chunk_bytes: int = 16 * 1024 * 1024


DEFAULT_LIMITS = Limits()

T = TypeVar("T")


def _build(kind: str, factory: Callable[[], T]) -> T:
    """Run a message constructor, turning its validation errors into one ``PayloadError``."""
    try:
        return factory()
    except PayloadError:
        raise
    except (ValueError, TypeError, KeyError, OverflowError) as exc:
        raise PayloadError(f"invalid {kind}: {exc}") from exc


def _check_size(kind: str, payload: bytes, limit: int) -> None:
    if not isinstance(payload, (bytes, bytearray, memoryview)):
        raise PayloadError(f"{kind} payload must be bytes, got {type(payload).__name__}")
    if len(payload) > limit:
        raise PayloadError(f"{kind} payload of {len(payload)} bytes exceeds the {limit}-byte limit")
    if len(payload) == 0:
        raise PayloadError(f"{kind} payload is empty")


def _field(kind: str, doc: Mapping[str, Any], key: str) -> Any:
    if key not in doc:
        raise PayloadError(f"invalid {kind}: missing field {key!r}")
    return doc[key]


def _check_version(kind: str, doc: Mapping[str, Any]) -> None:
    version = _field(kind, doc, "v")
    if version != SCHEMA_VERSION or isinstance(version, bool):
        raise PayloadError(f"invalid {kind}: unsupported schema version {version!r}")


# --------------------------------------------------------------------------------------------
# msgpack
# --------------------------------------------------------------------------------------------


def _reject_ext(code: int, data: bytes) -> Any:
    raise PayloadError(f"msgpack extension type {code} is not part of the contract")


def _unpack_map(kind: str, payload: bytes, limit: int) -> dict[str, Any]:
    _check_size(kind, payload, limit)
    try:
        doc = msgpack.unpackb(
            bytes(payload),
            raw=False,
            strict_map_key=True,
            use_list=True,
            ext_hook=_reject_ext,
            max_str_len=4096,
            max_bin_len=limit,
            max_array_len=1024,
            max_map_len=64,
            max_ext_len=0,
        )
    except PayloadError:
        raise
    except Exception as exc:  # msgpack raises a zoo of types for bad bytes
        raise PayloadError(f"{kind} is not valid msgpack: {type(exc).__name__}: {exc}") from exc
    if not isinstance(doc, dict):
        raise PayloadError(f"{kind} must be a msgpack map, got {type(doc).__name__}")
    return doc


def _pack(doc: Mapping[str, Any]) -> bytes:
    packed: bytes = msgpack.packb(doc, use_bin_type=True)
    return packed


def encode_sensor_batch(batch: SensorBatch) -> bytes:
    doc: dict[str, Any] = {
        "v": batch.v,
        "dev": batch.device_id,
        "seq": batch.seq,
        "hz": batch.sample_rate_hz,
        "t0": batch.t0_ns,
        "xyz": samples_to_bytes(batch.samples),
    }
    if batch.offsets_us is not None:
        doc["dt"] = batch.offsets_us.astype(_OFFSET_DTYPE, copy=False).tobytes()
    return _pack(doc)


def decode_sensor_batch(payload: bytes, limits: Limits = DEFAULT_LIMITS) -> SensorBatch:
    kind = "sensor batch"
    doc = _unpack_map(kind, payload, limits.max_batch_bytes)
    _check_version(kind, doc)
    raw = _field(kind, doc, "xyz")
    if not isinstance(raw, bytes):
        raise PayloadError(f"invalid {kind}: xyz must be binary, got {type(raw).__name__}")
    if len(raw) % _BYTES_PER_SAMPLE:
        raise PayloadError(
            f"invalid {kind}: xyz holds {len(raw)} bytes, not a multiple of "
            f"{_BYTES_PER_SAMPLE} (3 little-endian float32 per sample)"
        )
    n = len(raw) // _BYTES_PER_SAMPLE
    if n > MAX_SAMPLES_PER_BATCH:
        raise PayloadError(f"invalid {kind}: {n} samples exceed {MAX_SAMPLES_PER_BATCH}")
    samples = samples_from_bytes(raw)
    offsets = None
    if "dt" in doc:
        raw_dt = doc["dt"]
        if not isinstance(raw_dt, bytes) or len(raw_dt) != n * _OFFSET_DTYPE.itemsize:
            raise PayloadError(f"invalid {kind}: dt must hold one little-endian uint32 per sample")
        offsets = np.frombuffer(raw_dt, dtype=_OFFSET_DTYPE).astype(np.uint32)
    return _build(
        kind,
        lambda: SensorBatch(
            device_id=_field(kind, doc, "dev"),
            seq=_field(kind, doc, "seq"),
            sample_rate_hz=_field(kind, doc, "hz"),
            t0_ns=_field(kind, doc, "t0"),
            samples=samples,
            offsets_us=offsets,
        ),
    )


def encode_model_chunk(chunk: ModelChunk) -> bytes:
    return _pack(
        {"v": chunk.v, "ver": chunk.version, "i": chunk.index, "n": chunk.count, "data": chunk.data}
    )


def decode_model_chunk(payload: bytes, limits: Limits = DEFAULT_LIMITS) -> ModelChunk:
    kind = "model chunk"
    doc = _unpack_map(kind, payload, limits.max_chunk_bytes)
    _check_version(kind, doc)
    return _build(
        kind,
        lambda: ModelChunk(
            version=_field(kind, doc, "ver"),
            index=_field(kind, doc, "i"),
            count=_field(kind, doc, "n"),
            data=_field(kind, doc, "data"),
        ),
    )


# --------------------------------------------------------------------------------------------
# JSON
# --------------------------------------------------------------------------------------------


def _reject_constant(name: str) -> Any:
    raise PayloadError(f"JSON constant {name} is not allowed (values must be finite)")


def _dump_json(doc: Mapping[str, Any]) -> bytes:
    return json.dumps(doc, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


# Valid UTF-8 cannot hold a surrogate; a JSON ``\\uD800``-``\\uDFFF`` escape can. Only text
# with such an escape needs the walk below (a false alarm only costs the walk).
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def _refuse_lone_surrogates(kind: str, value: Any, path: str = "") -> None:
    """PayloadError naming the first string (key or value, at any depth) that is not Unicode.

    A paired ``\\uD83D\\uDE00`` escape decodes to one real character; a lone surrogate cannot be
    encoded as UTF-8, so no database, log or reply could carry it: refuse it here, where it is
    still a bad payload.
    """
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise PayloadError(
                f"invalid {kind}: {path or 'the payload'} holds a lone surrogate "
                f"(\\u{ord(value[exc.start]):04x}), which is not Unicode text"
            ) from None
    elif isinstance(value, dict):
        for key, item in value.items():
            _refuse_lone_surrogates(kind, key, f"a key of {path or 'the payload'}")
            _refuse_lone_surrogates(kind, item, f"{path}.{key}" if path else key)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _refuse_lone_surrogates(kind, item, f"{path}[{index}]")


def _load_json(kind: str, payload: bytes, limit: int) -> dict[str, Any]:
    _check_size(kind, payload, limit)
    try:
        text = bytes(payload).decode("utf-8")
        doc = json.loads(text, parse_constant=_reject_constant)
    except PayloadError:
        raise
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise PayloadError(f"{kind} is not valid UTF-8 JSON: {exc}") from exc
    if _SURROGATE_ESCAPE.search(text):
        _refuse_lone_surrogates(kind, doc)
    if not isinstance(doc, dict):
        raise PayloadError(f"{kind} must be a JSON object, got {type(doc).__name__}")
    declared = doc.get("type")
    expected = kind.replace(" ", "_")
    if declared != expected:
        raise PayloadError(f"invalid {kind}: field 'type' must be {expected!r}, got {declared!r}")
    _check_version(kind, doc)
    return doc


def encode_prediction(prediction: Prediction) -> bytes:
    doc: dict[str, Any] = {
        "type": "prediction",
        "v": prediction.v,
        "prediction_id": prediction.prediction_id,
        "device_id": prediction.device_id,
        "window": {
            "batch_seq": prediction.window.batch_seq,
            "offset": prediction.window.offset,
            "length": prediction.window.length,
        },
        "label": prediction.label,
        "class_index": prediction.class_index,
        "probabilities": [round(p, 6) for p in prediction.probabilities],
        # Derived (the predicted class's probability), for tools that want one number.
        "confidence": round(prediction.probabilities[prediction.class_index], 6),
        "model_version": prediction.model_version,
        "ts": prediction.ts,
    }
    if prediction.truth is not None:
        doc["truth"] = prediction.truth
    return _dump_json(doc)


def _window(kind: str, value: Any) -> WindowRef:
    if not isinstance(value, dict):
        raise PayloadError(f"invalid {kind}: window must be an object")
    return WindowRef(
        batch_seq=_field(kind, value, "batch_seq"),
        offset=_field(kind, value, "offset"),
        length=_field(kind, value, "length"),
    )


def _float_list(kind: str, value: Any, name: str) -> tuple[float, ...]:
    if not isinstance(value, list):
        raise PayloadError(f"invalid {kind}: {name} must be a list")
    return tuple(value)


def decode_prediction(payload: bytes, limits: Limits = DEFAULT_LIMITS) -> Prediction:
    kind = "prediction"
    doc = _load_json(kind, payload, limits.max_json_bytes)
    return _build(
        kind,
        lambda: Prediction(
            prediction_id=_field(kind, doc, "prediction_id"),
            device_id=_field(kind, doc, "device_id"),
            window=_window(kind, _field(kind, doc, "window")),
            label=_field(kind, doc, "label"),
            class_index=_field(kind, doc, "class_index"),
            probabilities=_float_list(kind, _field(kind, doc, "probabilities"), "probabilities"),
            model_version=_field(kind, doc, "model_version"),
            ts=_field(kind, doc, "ts"),
            truth=doc.get("truth"),
        ),
    )


def encode_receipt(receipt: Receipt) -> bytes:
    return _dump_json(
        {
            "type": "receipt",
            "v": receipt.v,
            "device_id": receipt.device_id,
            "ranges": [list(pair) for pair in receipt.ranges],
            "predictions": list(receipt.predictions),
            "confirmations": list(receipt.confirmations),
            # Only when there are: receipts without forgets stay byte for byte as before.
            **({"forgets": list(receipt.forgets)} if receipt.forgets else {}),
            "ts": receipt.ts,
        }
    )


def decode_receipt(payload: bytes, limits: Limits = DEFAULT_LIMITS) -> Receipt:
    kind = "receipt"
    doc = _load_json(kind, payload, limits.max_json_bytes)
    ranges = doc.get("ranges", [])
    if not isinstance(ranges, list) or not all(
        isinstance(pair, list) and len(pair) == 2 for pair in ranges
    ):
        raise PayloadError("receipt: ranges must be a list of [first, last] pairs")
    lists = {name: doc.get(name, []) for name in ("predictions", "confirmations", "forgets")}
    for name, ids in lists.items():
        if not isinstance(ids, list):
            raise PayloadError(f"receipt: {name} must be a list of ids")
    return _build(
        kind,
        lambda: Receipt(
            device_id=_field(kind, doc, "device_id"),
            ranges=tuple((pair[0], pair[1]) for pair in ranges),
            predictions=tuple(lists["predictions"]),
            confirmations=tuple(lists["confirmations"]),
            forgets=tuple(lists["forgets"]),
            ts=_field(kind, doc, "ts"),
        ),
    )


def encode_confirmation(confirmation: Confirmation) -> bytes:
    return _dump_json(
        {
            "type": "confirmation",
            "v": confirmation.v,
            "prediction_id": confirmation.prediction_id,
            "label": confirmation.label,
            "source": confirmation.source,
            "ts": confirmation.ts,
        }
    )


def decode_confirmation(payload: bytes, limits: Limits = DEFAULT_LIMITS) -> Confirmation:
    kind = "confirmation"
    doc = _load_json(kind, payload, limits.max_json_bytes)
    return _build(
        kind,
        lambda: Confirmation(
            prediction_id=_field(kind, doc, "prediction_id"),
            label=_field(kind, doc, "label"),
            source=doc.get("source", "user"),
            ts=_field(kind, doc, "ts"),
        ),
    )


def encode_status(status: DeviceStatus) -> bytes:
    return _dump_json(
        {
            "type": "status",
            "v": status.v,
            "device_id": status.device_id,
            "state": status.state,
            "model_version": status.model_version,
            "counters": dict(status.counters),
            "ts": status.ts,
        }
    )


def decode_status(payload: bytes, limits: Limits = DEFAULT_LIMITS) -> DeviceStatus:
    kind = "status"
    doc = _load_json(kind, payload, limits.max_json_bytes)
    counters = doc.get("counters", {})
    if not isinstance(counters, dict):
        raise PayloadError(f"invalid {kind}: counters must be an object")
    return _build(
        kind,
        lambda: DeviceStatus(
            device_id=_field(kind, doc, "device_id"),
            state=_field(kind, doc, "state"),
            model_version=doc.get("model_version"),
            counters=counters,
            ts=_field(kind, doc, "ts"),
        ),
    )


def encode_error(event: ErrorEvent) -> bytes:
    return _dump_json(
        {
            "type": "error",
            "v": event.v,
            "source": event.source,
            "code": event.code,
            "message": event.message,
            "topic": event.topic,
            "ts": event.ts,
        }
    )


def decode_error(payload: bytes, limits: Limits = DEFAULT_LIMITS) -> ErrorEvent:
    kind = "error"
    doc = _load_json(kind, payload, limits.max_json_bytes)
    return _build(
        kind,
        lambda: ErrorEvent(
            source=_field(kind, doc, "source"),
            code=_field(kind, doc, "code"),
            message=_field(kind, doc, "message"),
            topic=doc.get("topic", ""),
            ts=_field(kind, doc, "ts"),
        ),
    )


def encode_command(command: TrainerCommand) -> bytes:
    return _encode_any_command("command", command)


def decode_command(payload: bytes, limits: Limits = DEFAULT_LIMITS) -> TrainerCommand:
    return _decode_any_command("command", TrainerCommand, payload, limits)


def encode_device_command(command: DeviceCommand) -> bytes:
    label = {} if command.label is None else {"label": command.label}
    return _encode_any_command("device_command", command, label)


def decode_device_command(payload: bytes, limits: Limits = DEFAULT_LIMITS) -> DeviceCommand:
    return _decode_any_command("device command", DeviceCommand, payload, limits, ("label",))


def _encode_any_command(
    kind: str, command: TrainerCommand | DeviceCommand, extra: Mapping[str, Any] | None = None
) -> bytes:
    return _dump_json(
        {
            "type": kind,
            "v": command.v,
            "command": command.command,
            **(extra or {}),
            "request_id": command.request_id,
            "ts": command.ts,
        }
    )


Command = TypeVar("Command", TrainerCommand, DeviceCommand)


def _decode_any_command(
    kind: str,
    factory: type[Command],
    payload: bytes,
    limits: Limits,
    optional: tuple[str, ...] = (),
) -> Command:
    doc = _load_json(kind, payload, limits.max_json_bytes)
    return _build(
        kind,
        lambda: factory(
            command=_field(kind, doc, "command"),
            request_id=_field(kind, doc, "request_id"),
            ts=_field(kind, doc, "ts"),
            **{name: doc[name] for name in optional if name in doc},
        ),
    )


def _manifest_doc(manifest: ModelManifest) -> dict[str, Any]:
    return {
        "type": "model_manifest",
        "v": manifest.v,
        "version": manifest.version,
        "parent": manifest.parent,
        "sha256": manifest.sha256,
        "size": manifest.size,
        "chunks": manifest.chunks,
        "labels": list(manifest.labels),
        "input": {
            "window": manifest.input.window,
            "channels": manifest.input.channels,
            "sample_rate_hz": manifest.input.sample_rate_hz,
            "dtype": manifest.input.dtype,
        },
        "metrics": dict(manifest.metrics),
        "created": manifest.created,
        "key_id": manifest.key_id,
    }


def manifest_signing_bytes(manifest: ModelManifest) -> bytes:
    """The canonical bytes an Ed25519 signature covers: every field but the signature itself."""
    for value in manifest.metrics.values():
        if not math.isfinite(value):
            raise PayloadError("manifest metrics must be finite to be signed")
    return json.dumps(
        _manifest_doc(manifest), sort_keys=True, separators=(",", ":"), ensure_ascii=True
    ).encode("ascii")


def encode_manifest(manifest: ModelManifest) -> bytes:
    doc = _manifest_doc(manifest)
    doc["signature"] = base64.b64encode(manifest.signature).decode("ascii")
    return _dump_json(doc)


def _input_spec(kind: str, value: Any) -> InputSpec:
    if not isinstance(value, dict):
        raise PayloadError(f"invalid {kind}: input must be an object")
    return InputSpec(
        window=_field(kind, value, "window"),
        channels=_field(kind, value, "channels"),
        sample_rate_hz=_field(kind, value, "sample_rate_hz"),
        dtype=_field(kind, value, "dtype"),
    )


def decode_manifest(payload: bytes, limits: Limits = DEFAULT_LIMITS) -> ModelManifest:
    kind = "model manifest"
    doc = _load_json(kind, payload, limits.max_json_bytes)
    encoded_signature = _field(kind, doc, "signature")
    if not isinstance(encoded_signature, str):
        raise PayloadError(f"invalid {kind}: signature must be a base64 string")
    try:
        signature = base64.b64decode(encoded_signature, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise PayloadError(f"invalid {kind}: signature is not base64: {exc}") from exc
    labels = _field(kind, doc, "labels")
    if not isinstance(labels, list):
        raise PayloadError(f"invalid {kind}: labels must be a list")
    metrics = _field(kind, doc, "metrics")
    if not isinstance(metrics, dict):
        raise PayloadError(f"invalid {kind}: metrics must be an object")
    return _build(
        kind,
        lambda: ModelManifest(
            version=_field(kind, doc, "version"),
            parent=doc.get("parent"),
            sha256=_field(kind, doc, "sha256"),
            size=_field(kind, doc, "size"),
            chunks=_field(kind, doc, "chunks"),
            labels=tuple(labels),
            input=_input_spec(kind, _field(kind, doc, "input")),
            metrics=metrics,
            created=_field(kind, doc, "created"),
            key_id=doc.get("key_id", ""),
            signature=signature,
        ),
    )
