"""One MQTT connection of the simulator: an outbox published in order, at least once.

A message leaves the outbox when it is handed to paho and is forgotten only when the broker
acknowledges it; when the connection drops, what was in flight goes back to the front of the
outbox and is sent again after the reconnect (receivers deduplicate: batches by sequence number,
predictions by id). Every attempt uses a fresh paho client, so paho never resends on its own.

A message published with a receipt key (a sensor batch, a prediction) is kept after the broker's
acknowledgement until the trainer's receipt names it, as a real agent's outbox keeps it
(docs/protocol.md, "End-to-end delivery"): ``resend_unreceipted`` sends again what no receipt
named in time, so that a broker that crashes after acknowledging loses nothing. The people's
app uses the same for its confirmations, with the device's relay of each as its receipt.
"""

from __future__ import annotations

import logging
import random
from collections import Counter, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import MQTTErrorCode

from shared.config import BrokerSettings
from shared.mqtt_transport import Outbound, PropertiesCache, backoff_delay, new_paho_client
from simulator.event_loop import EventLoop, Timer

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Entry:
    order: int
    message: Outbound
    receipt_key: str | None = None  # kept until a receipt names it
    resent: bool = False  # sent again because no receipt named it in time


class Link:
    def __init__(
        self,
        loop: EventLoop,
        broker: BrokerSettings,
        properties: PropertiesCache,
        *,
        client_id: str,
        username: str,
        password: str,
        counters: Counter[str],
        will: Outbound | None = None,
        on_connected: Callable[[Link], None] = lambda link: None,
        on_message: Callable[[str, bytes], None] = lambda topic, payload: None,
        on_acked: Callable[[Entry], None] = lambda entry: None,
        inflight: int = 20,
        outbox_max: int = 1000,
    ) -> None:
        self._loop = loop
        self._broker = broker
        self._properties = properties
        self._client_id = client_id
        self._username = username
        self._password = password
        self.counters = counters
        self._will = will
        self._on_connected = on_connected
        self._on_message = on_message
        self._on_acked = on_acked
        self._inflight = inflight
        self._outbox_max = outbox_max
        self.outbox: deque[Entry] = deque()
        self._in_flight: dict[int, Entry] = {}
        # Acknowledged by the broker, not yet named by a receipt: key -> (entry, when acked).
        self._awaiting: dict[str, tuple[Entry, float]] = {}
        self._receipted_up_to = 0  # the order of the latest entry a receipt named
        self._order = 0
        self._client: paho.Client | None = None
        self.connected = False
        self.closed = False
        self._closing = False
        self._final: Outbound | None = None
        self._attempt = 0
        self._rng = random.Random(client_id)
        self._retry: Timer | None = None

    # ------------------------------------------------------------------ public
    def start(self) -> None:
        self._connect()

    def publish(self, message: Outbound, receipt_key: str | None = None) -> None:
        if len(self.outbox) >= self._outbox_max:
            self.outbox.popleft()  # offline too long: the oldest goes first
            self.counters["outbox_dropped"] += 1
        self._order += 1
        self.outbox.append(Entry(self._order, message, receipt_key))
        self.pump()

    def receipted(self, keys: Iterable[str]) -> None:
        """The trainer stored these: forget them."""
        for key in keys:
            found = self._awaiting.pop(key, None)
            if found is not None:
                self.counters["receipted"] += 1
                self._receipted_up_to = max(self._receipted_up_to, found[0].order)

    def resend_unreceipted(self, older_than_s: float) -> int:
        """Send again, in their order, what the broker took ``older_than_s`` ago or more and no
        receipt named though one named a later message (as the agent: while the trainer is
        away nothing is receipted, and nothing is resent); how many."""
        cutoff = self._loop.time() - older_than_s
        late = [
            key
            for key, (entry, acked) in self._awaiting.items()
            if acked <= cutoff and entry.order < self._receipted_up_to
        ]
        entries = sorted((self._awaiting.pop(key)[0] for key in late), key=lambda e: e.order)
        for entry in reversed(entries):
            self.outbox.appendleft(replace(entry, resent=True))
        self.counters["resends"] += len(entries)
        if entries:
            self.pump()
        return len(entries)

    @property
    def unsent(self) -> int:
        return len(self.outbox) + len(self._in_flight)

    @property
    def unreceipted(self) -> int:
        return len(self._awaiting)

    def subscribe(self, topic: str, qos: int = 1) -> None:
        if self._client is not None and self.connected:
            self._client.subscribe(topic, qos)

    def unsubscribe(self, topic: str) -> None:
        if self._client is not None and self.connected:
            self._client.unsubscribe(topic)

    def close(self, final: Outbound | None = None) -> None:
        """Flush the outbox, publish ``final`` (e.g. an offline status), then disconnect."""
        self._closing = True
        self._final = final
        if self._retry is not None:
            self._retry.cancel()
        if not self.connected:
            self._finish()
            return
        self._maybe_finish()

    def abort(self) -> None:
        """Give up on what is left and disconnect now (the flush took too long)."""
        self._closing = True
        if self._client is not None and self.connected:
            self._client.disconnect()
        else:
            self._finish()

    # ------------------------------------------------------------------ sending
    def pump(self) -> None:
        client = self._client
        if client is None or not self.connected:
            return
        while self.outbox and len(self._in_flight) < self._inflight:
            entry = self.outbox.popleft()
            message = entry.message
            info = client.publish(
                message.topic,
                message.payload,
                qos=message.qos,
                retain=message.retain,
                properties=self._properties.get(message.content_type),
            )
            if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                self.outbox.appendleft(entry)
                return
            if message.qos == 0:
                self._on_acked(entry)
            else:
                self._in_flight[info.mid] = entry

    def _maybe_finish(self) -> None:
        if not self._closing or self.outbox or self._in_flight or self._client is None:
            return
        if self._final is not None:
            final, self._final = self._final, None
            self.publish(final)
            return
        self._client.disconnect()

    # ------------------------------------------------------------------ connecting
    def _connect(self) -> None:
        self._retry = None
        client = new_paho_client(
            self._broker,
            self._client_id,
            username=self._username,
            password=self._password,
            will=self._will,
            properties=self._properties,
            max_inflight=self._inflight,
        )
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_paho_message
        client.on_publish = self._on_publish
        self._client = client
        self._loop.attach(client)
        try:
            client.connect(
                self._broker.host, self._broker.port, self._broker.keepalive_s, clean_start=True
            )
        except (OSError, ValueError) as exc:
            self.counters["connect_failures"] += 1
            log.debug("%s: cannot connect: %s", self._client_id, exc)
            self._loop.detach(client)
            self._client = None
            self._schedule_retry()

    def _schedule_retry(self) -> None:
        if self._closing:
            self._finish()
            return
        self._attempt += 1
        delay = backoff_delay(
            self._attempt, self._broker.reconnect_min_s, self._broker.reconnect_max_s, self._rng
        )
        self._retry = self._loop.call_later(delay, self._connect)

    def _finish(self) -> None:
        self.closed = True
        self.counters["unsent_at_exit"] += self.unsent
        self.counters["unreceipted_at_exit"] += self.unreceipted

    # ------------------------------------------------------------------ paho callbacks
    def _on_connect(
        self, client: paho.Client, userdata: Any, flags: Any, reason: Any, properties: Any
    ) -> None:
        if reason.is_failure:
            self.counters["connect_refused"] += 1
            log.warning("%s: broker refused the connection: %s", self._client_id, reason)
            client.disconnect()
            return
        self.connected = True
        self._attempt = 0
        self.counters["connects"] += 1
        self._on_connected(self)
        self.pump()

    def _on_disconnect(
        self, client: paho.Client, userdata: Any, flags: Any, reason: Any, properties: Any
    ) -> None:
        if client is not self._client:
            return
        self._loop.detach(client)
        self._client = None
        was_connected, self.connected = self.connected, False
        # What the broker never acknowledged is sent again, in its original order.
        for entry in sorted(self._in_flight.values(), key=lambda e: e.order, reverse=True):
            self.outbox.appendleft(entry)
        self._in_flight.clear()
        if self._closing:
            self._finish()
            return
        if was_connected:
            self.counters["disconnects"] += 1
            log.debug("%s: connection lost (%s)", self._client_id, reason)
        self._schedule_retry()

    def _on_publish(
        self, client: paho.Client, userdata: Any, mid: int, reason: Any, properties: Any
    ) -> None:
        entry = self._in_flight.pop(mid, None)
        if entry is not None:
            if reason.is_failure:
                # Refused (e.g. "not authorized"): sending it again would be refused again.
                self.counters["publish_refused"] += 1
                log.debug("%s: broker refused %s: %s", self._client_id, entry.message.topic, reason)
            else:
                if entry.receipt_key is not None:
                    self._awaiting[entry.receipt_key] = (entry, self._loop.time())
                self._on_acked(entry)
        self.pump()
        self._maybe_finish()

    def _on_paho_message(self, client: paho.Client, userdata: Any, message: Any) -> None:
        self._on_message(message.topic, bytes(message.payload))
