"""Receipts of stored messages: the trainer's half of end-to-end delivery.

The broker's PUBACK only says the broker took a message; a broker that crashes before the trainer
got it, or that answers "no matching subscribers" while the trainer's session is gone, loses it.
So after each commit the trainer tells every device which of its sensor batches, predictions,
relayed confirmations and forgets are now stored (duplicates included: they are stored too), and
the agent deletes a message from its outbox only then (``device_agent.sender``). A receipt lost
on the way costs a resend, which storage deduplicates.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from shared import codec
from shared.messages import MAX_RECEIPT_IDS, MAX_RECEIPT_RANGES, Receipt
from shared.mqtt_transport import MqttConnection, Outbound
from shared.topics import Topics


@dataclass
class _Stored:
    seqs: list[int] = field(default_factory=list)
    predictions: list[str] = field(default_factory=list)
    confirmations: list[str] = field(default_factory=list)
    forgets: list[str] = field(default_factory=list)


class ReceiptBook:
    """What the transaction being written stores, per device; owned by the ingest thread."""

    def __init__(self) -> None:
        self._stored: defaultdict[str, _Stored] = defaultdict(_Stored)

    def batch(self, device_id: str, seq: int) -> None:
        self._stored[device_id].seqs.append(seq)

    def prediction(self, device_id: str, prediction_id: str) -> None:
        self._stored[device_id].predictions.append(prediction_id)

    def confirmation(self, device_id: str, prediction_id: str) -> None:
        self._stored[device_id].confirmations.append(prediction_id)

    def forget(self, device_id: str, request_id: str) -> None:
        self._stored[device_id].forgets.append(request_id)

    def clear(self) -> None:
        """The transaction failed: nothing of it is stored."""
        self._stored.clear()

    def send(self, connection: MqttConnection, topics: Topics, now: float) -> int:
        """Publish the receipts (after the commit), then start afresh; how many were sent."""
        sent = 0
        for device, stored in self._stored.items():
            for receipt in _receipts(device, stored, now):
                connection.publish(Outbound(topics.receipt(device), codec.encode_receipt(receipt)))
                sent += 1
        self._stored.clear()
        return sent


def _receipts(device: str, stored: _Stored, now: float) -> list[Receipt]:
    """As few receipts as the size limits allow (a commit group rarely needs more than one)."""
    ranges = Receipt.ranges_of(stored.seqs)
    predictions = sorted(set(stored.predictions))
    confirmations = sorted(set(stored.confirmations))
    forgets = sorted(set(stored.forgets))
    receipts = []
    while ranges or predictions or confirmations or forgets:
        receipts.append(
            Receipt(
                device,
                ranges[:MAX_RECEIPT_RANGES],
                now,
                tuple(predictions[:MAX_RECEIPT_IDS]),
                tuple(confirmations[:MAX_RECEIPT_IDS]),
                tuple(forgets[:MAX_RECEIPT_IDS]),
            )
        )
        ranges = ranges[MAX_RECEIPT_RANGES:]
        predictions = predictions[MAX_RECEIPT_IDS:]
        confirmations = confirmations[MAX_RECEIPT_IDS:]
        forgets = forgets[MAX_RECEIPT_IDS:]
    return receipts
