"""Home Assistant's side, for tests: its discovery configs rendered as it would, retained
messages, sample messages of every kind."""

from __future__ import annotations

import dataclasses
import re
import uuid
from typing import Any

from shared import codec
from shared.config import BrokerSettings
from shared.messages import (
    DeviceStatus,
    Prediction,
    WindowRef,
)
from shared.mqtt_transport import InboundMessage, Outbound
from tests.mqtt_helpers import connect, receive

# The labels of the sample prediction's model (its class_index 5 is "Walking").
MODEL_LABELS = ("Downstairs", "Jogging", "Sitting", "Standing", "Upstairs", "Walking")


TEMPLATE_FIELD = re.compile(r"value_json((?:\.\w+)+)")


def sample_messages(device_id: str = "wrist-0001") -> dict[str, list[bytes]]:
    """Payloads our codec really writes, by the last topic level they are published on."""
    prediction = Prediction(
        prediction_id="9b1f0c2e4d6a48b7a3e5f1c2d3b4a596",
        device_id=device_id,
        window=WindowRef(batch_seq=41, offset=15, length=80),
        label="Walking",
        class_index=5,
        probabilities=(0.011, 0.062, 0.004, 0.009, 0.012, 0.902),
        model_version="v0007",
        ts=1763769612.25,
    )
    replayed = dataclasses.replace(prediction, truth="Jogging")
    online = DeviceStatus(device_id, "online", "v0007", 1763769600.0, {"predictions": 758})
    offline = DeviceStatus(device_id, "offline", None, 1763769000.0)
    return {
        "prediction": [codec.encode_prediction(prediction), codec.encode_prediction(replayed)],
        "status": [codec.encode_status(online), codec.encode_status(offline)],
    }


def template_fields(template: str) -> list[tuple[str, ...]]:
    """The field paths a Home Assistant template reads from ``value_json``."""
    paths = [
        tuple(match.group(1).strip(".").split(".")) for match in TEMPLATE_FIELD.finditer(template)
    ]
    assert paths, f"template {template!r} reads no value_json field"
    return paths


def resolve(doc: Any, path: tuple[str, ...]) -> Any:
    """``value_json.a.b`` evaluated on a decoded message; fails if a field is missing."""
    for key in path:
        assert isinstance(doc, dict), f"{'.'.join(path)}: {key!r} of a non-object"
        assert key in doc, f"{'.'.join(path)}: no field {key!r}"
        doc = doc[key]
    return doc


def retained_under(settings: BrokerSettings, prefix: str) -> list[InboundMessage]:
    """Every retained message a new subscriber to ``<prefix>/#`` gets.

    Mosquitto sends a new subscription's retained messages right after its SUBACK, before
    anything published later: a marker published after the SUBACK arrives behind all of them.
    """
    connection, inbox = connect(settings, [(f"{prefix}/#", 1)])
    try:
        marker = f"{prefix}/end-marker-{uuid.uuid4().hex}"
        assert connection.publish(Outbound(marker, b"end")).wait(10)
        received = []
        while (message := receive(inbox)).topic != marker:
            received.append(message)
        return received
    finally:
        connection.stop()


def publish_all(settings: BrokerSettings, messages: list[Outbound]) -> None:
    connection, _ = connect(settings)
    try:
        for message in messages:
            assert connection.publish(message).wait(10)
    finally:
        connection.stop()
