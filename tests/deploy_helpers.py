"""The shipped broker configuration (deploy/mosquitto) run for tests: logins, topics, clients."""

from __future__ import annotations

import queue
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from har.local_broker import (
    MosquittoProcess,
    ShippedMosquitto,
)
from shared.config import BrokerSettings
from shared.mqtt_transport import InboundMessage, MqttConnection, Outbound
from shared.topics import Topics
from tests.mqtt_helpers import connect, receive

REPO = Path(__file__).resolve().parent.parent


DEPLOY = REPO / "deploy"


# The ACL names the topic root literally.
ROOT = "har/v1"


TOPICS = Topics(ROOT)


PASSWORDS = {
    "wrist-0001": "pw-wrist-1",
    "wrist-0002": "pw-wrist-2",
    "trainer": "pw-trainer",
    "dashboard": "pw-dashboard",
    "operator": "pw-operator",
    "healthcheck": "pw-health",
    "homeassistant": "pw-homeassistant",
    "nodered": "pw-nodered",
    "watch": "pw-watch",
    "scripts": "pw-scripts",
}


WAIT_S = 10.0


def settings_for(
    broker: MosquittoProcess, user: str | None, *, tls: bool = False
) -> BrokerSettings:
    """``user``'s settings for the plain listener, or with ``tls`` the TLS one, trusting its CA."""
    port, ca_file = broker.port, None
    if tls:
        assert isinstance(broker, ShippedMosquitto), "only the shipped config has TLS"
        port, ca_file = broker.tls_port, broker.ca_file
    return BrokerSettings(
        host=broker.host,
        port=port,
        topic_root=ROOT,
        username=user or "",
        password=PASSWORDS.get(user or "", ""),
        tls=tls,
        ca_file=ca_file,
        keepalive_s=5,
        reconnect_min_s=0.05,
        reconnect_max_s=0.5,
    )


@dataclass
class Client:
    connection: MqttConnection
    inbox: queue.Queue[InboundMessage]
    seen: list[tuple[str, bytes]] = field(default_factory=list)

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        handle = self.connection.publish(Outbound(topic, payload, qos=1, retain=retain))
        assert handle.wait(WAIT_S), f"no PUBACK for {topic}"

    def until(self, topic: str, payload: bytes) -> list[tuple[str, bytes]]:
        """Every message received so far, once (topic, payload) is among them."""
        while (topic, payload) not in self.seen:
            try:
                message = receive(self.inbox, timeout=WAIT_S)
            except queue.Empty:
                raise AssertionError(
                    f"{payload!r} never arrived on {topic}; got {self.seen}"
                ) from None
            self.seen.append((message.topic, message.payload))
        return list(self.seen)


class Clients:
    """Connected clients of one test, by user: subscribe first (``join``), then publish."""

    def __init__(self, broker: MosquittoProcess) -> None:
        self._broker = broker
        self._opened: list[MqttConnection] = []

    def join(
        self,
        user: str,
        subscriptions: list[str] | None = None,
        *,
        persistent: bool = False,
        tls: bool = False,
    ) -> Client:
        return self.join_as(
            settings_for(self._broker, user, tls=tls),
            subscriptions,
            client_id=f"{user}-{uuid.uuid4().hex[:8]}",
            persistent=persistent,
        )

    def join_as(
        self,
        settings: BrokerSettings,
        subscriptions: list[str] | None = None,
        *,
        client_id: str | None = None,
        persistent: bool = False,
    ) -> Client:
        """A client logged in with ``settings`` (any user, any password file)."""
        connection, inbox = connect(
            settings,
            [(topic, 1) for topic in subscriptions or []],
            client_id=client_id or f"{settings.username}-{uuid.uuid4().hex[:8]}",
            persistent=persistent,
        )
        self._opened.append(connection)
        return Client(connection, inbox)

    def close(self) -> None:
        for connection in self._opened:
            connection.stop()


def unique(prefix: str) -> bytes:
    return f"{prefix}-{uuid.uuid4().hex[:8]}".encode()
