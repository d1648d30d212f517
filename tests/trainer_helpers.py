"""The trainer service's settings for tests: one place, so every test's trainer is the same."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from shared import codec
from shared.config import BrokerSettings
from shared.mqtt_transport import MqttConnection, Outbound
from shared.signing import PRIVATE_KEY_FILE, generate_keypair
from trainer_service.settings import (
    RetrainSettings,
    TrainerSettings,
)


def trainer_settings_for(
    broker_settings: BrokerSettings, folder: Path, **overrides: Any
) -> TrainerSettings:
    """Data, registry and a signing key (made once) under ``folder``; no scheduled retrain; a
    status every second. ``overrides`` replace any other field."""
    private_key = folder / "keys" / PRIVATE_KEY_FILE
    if not private_key.exists():
        generate_keypair(folder / "keys")
    settings = TrainerSettings(
        instance="trainer-test",
        data_dir=folder / "data",
        registry_dir=folder / "registry",
        private_key=private_key,
        broker=dataclasses.replace(broker_settings, client_id=""),
        retrain=RetrainSettings(min_new_confirmations=1000, interval_s=0),
        status_interval_s=1.0,
    )
    return dataclasses.replace(settings, **overrides)


WAIT = 60.0


def publish(connection: MqttConnection, topic: str, payload: bytes, *, msgpack: bool) -> None:
    content_type = codec.CONTENT_TYPE_MSGPACK if msgpack else codec.CONTENT_TYPE_JSON
    assert connection.publish(Outbound(topic, payload, content_type=content_type)).wait(10)
