"""Small helpers for tests that talk to the broker through the project's own transport."""

from __future__ import annotations

import queue
import uuid
from collections.abc import Sequence

from shared.config import BrokerSettings
from shared.mqtt_transport import InboundMessage, MqttConnection


def connect(
    settings: BrokerSettings,
    subscriptions: Sequence[tuple[str, int]] = (),
    *,
    client_id: str | None = None,
    inbox_size: int = 10_000,
    persistent: bool = False,
) -> tuple[MqttConnection, queue.Queue[InboundMessage]]:
    """A started connection (and its inbox) that is connected and subscribed."""
    inbox: queue.Queue[InboundMessage] = queue.Queue(maxsize=inbox_size)
    connection = MqttConnection(
        settings,
        client_id=client_id or f"test-{uuid.uuid4().hex[:8]}",
        subscriptions=subscriptions,
        inbox=inbox if subscriptions else None,
        persistent_session=persistent,
    )
    connection.start()
    assert connection.wait_connected(10.0), "test client could not connect to the broker"
    if subscriptions:
        assert connection.wait_subscribed(10.0), "broker did not acknowledge the subscription"
    return connection, inbox


def receive(inbox: queue.Queue[InboundMessage], timeout: float = 10.0) -> InboundMessage:
    message = inbox.get(timeout=timeout)
    message.ack()
    return message
