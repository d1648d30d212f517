"""The dashboard's MQTT side: receive the fleet's messages, publish confirmations.

It works against any broker the settings describe. With the shipped ACL it logs in as user
``dashboard``, which may read predictions, status, errors, confirmations and the manifest, and
write confirmations. A confirmation is published at QoS 1 and its PUBACK's MQTT 5 reason code
(``PublishHandle.outcome``) is reported, so a refused publish (0x87 Not authorized, for example) is
not taken for a success.
"""

from __future__ import annotations

import logging
import queue
import time
import uuid
from collections.abc import Callable

from dashboard.feed import feed_message, subscriptions
from dashboard.fleet_view import FleetView
from shared import codec
from shared.config import BrokerSettings
from shared.errors import BrokerError, HarError, PayloadError
from shared.messages import Confirmation, ConfirmationSource
from shared.mqtt_transport import (
    InboundMessage,
    MqttConnection,
    Outbound,
    PublishHandle,
    PublishOutcome,
)
from shared.topics import Topics

log = logging.getLogger(__name__)


class ConfirmError(HarError):
    """A confirmation cannot be sent as asked (bad device id, label not of the current model)."""


def new_client_id(settings: BrokerSettings, role: str) -> str:
    return settings.client_id or f"har-{role}-{uuid.uuid4().hex[:8]}"


def build_confirmation(topics: Topics, device_id: str, confirmation: Confirmation) -> Outbound:
    try:
        topic = topics.confirmation(device_id)
    except ValueError as exc:
        raise ConfirmError(str(exc)) from exc
    return Outbound(topic, codec.encode_confirmation(confirmation), qos=1)


class FleetClient:
    """Subscribes to the fleet's topics, feeds a ``FleetView``, publishes confirmations."""

    def __init__(
        self,
        settings: BrokerSettings,
        *,
        inbox_size: int = 1000,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.topics = Topics(settings.topic_root)
        self._clock = clock
        self._inbox: queue.Queue[InboundMessage] = queue.Queue(maxsize=inbox_size)
        self._connection = MqttConnection(
            settings,
            client_id=new_client_id(settings, "dashboard"),
            subscriptions=subscriptions(self.topics),
            inbox=self._inbox,
            persistent_session=False,  # a dashboard wants the present, not a backlog
        )

    def start(self, timeout: float) -> None:
        """Connect and subscribe; BrokerError if the broker cannot be reached or refuses us."""
        self._connection.start()
        try:
            self._connection.wait_connected_or_raise(timeout)
            subscribed = self._connection.wait_subscribed(timeout)
        except BrokerError:
            self._connection.stop()
            raise
        if not subscribed:
            self._connection.stop()
            raise BrokerError("the broker did not acknowledge the dashboard's subscriptions")

    def stop(self) -> None:
        self._connection.stop()

    def __enter__(self) -> FleetClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def connected(self) -> bool:
        return self._connection.connected

    def pump(self, view: FleetView, timeout: float = 0.0, max_messages: int = 5000) -> int:
        """Feed waiting messages to ``view``, waiting up to ``timeout`` for the first.

        At most ``max_messages`` per call, so that a busy fleet cannot starve the screen.
        """
        handled = 0
        wait = timeout
        while handled < max_messages:
            try:
                message = self._inbox.get(timeout=wait) if wait > 0 else self._inbox.get_nowait()
            except queue.Empty:
                return handled
            wait = 0.0
            problem = feed_message(view, self.topics, message.topic, message.payload, self._clock())
            if problem is not None:
                log.warning("bad payload: %s", problem)
            message.ack()
            handled += 1
        return handled

    def confirm(
        self, device_id: str, prediction_id: str, label: str, source: ConfirmationSource = "user"
    ) -> PublishHandle:
        """Publish a confirmation of ``prediction_id``; the handle tells what the broker said."""
        try:
            confirmation = Confirmation(prediction_id, label, source, ts=self._clock())
        except ValueError as exc:
            raise ConfirmError(f"invalid confirmation: {exc}") from exc
        return self._connection.publish(build_confirmation(self.topics, device_id, confirmation))


def check_label(label: str, manifest_payload: bytes | None, manifest_topic: str) -> None:
    """ConfirmError unless ``label`` is one of the labels of the retained model manifest."""
    if manifest_payload is None:
        raise ConfirmError(
            f"no model manifest arrived on {manifest_topic}, so the label cannot be checked; "
            "pass --any-label to send it unchecked"
        )
    try:
        manifest = codec.decode_manifest(manifest_payload)
    except PayloadError as exc:
        raise ConfirmError(
            f"the retained model manifest is malformed ({exc}); pass --any-label to send "
            "the confirmation unchecked"
        ) from exc
    if label not in manifest.labels:
        raise ConfirmError(
            f"{label!r} is not a label of model {manifest.version}: "
            f"{', '.join(manifest.labels)} (--any-label skips this check)"
        )


def send_confirmation(
    settings: BrokerSettings,
    device_id: str,
    confirmation: Confirmation,
    *,
    check_labels: bool,
    connect_timeout_s: float,
    manifest_wait_s: float,
    ack_timeout_s: float,
) -> PublishOutcome:
    """Publish one confirmation and wait for the broker's acceptance (``har confirm``).

    Raises ConfirmError for a bad device id or label, BrokerError when the broker cannot be
    reached, does not acknowledge in time or refuses the publish.
    """
    topics = Topics(settings.topic_root)
    message = build_confirmation(topics, device_id, confirmation)
    inbox: queue.Queue[InboundMessage] = queue.Queue(maxsize=10)
    connection = MqttConnection(
        settings,
        client_id=new_client_id(settings, "confirm"),
        subscriptions=[(topics.model_manifest(), 1)] if check_labels else (),
        inbox=inbox if check_labels else None,
        persistent_session=False,
    )
    connection.start()
    try:
        connection.wait_connected_or_raise(connect_timeout_s)
        if check_labels:
            check_label(
                confirmation.label,
                _retained_manifest(connection, inbox, manifest_wait_s),
                topics.model_manifest(),
            )
        handle = connection.publish(message)
        handle.wait(ack_timeout_s)
    finally:
        connection.stop()
    outcome = handle.outcome()
    if outcome is None:
        raise BrokerError(f"the broker did not acknowledge the confirmation in {ack_timeout_s:g} s")
    if not outcome.accepted:
        raise BrokerError(f"the broker refused the confirmation: {outcome.describe()}")
    return outcome


def _retained_manifest(
    connection: MqttConnection, inbox: queue.Queue[InboundMessage], wait_s: float
) -> bytes | None:
    # The broker sends a retained message right after the SUBACK, or nothing if there is none.
    deadline = time.monotonic() + wait_s
    if not connection.wait_subscribed(wait_s):
        return None
    try:
        message = inbox.get(timeout=max(0.0, deadline - time.monotonic()))
    except queue.Empty:
        return None
    message.ack()
    return message.payload
