"""The messages of the wire contract, as frozen value types.

Each type checks its own invariants when it is built (``ValueError`` on violation), so a message
our code builds is as valid as one the codec accepts. ``shared.codec`` turns them into bytes and
back, and converts every failure into a ``PayloadError``.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from shared.topics import is_valid_id

SCHEMA_VERSION = 1

# Physical plausibility: phone and wearable accelerometers saturate at +-16 g (157 m/s^2). A value
# far beyond that is a unit error or corruption, never a movement.
MAX_ABS_ACCELERATION = 1000.0
MAX_SAMPLE_RATE_HZ = 1000.0
MAX_SAMPLES_PER_BATCH = 4096
MAX_LABELS = 64
MAX_TEXT = 256
MAX_MESSAGE_TEXT = 2048
MAX_ERROR_TOPIC = 512

# "failed": a service one of whose loops died, published just before it exits to be restarted.
DeviceState = Literal["online", "offline", "failed"]
# What a device's (or trainer's) status can say, and "unknown" for one that has sent none yet.
DEVICE_STATES: tuple[str, ...] = ("online", "offline", "failed", "unknown")
ConfirmationSource = Literal["user", "app", "import", "auto"]

Float32Samples = npt.NDArray[np.float32]
OffsetsMicros = npt.NDArray[np.uint32]


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def _check_text(name: str, value: object, max_len: int = MAX_TEXT, *, empty: bool = False) -> str:
    _require(isinstance(value, str), f"{name} must be a string")
    assert isinstance(value, str)
    _require(empty or len(value) > 0, f"{name} must not be empty")
    _require(len(value) <= max_len, f"{name} longer than {max_len} characters")
    # A lone surrogate cannot be encoded (UTF-8 on the wire, SQLite): no message may hold one.
    _require(value == escape_unencodable(value), f"{name} holds a lone surrogate")
    return value


def escape_unencodable(text: str) -> str:
    """``text`` with every character UTF-8 cannot encode (lone surrogates) written as ``\\udxxx``.

    For text that reports on bad input (error events, logs): it must say what came, not fail.
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text


def _check_device_id(value: object) -> str:
    text = _check_text("device_id", value, 64)
    _require(is_valid_id(text), f"device_id {text!r} has characters outside A-Z a-z 0-9 _ . -")
    return text


def _check_int(name: str, value: object, low: int, high: int) -> int:
    _require(isinstance(value, int) and not isinstance(value, bool), f"{name} must be an integer")
    assert isinstance(value, int)
    _require(low <= value <= high, f"{name}={value} outside [{low}, {high}]")
    return value


def _check_float(name: str, value: object, low: float, high: float) -> float:
    _require(
        isinstance(value, (int, float)) and not isinstance(value, bool), f"{name} must be a number"
    )
    assert isinstance(value, (int, float))
    number = float(value)
    _require(math.isfinite(number), f"{name} must be finite")
    _require(low <= number <= high, f"{name}={number} outside [{low}, {high}]")
    return number


_INT64_MAX = 2**63 - 1
_UINT32_MAX = 2**32 - 1
_EPOCH_MAX_S = 2**33  # year 2242: anything later is a unit mistake


@dataclass(frozen=True, slots=True, eq=False)
class SensorBatch:
    """Consecutive accelerometer samples from one device, in m/s^2.

    ``seq`` increases by one per batch with no gaps, so a receiver can spot loss and dedupe
    redeliveries. ``t0_ns`` is the device clock at the first sample; ``offsets_us`` optionally
    gives each sample's time after it (otherwise samples are ``1 / sample_rate_hz`` apart).
    """

    device_id: str
    seq: int
    sample_rate_hz: float
    t0_ns: int
    samples: Float32Samples
    offsets_us: OffsetsMicros | None = None
    v: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        _check_device_id(self.device_id)
        _check_int("seq", self.seq, 0, _INT64_MAX)
        _check_float("sample_rate_hz", self.sample_rate_hz, 1e-3, MAX_SAMPLE_RATE_HZ)
        _check_int("t0_ns", self.t0_ns, 0, _INT64_MAX)
        _require(self.v == SCHEMA_VERSION, f"unsupported sensor batch version {self.v}")
        samples = np.asarray(self.samples)
        _require(samples.dtype.kind == "f", f"samples must be floating point, got {samples.dtype}")
        _require(
            samples.ndim == 2 and samples.shape[1] == 3,
            f"samples must have shape (n, 3), got {samples.shape}",
        )
        _require(
            1 <= samples.shape[0] <= MAX_SAMPLES_PER_BATCH,
            f"a batch holds 1..{MAX_SAMPLES_PER_BATCH} samples, got {samples.shape[0]}",
        )
        samples = np.ascontiguousarray(samples, dtype=np.float32)
        _require(bool(np.isfinite(samples).all()), "samples contain NaN or infinity")
        peak = float(np.abs(samples).max())
        _require(
            peak <= MAX_ABS_ACCELERATION,
            f"sample magnitude {peak:.1f} m/s^2 exceeds {MAX_ABS_ACCELERATION:g}",
        )
        samples.setflags(write=False)
        object.__setattr__(self, "samples", samples)
        if self.offsets_us is not None:
            offsets = np.asarray(self.offsets_us)
            _require(offsets.dtype.kind in "ui", "offsets_us must be integers")
            _require(
                offsets.shape == (samples.shape[0],),
                f"offsets_us must have shape ({samples.shape[0]},), got {offsets.shape}",
            )
            _require(
                bool((offsets >= 0).all() and (offsets <= _UINT32_MAX).all()),
                "offsets_us out of uint32 range",
            )
            offsets = np.ascontiguousarray(offsets, dtype=np.uint32)
            _require(bool((np.diff(offsets.astype(np.int64)) >= 0).all()), "offsets_us decrease")
            offsets.setflags(write=False)
            object.__setattr__(self, "offsets_us", offsets)

    @property
    def n_samples(self) -> int:
        return int(self.samples.shape[0])

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, SensorBatch):
            return NotImplemented
        same_offsets = (self.offsets_us is None and other.offsets_us is None) or (
            self.offsets_us is not None
            and other.offsets_us is not None
            and np.array_equal(self.offsets_us, other.offsets_us)
        )
        return (
            self.device_id == other.device_id
            and self.seq == other.seq
            and self.sample_rate_hz == other.sample_rate_hz
            and self.t0_ns == other.t0_ns
            and self.v == other.v
            and np.array_equal(self.samples, other.samples)
            and same_offsets
        )

    __hash__ = None  # type: ignore[assignment]


@dataclass(frozen=True, slots=True)
class WindowRef:
    """Where a window's samples sit in a device's batch stream.

    The window starts at sample ``offset`` of batch ``batch_seq`` and runs for ``length`` samples,
    possibly into the following batches. Receivers that stored the batches can rebuild it exactly.
    """

    batch_seq: int
    offset: int
    length: int

    def __post_init__(self) -> None:
        _check_int("window.batch_seq", self.batch_seq, 0, _INT64_MAX)
        _check_int("window.offset", self.offset, 0, MAX_SAMPLES_PER_BATCH - 1)
        _check_int("window.length", self.length, 1, 100_000)


@dataclass(frozen=True, slots=True)
class Prediction:
    """The model's reading of one window, published for dashboards and for confirmation."""

    prediction_id: str
    device_id: str
    window: WindowRef
    label: str
    class_index: int
    probabilities: tuple[float, ...]
    model_version: str
    ts: float
    # The recorded label of the window, only when the sensor replays labelled data (demo, tests):
    # dashboards can show live accuracy, and a simulated user can confirm from it.
    truth: str | None = None
    v: int = SCHEMA_VERSION

    @classmethod
    def new(
        cls,
        *,
        device_id: str,
        window: WindowRef,
        probabilities: npt.NDArray[np.floating[Any]],
        labels: Sequence[str],
        model_version: str,
        ts: float,
        truth: str | None = None,
    ) -> Prediction:
        """A prediction with a fresh id from a model's class probabilities over ``labels``."""
        normalised = np.asarray(probabilities, dtype=np.float64)
        normalised = normalised / normalised.sum()
        index = int(np.argmax(normalised))
        return cls(
            prediction_id=uuid.uuid4().hex,
            device_id=device_id,
            window=window,
            label=labels[index],
            class_index=index,
            probabilities=tuple(normalised.tolist()),
            model_version=model_version,
            ts=ts,
            truth=truth,
        )

    def __post_init__(self) -> None:
        _check_text("prediction_id", self.prediction_id, 64)
        _check_device_id(self.device_id)
        if self.truth is not None:
            _check_text("truth", self.truth, 64)
        _require(isinstance(self.window, WindowRef), "window must be a WindowRef")
        _check_text("label", self.label, 64)
        _check_text("model_version", self.model_version, 64)
        _check_float("ts", self.ts, 0.0, _EPOCH_MAX_S)
        _require(self.v == SCHEMA_VERSION, f"unsupported prediction version {self.v}")
        probabilities = tuple(_check_float("probability", p, 0.0, 1.0) for p in self.probabilities)
        _require(1 <= len(probabilities) <= MAX_LABELS, "probabilities must have 1..64 entries")
        _check_int("class_index", self.class_index, 0, len(probabilities) - 1)
        _require(abs(sum(probabilities) - 1.0) < 1e-3, "probabilities must sum to 1")
        object.__setattr__(self, "probabilities", probabilities)


@dataclass(frozen=True, slots=True)
class Confirmation:
    """A person's (or app's) statement of what the activity in a predicted window really was."""

    prediction_id: str
    label: str
    source: ConfirmationSource
    ts: float
    v: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        _check_text("prediction_id", self.prediction_id, 64)
        _check_text("label", self.label, 64)
        _require(
            self.source in ("user", "app", "import", "auto"),
            f"source must be user, app, import or auto, got {self.source!r}",
        )
        _check_float("ts", self.ts, 0.0, _EPOCH_MAX_S)
        _require(self.v == SCHEMA_VERSION, f"unsupported confirmation version {self.v}")


@dataclass(frozen=True, slots=True)
class DeviceStatus:
    """Retained per-device presence: birth message, last will and periodic counters."""

    device_id: str
    state: DeviceState
    model_version: str | None
    ts: float
    counters: Mapping[str, int] = field(default_factory=dict)
    v: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        _check_device_id(self.device_id)
        _require(
            self.state in ("online", "offline", "failed"), "state must be online, offline or failed"
        )
        if self.model_version is not None:
            _check_text("model_version", self.model_version, 64)
        _check_float("ts", self.ts, 0.0, _EPOCH_MAX_S)
        _require(isinstance(self.counters, Mapping), "counters must be a mapping")
        _require(len(self.counters) <= 64, "at most 64 counters")
        counters = {
            _check_text("counter name", k, 64): _check_int(f"counter {k}", c, 0, _INT64_MAX)
            for k, c in self.counters.items()
        }
        object.__setattr__(self, "counters", counters)
        _require(self.v == SCHEMA_VERSION, f"unsupported status version {self.v}")


@dataclass(frozen=True, slots=True)
class InputSpec:
    """What a model eats: ``window`` samples of ``channels`` axes at ``sample_rate_hz``."""

    window: int
    channels: int = 3
    sample_rate_hz: float = 20.0
    dtype: str = "float32"

    def __post_init__(self) -> None:
        _check_int("input.window", self.window, 1, 100_000)
        _check_int("input.channels", self.channels, 1, 16)
        _check_float("input.sample_rate_hz", self.sample_rate_hz, 1e-3, MAX_SAMPLE_RATE_HZ)
        _require(self.dtype == "float32", "input.dtype must be float32")


@dataclass(frozen=True, slots=True)
class ModelManifest:
    """An immutable description of one model version; ``signature`` signs all the rest."""

    version: str
    sha256: str
    size: int
    labels: tuple[str, ...]
    input: InputSpec
    metrics: Mapping[str, float]
    created: float
    chunks: int
    parent: str | None = None
    signature: bytes = b""
    key_id: str = ""
    v: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        _check_text("version", self.version, 64)
        _require(is_valid_id(self.version), f"version {self.version!r} is not a valid id")
        _require(
            isinstance(self.sha256, str)
            and len(self.sha256) == 64
            and all(c in "0123456789abcdef" for c in self.sha256),
            "sha256 must be 64 lowercase hex digits",
        )
        _check_int("size", self.size, 1, 2**40)
        _check_int("chunks", self.chunks, 1, 1_000_000)
        labels = tuple(_check_text("label", label, 64) for label in self.labels)
        _require(1 <= len(labels) <= MAX_LABELS, "a model needs 1..64 labels")
        _require(len(set(labels)) == len(labels), "labels must be unique")
        object.__setattr__(self, "labels", labels)
        _require(isinstance(self.input, InputSpec), "input must be an InputSpec")
        _require(isinstance(self.metrics, Mapping), "metrics must be a mapping")
        metrics = {
            _check_text("metric name", k, 64): _check_float(f"metric {k}", m, -1e12, 1e12)
            for k, m in self.metrics.items()
        }
        object.__setattr__(self, "metrics", metrics)
        _check_float("created", self.created, 0.0, _EPOCH_MAX_S)
        if self.parent is not None:
            _check_text("parent", self.parent, 64)
        _require(isinstance(self.signature, bytes), "signature must be bytes")
        _require(len(self.signature) <= 512, "signature too long")
        _check_text("key_id", self.key_id, 64, empty=True)
        _require(self.v == SCHEMA_VERSION, f"unsupported manifest version {self.v}")


@dataclass(frozen=True, slots=True)
class ModelChunk:
    """One piece of a model payload; ``count`` pieces concatenated in order make the payload."""

    version: str
    index: int
    count: int
    data: bytes
    v: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        _require(is_valid_id(self.version), f"version {self.version!r} is not a valid id")
        _check_int("count", self.count, 1, 1_000_000)
        _check_int("index", self.index, 0, self.count - 1)
        _require(isinstance(self.data, bytes), "data must be bytes")
        _require(self.v == SCHEMA_VERSION, f"unsupported chunk version {self.v}")


@dataclass(frozen=True, slots=True)
class ErrorEvent:
    """Something that went wrong and was handled: published so operators see it."""

    source: str
    code: str
    message: str
    ts: float
    topic: str = ""
    v: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        _check_text("source", self.source, 64)
        _check_text("code", self.code, 64)
        # The message and topic quote what went wrong, which may be unencodable text: escaped.
        for name in ("message", "topic"):
            value = getattr(self, name)
            if isinstance(value, str):
                object.__setattr__(self, name, escape_unencodable(value))
        _check_text("message", self.message, MAX_MESSAGE_TEXT, empty=True)
        _check_text("topic", self.topic, MAX_ERROR_TOPIC, empty=True)
        _check_float("ts", self.ts, 0.0, _EPOCH_MAX_S)
        _require(self.v == SCHEMA_VERSION, f"unsupported error version {self.v}")

    @classmethod
    def quoting(
        cls, source: str, code: str, message: str, ts: float, topic: str = ""
    ) -> ErrorEvent:
        """An event whose message and topic may quote anything (bad input, a huge topic):
        unencodable characters escaped, then cut to the contract's limits."""
        return cls(
            source,
            code,
            escape_unencodable(message)[:MAX_MESSAGE_TEXT],
            ts,
            escape_unencodable(topic)[:MAX_ERROR_TOPIC],
        )


DeviceCommandName = Literal["forget", "confirm_latest", "correct_latest"]
DEVICE_COMMANDS: tuple[DeviceCommandName, ...] = ("forget", "confirm_latest", "correct_latest")


@dataclass(frozen=True, slots=True)
class DeviceCommand:
    """A wearer's (or operator's) request to one device: ``forget`` every confirmation;
    ``confirm_latest``: its latest prediction was right; ``correct_latest``: it was ``label``.

    The two ``*_latest`` commands let a dashboard that cannot know prediction ids (a Home
    Assistant button or select) confirm or correct what the device predicted last.
    """

    command: DeviceCommandName
    request_id: str
    ts: float
    label: str | None = None  # correct_latest only
    v: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        _check_command("device command", DEVICE_COMMANDS, self)
        if self.command == "correct_latest":
            _check_text("label", self.label, 64)
        else:
            _require(self.label is None, f"{self.command} takes no label")


MAX_RECEIPT_RANGES = 4096
MAX_RECEIPT_IDS = 512  # prediction ids per list: 512 x 34 bytes stays far below the JSON limit


@dataclass(frozen=True, slots=True)
class Receipt:
    """The trainer's word that it has committed these messages of one device.

    ``ranges``: sensor batches, as inclusive ``(first, last)`` sequence numbers, sorted and
    disjoint. ``predictions`` and ``confirmations``: prediction ids of predictions and of
    confirmations the device relayed. The agent deletes a message from its outbox only once a
    receipt names it (end-to-end delivery, docs/protocol.md).
    """

    device_id: str
    ranges: tuple[tuple[int, int], ...]
    ts: float
    predictions: tuple[str, ...] = ()
    confirmations: tuple[str, ...] = ()
    forgets: tuple[str, ...] = ()  # request ids of forgets the device relayed
    v: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        _check_device_id(self.device_id)
        _require(len(self.ranges) <= MAX_RECEIPT_RANGES, "a receipt holds at most 4096 ranges")
        previous = -1
        for pair in self.ranges:
            _require(isinstance(pair, tuple) and len(pair) == 2, "a range is [first, last]")
            first = _check_int("range first", pair[0], 0, _INT64_MAX)
            last = _check_int("range last", pair[1], first, _INT64_MAX)
            _require(first > previous, "receipt ranges must be sorted and disjoint")
            previous = last
        for name, ids in (
            ("predictions", self.predictions),
            ("confirmations", self.confirmations),
            ("forgets", self.forgets),
        ):
            _require(len(ids) <= MAX_RECEIPT_IDS, f"a receipt names at most 512 {name}")
            for prediction_id in ids:
                _check_text(name, prediction_id, 64)
        _require(
            bool(self.ranges or self.predictions or self.confirmations or self.forgets),
            "an empty receipt",
        )
        _check_float("ts", self.ts, 0.0, _EPOCH_MAX_S)
        _require(self.v == SCHEMA_VERSION, f"unsupported receipt version {self.v}")

    @staticmethod
    def ranges_of(seqs: Sequence[int]) -> tuple[tuple[int, int], ...]:
        """``seqs`` (any order, repeats allowed) as few sorted, disjoint ranges."""
        ranges: list[tuple[int, int]] = []
        for seq in sorted(set(seqs)):
            if ranges and seq == ranges[-1][1] + 1:
                ranges[-1] = (ranges[-1][0], seq)
            else:
                ranges.append((seq, seq))
        return tuple(ranges)

    def outbox_keys(self) -> list[str]:
        """The outbox keys (``ReceiptKey``) of everything this receipt names."""
        keys = [
            ReceiptKey.batch(seq) for first, last in self.ranges for seq in range(first, last + 1)
        ]
        keys += [ReceiptKey.prediction(p) for p in self.predictions]
        keys += [ReceiptKey.confirmation(p) for p in self.confirmations]
        keys += [ReceiptKey.forget(r) for r in self.forgets]
        return keys


class ReceiptKey:
    """How an agent's outbox names a message a receipt will name."""

    @staticmethod
    def batch(seq: int) -> str:
        return f"s:{seq}"

    @staticmethod
    def prediction(prediction_id: str) -> str:
        return f"p:{prediction_id}"

    @staticmethod
    def confirmation(prediction_id: str) -> str:
        return f"c:{prediction_id}"

    @staticmethod
    def forget(request_id: str) -> str:
        return f"f:{request_id}"


@dataclass(frozen=True, slots=True)
class TrainerCommand:
    """An operator's request to the trainer service (e.g. retrain now)."""

    command: Literal["retrain"]
    request_id: str
    ts: float
    v: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        _check_command("command", ("retrain",), self)


def _check_command(
    kind: str, known: Sequence[str], message: DeviceCommand | TrainerCommand
) -> None:
    _require(message.command in known, f"unknown {kind} {message.command!r}")
    _check_text("request_id", message.request_id, 64)
    _check_float("ts", message.ts, 0.0, _EPOCH_MAX_S)
    _require(message.v == SCHEMA_VERSION, f"unsupported {kind} version {message.v}")
