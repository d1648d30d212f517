"""The simulated people's app: what it sees on the broker, what it confirms, how it scores.

Domain logic only: ``PeopleApp.handle`` takes one decoded-or-not message and returns the
confirmations to publish; the transport lives in ``har.demo.run``. Each device's accuracy is
scored in four phases:

- ``before``: the first model, before anyone confirmed anything (one pass of the recording);
- ``while_confirming``: the first model plus on-device learning, while the person confirms a
  share of the predictions (``SimulatedPerson``: some answers are wrong on purpose);
- ``learned``: the first model plus what the device learned, after the person's last
  confirmation and until the new version arrives (at most one pass): what on-device learning
  adds on its own;
- ``after``: the retrained global model, personalised on the device with the person's
  confirmations (one pass).
"""

from __future__ import annotations

import random
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from shared import codec
from shared.errors import PayloadError
from shared.messages import Confirmation, DeviceStatus, Prediction
from shared.topics import Topics
from simulator.people import SimulatedPerson

# What the app counts each per-device message kind as (its subscriptions).
RECEIVED_AS = {
    "prediction": "predictions",
    "status": "statuses",
    "error": "errors",
    "confirmation": "confirmations",
}


@dataclass
class Score:
    windows: int = 0
    correct: int = 0
    versions: set[str] = field(default_factory=set)

    def add(self, correct: bool, version: str) -> None:
        self.windows += 1
        self.correct += int(correct)
        self.versions.add(version)

    @property
    def accuracy(self) -> float | None:
        return self.correct / self.windows if self.windows else None

    def to_dict(self) -> dict[str, Any]:
        accuracy = self.accuracy
        return {
            "windows": self.windows,
            "correct": self.correct,
            "accuracy": None if accuracy is None else round(accuracy, 4),
            "model_versions": sorted(self.versions),
        }


@dataclass
class DeviceView:
    """One device as its person's app sees it."""

    device_id: str
    windows_per_pass: int
    person: SimulatedPerson
    confirmations_wanted: int
    before: Score = field(default_factory=Score)
    while_confirming: Score = field(default_factory=Score)
    learned: Score = field(default_factory=Score)
    after: Score = field(default_factory=Score)
    confirmations_sent: int = 0
    wrong_answers: int = 0
    learned_served: bool = False  # its status said it served the learned state in "learned"
    status: DeviceStatus | None = None
    statuses_received: int = 0

    def on_prediction(
        self, prediction: Prediction, first_version: str, labels: Sequence[str]
    ) -> Confirmation | None:
        if prediction.truth is None:
            return None
        correct = prediction.label == prediction.truth
        if prediction.model_version != first_version:
            if self.after.windows < self.windows_per_pass:
                self.after.add(correct, prediction.model_version)
            return None
        if self.before.windows < self.windows_per_pass:
            self.before.add(correct, prediction.model_version)
            return None
        if self.confirmations_sent >= self.confirmations_wanted:
            if self.learned.windows < self.windows_per_pass:
                self.learned.add(correct, prediction.model_version)
                counters = self.status.counters if self.status is not None else {}
                self.learned_served |= bool(counters.get("serving_learned_state"))
            return None
        self.while_confirming.add(correct, prediction.model_version)
        answer = self.person.answer(prediction.truth, labels)
        if answer is None:
            return None
        self.confirmations_sent += 1
        self.wrong_answers += int(answer != prediction.truth)
        return Confirmation(prediction.prediction_id, answer, "app", time.time())

    @property
    def online(self) -> bool:
        return self.status is not None and self.status.state == "online"

    def finished(self, new_version: str | None) -> bool:
        """Scored a full pass with the new version, and its retained status says it runs it."""
        return (
            new_version is not None
            and self.after.windows >= self.windows_per_pass
            and self.status is not None
            and self.status.model_version == new_version
        )


class PeopleApp:
    """Every device's person, on one dashboard connection; counts what it receives, by kind."""

    def __init__(
        self,
        topics: Topics,
        trainer_instance: str,
        devices: Sequence[tuple[str, int]],
        first_version: str,
        labels: Sequence[str],
        *,
        confirmations: int,
        confirm_share: float,
        mistake_rate: float,
        seed: int = 0,
    ) -> None:
        self.topics = topics
        self._trainer_status = topics.trainer_status(trainer_instance)
        wanted = [confirmations // len(devices)] * len(devices)
        for rank in range(confirmations % len(devices)):
            wanted[rank] += 1
        self.devices = {
            device_id: DeviceView(
                device_id,
                windows_per_pass,
                SimulatedPerson(confirm_share, mistake_rate, random.Random(seed + rank)),
                wanted[rank],
            )
            for rank, (device_id, windows_per_pass) in enumerate(devices)
        }
        self.first_version = first_version
        self.new_version: str | None = None
        self.labels = tuple(labels)
        self.received: Counter[str] = Counter()
        self.trainer_status: DeviceStatus | None = None
        self.errors: list[str] = []

    def subscriptions(self) -> list[str]:
        return [
            self.topics.all_prediction(),
            self.topics.all_status(),
            self.topics.all_error(),
            self.topics.all_confirmation(),
            self.topics.model_manifest(),
            self._trainer_status,
        ]

    @property
    def confirmations_sent(self) -> int:
        return sum(device.confirmations_sent for device in self.devices.values())

    def progress(self) -> str:
        """Where the run is, in one line: said during the quiet stretches between milestones."""
        devices = list(self.devices.values())
        total = sum(d.windows_per_pass for d in devices)

        def scored(phase: str) -> int:
            return sum(min(getattr(d, phase).windows, d.windows_per_pass) for d in devices)

        if self.new_version is not None:
            running = sum(
                d.status is not None and d.status.model_version == self.new_version for d in devices
            )
            return (
                f"devices running {self.new_version}: {running}/{len(devices)}; "
                f"windows predicted with it: {scored('after')}/{total}"
            )
        wanted = sum(d.confirmations_wanted for d in devices)
        if scored("before") < total:
            return f"first model: {scored('before')}/{total} windows of the first pass scored"
        if self.confirmations_sent < wanted:
            return f"people confirming: {self.confirmations_sent}/{wanted} confirmations sent"
        learned = f"{scored('learned')}/{total} windows scored with what the devices learned"
        counters = self.trainer_status.counters if self.trainer_status is not None else {}
        epoch, epochs = counters.get("retrain_epoch", 0), counters.get("retrain_epochs_max", 0)
        if epoch > 0:
            return (
                f"the trainer is retraining: epoch {epoch} of at most {epochs} "
                f"(early stopping may end it sooner); meanwhile {learned}"
            )
        return f"waiting for the retrained model; meanwhile {learned}"

    def handle(self, topic: str, payload: bytes) -> list[tuple[str, Confirmation]]:
        """One inbound message; returns (topic, confirmation) pairs to publish."""
        try:
            return self._handle(topic, payload)
        except (PayloadError, ValueError) as exc:
            self.received["malformed"] += 1
            self.errors.append(f"malformed message on {topic}: {exc}")
            return []

    def _handle(self, topic: str, payload: bytes) -> list[tuple[str, Confirmation]]:
        if topic == self.topics.model_manifest():
            self.received["model_manifests"] += 1
            self._on_manifest(payload)
            return []
        if topic == self._trainer_status:
            self.received["trainer_statuses"] += 1
            self.trainer_status = codec.decode_status(payload)
            return []
        kind = self.topics.kind_of(topic)
        device = self.devices.get(self.topics.device_of(topic) or "")
        self.received[RECEIVED_AS.get(kind or "", "other")] += 1
        if device is None:
            return []
        if kind == "status":
            device.status = codec.decode_status(payload)
            device.statuses_received += 1
        elif kind == "error":
            event = codec.decode_error(payload)
            self.errors.append(f"{device.device_id}: {event.code}: {event.message}")
        elif kind == "prediction":
            prediction = codec.decode_prediction(payload)
            confirmation = device.on_prediction(prediction, self.first_version, self.labels)
            if confirmation is not None:
                return [(self.topics.confirmation(device.device_id), confirmation)]
        return []

    def _on_manifest(self, payload: bytes) -> None:
        version = codec.decode_manifest(payload).version
        if version != self.first_version and self.new_version is None:
            self.new_version = version

    def all_online(self) -> bool:
        return all(device.online for device in self.devices.values())

    def all_finished(self) -> bool:
        return all(device.finished(self.new_version) for device in self.devices.values())
