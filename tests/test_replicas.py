"""Trainer replicas: several trainers on one ``$share`` group and one PostgreSQL database split the
ingest; one of them, the leader, retrains and publishes; another takes over when it dies."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from shared import codec
from shared.config import BrokerSettings
from shared.messages import DeviceStatus, SensorBatch, TrainerCommand
from shared.mqtt_transport import InboundMessage, Outbound
from shared.topics import Topics
from tests.mqtt_helpers import connect, receive
from tests.process_helpers import Program, broker_table
from tests.trainer_helpers import trainer_settings_for
from trainer_service.service import TrainerService
from trainer_service.settings import IngestSettings, StoreSettings
from trainer_service.stores import open_store

pytestmark = pytest.mark.broker
WAIT = 60.0


def wait_until(condition: Callable[[], bool], timeout: float = WAIT) -> bool:
    """A bounded poll of state that has no event to wait on (another process, a database)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def trainer_statuses(inbox: queue.Queue[InboundMessage]) -> Iterator[DeviceStatus]:
    """Every trainer's statuses as they come (the inbox subscribes to trainer/+/status)."""
    while True:
        message = receive(inbox, WAIT)
        if message.payload:
            yield codec.decode_status(message.payload)


def sensor_payload(device: str, seq: int) -> bytes:
    samples = np.full((20, 3), seq % 97, np.float32)
    return codec.encode_sensor_batch(SensorBatch(device, seq, 20.0, seq, samples))


class ReceiptedDevice:
    """A device's end-to-end delivery, reduced to batches: publish each once, then publish again
    every batch no receipt named within ``timeout_s``, until every one is receipted."""

    def __init__(self, settings: BrokerSettings, device: str, timeout_s: float = 3.0) -> None:
        self.topics = Topics(settings.topic_root)
        self.device = device
        self.timeout_s = timeout_s
        self.connection, self.inbox = connect(settings, [(self.topics.receipt(device), 1)])
        self.receipted: set[int] = set()
        self.resent = 0

    def send(self, seq: int) -> None:
        # Not waiting for each PUBACK (as the agent's sender does not): the receipt is what counts.
        self.connection.publish(
            Outbound(
                self.topics.sensor(self.device),
                sensor_payload(self.device, seq),
                content_type=codec.CONTENT_TYPE_MSGPACK,
            )
        )

    def take_receipts(self) -> None:
        while True:
            try:
                message = self.inbox.get_nowait()
            except queue.Empty:
                return
            message.ack()
            for first, last in codec.decode_receipt(message.payload).ranges:
                self.receipted.update(range(first, last + 1))

    def stream(self, total: int, pace: threading.Event, deadline_s: float = WAIT) -> None:
        sent_at: dict[int, float] = {}
        for seq in range(total):
            pace.wait(0.005)  # never set: about 200 batches a second
            self.send(seq)
            sent_at[seq] = time.monotonic()
            self.take_receipts()
        deadline = time.monotonic() + deadline_s
        while len(self.receipted) < total and time.monotonic() < deadline:
            pace.wait(0.1)
            self.take_receipts()
            for seq in range(total):
                if seq not in self.receipted and time.monotonic() - sent_at[seq] > self.timeout_s:
                    self.send(seq)
                    sent_at[seq] = time.monotonic()
                    self.resent += 1

    def stop(self) -> None:
        self.connection.stop()


@pytest.fixture
def replicas(
    broker_settings: BrokerSettings, tmp_path: Path, postgres_url: str
) -> Iterator[list[TrainerService]]:
    started: list[TrainerService] = []
    for name in ("trainer-a", "trainer-b"):
        settings = trainer_settings_for(
            broker_settings,
            tmp_path,  # one registry folder: the shared directory of every replica
            instance=name,
            store=StoreSettings(url=postgres_url),
            ingest=IngestSettings(session_expiry_s=2),
        )
        service = TrainerService(settings)
        service.start()
        started.append(service)
    for service in started:
        assert service.wait_connected(WAIT)
    yield started
    for service in started:
        service.shutdown()


def test_two_replicas_split_the_ingest_and_one_leader_takes_every_command(
    replicas: list[TrainerService], broker_settings: BrokerSettings
) -> None:
    assert wait_until(lambda: sum(r.is_leader for r in replicas) == 1)
    [leader] = [r for r in replicas if r.is_leader]
    [follower] = [r for r in replicas if not r.is_leader]
    topics = Topics(broker_settings.topic_root)
    device, _ = connect(broker_settings)
    try:
        for seq in range(200):
            device.publish(
                Outbound(topics.sensor("d1"), sensor_payload("d1", seq), 1)
            ).wait_accepted(10)
        for request in ("r1", "r2", "r3", "r4"):
            command = codec.encode_command(TrainerCommand("retrain", request, 1.0))
            device.publish(Outbound(topics.trainer_command(), command, 1)).wait_accepted(10)
    finally:
        device.stop()
    assert wait_until(lambda: len(leader.store.batch_seqs("d1")) == 200)
    assert leader.store.batch_seqs("d1") == list(range(200))
    stored = [r.counters.get("batches") for r in replicas]
    assert sum(stored) == 200
    assert min(stored) > 0, f"the $share group did not split the ingest: {stored}"
    assert follower.counters.get("commands") > 0, "every command went to the leader"
    # The follower left its commands in the store; only the leader runs rounds (they fail
    # here: no signing key is needed to show who runs them, and no base data is configured).
    assert wait_until(
        lambda: leader.counters.get("commands") + follower.counters.get("commands") == 4
    )
    assert wait_until(lambda: leader.store.meta("retrain_request") is None)
    assert leader.counters.get("retrain_rounds") >= 1
    assert follower.counters.get("retrain_rounds") == 0

    leader.shutdown()  # releases the lock: the follower leads within about a second
    assert wait_until(lambda: follower.is_leader, timeout=5.0)
    assert follower.counters.get("leader_acquired") == 1


@pytest.mark.slow
def test_a_replica_killed_mid_stream_loses_nothing_and_the_other_takes_over(
    broker_settings: BrokerSettings, tmp_path: Path, postgres_url: str
) -> None:
    """Two `har trainer serve` processes; the leader gets SIGKILL while a device streams."""
    topics = Topics(broker_settings.topic_root)
    programs: list[Program] = []
    watcher, inbox = connect(broker_settings, [(f"{topics.root}/trainer/+/status", 1)])
    total = 1000
    for name in ("ra", "rb"):
        config = tmp_path / f"{name}.toml"
        config.write_text(
            f'instance = "{name}"\ndata_dir = "{tmp_path / name}"\n'
            f'registry_dir = "{tmp_path / "registry"}"\nstatus_interval_s = 0.3\n\n'
            f"{broker_table(broker_settings)}\n"
            f'[store]\nurl = "{postgres_url}"\n\n'
            "[ingest]\ncommit_batch = 20\nsession_expiry_s = 2\n"
        )
        programs.append(
            Program(tmp_path / f"{name}.log", "trainer", "serve", "--config", str(config))
        )
    device = ReceiptedDevice(broker_settings, "d1")
    try:
        leaders: dict[str, int] = {}
        online: set[str] = set()
        for status in trainer_statuses(inbox):
            if status.state == "online":
                online.add(status.device_id)
            leaders[status.device_id] = status.counters.get("leader", 0)
            if online == {"ra", "rb"} and sum(leaders.values()) == 1:
                break
        leader_name = next(name for name, held in leaders.items() if held)
        survivor_name = "rb" if leader_name == "ra" else "ra"
        [leader] = [p for p, n in zip(programs, ("ra", "rb"), strict=True) if n == leader_name]
        [survivor] = [p for p in programs if p is not leader]

        pace = threading.Event()
        streamer = threading.Thread(target=device.stream, args=(total, pace))
        streamer.start()
        store = open_store(postgres_url)
        assert wait_until(lambda: store.counts().batches >= 100)
        leader.process.kill()  # SIGKILL, mid-stream and possibly mid-transaction
        leader.process.wait(10)
        killed = time.monotonic()
        stored_at_kill = store.counts().batches
        assert stored_at_kill < total, "the kill must land mid-stream"
        took_over = None
        for status in trainer_statuses(inbox):
            if status.device_id == survivor_name and status.counters.get("leader"):
                took_over = time.monotonic() - killed
                break
        streamer.join(WAIT * 2)
        assert not streamer.is_alive()
        assert wait_until(lambda: store.counts().batches >= total)
        assert store.batch_seqs("d1") == list(range(total))  # none lost, each stored once
        assert store.counts().batches == total
        store.close()
        assert device.receipted == set(range(total))
        assert took_over is not None
        assert took_over < 5.0, took_over
        assert survivor.stop() == 0, survivor.output()
    finally:
        device.stop()
        watcher.stop()
        for program in programs:
            if program.process.poll() is None:
                program.process.kill()
                program.process.wait()
