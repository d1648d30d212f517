"""The sender thread's job: publish the outbox in order; keep what the trainer must store.

A message leaves the outbox once the broker answered it, except a sensor batch, a prediction and
a kept confirmation relayed to the trainer: the broker's acknowledgement only says the broker
took it, and a broker that crashes, or that answers "no matching subscribers" while the trainer's
session is gone, loses it. Those stay until the trainer's receipt names them (``DeviceAgent``
hands receipts to the store), and are sent again when something queued after them was receipted
and they were not (end-to-end delivery, docs/protocol.md).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

from device_agent.outbox import ErrorReporter, Outbox
from device_agent.store import AgentStore, OutboxEntry
from shared.counters import Counters
from shared.mqtt_transport import MqttConnection, PublishHandle

log = logging.getLogger(__name__)

_RESEND_AFTER_S = 60.0


@dataclass(frozen=True, slots=True)
class Receipts:
    """How receipted messages are confirmed: by the trainer's receipts, or by the broker alone."""

    awaited: bool = True
    timeout_s: float = 30.0  # sent this long ago, not receipted though a later one was: resend
    max_resends: int = 10


class OutboxSender:
    """Publishes the outbox in order when the broker is reachable.

    A message the broker refuses (its ACL, say) is reported and deleted: it would be refused
    again.
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
        receipts: Receipts,
    ) -> None:
        self._store = store
        self._outbox = outbox
        self._connection = connection
        self._report = report
        self._counters = counters
        self._inflight = inflight
        self._flush_s = flush_s
        self._receipts = receipts

    def run(self, producers_done: Callable[[], bool]) -> None:
        """Until ``producers_done()`` and the outbox is flushed (or ``flush_s`` has passed, or
        the broker is away): then the rest waits in the outbox for the next start. Messages
        waiting for a receipt are not waited for."""
        in_flight: list[tuple[OutboxEntry, PublishHandle]] = []
        last_sent = 0
        flush_deadline: float | None = None
        oldest_in_flight_since = 0.0
        next_resend_check = time.monotonic() + self._receipts.timeout_s / 4
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
                self._settle(answered)
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
            if entries:
                last_sent = entries[-1].id
            elif time.monotonic() >= next_resend_check and flush_deadline is None:
                next_resend_check = time.monotonic() + self._receipts.timeout_s / 4
                entries = self._unreceipted()
            if not entries:
                if flush_deadline is not None:
                    break  # everything is out
                self._wait_for_more(self._outbox.ready)
                continue
            oldest_in_flight_since = time.monotonic()
            in_flight = [(entry, self._connection.publish(entry.message)) for entry in entries]

    def _unreceipted(self) -> list[OutboxEntry]:
        """Messages to send again (their resend counted), after dropping those that used up
        their resends."""
        if not self._receipts.awaited:
            return []
        due = self._store.outbox_unreceipted(time.time() - self._receipts.timeout_s, self._inflight)
        spent = [entry for entry in due if entry.resends >= self._receipts.max_resends]
        spent_ids = {entry.id for entry in spent}
        if spent:
            self._store.outbox_remove(entry.id for entry in spent)
            self._counters.add("unreceipted_dropped", len(spent))
            self._report(
                "unreceipted",
                f"{len(spent)} messages sent {self._receipts.max_resends + 1} times and never "
                f"receipted (the first: {spent[0].receipt_key}): dropped from the outbox",
            )
        resend = [replace(e, resends=e.resends + 1) for e in due if e.id not in spent_ids]
        self._counters.add("messages_resent", len(resend))
        return resend

    def _settle(self, answered: list[tuple[OutboxEntry, PublishHandle]]) -> None:
        """Keep answered messages that await a receipt; delete everything else answered."""
        kept = [
            entry
            for entry, handle in answered
            if entry.receipt_key is not None and self._receipts.awaited and not handle.refused
        ]
        kept_ids = {entry.id for entry in kept}
        self._store.outbox_mark_sent(kept, time.time())
        self._store.outbox_remove(entry.id for entry, _ in answered if entry.id not in kept_ids)
        refused = [handle for _, handle in answered if handle.refused]
        for handle in refused:
            self._report_refused(handle)
        self._counters.add("messages_sent", len(answered) - len(refused))

    @staticmethod
    def _wait_for_more(ready: threading.Event) -> None:
        ready.wait(0.5)
        ready.clear()

    @staticmethod
    def _await_answers(
        in_flight: list[tuple[OutboxEntry, PublishHandle]],
    ) -> list[tuple[OutboxEntry, PublishHandle]]:
        """The leading messages the broker answered (order kept: stop at the first pending)."""
        answered = []
        for entry, handle in in_flight:
            if not handle.wait(1.0):
                break
            answered.append((entry, handle))
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
