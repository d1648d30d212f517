"""The agent's way out: messages committed to the store's outbox, and handled errors reported.

Every thread that has something to send commits it here; the sender thread
(``device_agent.sender``) publishes the outbox in order when the broker is reachable.
"""

from __future__ import annotations

import collections
import logging
import threading
from collections.abc import Callable, Mapping

import numpy as np
import numpy.typing as npt

from device_agent.store import AgentStore, Priority
from shared import codec
from shared.counters import Counters
from shared.errors import HarError, StorageError
from shared.messages import DeviceCommand, ErrorEvent, ReceiptKey
from shared.mqtt_transport import InboundMessage, Outbound
from shared.topics import Topics

log = logging.getLogger(__name__)


def forget_relay(topics: Topics, device_id: str, command: DeviceCommand) -> tuple[Outbound, str]:
    """The message that tells the trainer this device forgot its confirmations (the forget
    command itself, on the device's ``forgotten`` topic) and its receipt key: it stays in the
    outbox until the trainer's receipt says it forgot them too."""
    return (
        Outbound(topics.forgotten(device_id), codec.encode_device_command(command)),
        ReceiptKey.forget(command.request_id),
    )


class Outbox:
    """Commits outgoing messages to the store (before anything is sent) and wakes the sender."""

    def __init__(self, store: AgentStore) -> None:
        self._store = store
        self.ready = threading.Event()  # set whenever something was committed

    def put(
        self,
        message: Outbound,
        priority: Priority,
        *,
        counters: Mapping[str, int] | None = None,
        recent: tuple[str, str, npt.NDArray[np.float32]] | None = None,
        receipt_key: str | None = None,
    ) -> None:
        evicted = self._store.enqueue(
            message, priority, counters=counters, recent=recent, receipt_key=receipt_key
        )
        if evicted:
            log.warning("outbox full: evicted %d oldest low-priority messages", evicted)
        self.ready.set()


_REPORTED_KEPT = 1000  # messages reported on whose redelivery is recognised


class ErrorReporter:
    """Log, count and publish (through the outbox) a handled error. Never raises.

    When the outbox cannot take the event (the store refuses writes: a full disk), it is
    published directly by ``publish_directly``: an error must reach the broker most of all
    when the device cannot store anything.
    """

    def __init__(
        self,
        device_id: str,
        topics: Topics,
        outbox: Outbox,
        counters: Counters,
        clock: Callable[[], float],
        *,
        publish_directly: Callable[[Outbound], object],
    ) -> None:
        self._device = device_id
        self._topic = topics.error(device_id)
        self._outbox = outbox
        self._counters = counters
        self._clock = clock
        self._publish_directly = publish_directly
        # Digests of the last messages reported on (``about``): a redelivery of one is not
        # reported again.
        self._reported: collections.OrderedDict[bytes, None] = collections.OrderedDict()
        self._reported_lock = threading.Lock()

    @property
    def topic(self) -> str:
        return self._topic

    def about(self, inbound: InboundMessage, code: str, message: str) -> None:
        """Report what is wrong with a received message, once: a redelivery of it (MQTT's DUP
        flag: our acknowledgement was lost) reported already in this run is only counted."""
        key = inbound.digest()
        with self._reported_lock:
            repeated = inbound.redelivered and key in self._reported
            self._reported[key] = None
            self._reported.move_to_end(key)
            while len(self._reported) > _REPORTED_KEPT:
                self._reported.popitem(last=False)
        if repeated:
            self._counters.add("reports_not_repeated")
            return
        self(code, message, inbound.topic)

    def __call__(self, code: str, message: str, topic: str = "") -> None:
        log.warning("%s: %s", code, message)
        self._counters.add(f"error_{code}")
        try:
            event = self.encode(code, message, topic)
        except (HarError, ValueError) as exc:
            log.warning("error event %s cannot be encoded: %s", code, exc)
            return
        try:
            self._outbox.put(event, Priority.NORMAL)
        except StorageError as exc:
            log.warning("error event %s not stored (%s): publishing it directly", code, exc)
            self.publish_now(event)

    def publish_now(self, event: Outbound) -> object:
        """Publish an encoded event without the outbox (its handle, or None if that failed)."""
        self._counters.add("error_events_published_directly")
        try:
            return self._publish_directly(event)
        except (HarError, ValueError) as exc:
            log.warning("error event on %s could not be published: %s", event.topic, exc)
            return None

    def encode(self, code: str, message: str, topic: str = "") -> Outbound:
        """An error event as a message, for a caller that publishes it itself."""
        return Outbound(self._topic, codec.encode_error(self._event(code, message, topic)))

    def _event(self, code: str, message: str, topic: str) -> ErrorEvent:
        return ErrorEvent(self._device, code, message[:2000], self._clock(), topic=topic)
