"""End-to-end delivery of sensor batches: a batch leaves the agent's outbox only once stored.

Against a real Mosquitto, a real trainer service and a real agent (synthetic sensor).
"""

from __future__ import annotations

import queue
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from device_agent.agent import DeviceAgent
from device_agent.sensors import SensorSettings, open_sensor
from device_agent.settings import AgentSettings, AgentTuning
from shared import codec
from shared.config import BrokerSettings
from shared.messages import Confirmation, Prediction, Receipt, ReceiptKey, SensorBatch, WindowRef
from shared.mqtt_transport import InboundMessage, Outbound
from shared.topics import Topics
from tests.mosquitto import MosquittoProcess
from tests.mqtt_helpers import connect, receive
from tests.trainer_helpers import trainer_settings_for
from trainer_service.service import TrainerService

pytestmark = pytest.mark.broker

DEVICE = "wrist-1"
WAIT = 60.0
START_MS = 1_700_000_000_000  # the agent's first sequence number (its clock is pinned)


def trainer(broker_settings: BrokerSettings, tmp_path: Path) -> TrainerService:
    return TrainerService(trainer_settings_for(broker_settings, tmp_path))


@pytest.fixture
def service(broker_settings: BrokerSettings, tmp_path: Path) -> Iterator[TrainerService]:
    running = trainer(broker_settings, tmp_path / "trainer")
    running.start()
    assert running.wait_connected(WAIT)
    yield running
    running.shutdown()


def agent(broker_settings: BrokerSettings, state_dir: Path) -> DeviceAgent:
    settings = AgentSettings(
        device_id=DEVICE,
        state_dir=state_dir,
        broker=broker_settings,
        sensor=SensorSettings(kind="synthetic", speed=5.0),
        agent=AgentTuning(status_interval_s=2.0, receipt_timeout_s=1.0),
    )
    return DeviceAgent(settings, open_sensor(settings.sensor), wall_clock=lambda: START_MS / 1000)


def batch(seq: int) -> SensorBatch:
    return SensorBatch(DEVICE, seq, 20.0, 0, np.zeros((20, 3), np.float32))


def wait_for(condition: object, timeout: float = WAIT) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():  # type: ignore[operator]
            return True
        time.sleep(0.1)  # polling a real condition, with a deadline
    return False


def test_the_trainer_receipts_every_stored_batch_duplicates_included(
    broker_settings: BrokerSettings, service: TrainerService
) -> None:
    topics = Topics(broker_settings.topic_root)
    device, inbox = connect(broker_settings, [(topics.receipt(DEVICE), 1)])

    def send(seq: int) -> None:
        message = Outbound(
            topics.sensor(DEVICE),
            codec.encode_sensor_batch(batch(seq)),
            content_type=codec.CONTENT_TYPE_MSGPACK,
        )
        assert device.publish(message).wait(10)

    def named_by_next_receipt() -> set[int]:
        receipt = codec.decode_receipt(receive(inbox).payload)
        assert receipt.device_id == DEVICE
        return {seq for first, last in receipt.ranges for seq in range(first, last + 1)}

    try:
        send(5)
        send(6)
        named: set[int] = set()
        while named != {5, 6}:
            named |= named_by_next_receipt()
        send(5)  # a resend of a batch already stored: stored, so receipted again
        assert named_by_next_receipt() == {5}
        assert service.store.batch_seqs(DEVICE) == [5, 6]
        assert service.counters.get("batches_duplicate") == 1
    finally:
        device.stop()


def test_a_relayed_confirmation_and_a_prediction_are_receipted_once_stored(
    broker_settings: BrokerSettings, service: TrainerService
) -> None:
    topics = Topics(broker_settings.topic_root)
    device, inbox = connect(broker_settings, [(topics.receipt(DEVICE), 1)])
    prediction = Prediction.new(
        device_id=DEVICE,
        window=WindowRef(7, 0, 20),
        probabilities=np.array([0.9, 0.1], np.float32),
        labels=("Walking", "Sitting"),
        model_version="v0001",
        ts=2.0,
    )
    confirmation = Confirmation(prediction.prediction_id, "Walking", "user", 3.0)
    try:
        for topic, payload in (
            (topics.prediction(DEVICE), codec.encode_prediction(prediction)),
            (topics.confirmed(DEVICE), codec.encode_confirmation(confirmation)),
        ):
            assert device.publish(Outbound(topic, payload)).wait(10)
        named: set[str] = set()
        while len(named) < 2:
            named |= set(codec.decode_receipt(receive(inbox).payload).outbox_keys())
        assert named == {
            ReceiptKey.prediction(prediction.prediction_id),
            ReceiptKey.confirmation(prediction.prediction_id),
        }
        assert service.counters.get("confirmations") == 1
    finally:
        device.stop()


def test_a_receipt_is_a_few_sorted_ranges_and_names_outbox_keys() -> None:
    ranges = Receipt.ranges_of([9, 3, 4, 5, 3, 12, 11])
    assert ranges == ((3, 5), (9, 9), (11, 12))
    receipt = Receipt(DEVICE, ranges, 1.0, predictions=("p1",), confirmations=("p0",))
    assert codec.decode_receipt(codec.encode_receipt(receipt)) == receipt
    assert ReceiptKey.batch(4) in receipt.outbox_keys()
    assert ReceiptKey.batch(6) not in receipt.outbox_keys()
    assert ReceiptKey.prediction("p1") in receipt.outbox_keys()
    assert ReceiptKey.confirmation("p0") in receipt.outbox_keys()
    assert ReceiptKey.confirmation("p1") not in receipt.outbox_keys()


def test_a_broker_that_crashes_and_forgets_everything_loses_no_batch(
    broker: MosquittoProcess, broker_settings: BrokerSettings, tmp_path: Path
) -> None:
    """The worst crash: kill -9 and the persistence file gone, so the trainer's session and
    every queued message with it. The broker acknowledged those batches; the receipts did not."""
    service = trainer(broker_settings, tmp_path / "trainer")
    device = agent(broker_settings, tmp_path / "device")
    service.start()
    try:
        assert service.wait_connected(WAIT)
        device.start()
        # Stop the trainer (its session stays, the broker queues for it), let the agent stream
        # into that queue, then crash the broker and lose its state.
        assert wait_for(lambda: len(service.store.batch_seqs(DEVICE)) >= 3)
        service.shutdown()
        queued = device.counters.get("messages_sent")
        assert device.counters.wait_until("messages_sent", queued + 10, WAIT)
        broker.kill()
        (broker.workdir / "mosquitto.db").unlink(missing_ok=True)
        broker.start()

        service = trainer(broker_settings, tmp_path / "trainer")
        service.start()
        assert service.wait_connected(WAIT)
        produced = device.counters.get("batches_queued") + 10
        assert device.counters.wait_until("batches_queued", produced, WAIT)
        expected = list(range(START_MS, START_MS + produced))
        assert wait_for(lambda: service.store.batch_seqs(DEVICE)[:produced] == expected), (
            "a batch the broker acknowledged and then lost was never stored"
        )
        assert device.counters.get("messages_resent") >= 10
    finally:
        device.shutdown()
        service.shutdown()


def test_a_device_can_neither_shadow_nor_confirm_another_devices_prediction(
    broker_settings: BrokerSettings, service: TrainerService
) -> None:
    """Prediction ids are unique per device: the trainer keys rows by (device, id). Another
    device's prediction with the same id is stored beside it; its confirmation of this device's
    prediction is refused, reported (foreign_prediction) and not receipted."""
    topics = Topics(broker_settings.topic_root)
    other = "wrist-2"
    watcher, errors = connect(broker_settings, [(topics.trainer_error(), 1)])
    mine, my_receipts = connect(broker_settings, [(topics.receipt(DEVICE), 1)])
    theirs, their_receipts = connect(broker_settings, [(topics.receipt(other), 1)])

    def predicted_by(device: str, prediction_id: str) -> bytes:
        made = Prediction(
            prediction_id, device, WindowRef(7, 0, 20), "Walking", 0, (0.9, 0.1), "v0001", 2.0
        )
        return codec.encode_prediction(made)

    def receipted(inbox: queue.Queue[InboundMessage], key: str) -> set[str]:
        """The outbox keys of every receipt until one names ``key``."""
        named: set[str] = set()
        while key not in named:
            named |= set(codec.decode_receipt(receive(inbox).payload).outbox_keys())
        return named

    try:
        # The other device uses the id first; this device's prediction is stored all the same.
        for device, connection in ((other, theirs), (DEVICE, mine)):
            message = Outbound(topics.prediction(device), predicted_by(device, "p-shared"))
            assert connection.publish(message).wait(10)
        assert ReceiptKey.prediction("p-shared") in receipted(
            my_receipts, ReceiptKey.prediction("p-shared")
        )
        assert service.store.counts().predictions == 2
        # The other device relays a confirmation of a prediction only this device made.
        assert mine.publish(
            Outbound(topics.prediction(DEVICE), predicted_by(DEVICE, "p-mine"))
        ).wait(10)
        receipted(my_receipts, ReceiptKey.prediction("p-mine"))
        foreign = Confirmation("p-mine", "Laying", "user", 3.0)
        assert theirs.publish(
            Outbound(topics.confirmed(other), codec.encode_confirmation(foreign))
        ).wait(10)
        control = Outbound(
            topics.sensor(other),
            codec.encode_sensor_batch(
                SensorBatch(other, 1, 20.0, 0, np.zeros((20, 3), np.float32))
            ),
            content_type=codec.CONTENT_TYPE_MSGPACK,
        )
        assert theirs.publish(control).wait(10)
        named = receipted(their_receipts, ReceiptKey.batch(1))
        assert ReceiptKey.confirmation("p-mine") not in named
        event = codec.decode_error(receive(errors).payload)
        assert (event.code, event.topic) == ("foreign_prediction", topics.confirmed(other))
        # This device's own answer is the first one stored for its prediction.
        own = Confirmation("p-mine", "Walking", "user", 4.0)
        assert mine.publish(
            Outbound(topics.confirmed(DEVICE), codec.encode_confirmation(own))
        ).wait(10)
        receipted(my_receipts, ReceiptKey.confirmation("p-mine"))
        assert service.counters.get("confirmations") == 1
        assert service.counters.get("confirmations_foreign") == 1
    finally:
        for connection in (watcher, mine, theirs):
            connection.stop()
