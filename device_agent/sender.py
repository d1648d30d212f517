"""The sender thread's job: publish the outbox in order, delete each message once answered."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from device_agent.outbox import ErrorReporter, Outbox
from device_agent.store import AgentStore
from shared.counters import Counters
from shared.mqtt_transport import MqttConnection, PublishHandle

log = logging.getLogger(__name__)

_RESEND_AFTER_S = 60.0


class OutboxSender:
    """Publishes the outbox in order when the broker is reachable.

    A message is deleted from the outbox only once the broker answered it. A message the broker
    refuses (its ACL, say) is reported and deleted too: it would be refused again.
    """

    def __init__(
        self,
        store: AgentStore,
        outbox: Outbox,
        connection: MqttConnection,
        report: ErrorReporter,
        counters: Counters,
        *,
        inflight: int,
        flush_s: float,
    ) -> None:
        self._store = store
        self._outbox = outbox
        self._connection = connection
        self._report = report
        self._counters = counters
        self._inflight = inflight
        self._flush_s = flush_s

    def run(self, producers_done: Callable[[], bool]) -> None:
        """Until ``producers_done()`` and the outbox is flushed (or ``flush_s`` has passed, or
        the broker is away): then the rest waits in the outbox for the next start."""
        in_flight: list[tuple[int, PublishHandle]] = []
        last_sent = 0
        flush_deadline: float | None = None
        oldest_in_flight_since = 0.0
        while True:
            if producers_done():
                if flush_deadline is None:
                    flush_deadline = time.monotonic() + self._flush_s
                if time.monotonic() > flush_deadline or not self._connection.connected:
                    break
            if not self._connection.connected:
                self._connection.wait_connected(0.5)
                continue
            if in_flight:
                answered = self._await_answers(in_flight)
                self._store.outbox_remove([entry_id for entry_id, _ in answered])
                refused = [handle for _, handle in answered if handle.refused]
                for handle in refused:
                    self._report_refused(handle)
                self._counters.add("messages_sent", len(answered) - len(refused))
                in_flight = in_flight[len(answered) :]
                if answered:
                    oldest_in_flight_since = time.monotonic()
                elif time.monotonic() - oldest_in_flight_since > _RESEND_AFTER_S:
                    # paho resends unacknowledged messages after a reconnect; if that never
                    # completes, send them again from the outbox (receivers deduplicate).
                    log.warning("%d publishes unacknowledged for 60 s: resending", len(in_flight))
                    in_flight, last_sent = [], 0
                continue
            entries = self._store.outbox_after(last_sent, self._inflight)
            if not entries:
                if flush_deadline is not None:
                    break  # everything is out
                self._wait_for_more(self._outbox.ready)
                continue
            oldest_in_flight_since = time.monotonic()
            for entry in entries:
                in_flight.append((entry.id, self._connection.publish(entry.message)))
                last_sent = entry.id

    @staticmethod
    def _wait_for_more(ready: threading.Event) -> None:
        ready.wait(0.5)
        ready.clear()

    @staticmethod
    def _await_answers(
        in_flight: list[tuple[int, PublishHandle]],
    ) -> list[tuple[int, PublishHandle]]:
        """The leading messages the broker answered (order kept: stop at the first pending)."""
        answered = []
        for entry_id, handle in in_flight:
            if not handle.wait(1.0):
                break
            answered.append((entry_id, handle))
        return answered

    def _report_refused(self, handle: PublishHandle) -> None:
        """Log, count and publish a refusal: the message is not sent again, it would be refused."""
        outcome = handle.outcome()
        reason = outcome.describe() if outcome is not None else "no reason code"
        text = f"the broker refused {handle.topic}: {reason}; dropped from the outbox"
        if handle.topic == self._report.topic:
            # Reporting it on the error topic would be refused in turn, again and again.
            log.error("%s", text)
            self._counters.add("error_publish_refused")
        else:
            self._report("publish_refused", text, handle.topic)
