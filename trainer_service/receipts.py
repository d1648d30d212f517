"""Receipts of stored sensor batches: the trainer's half of end-to-end delivery.

The broker's PUBACK only says the broker took a batch; a broker that crashes before the trainer
got it, or that answers "no matching subscribers" while the trainer is away, loses it. So after
each commit the trainer tells every device which of its sequence numbers are now stored
(duplicates included: they are stored too), and the agent deletes a batch from its outbox only
then (``device_agent.sender``). A receipt lost on the way costs a resend, which storage dedups.
"""

from __future__ import annotations

from collections import defaultdict

from shared import codec
from shared.messages import MAX_RECEIPT_RANGES, BatchReceipt
from shared.mqtt_transport import MqttConnection, Outbound
from shared.topics import Topics


class ReceiptBook:
    """Sequence numbers stored in the transaction being written, per device; owned by ingest."""

    def __init__(self) -> None:
        self._stored: defaultdict[str, list[int]] = defaultdict(list)

    def stored(self, device_id: str, seq: int) -> None:
        self._stored[device_id].append(seq)

    def clear(self) -> None:
        """The transaction failed: nothing of it is stored."""
        self._stored.clear()

    def send(self, connection: MqttConnection, topics: Topics, now: float) -> int:
        """Publish one receipt per device (after the commit), then start afresh; how many."""
        sent = 0
        for device, seqs in self._stored.items():
            receipt = BatchReceipt.of(device, seqs, now)
            # A group holds at most commit_batch messages, far fewer ranges than a receipt may
            # carry; split anyway rather than publish one the agent would refuse.
            for start in range(0, len(receipt.ranges), MAX_RECEIPT_RANGES):
                part = BatchReceipt(device, receipt.ranges[start : start + MAX_RECEIPT_RANGES], now)
                connection.publish(Outbound(topics.receipt(device), codec.encode_receipt(part)))
                sent += 1
        self._stored.clear()
        return sent
