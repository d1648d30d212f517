"""What the dashboard knows about the fleet: pure state, fed decoded messages, no I/O.

Per device it keeps the latest prediction, presence (online, offline or failed, from the
retained status and its last will), the model version and a few counts. Across the fleet it
keeps the accuracy of confirmed predictions per model version: a confirmation names a prediction
id, and the pair counts once, as right when the confirmed label is the predicted one and as
wrong otherwise. A confirmation may arrive before its prediction (different topics are not
ordered), after it, or never meet it. As in the trainer, the first prediction and the first
confirmation of an id win.

Memory is bounded: per device, the most recent predictions (for joining) and unmatched
confirmations are LRU caches; the number of devices and of model versions is capped too. The
price of the bounds: a confirmation whose prediction was evicted is not counted.

Times are passed in (``now``, seconds since the epoch), so the state is deterministic to test.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Literal

from shared.messages import Confirmation, DeviceStatus, ErrorEvent, ModelManifest, Prediction

Presence = Literal["online", "offline", "failed", "unknown"]


@dataclass(frozen=True, slots=True)
class Limits:
    """How much the view remembers."""

    predictions_per_device: int = 512  # kept to join confirmations that come after them
    pending_per_device: int = 128  # confirmations waiting for their prediction
    # A confirmation whose prediction has not come by then never will (it was made before this
    # view started, or the device no longer had it): it stops waiting and is counted unmatched.
    pending_s: float = 60.0
    devices: int = 10_000
    versions: int = 256

    def __post_init__(self) -> None:
        if min(dataclasses.astuple(self)) < 1:
            raise ValueError("view limits must be >= 1")


@dataclass(frozen=True, slots=True)
class LatestPrediction:
    prediction_id: str
    label: str
    confidence: float  # the highest class probability
    model_version: str
    ts: float  # when the device predicted
    received_at: float
    truth: str | None = None


@dataclass(frozen=True, slots=True)
class LastError:
    code: str
    message: str
    received_at: float


@dataclass(frozen=True, slots=True)
class Accuracy:
    """Confirmed predictions of one model version: right ones and corrections."""

    right: int = 0
    wrong: int = 0

    @property
    def confirmed(self) -> int:
        return self.right + self.wrong

    @property
    def ratio(self) -> float | None:
        return self.right / self.confirmed if self.confirmed else None

    def counted(self, is_right: bool) -> Accuracy:
        return Accuracy(self.right + is_right, self.wrong + (not is_right))


@dataclass(frozen=True, slots=True)
class DeviceRow:
    """One device as the dashboard shows it."""

    device_id: str
    presence: Presence
    status_at: float | None  # when the last status message was received
    model_version: str | None
    latest: LatestPrediction | None
    predictions: int
    confirmations: int
    errors: int
    last_error: LastError | None


@dataclass(slots=True)
class _Kept:
    """A prediction remembered for joining."""

    label: str
    model_version: str
    confirmed: bool = False


@dataclass(slots=True)
class _Device:
    device_id: str
    last_heard: float
    presence: Presence = "unknown"
    status_at: float | None = None
    model_version: str | None = None
    latest: LatestPrediction | None = None
    predictions_seen: int = 0
    confirmations_seen: int = 0
    errors_seen: int = 0
    last_error: LastError | None = None
    kept: OrderedDict[str, _Kept] = field(default_factory=OrderedDict)
    # prediction id -> (label, when it came), oldest first
    pending: OrderedDict[str, tuple[str, float]] = field(default_factory=OrderedDict)

    def row(self) -> DeviceRow:
        return DeviceRow(
            device_id=self.device_id,
            presence=self.presence,
            status_at=self.status_at,
            model_version=self.model_version,
            latest=self.latest,
            predictions=self.predictions_seen,
            confirmations=self.confirmations_seen,
            errors=self.errors_seen,
            last_error=self.last_error,
        )


@dataclass(frozen=True, slots=True)
class ModelInfo:
    version: str
    labels: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class ViewCounts:
    """Fleet-wide counts of what was received and what became of it."""

    bad_payloads: int
    confirmations_joined: int  # counted in the accuracy
    confirmations_duplicate: int  # a later confirmation of an already confirmed prediction
    confirmations_dropped: int  # evicted while waiting for a prediction that never came
    confirmations_pending: int  # waiting for their prediction now
    confirmations_unmatched: int  # waited Limits.pending_s for a prediction that never came
    predictions_duplicate: int  # redelivered predictions, ignored
    devices_evicted: int


class FleetView:
    """The fleet's state, built from the messages the dashboard receives."""

    def __init__(self, limits: Limits | None = None) -> None:
        self._limits = limits or Limits()
        self._devices: dict[str, _Device] = {}
        self._accuracy: dict[str, Accuracy] = {}
        self._model: ModelInfo | None = None
        self._bad_payloads = 0
        self._last_bad_payload: str | None = None
        self._joined = 0
        self._duplicate_confirmations = 0
        self._dropped_confirmations = 0
        self._unmatched_confirmations = 0
        self._duplicate_predictions = 0
        self._evicted_devices = 0

    # ------------------------------------------------------------------ feeding
    def apply_prediction(self, device_id: str, prediction: Prediction, now: float) -> None:
        device = self._device(device_id, now)
        if prediction.prediction_id in device.kept:
            self._duplicate_predictions += 1  # QoS 1 may deliver twice
            return
        device.predictions_seen += 1
        device.model_version = prediction.model_version
        device.latest = LatestPrediction(
            prediction_id=prediction.prediction_id,
            label=prediction.label,
            confidence=max(prediction.probabilities),
            model_version=prediction.model_version,
            ts=prediction.ts,
            received_at=now,
            truth=prediction.truth,
        )
        kept = _Kept(prediction.label, prediction.model_version)
        device.kept[prediction.prediction_id] = kept
        if len(device.kept) > self._limits.predictions_per_device:
            device.kept.popitem(last=False)
        waiting = device.pending.pop(prediction.prediction_id, None)
        if waiting is not None:
            self._count(kept, waiting[0])

    def apply_confirmation(self, device_id: str, confirmation: Confirmation, now: float) -> None:
        device = self._device(device_id, now)
        device.confirmations_seen += 1
        pid = confirmation.prediction_id
        kept = device.kept.get(pid)
        if kept is not None:
            device.kept.move_to_end(pid)
            if kept.confirmed:
                self._duplicate_confirmations += 1
            else:
                self._count(kept, confirmation.label)
            return
        if pid in device.pending:
            self._duplicate_confirmations += 1  # the first one waits; it wins
            return
        device.pending[pid] = (confirmation.label, now)
        if len(device.pending) > self._limits.pending_per_device:
            device.pending.popitem(last=False)
            self._dropped_confirmations += 1

    def apply_status(self, device_id: str, status: DeviceStatus, now: float) -> None:
        device = self._device(device_id, now)
        device.presence = status.state
        device.status_at = now  # a last will's own ts is its connect time: receipt is what counts
        if status.model_version is not None:
            device.model_version = status.model_version

    def apply_error(self, device_id: str, event: ErrorEvent, now: float) -> None:
        device = self._device(device_id, now)
        device.errors_seen += 1
        device.last_error = LastError(event.code, event.message, now)

    def apply_manifest(self, manifest: ModelManifest) -> None:
        self._model = ModelInfo(manifest.version, manifest.labels)

    def record_bad_payload(self, description: str) -> None:
        self._bad_payloads += 1
        self._last_bad_payload = description

    # ------------------------------------------------------------------ reading
    @property
    def model(self) -> ModelInfo | None:
        """The current model's version and labels, from the retained manifest."""
        return self._model

    @property
    def labels(self) -> tuple[str, ...]:
        return self._model.labels if self._model is not None else ()

    @property
    def last_bad_payload(self) -> str | None:
        return self._last_bad_payload

    def device_ids(self) -> list[str]:
        """Every device's id, sorted."""
        return sorted(self._devices)

    def rows(self) -> list[DeviceRow]:
        """Every device, sorted by id."""
        return [self._devices[device_id].row() for device_id in self.device_ids()]

    def row(self, device_id: str) -> DeviceRow | None:
        device = self._devices.get(device_id)
        return device.row() if device is not None else None

    def accuracy(self) -> dict[str, Accuracy]:
        """Per model version, the confirmed predictions counted so far (versions sorted)."""
        return {version: self._accuracy[version] for version in sorted(self._accuracy)}

    def expire_pending(self, now: float) -> int:
        """Stop waiting for predictions that did not come within ``Limits.pending_s``."""
        expired = 0
        for device in self._devices.values():
            while device.pending:
                _, (_, since) = next(iter(device.pending.items()))
                if now - since < self._limits.pending_s:
                    break
                device.pending.popitem(last=False)
                expired += 1
        self._unmatched_confirmations += expired
        return expired

    def counts(self) -> ViewCounts:
        return ViewCounts(
            bad_payloads=self._bad_payloads,
            confirmations_joined=self._joined,
            confirmations_duplicate=self._duplicate_confirmations,
            confirmations_dropped=self._dropped_confirmations,
            confirmations_pending=sum(len(d.pending) for d in self._devices.values()),
            confirmations_unmatched=self._unmatched_confirmations,
            predictions_duplicate=self._duplicate_predictions,
            devices_evicted=self._evicted_devices,
        )

    def memory(self) -> tuple[int, int]:
        """(predictions kept, confirmations pending) over all devices: what the limits bound."""
        devices = self._devices.values()
        return sum(len(d.kept) for d in devices), sum(len(d.pending) for d in devices)

    def snapshot(self) -> dict[str, Any]:
        """Everything shown, as JSON-ready data (``har watch --once --json``)."""
        return {
            "model": (
                {"version": self._model.version, "labels": list(self._model.labels)}
                if self._model is not None
                else None
            ),
            "devices": [dataclasses.asdict(row) for row in self.rows()],
            "accuracy": {
                version: {"right": acc.right, "wrong": acc.wrong, "accuracy": acc.ratio}
                for version, acc in self.accuracy().items()
            },
            "counts": dataclasses.asdict(self.counts()),
            "last_bad_payload": self._last_bad_payload,
        }

    # ------------------------------------------------------------------ internals
    def _device(self, device_id: str, now: float) -> _Device:
        device = self._devices.get(device_id)
        if device is None:
            if len(self._devices) >= self._limits.devices:
                # The device heard from least recently makes room.
                quietest = min(self._devices.values(), key=lambda d: d.last_heard)
                self._dropped_confirmations += len(quietest.pending)
                del self._devices[quietest.device_id]
                self._evicted_devices += 1
            device = _Device(device_id, last_heard=now)
            self._devices[device_id] = device
        device.last_heard = max(device.last_heard, now)
        return device

    def _count(self, kept: _Kept, confirmed_label: str) -> None:
        kept.confirmed = True
        self._joined += 1
        version = kept.model_version
        if version not in self._accuracy and len(self._accuracy) >= self._limits.versions:
            del self._accuracy[next(iter(self._accuracy))]  # least recently counted goes
        previous = self._accuracy.pop(version, Accuracy())
        self._accuracy[version] = previous.counted(confirmed_label == kept.label)
