"""A device agent against a real broker, for tests: its settings, a factory that starts and
stops agents, a watcher of what it publishes, tiny signed releases."""

from __future__ import annotations

import json
import queue
from collections.abc import Callable
from pathlib import Path

from device_agent.agent import DeviceAgent
from device_agent.sensors import SensorSettings
from device_agent.settings import AgentSettings, AgentTuning
from shared import codec
from shared.config import BrokerSettings
from shared.messages import Prediction
from shared.mqtt_transport import InboundMessage
from shared.topics import Topics
from simulator.tiny_model import (
    CHUNK_SIZE,
    LABELS,
    Release,
    Releases,
)
from tests.mqtt_helpers import connect
from trainer_service.distribution import publish_all, release_messages

DEVICE = "wrist-1"
WAIT = 60.0


def publish_release(settings: BrokerSettings, release: Release) -> None:
    connection, _ = connect(settings)
    try:
        topics = Topics(settings.topic_root)
        publish_all(
            connection, release_messages(topics, release.manifest, release.payload, CHUNK_SIZE), 10
        )
    finally:
        connection.stop()


def agent_settings(
    broker_settings: BrokerSettings, state_dir: Path, releases: Releases, **tuning: object
) -> AgentSettings:
    return AgentSettings(
        device_id=DEVICE,
        state_dir=state_dir,
        public_key=releases.public_key_path,
        broker=broker_settings,
        sensor=SensorSettings(
            kind="synthetic",
            speed=5.0,
            synthetic_activities=",".join(LABELS),
            synthetic_segment_s=8.0,
        ),
        agent=AgentTuning(status_interval_s=2.0, **tuning),  # type: ignore[arg-type]
    )


AgentFactory = Callable[..., DeviceAgent]


class Watcher:
    """A subscriber that sorts what the agent publishes by kind."""

    def __init__(self, settings: BrokerSettings, *, client_id: str = "watcher") -> None:
        self.topics = Topics(settings.topic_root)
        self.connection, self.inbox = connect(
            settings,
            [
                (self.topics.all_sensor(), 1),
                (self.topics.all_prediction(), 1),
                (self.topics.all_error(), 1),
                (self.topics.all_status(), 1),
            ],
            client_id=client_id,
            persistent=True,
        )
        self.queues: dict[str, queue.Queue[InboundMessage]] = {
            kind: queue.Queue() for kind in ("sensor", "prediction", "error", "status")
        }

    def pump(self, kind: str, timeout: float = WAIT) -> InboundMessage:
        """The next message of ``kind``, sorting others into their queues meanwhile."""
        wanted = self.queues[kind]
        while wanted.empty():
            message = self.inbox.get(timeout=timeout)
            message.ack()
            self.queues[self.topics.kind_of(message.topic) or "other"].put(message)
        return wanted.get_nowait()

    def prediction(self) -> Prediction:
        return codec.decode_prediction(self.pump("prediction").payload)

    def error_with(self, code: str) -> dict[str, object]:
        while True:
            event = json.loads(self.pump("error").payload)
            if event["code"] == code:
                return event  # type: ignore[no-any-return]

    def stop(self) -> None:
        self.connection.stop()
