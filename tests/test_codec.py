"""The wire contract: golden bytes, round trips, limits, fuzzing that only meets PayloadError."""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path

import msgpack
import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from shared import codec
from shared.errors import PayloadError
from shared.messages import (
    MAX_ABS_ACCELERATION,
    Confirmation,
    DeviceCommand,
    DeviceStatus,
    ErrorEvent,
    InputSpec,
    ModelChunk,
    ModelManifest,
    Prediction,
    SensorBatch,
    TrainerCommand,
    WindowRef,
)
from trainer_service.store import SqliteStore

SAMPLES = np.array([[0.0, 9.80665, -1.5], [1.25, -0.5, 3.0]], dtype=np.float32)


def make_batch(**overrides: object) -> SensorBatch:
    fields: dict[str, object] = {
        "device_id": "dev-1",
        "seq": 7,
        "sample_rate_hz": 20.0,
        "t0_ns": 1_700_000_000_000_000_000,
        "samples": SAMPLES,
    }
    fields.update(overrides)
    return SensorBatch(**fields)  # type: ignore[arg-type]


def make_prediction() -> Prediction:
    return Prediction(
        prediction_id="p-1",
        device_id="dev-1",
        window=WindowRef(batch_seq=3, offset=10, length=80),
        label="Walking",
        class_index=1,
        probabilities=(0.25, 0.75),
        model_version="v0001",
        ts=1_700_000_000.5,
    )


def make_manifest(**overrides: object) -> ModelManifest:
    fields: dict[str, object] = {
        "version": "v0002",
        "parent": "v0001",
        "sha256": "ab" * 32,
        "size": 1234,
        "chunks": 1,
        "labels": ("Sitting", "Walking"),
        "input": InputSpec(window=80),
        "metrics": {"accuracy": 0.95},
        "created": 1_700_000_000.0,
        "key_id": "k1",
        "signature": b"\x01" * 64,
    }
    fields.update(overrides)
    return ModelManifest(**fields)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------ golden bytes


def test_sensor_batch_golden_bytes() -> None:
    # fmt: off
    expected = bytes.fromhex(
        "86"                                # map of 6 entries
        "a176" "01"                         # "v": 1
        "a3646576" "a5" "6465762d31"        # "dev": "dev-1"
        "a3736571" "07"                     # "seq": 7
        "a2687a" "cb4034000000000000"       # "hz": 20.0 as float64
        "a27430" "cf17979cfe362a0000"       # "t0": uint64 1.7e18 ns
        "a378797a" "c418"                   # "xyz": bin 8 of 24 bytes, then the samples
    ) + SAMPLES.astype("<f4").tobytes()
    # fmt: on
    assert codec.encode_sensor_batch(make_batch()) == expected


def test_sensor_batch_float_layout_is_little_endian_float32() -> None:
    encoded = codec.encode_sensor_batch(make_batch())
    raw = msgpack.unpackb(encoded, raw=False)["xyz"]
    # 9.80665 as little-endian IEEE-754 single precision.
    assert raw[4:8] == bytes.fromhex("0ae81c41")  # 0x411CE80A


def test_model_chunk_golden_bytes() -> None:
    chunk = ModelChunk(version="v1", index=0, count=2, data=b"\x00\xff")
    assert codec.encode_model_chunk(chunk) == bytes.fromhex(
        "85a17601a3766572a27631a16900a16e02a464617461c40200ff"
    )


def test_prediction_json_is_stable_and_readable() -> None:
    encoded = codec.encode_prediction(make_prediction())
    assert json.loads(encoded) == {
        "type": "prediction",
        "v": 1,
        "prediction_id": "p-1",
        "device_id": "dev-1",
        "window": {"batch_seq": 3, "offset": 10, "length": 80},
        "label": "Walking",
        "class_index": 1,
        "probabilities": [0.25, 0.75],
        "confidence": 0.75,
        "model_version": "v0001",
        "ts": 1_700_000_000.5,
    }


def test_ten_second_batch_costs_at_most_13_bytes_per_sample() -> None:
    samples = np.random.default_rng(0).normal(0, 5, size=(200, 3)).astype(np.float32)
    encoded = codec.encode_sensor_batch(make_batch(samples=samples, device_id="wrist-0042"))
    assert len(encoded) / 200 <= 13.0


# ------------------------------------------------------------------------------ round trips

device_ids = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}", fullmatch=True)
finite_accel = st.floats(-MAX_ABS_ACCELERATION, MAX_ABS_ACCELERATION, allow_nan=False, width=32)
sample_arrays = hnp.arrays(
    np.float32, st.tuples(st.integers(1, 300), st.just(3)), elements=finite_accel
)


@given(
    device_id=device_ids,
    seq=st.integers(0, 2**63 - 1),
    rate=st.floats(0.5, 1000.0),
    t0=st.integers(0, 2**63 - 1),
    samples=sample_arrays,
    with_offsets=st.booleans(),
)
def test_sensor_batch_round_trip(
    device_id: str, seq: int, rate: float, t0: int, samples: np.ndarray, with_offsets: bool
) -> None:
    offsets = np.arange(samples.shape[0], dtype=np.uint32) * 50_000 if with_offsets else None
    batch = SensorBatch(device_id, seq, rate, t0, samples, offsets)
    decoded = codec.decode_sensor_batch(codec.encode_sensor_batch(batch))
    assert decoded == batch
    assert decoded.samples.dtype == np.float32


probabilities = st.lists(st.floats(0.01, 1.0), min_size=1, max_size=12).map(
    lambda raw: tuple(p / math.fsum(raw) for p in raw)
)


@given(
    pid=st.text(min_size=1, max_size=64),
    label=st.text(min_size=1, max_size=64),
    probs=probabilities,
    data=st.data(),
)
def test_prediction_round_trip(
    pid: str, label: str, probs: tuple[float, ...], data: st.DataObject
) -> None:
    index = data.draw(st.integers(0, len(probs) - 1))
    prediction = Prediction(
        prediction_id=pid,
        device_id="d",
        window=WindowRef(1, 2, 3),
        label=label,
        class_index=index,
        probabilities=probs,
        model_version="v1",
        ts=1.5,
    )
    decoded = codec.decode_prediction(codec.encode_prediction(prediction))
    assert decoded.prediction_id == pid
    assert decoded.label == label
    assert decoded.class_index == index
    assert decoded.probabilities == pytest.approx(probs, abs=1e-6)


@given(pid=st.text(min_size=1, max_size=64), label=st.text(min_size=1, max_size=64))
def test_confirmation_round_trip(pid: str, label: str) -> None:
    confirmation = Confirmation(prediction_id=pid, label=label, source="user", ts=2.0)
    assert codec.decode_confirmation(codec.encode_confirmation(confirmation)) == confirmation


@given(
    counters=st.dictionaries(st.text(min_size=1, max_size=64), st.integers(0, 2**40), max_size=10)
)
def test_status_round_trip(counters: dict[str, int]) -> None:
    status = DeviceStatus("dev-1", "online", "v3", 3.0, counters)
    assert codec.decode_status(codec.encode_status(status)) == status


@given(
    metrics=st.dictionaries(
        st.text(min_size=1, max_size=20), st.floats(-1e6, 1e6, allow_nan=False), max_size=6
    ),
    signature=st.binary(max_size=128),
)
def test_manifest_round_trip(metrics: dict[str, float], signature: bytes) -> None:
    manifest = make_manifest(metrics=metrics, signature=signature)
    decoded = codec.decode_manifest(codec.encode_manifest(manifest))
    assert decoded == manifest
    assert codec.manifest_signing_bytes(decoded) == codec.manifest_signing_bytes(manifest)


@given(data=st.binary(max_size=2048), count=st.integers(1, 50), data_index=st.data())
def test_model_chunk_round_trip(data: bytes, count: int, data_index: st.DataObject) -> None:
    index = data_index.draw(st.integers(0, count - 1))
    chunk = ModelChunk(version="v9", index=index, count=count, data=data)
    assert codec.decode_model_chunk(codec.encode_model_chunk(chunk)) == chunk


def test_error_and_command_round_trip() -> None:
    event = ErrorEvent("dev-1", "malformed_payload", "bad bytes", 5.0, topic="a/b")
    assert codec.decode_error(codec.encode_error(event)) == event
    command = TrainerCommand("retrain", "r-1", 6.0)
    assert codec.decode_command(codec.encode_command(command)) == command
    forget = DeviceCommand("forget", "f-1", 7.0)
    assert codec.decode_device_command(codec.encode_device_command(forget)) == forget
    with pytest.raises(PayloadError, match="unknown device command"):
        codec.decode_device_command(
            b'{"type":"device_command","v":1,"command":"reboot","request_id":"x","ts":1.0}'
        )
    with pytest.raises(PayloadError, match="'type' must be 'device_command'"):
        codec.decode_device_command(codec.encode_command(command))


def test_commands_about_the_latest_prediction_round_trip_and_need_a_label_to_correct() -> None:
    confirm = DeviceCommand("confirm_latest", "ha-1", 8.0)
    correct = DeviceCommand("correct_latest", "ha-2", 9.0, label="Jogging")
    for command in (confirm, correct):
        assert codec.decode_device_command(codec.encode_device_command(command)) == command
    assert b'"label"' not in codec.encode_device_command(confirm)
    with pytest.raises(PayloadError, match="label must be a string"):
        codec.decode_device_command(
            b'{"type":"device_command","v":1,"command":"correct_latest","request_id":"x","ts":1.0}'
        )
    with pytest.raises(PayloadError, match="confirm_latest takes no label"):
        codec.decode_device_command(
            b'{"type":"device_command","v":1,"command":"confirm_latest","label":"Jogging",'
            b'"request_id":"x","ts":1.0}'
        )
    with pytest.raises(PayloadError, match="label longer than 64"):
        codec.decode_device_command(
            codec.encode_device_command(correct).replace(b"Jogging", b"J" * 65)
        )


def test_signing_bytes_exclude_the_signature_and_cover_everything_else() -> None:
    base = make_manifest()
    assert codec.manifest_signing_bytes(base) == codec.manifest_signing_bytes(
        make_manifest(signature=b"other")
    )
    assert codec.manifest_signing_bytes(base) != codec.manifest_signing_bytes(
        make_manifest(size=1235)
    )
    assert codec.manifest_signing_bytes(base) != codec.manifest_signing_bytes(
        make_manifest(labels=("Walking", "Sitting"))
    )


# ------------------------------------------------------------------------------ limits


def _raw_batch(**fields: object) -> bytes:
    doc: dict[str, object] = {
        "v": 1,
        "dev": "dev-1",
        "seq": 1,
        "hz": 20.0,
        "t0": 0,
        "xyz": SAMPLES.astype("<f4").tobytes(),
    }
    doc.update(fields)
    return msgpack.packb({k: v for k, v in doc.items() if v is not None}, use_bin_type=True)


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (b"", "empty"),
        (b"\xc1", "not valid msgpack"),
        (msgpack.packb([1, 2, 3]), "must be a msgpack map"),
        (_raw_batch(v=2), "unsupported schema version 2"),
        (_raw_batch(v=None), "missing field 'v'"),
        (_raw_batch(xyz=b"\x00" * 13), "not a multiple of 12"),
        (_raw_batch(xyz="text"), "xyz must be binary"),
        (_raw_batch(xyz=np.array([[np.nan, 0, 0]], "<f4").tobytes()), "NaN or infinity"),
        (_raw_batch(xyz=np.array([[5000.0, 0, 0]], "<f4").tobytes()), "exceeds 1000"),
        (_raw_batch(xyz=b""), "1..4096 samples"),
        (_raw_batch(xyz=b"\x00" * 12 * 4097), "4097 samples exceed 4096"),
        (_raw_batch(seq=-1), "seq=-1 outside"),
        (_raw_batch(seq=True), "seq must be an integer"),
        (_raw_batch(hz=0.0), "sample_rate_hz=0.0 outside"),
        (_raw_batch(dev="../etc"), "device_id '../etc' has characters"),
        (_raw_batch(dev=None), "missing field 'dev'"),
        (_raw_batch(dt=b"\x00\x00"), "dt must hold one little-endian uint32 per sample"),
        (b"\x00" * (200 * 1024), "exceeds the 131072-byte limit"),
    ],
)
def test_bad_sensor_batches_are_rejected_with_a_reason(payload: bytes, message: str) -> None:
    with pytest.raises(PayloadError, match=message.replace("(", r"\(").replace(".", r"\.")):
        codec.decode_sensor_batch(payload)


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (b'{"type":"confirmation","v":1,"prediction_id":"p","label":"x","ts":NaN}', "NaN"),
        (b"[1]", "must be a JSON object"),
        (b"\xff\xfe", "not valid UTF-8 JSON"),
        (b'{"type":"prediction","v":1}', "field 'type' must be 'confirmation'"),
        (b'{"type":"confirmation","v":1,"label":"x","ts":1}', "missing field 'prediction_id'"),
        (b'{"type":"confirmation","v":1,"prediction_id":"p","label":"","ts":1}', "label must not"),
        (
            b'{"type":"confirmation","v":1,"prediction_id":"p","label":"x","ts":1,"source":"cat"}',
            "source must be",
        ),
        (b"{" + b'"a":' * 100_000, "exceeds"),
    ],
)
def test_bad_confirmations_are_rejected_with_a_reason(payload: bytes, message: str) -> None:
    with pytest.raises(PayloadError, match=message):
        codec.decode_confirmation(payload)


def test_prediction_probabilities_must_be_a_distribution() -> None:
    doc = json.loads(codec.encode_prediction(make_prediction()))
    doc["probabilities"] = [0.9, 0.9]
    with pytest.raises(PayloadError, match="sum to 1"):
        codec.decode_prediction(json.dumps(doc).encode())
    doc["probabilities"] = [0.5, 0.5]
    doc["class_index"] = 2
    with pytest.raises(PayloadError, match="class_index=2 outside"):
        codec.decode_prediction(json.dumps(doc).encode())


def test_manifest_signature_must_be_base64() -> None:
    doc = json.loads(codec.encode_manifest(make_manifest()))
    doc["signature"] = "not base64!"
    with pytest.raises(PayloadError, match="signature is not base64"):
        codec.decode_manifest(json.dumps(doc).encode())


def test_unknown_fields_are_ignored_for_additive_evolution() -> None:
    doc = json.loads(codec.encode_confirmation(Confirmation("p", "Walking", "user", 1.0)))
    doc["mood"] = "happy"
    assert codec.decode_confirmation(json.dumps(doc).encode()).label == "Walking"


# ------------------------------------------------------------------------------ fuzzing

DECODERS = [
    codec.decode_sensor_batch,
    codec.decode_model_chunk,
    codec.decode_prediction,
    codec.decode_confirmation,
    codec.decode_status,
    codec.decode_manifest,
    codec.decode_error,
    codec.decode_command,
    codec.decode_device_command,
]

VALID_PAYLOADS = [
    codec.encode_sensor_batch(make_batch()),
    codec.encode_sensor_batch(make_batch(offsets_us=np.array([0, 50_000], dtype=np.uint32))),
    codec.encode_model_chunk(ModelChunk("v1", 0, 1, b"abc")),
    codec.encode_prediction(make_prediction()),
    codec.encode_confirmation(Confirmation("p", "Walking", "user", 1.0)),
    codec.encode_status(DeviceStatus("dev-1", "online", "v1", 1.0, {"batches": 3})),
    codec.encode_manifest(make_manifest()),
    codec.encode_error(ErrorEvent("dev-1", "x", "y", 1.0)),
    codec.encode_command(TrainerCommand("retrain", "r", 1.0)),
    codec.encode_device_command(DeviceCommand("forget", "f", 1.0)),
    codec.encode_device_command(DeviceCommand("correct_latest", "c", 1.0, label="Sitting")),
]


def _decode_or_payload_error(decoder: object, payload: bytes) -> None:
    with contextlib.suppress(PayloadError):
        decoder(payload)  # type: ignore[operator]


@settings(max_examples=300)
@given(payload=st.binary(max_size=512), decoder=st.sampled_from(DECODERS))
def test_random_bytes_only_raise_payload_error(payload: bytes, decoder: object) -> None:
    _decode_or_payload_error(decoder, payload)


@settings(max_examples=500)
@given(
    original=st.sampled_from(VALID_PAYLOADS),
    decoder=st.sampled_from(DECODERS),
    edits=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=8),
    cut=st.integers(0, 10_000),
)
def test_mutated_valid_payloads_only_raise_payload_error(
    original: bytes, decoder: object, edits: list[tuple[int, int]], cut: int
) -> None:
    mutated = bytearray(original)
    for position, value in edits:
        mutated[position % len(mutated)] = value
    _decode_or_payload_error(decoder, bytes(mutated))
    _decode_or_payload_error(decoder, bytes(mutated[: cut % (len(mutated) + 1)]))


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4)
    ),
    max_leaves=20,
)


@settings(max_examples=300)
@given(
    original=st.sampled_from(VALID_PAYLOADS[3:]),
    key=st.sampled_from(
        [
            "v",
            "type",
            "prediction_id",
            "label",
            "probabilities",
            "class_index",
            "window",
            "counters",
            "labels",
            "input",
            "metrics",
            "ts",
            "signature",
            "state",
            "sha256",
            "size",
        ]
    ),
    value=json_values,
)
def test_json_fields_of_any_type_only_raise_payload_error(
    original: bytes, key: str, value: object
) -> None:
    doc = json.loads(original)
    doc[key] = value
    payload = json.dumps(doc).encode()
    for decoder in DECODERS[2:]:
        _decode_or_payload_error(decoder, payload)


@settings(max_examples=300)
@given(
    key=st.sampled_from(["v", "dev", "seq", "hz", "t0", "xyz", "dt", "ver", "i", "n", "data"]),
    value=json_values | st.binary(max_size=64),
)
def test_msgpack_fields_of_any_type_only_raise_payload_error(key: str, value: object) -> None:
    for original, decoder in (
        (VALID_PAYLOADS[0], codec.decode_sensor_batch),
        (VALID_PAYLOADS[2], codec.decode_model_chunk),
    ):
        doc = msgpack.unpackb(original, raw=False)
        doc[key] = value
        try:
            packed = msgpack.packb(doc, use_bin_type=True)
        except OverflowError:  # integers msgpack cannot carry never reach a decoder
            continue
        _decode_or_payload_error(decoder, packed)


# ------------------------------------------------------------------------------ unencodable text

# Any code point, lone surrogates often (hypothesis leaves them out of st.text by default).
any_text = st.text(
    alphabet=st.characters(categories=["Cs"]) | st.characters(exclude_categories=()), max_size=12
)
any_json_values = st.recursive(
    st.none() | st.booleans() | st.integers(0, 9) | st.integers() | st.floats() | any_text,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(any_text, children, max_size=4)
    ),
    max_leaves=20,
)
PLANTED_KEYS = (
    *("counters", "window", "input", "metrics", "labels", "label", "prediction_id", "source"),
    *("message", "topic", "request_id", "model_version", "state", "version"),
)
JSON_CODECS = {
    codec.decode_prediction: codec.encode_prediction,
    codec.decode_confirmation: codec.encode_confirmation,
    codec.decode_status: codec.encode_status,
    codec.decode_manifest: codec.encode_manifest,
    codec.decode_error: codec.encode_error,
    codec.decode_command: codec.encode_command,
    codec.decode_device_command: codec.encode_device_command,
}


def _store_decoded(store: SqliteStore, message: object) -> None:
    """What the trainer stores of a decoded message; StorageError only for a broken disk."""
    with store.transaction() as writer:
        if isinstance(message, Prediction):
            writer.add_prediction(message)
        elif isinstance(message, Confirmation):
            writer.add_confirmation("dev-1", message)
        elif isinstance(message, DeviceStatus):
            writer.update_status(message)


@settings(max_examples=400)
@given(
    original=st.sampled_from(VALID_PAYLOADS[3:]),
    path=st.lists(
        st.sampled_from(PLANTED_KEYS) | any_text,
        min_size=1,
        max_size=3,
    ),
    value=any_text | any_json_values,
)
# The case: a provisioned device's status with a counter named by a lone surrogate.
@example(original=VALID_PAYLOADS[5], path=["counters", "\ud800"], value=1)
@example(original=VALID_PAYLOADS[4], path=["label"], value="\udfff")
def test_no_json_payload_raises_anything_but_payload_error_and_what_decodes_is_kept(
    original: bytes, path: list[str], value: object
) -> None:
    doc = json.loads(original)
    target = doc
    for key in path[:-1]:  # plant ``value`` at any depth, under any key
        if not isinstance(target.get(key), dict):
            target[key] = {}
        target = target[key]
    target[path[-1]] = value
    payload = json.dumps(doc).encode()  # ensure_ascii: a lone surrogate travels as \udxxx
    store = SqliteStore(Path(":memory:"))
    try:
        for decode, encode in JSON_CODECS.items():
            try:
                message = decode(payload)
            except PayloadError:
                continue
            encode(message)  # type: ignore[operator]
            _store_decoded(store, message)
    finally:
        store.close()


def test_lone_surrogates_are_refused_with_their_place_in_the_payload() -> None:
    status = json.loads(codec.encode_status(DeviceStatus("dev-1", "online", "v1", 1.0)))
    status["counters"] = {"\ud800": 1}
    with pytest.raises(PayloadError, match=r"a key of counters holds a lone surrogate \(\\ud800\)"):
        codec.decode_status(json.dumps(status).encode())
    confirmation = json.loads(codec.encode_confirmation(Confirmation("p", "Walking", "user", 1.0)))
    confirmation["extra"] = [{"note": "ok \udfff"}]  # an unknown field is checked too
    with pytest.raises(PayloadError, match=r"extra\[0\]\.note holds a lone surrogate"):
        codec.decode_confirmation(json.dumps(confirmation).encode())
    # A pair of surrogate escapes is one real character, and welcome.
    confirmation = json.loads(codec.encode_confirmation(Confirmation("p", "Walking", "user", 1.0)))
    confirmation["label"] = "\U0001f600"
    assert codec.decode_confirmation(json.dumps(confirmation).encode()).label == "\U0001f600"


def test_an_error_event_about_unencodable_text_escapes_it() -> None:
    event = ErrorEvent("trainer-1", "malformed_payload", "counter \ud800 is bad", 1.0, "a/\udc80")
    decoded = codec.decode_error(codec.encode_error(event))
    assert decoded.message == "counter \\ud800 is bad"
    assert decoded.topic == "a/\\udc80"
    quoting = ErrorEvent.quoting("trainer-1", "malformed_payload", "\ud800" * 3000, 1.0, "t" * 600)
    assert quoting.message == ("\\ud800" * 3000)[:2048]  # escaped, then cut to size
    assert len(quoting.topic) == 512
    codec.encode_error(quoting)
