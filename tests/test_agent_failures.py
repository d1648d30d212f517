"""The device agent under failure, against a real Mosquitto broker: dead threads, a failing
message, stalled and oversized model downloads, a full disk."""

from __future__ import annotations

import dataclasses
import logging
import math
import threading
import zlib
from pathlib import Path

import msgpack
import pytest

from device_agent.agent import DeviceAgent
from device_agent.outbox import ErrorReporter, Outbox
from device_agent.sensors import SensorReading, SensorSource, open_sensor
from device_agent.settings import AgentSettings
from device_agent.store import AgentStore
from shared import codec
from shared.config import BrokerSettings
from shared.counters import Counters
from shared.errors import StorageError
from shared.messages import DeviceCommand
from shared.model_bundle import sha256_hex
from shared.mqtt_transport import InboundMessage, Outbound
from shared.signing import sign_manifest
from shared.supervision import EXIT_THREAD_DIED
from shared.topics import Topics
from simulator.tiny_model import CHUNK_SIZE, Release, Releases
from tests.agent_helpers import (
    DEVICE,
    WAIT,
    AgentFactory,
    Watcher,
    agent_settings,
    publish_release,
)
from tests.mosquitto import MosquittoProcess
from tests.mqtt_helpers import connect
from trainer_service.distribution import publish_all, release_messages

pytestmark = [pytest.mark.broker, pytest.mark.slow]


class FailingSensor:
    """A real synthetic sensor that fails for good after ``reads`` reads (a device unplugged)."""

    def __init__(self, inner: SensorSource, reads: int) -> None:
        self._inner = inner
        self._reads_left = reads

    @property
    def sample_rate_hz(self) -> float:
        return self._inner.sample_rate_hz

    @property
    def exhausted(self) -> bool:
        return self._inner.exhausted

    def read(self, stop: threading.Event, max_samples: int) -> list[SensorReading]:
        if self._reads_left <= 0:
            raise OSError("accelerometer disappeared")
        self._reads_left -= 1
        return self._inner.read(stop, max_samples)

    def counters(self) -> dict[str, int]:
        return self._inner.counters()

    def close(self) -> None:
        self._inner.close()


def test_a_dead_thread_makes_run_report_it_and_exit_70(
    broker_settings: BrokerSettings,
    releases: Releases,
    tmp_path: Path,
    logged_exceptions: list[logging.LogRecord],
) -> None:
    watcher = Watcher(broker_settings)
    settings = agent_settings(broker_settings, tmp_path / "device", releases)
    agent = DeviceAgent(settings, FailingSensor(open_sensor(settings.sensor), reads=5))
    try:
        assert agent.run() == EXIT_THREAD_DIED
        event = watcher.error_with("thread_died")
        assert "agent-sensor" in str(event["message"])
        assert "accelerometer disappeared" in str(event["message"])
        status = codec.decode_status(watcher.pump("status").payload)
        while status.state != "offline":
            status = codec.decode_status(watcher.pump("status").payload)
        assert status.counters.get("error_thread_died") == 1
    finally:
        watcher.stop()
    assert [record.threadName for record in logged_exceptions] == ["agent-sensor"]


def test_a_message_the_dispatcher_fails_on_does_not_stop_the_next_one(
    broker_settings: BrokerSettings,
    releases: Releases,
    tmp_path: Path,
    start_agent: AgentFactory,
    logged_exceptions: list[logging.LogRecord],
) -> None:
    watcher = Watcher(broker_settings)
    agent = start_agent(agent_settings(broker_settings, tmp_path / "device", releases))
    # Commands sent before the first subscription would be lost, and "second" would fail.
    assert agent.wait_subscribed(WAIT)
    route = agent._route
    failures = []

    def route_failing_once(message: InboundMessage) -> None:
        if not failures and message.topic == watcher.topics.command(DEVICE):
            failures.append(message.topic)
            raise RuntimeError("routing bug")
        route(message)

    agent._route = route_failing_once  # type: ignore[method-assign]
    connection, _ = connect(broker_settings)
    try:
        topic = watcher.topics.command(DEVICE)
        for request in ("first", "second"):
            command = codec.encode_device_command(DeviceCommand("forget", request, 1.0))
            assert connection.publish(Outbound(topic, command)).wait(10)
        event = watcher.error_with("internal_error")
        assert "routing bug" in str(event["message"])
        assert agent.counters.wait_until("forgets", 1, WAIT), "the dispatcher stopped"
        assert agent.counters.get("dispatch_failures") == 1
    finally:
        connection.stop()
        watcher.stop()
    assert len(logged_exceptions) == 1


def test_a_stalled_download_is_retried_then_abandoned_until_announced_again(
    broker_settings: BrokerSettings, releases: Releases, tmp_path: Path, start_agent: AgentFactory
) -> None:
    release = releases.first
    topics = Topics(broker_settings.topic_root)
    messages = release_messages(topics, release.manifest, release.payload, CHUNK_SIZE)
    assert release.manifest.chunks >= 2
    publisher, _ = connect(broker_settings)
    watcher = Watcher(broker_settings)
    try:
        publish_all(publisher, messages[1:], 10)  # chunk 0 never comes
        settings = agent_settings(
            broker_settings,
            tmp_path / "device",
            releases,
            download_stall_s=0.5,
            download_retries=2,
        )
        agent = start_agent(settings)
        retries = [watcher.error_with("download_stalled") for _ in range(2)]
        assert all("asking for the retained chunks again" in str(e["message"]) for e in retries)
        given_up = watcher.error_with("download_stalled")
        assert "abandoned" in str(given_up["message"])
        assert agent.counters.get("download_stalled") == 3
        assert agent.counters.get("downloads_abandoned") == 1
        # Each retry got the retained chunks again: the broker resent them.
        held = release.manifest.chunks - 1
        assert agent.counters.get("model_chunks_received") >= 3 * held
        assert agent.active_version is None

        publish_all(publisher, messages, 10)  # the whole release, announced again
        assert agent.model_changed.wait(WAIT)
        assert agent.active_version == release.manifest.version
    finally:
        publisher.stop()
        watcher.stop()


def test_a_signed_model_over_max_model_bytes_is_refused_before_download(
    broker_settings: BrokerSettings, releases: Releases, tmp_path: Path, start_agent: AgentFactory
) -> None:
    watcher = Watcher(broker_settings)
    limit = releases.first.manifest.size - 1
    settings = agent_settings(broker_settings, tmp_path / "device", releases, max_model_bytes=limit)
    agent = start_agent(settings)
    try:
        publish_release(broker_settings, releases.first)
        event = watcher.error_with("model_rejected")
        assert "agent.max_model_bytes" in str(event["message"])
        assert agent.counters.get("model_chunks_received") == 0  # not downloaded
        assert agent.active_version is None
    finally:
        watcher.stop()


def signed_bomb(releases: Releases, inflated: int) -> Release:
    """A validly signed bundle of one file that says, truthfully, it inflates to ``inflated``."""
    files = [["saved_model.pb", "zlib", inflated, zlib.compress(bytes(inflated), 9)]]
    payload = msgpack.packb({"kind": "har-model-bundle", "v": 2, "files": files})
    manifest = dataclasses.replace(
        releases.first.manifest,
        version="v-bomb",
        size=len(payload),
        sha256=sha256_hex(payload),
        chunks=max(1, math.ceil(len(payload) / CHUNK_SIZE)),
    )
    return Release(sign_manifest(manifest, releases.private_key), payload)


def test_a_signed_compression_bomb_is_refused_before_inflating(
    broker_settings: BrokerSettings, releases: Releases, tmp_path: Path, start_agent: AgentFactory
) -> None:
    limit = 1024 * 1024
    bomb = signed_bomb(releases, inflated=64 * limit)
    assert bomb.manifest.size < limit  # small on the wire: only its inflated size is over
    watcher = Watcher(broker_settings)
    settings = agent_settings(broker_settings, tmp_path / "device", releases, max_model_bytes=limit)
    agent = start_agent(settings)
    try:
        publish_release(broker_settings, bomb)
        event = watcher.error_with("model_rejected")
        assert f"add up to {64 * limit} bytes, over its size limit" in str(event["message"])
        assert agent.active_version is None
        assert not (tmp_path / "device" / "models" / "v-bomb").exists()
    finally:
        watcher.stop()


def test_a_full_disk_is_reported_survived_and_recovered_from(
    broker: MosquittoProcess,
    broker_settings: BrokerSettings,
    releases: Releases,
    tmp_path: Path,
    start_agent: AgentFactory,
) -> None:
    # A session for the watcher before the outage, so the broker keeps what comes after it.
    Watcher(broker_settings, client_id="full-disk-watch").stop()
    broker.stop()  # the outbox grows until the store is full
    settings: AgentSettings = agent_settings(
        broker_settings, tmp_path / "device", releases, hold_unstored_s=600.0
    )
    agent = start_agent(settings)
    assert agent.counters.wait_until("batches_queued", 3, WAIT)
    store = agent._store
    store.limit_pages(store.page_count())  # SQLite now answers "database or disk is full"
    assert agent.counters.wait_until("batch_store_failures", 3, WAIT)
    assert agent.counters.get("error_storage_error") == 1  # once per outage, not per batch
    assert agent.counters.get("error_events_published_directly") >= 1
    assert agent._supervisor.death is None
    queued = agent.counters.get("batches_queued")

    store.limit_pages(1_000_000)  # space returns
    assert agent.counters.wait_until("storage_recoveries", 1, WAIT)
    assert agent.counters.wait_until("batches_queued", queued + 5, WAIT)
    broker.start()
    watcher = Watcher(broker_settings, client_id="full-disk-watch")
    try:
        event = watcher.error_with("storage_error")
        assert "database or disk is full" in str(event["message"])
        seqs = [codec.decode_sensor_batch(watcher.pump("sensor").payload).seq for _ in range(40)]
        first = seqs[0]
        assert seqs == list(range(first, first + 40)), "a batch was lost or numbered twice"
        assert agent.counters.get("batches_queued") >= 40
    finally:
        watcher.stop()


def test_samples_held_past_hold_unstored_s_are_dropped_with_an_event(
    broker_settings: BrokerSettings, releases: Releases, tmp_path: Path, start_agent: AgentFactory
) -> None:
    """The disk stays full past agent.hold_unstored_s: the oldest held samples go, and each
    drop is logged, counted and published (samples_dropped), not only counted."""
    watcher = Watcher(broker_settings)
    settings = agent_settings(broker_settings, tmp_path / "device", releases, hold_unstored_s=2.0)
    agent = start_agent(settings)
    try:
        assert agent.counters.wait_until("batches_queued", 1, WAIT)
        store = agent._store
        store.limit_pages(store.page_count())  # SQLite now answers "database or disk is full"
        event = watcher.error_with("samples_dropped")
        assert "agent.hold_unstored_s (2 s)" in str(event["message"])
        assert agent.counters.get("samples_unstored_dropped") > 0
        assert agent.counters.get("error_samples_dropped") >= 1
        assert agent._supervisor.death is None
    finally:
        watcher.stop()


def test_every_store_error_is_a_storage_error_reads_included(tmp_path: Path) -> None:
    store = AgentStore(tmp_path / "agent.sqlite3")
    store.close()  # any sqlite3.Error will do: this one is "Cannot operate on a closed database"
    with pytest.raises(StorageError, match="cannot read"):
        store.counters()
    with pytest.raises(StorageError, match="cannot read"):
        store.recent_window("p")
    with pytest.raises(StorageError):
        store.set_counters({"a": 1})


def test_a_redelivered_bad_message_is_reported_once(tmp_path: Path) -> None:
    """What is wrong with a message is reported when it arrives; the broker's redelivery of it
    (DUP flag: our acknowledgement was lost) is counted, not reported again. The same bytes
    published anew are a new message, reported again."""
    store = AgentStore(tmp_path / "agent.sqlite3")
    counters = Counters()
    topics = Topics("har/v1")
    report = ErrorReporter(
        "wrist-1", topics, Outbox(store), counters, lambda: 1.0, publish_directly=lambda m: None
    )

    def arrives(*, redelivered: bool) -> InboundMessage:
        return InboundMessage(
            topics.confirmation("wrist-1"), b"{}", 1, False, None, redelivered=redelivered
        )

    try:
        report.about(arrives(redelivered=False), "malformed_confirmation", "not a confirmation")
        report.about(arrives(redelivered=True), "malformed_confirmation", "not a confirmation")
        assert counters.get("error_malformed_confirmation") == 1
        assert counters.get("reports_not_repeated") == 1
        report.about(arrives(redelivered=False), "malformed_confirmation", "not a confirmation")
        assert counters.get("error_malformed_confirmation") == 2
        events = [codec.decode_error(entry.message.payload) for entry in store.outbox_after(0, 10)]
        assert [e.code for e in events] == ["malformed_confirmation"] * 2
    finally:
        store.close()
