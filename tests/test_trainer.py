"""The trainer service: storage, ingest through a real broker, retrain and redistribution."""

from __future__ import annotations

import dataclasses
import json
import logging
import queue
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from device_agent.agent import DeviceAgent
from device_agent.sensors import SensorSettings, open_sensor
from device_agent.settings import AgentSettings, AgentTuning
from shared import codec
from shared.config import BrokerSettings
from shared.errors import StorageError
from shared.messages import (
    Confirmation,
    DeviceStatus,
    ModelManifest,
    Prediction,
    SensorBatch,
    TrainerCommand,
    WindowRef,
)
from shared.model_bundle import ChunkAssembler
from shared.mqtt_transport import InboundMessage
from shared.supervision import EXIT_THREAD_DIED
from shared.topics import Topics
from simulator.synthetic_data import write_dataset
from simulator.tiny_model import CHUNK_SIZE, make_releases
from tests.mosquitto import MosquittoProcess
from tests.mqtt_helpers import connect, receive
from tests.trainer_helpers import WAIT, publish, trainer_settings_for
from trainer_service.registry import ModelRegistry
from trainer_service.retrain import confirmed_sets, gate, is_holdout
from trainer_service.service import TrainerService
from trainer_service.settings import (
    IngestSettings,
    PublishSettings,
    RetrainSettings,
    TrainerSettings,
)
from trainer_service.store import ConfirmedWindow, SqliteStore


def batch(device: str, seq: int, n: int = 20) -> SensorBatch:
    samples = (np.arange(n * 3, dtype=np.float32).reshape(n, 3) + seq * 1000) / 100
    return SensorBatch(device, seq, 20.0, 1_000_000 + seq, samples)


def prediction(device: str, pid: str, seq: int, offset: int, length: int) -> Prediction:
    return Prediction(pid, device, WindowRef(seq, offset, length), "Walking", 0, (1.0,), "v1", 1.0)


# ------------------------------------------------------------------------------ storage


def test_holdout_is_stable_and_never_trained_on() -> None:
    window = np.zeros((4, 3), np.float32)
    confirmed = [
        ConfirmedWindow(f"p{i}", f"d{i % 2}", ("A", "B")[i % 2], window, 100.0) for i in range(200)
    ]
    train, held, counts = confirmed_sets(
        confirmed, ("A", "B"), 4, weight=3.0, holdout_every=5, recent_since=0.0
    )
    assert counts["confirmed_train"] + counts["confirmed_holdout"] == 200
    assert 20 <= len(held) <= 60
    # Stable: the same confirmations are held out whatever order or company they come in.
    _, held_again, _ = confirmed_sets(
        confirmed[::-1][:100], ("A", "B"), 4, weight=3.0, holdout_every=5, recent_since=0.0
    )
    held_ids = {f"p{i}" for i in range(200) if is_holdout(f"p{i}", 5)}
    assert len(held) == len(held_ids)
    assert len(held_again) == len({f"p{i}" for i in range(100, 200)} & held_ids)
    assert train.weights is not None
    assert set(train.weights.tolist()) == {3.0}
    assert set(train.users.tolist()) <= {-1_000_000, -1_000_001}


def test_gate_refuses_a_candidate_that_is_worse_anywhere() -> None:
    current = {"test": {"macro_f1": 0.9}, "confirmed": {"accuracy": 0.6}}
    better = {"test": {"macro_f1": 0.91}, "confirmed": {"accuracy": 0.8}}
    worse_on_users = {"test": {"macro_f1": 0.85}, "confirmed": {"accuracy": 0.9}}
    assert gate(better, current, 0.0)[0]
    passed, reason = gate(worse_on_users, current, 0.01)
    assert not passed
    assert "test macro_f1" in reason
    assert gate(worse_on_users, current, 0.1)[0]
    assert gate(better, {}, 0.0) == (True, "first model: nothing to compare with")


# ------------------------------------------------------------------------------ service


@pytest.fixture
def trainer_settings(broker_settings: BrokerSettings, tmp_path: Path) -> TrainerSettings:
    return trainer_settings_for(broker_settings, tmp_path)


@pytest.fixture
def service(trainer_settings: TrainerSettings) -> Iterator[TrainerService]:
    running = TrainerService(trainer_settings)
    running.start()
    assert running.wait_connected(WAIT)
    yield running
    running.shutdown()


@pytest.mark.broker
def test_two_devices_stream_and_confirm_and_redeliveries_are_not_stored_twice(
    service: TrainerService, broker_settings: BrokerSettings
) -> None:
    topics = Topics(broker_settings.topic_root)
    device, _ = connect(broker_settings)
    try:
        for name in ("d1", "d2"):
            for seq in [*range(30), *range(10, 20)]:  # 10..19 sent twice, as after an outage
                publish(
                    device,
                    topics.sensor(name),
                    codec.encode_sensor_batch(batch(name, seq)),
                    msgpack=True,
                )
            publish(
                device,
                topics.prediction(name),
                codec.encode_prediction(prediction(name, f"{name}-p", 3, 4, 30)),
                msgpack=False,
            )
            confirmation = Confirmation(f"{name}-p", "Sitting", "user", 3.0)
            for _ in range(2):
                publish(
                    device,
                    topics.confirmation(name),
                    codec.encode_confirmation(confirmation),
                    msgpack=False,
                )
        assert service.counters.wait_until("messages_ingested", 2 * (40 + 3), WAIT)
    finally:
        device.stop()
    store = service.store
    assert store.batch_seqs("d1") == list(range(30))
    assert store.batch_seqs("d2") == list(range(30))
    assert service.counters.get("batches_duplicate") == 20
    assert service.counters.get("confirmations_duplicate") == 2
    windows = {w.device_id: w for w in store.confirmed_windows()}
    assert set(windows) == {"d1", "d2"}
    expected = np.concatenate([batch("d2", 3).samples, batch("d2", 4).samples])[4:34]
    np.testing.assert_array_equal(windows["d2"].window, expected)


@pytest.mark.broker
def test_malformed_payloads_are_counted_and_reported(
    service: TrainerService, broker_settings: BrokerSettings
) -> None:
    topics = Topics(broker_settings.topic_root)
    watcher, errors = connect(broker_settings, [(topics.trainer_error(), 1)])
    device, _ = connect(broker_settings)
    try:
        bad = [
            (topics.sensor("d1"), b"\xc1\xc1"),
            (topics.sensor("d1"), codec.encode_sensor_batch(batch("someone-else", 0))),
            (topics.confirmation("d1"), b'{"type":"confirmation","v":1,"ts":NaN}'),
            (topics.prediction("d1"), b"[]"),
            (topics.sensor("d1"), b"\x00" * 300_000),
        ]
        for topic, payload in bad:
            publish(device, topic, payload, msgpack=True)
        publish(
            device, topics.sensor("d1"), codec.encode_sensor_batch(batch("d1", 0)), msgpack=True
        )
        assert service.counters.wait_until("messages_ingested", 6, WAIT)
        codes = [json.loads(errors.get(timeout=WAIT).payload)["code"] for _ in bad]
    finally:
        device.stop()
        watcher.stop()
    assert codes == ["malformed_payload"] * 5
    assert service.counters.get("payload_errors") == 5
    assert service.store.batch_seqs("d1") == [0]  # the good one after the bad ones


def test_a_redelivery_is_not_reported_again_and_a_request_id_runs_once(
    trainer_settings: TrainerSettings,
) -> None:
    """A message the broker delivers again (MQTT's DUP flag: our acknowledgement was lost)
    changes nothing and reports nothing again; the same bytes sent anew are another message,
    reported again. A retrain request id runs once, however often it comes."""
    service = TrainerService(trainer_settings)  # not connected: its reports are counted only
    topics = Topics(trainer_settings.broker.topic_root)

    def arrives(topic: str, payload: bytes, *, redelivered: bool = False) -> InboundMessage:
        return InboundMessage(topic, payload, 1, False, None, redelivered=redelivered)

    retrain = codec.encode_command(TrainerCommand("retrain", "operator-1", 1.0))
    try:
        service._ingest([arrives(topics.prediction("d1"), b"[]")])
        service._ingest([arrives(topics.prediction("d1"), b"[]", redelivered=True)])
        assert service.counters.get("error_malformed_payload") == 1
        assert service.counters.get("reports_not_repeated") == 1
        service._ingest([arrives(topics.prediction("d1"), b"[]")])  # sent again: reported
        assert service.counters.get("error_malformed_payload") == 2
        for redelivered in (False, True, False):
            service._ingest([arrives(topics.trainer_command(), retrain, redelivered=redelivered)])
        assert service.counters.get("commands") == 1
        assert service.counters.get("commands_duplicate") == 2
        assert service.store.meta("retrain_request") == "command operator-1"
    finally:
        service.shutdown()


@pytest.mark.broker
@pytest.mark.slow
def test_retrain_publishes_a_version_that_an_agent_installs(
    broker_settings: BrokerSettings, trainer_settings: TrainerSettings, tmp_path: Path
) -> None:
    activities = ("Walking", "Sitting", "Standing")
    base = write_dataset(tmp_path / "base.txt", [1, 2, 3, 4, 5], activities, 40.0)
    settings = dataclasses.replace(
        trainer_settings,
        base_data=base,
        retrain=RetrainSettings(
            min_new_confirmations=5, interval_s=0, initial_epochs=3, epochs=2, gate_margin=1.0
        ),
        ingest=IngestSettings(queue_size=100),
    )
    service = TrainerService(settings)
    service.start()
    agent: DeviceAgent | None = None
    try:
        assert service.wait_connected(WAIT)
        topics = Topics(broker_settings.topic_root)
        watcher, statuses = connect(
            broker_settings, [(topics.trainer_status(settings.instance), 1)]
        )
        command, _ = connect(broker_settings)
        publish(
            command,
            topics.trainer_command(),
            codec.encode_command(TrainerCommand("retrain", "first", 1.0)),
            msgpack=False,
        )
        command.stop()
        assert service.retrain_done.wait(300), "the first training round never finished"
        first = service.registry.current()
        assert first is not None, service.last_outcome
        # Each epoch's start went out in a status at once (from scratch: initial_epochs = 3),
        # then a status said that no retrain is running.
        epochs: list[tuple[int, int]] = []
        while True:
            counters = codec.decode_status(receive(statuses, WAIT).payload).counters
            epoch = (counters.get("retrain_epoch", 0), counters.get("retrain_epochs_max", 0))
            if epoch[0]:
                epochs.append(epoch)
            elif epochs:
                break
        watcher.stop()
        assert epochs == sorted(epochs)
        assert sorted(set(epochs)) == [(n, 3) for n in range(1, len(set(epochs)) + 1)]
        service.retrain_done.clear()

        agent_settings = AgentSettings(
            device_id="wrist-9",
            state_dir=tmp_path / "device",
            public_key=tmp_path / "keys" / "model-signing.pub",
            broker=broker_settings,
            sensor=SensorSettings(
                kind="synthetic", speed=8.0, synthetic_activities=",".join(activities)
            ),
            # The device's own quality gate is tested elsewhere; here every version must land.
            agent=AgentTuning(status_interval_s=2.0, window_hop=40, accept_margin=1.0),
        )
        agent = DeviceAgent(agent_settings, open_sensor(agent_settings.sensor))
        agent.start()
        assert agent.model_changed.wait(WAIT)
        assert agent.active_version == first
        agent.model_changed.clear()

        # The trainer joins the agent's confirmed windows; five of them trigger a retrain.
        predictions, prediction_inbox = connect(
            broker_settings, [(topics.prediction("wrist-9"), 1)]
        )
        confirmer, _ = connect(broker_settings)
        try:
            for _ in range(12):
                seen = codec.decode_prediction(receive(prediction_inbox, WAIT).payload)
                confirmation = Confirmation(seen.prediction_id, seen.truth or "Walking", "app", 2.0)
                publish(
                    confirmer,
                    topics.confirmation("wrist-9"),
                    codec.encode_confirmation(confirmation),
                    msgpack=False,
                )
        finally:
            predictions.stop()
            confirmer.stop()
        assert service.retrain_done.wait(300), "no retrain after the confirmations"
        second = service.registry.current()
        assert second is not None, service.last_outcome
        assert second != first
        assert service.registry.get(second).parent == first
        assert service.registry.get(second).summary["confirmed_usable"] >= 5
        # A retrained version keeps its per-epoch history and draws its learning curves.
        retrained = service.registry.get(second).path
        history = json.loads((retrained / "metrics.json").read_text())["history"]
        assert 1 <= len(history) <= settings.retrain.epochs
        assert (retrained / "learning_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert agent.model_changed.wait(WAIT), "the agent did not install the new version"
        assert agent.active_version == second
    finally:
        if agent is not None:
            agent.shutdown()
        service.shutdown()


@pytest.mark.broker
def test_devices_outside_the_allow_list_are_refused(
    trainer_settings: TrainerSettings, broker_settings: BrokerSettings
) -> None:
    settings = dataclasses.replace(trainer_settings, ingest=IngestSettings(known_devices=("d1",)))
    service = TrainerService(settings)
    service.start()
    topics = Topics(broker_settings.topic_root)
    watcher, errors = connect(broker_settings, [(topics.trainer_error(), 1)])
    device, _ = connect(broker_settings)
    try:
        assert service.wait_connected(WAIT)
        for name in ("intruder", "d1"):
            publish(
                device, topics.sensor(name), codec.encode_sensor_batch(batch(name, 0)), msgpack=True
            )
        assert service.counters.wait_until("messages_ingested", 2, WAIT)
        event = json.loads(errors.get(timeout=WAIT).payload)
    finally:
        device.stop()
        watcher.stop()
        service.shutdown()
    assert event["code"] == "unknown_device"
    assert "intruder" in event["message"]
    store = SqliteStore(settings.store_path)
    assert store.batch_seqs("d1") == [0]
    assert store.batch_seqs("intruder") == []


# ============================================================================== failures
# Hostile input and the trainer's own failures: nothing stops ingest for good, a failing job is
# reported and skipped, and a dead loop makes the service say so and exit non-zero.


def next_event(errors: queue.Queue[InboundMessage], code: str) -> dict[str, object]:
    """The next error event with ``code`` (others, such as periodic retries, are skipped)."""
    while True:
        event: dict[str, object] = json.loads(receive(errors, WAIT).payload)
        if event["code"] == code:
            return event


def status_json(device: str, counters: dict[str, int]) -> bytes:
    doc = json.loads(codec.encode_status(DeviceStatus(device, "online", None, 1.0)))
    doc["counters"] = counters
    return json.dumps(doc).encode()  # ensure_ascii: a lone surrogate travels as \ud800


# ------------------------------------------------------------------------------ hostile input


@pytest.mark.broker
def test_lone_surrogates_and_huge_topics_are_reported_and_ingest_carries_on(
    service: TrainerService, broker_settings: BrokerSettings
) -> None:
    topics = Topics(broker_settings.topic_root)
    watcher, errors = connect(broker_settings, [(topics.trainer_error(), 1)])
    device, _ = connect(broker_settings)
    confirmation = json.loads(codec.encode_confirmation(Confirmation("p1", "Walking", "user", 1.0)))
    confirmation["label"] = "Walking\udfff"
    long_topic = f"{broker_settings.topic_root}/devices/{'x' * 600}/sensor"
    try:
        for _ in range(2):  # the message that stopped ingest for good, twice
            publish(device, topics.status("d1"), status_json("d1", {"\ud800": 1}), msgpack=False)
        publish(device, topics.confirmation("d1"), json.dumps(confirmation).encode(), msgpack=False)
        publish(device, long_topic, b"\x00", msgpack=True)
        publish(
            device, topics.sensor("d1"), codec.encode_sensor_batch(batch("d1", 0)), msgpack=True
        )
        assert service.counters.wait_until("messages_ingested", 5, WAIT), "ingest stopped"
        events = [json.loads(receive(errors, WAIT).payload) for _ in range(4)]
    finally:
        device.stop()
        watcher.stop()
    # The same status twice: two messages (not a redelivery), two reports.
    assert [e["code"] for e in events] == ["malformed_payload"] * 3 + ["unexpected_topic"]
    assert "a key of counters holds a lone surrogate (\\ud800)" in events[0]["message"]
    assert "label holds a lone surrogate" in events[2]["message"]
    assert len(events[3]["topic"]) == 512  # cut to what an error event may carry
    assert service.counters.get("error_internal_error") == 0
    assert service.store.batch_seqs("d1") == [0]  # the valid batch after them is kept


# ------------------------------------------------------------------------------ failing jobs


@pytest.mark.broker
def test_a_failing_store_read_is_a_reported_storage_error_and_upkeep_carries_on(
    service: TrainerService, broker_settings: BrokerSettings
) -> None:
    topics = Topics(broker_settings.topic_root)
    watcher, errors = connect(broker_settings, [(topics.trainer_error(), 1)])
    try:
        service.store.close()  # every read fails from now on, as with a vanished disk
        event = next_event(errors, "upkeep_failed")
        # The same job fails again on its next round: the loop is alive.
        assert service.counters.wait_until("error_upkeep_failed", 3, WAIT)
    finally:
        watcher.stop()
    assert "cannot read" in str(event["message"])
    assert service.counters.get("error_internal_error") == 0
    with pytest.raises(StorageError, match="cannot read"):
        service.store.counts()


# ------------------------------------------------------------------------------ model releases


def read_release(settings: BrokerSettings, version: str) -> tuple[ModelManifest, bytes]:
    """The retained manifest, and the payload the retained chunks of ``version`` assemble to."""
    topics = Topics(settings.topic_root)
    subscriptions = [(topics.model_manifest(), 1), (topics.model_chunks(version), 1)]
    reader, inbox = connect(settings, subscriptions)
    manifest = None
    chunks = []
    try:
        while True:
            message = receive(inbox, WAIT)
            if message.topic == topics.model_manifest():
                manifest = codec.decode_manifest(message.payload)
            else:
                chunks.append(codec.decode_model_chunk(message.payload))
            if manifest is not None and len(chunks) == manifest.chunks:
                assembler = ChunkAssembler(manifest.version, manifest.chunks, manifest.size)
                whole = [assembler.add(chunk) for chunk in chunks][-1]
                assert whole is not None
                return manifest, whole
    finally:
        reader.stop()


@pytest.mark.broker
@pytest.mark.slow
def test_a_version_chunked_otherwise_is_published_and_again_after_the_broker_lost_it(
    trainer_settings: TrainerSettings,
    broker: MosquittoProcess,
    broker_settings: BrokerSettings,
    tmp_path: Path,
) -> None:
    releases = make_releases(tmp_path / "releases")
    assert releases.second.manifest.chunks > 1  # promoted at 64 KiB chunks...
    settings = dataclasses.replace(
        trainer_settings,
        registry_dir=releases.registry.root,
        publish=PublishSettings(chunk_bytes=4 * CHUNK_SIZE),  # ...and published at 256 KiB
    )
    service = TrainerService(settings)
    service.start()
    try:
        assert service.wait_connected(WAIT)
        assert read_release(broker_settings, releases.second.manifest.version) == (
            releases.second.manifest,
            releases.second.payload,
        )

        # A broker crash that loses its retained messages: the reconnect brings them back.
        connects = service._connection.connect_count
        broker.kill()
        (broker.workdir / "mosquitto.db").unlink(missing_ok=True)
        broker.start()
        assert service.counters.wait_until("models_published", 2, WAIT)
        assert service._connection.connect_count > connects
        assert read_release(broker_settings, releases.second.manifest.version) == (
            releases.second.manifest,
            releases.second.payload,
        )
    finally:
        service.shutdown()
    assert service.counters.get("error_upkeep_failed") == 0


@pytest.mark.broker
@pytest.mark.slow
def test_a_version_promoted_beside_the_running_service_reaches_the_fleet(
    trainer_settings: TrainerSettings, broker_settings: BrokerSettings, tmp_path: Path
) -> None:
    """`har models promote --no-publish` in another process: the service publishes it."""
    releases = make_releases(tmp_path / "releases")
    settings = dataclasses.replace(trainer_settings, registry_dir=releases.registry.root)
    service = TrainerService(settings)
    service.start()
    try:
        assert service.wait_connected(WAIT)
        assert service.counters.wait_until("models_published", 1, WAIT)
        other_process = ModelRegistry(releases.registry.root)
        version = releases.first.manifest.version
        manifest = other_process.promote(version, releases.private_key, chunk_size=CHUNK_SIZE)
        assert service.counters.wait_until("models_published", 2, WAIT)
        assert read_release(broker_settings, version) == (manifest, releases.first.payload)
    finally:
        service.shutdown()


# ------------------------------------------------------------------------------ dead loops


@pytest.mark.broker
def test_a_dead_thread_makes_har_trainer_serve_report_it_and_exit_70(
    trainer_settings: TrainerSettings,
    broker_settings: BrokerSettings,
    monkeypatch: pytest.MonkeyPatch,
    logged_exceptions: list[logging.LogRecord],
) -> None:
    from har.cli import main

    topics = Topics(broker_settings.topic_root)
    status_topic = topics.trainer_status(trainer_settings.instance)
    watcher, errors = connect(broker_settings, [(topics.trainer_error(), 1)])

    def broken_scheduling(*args: object, **kwargs: object) -> bool:
        raise RuntimeError("a bug outside the per-job handling")

    # The upkeep loop's own scheduling fails: nothing inside it can catch that.
    monkeypatch.setattr(TrainerService, "_upkeep_job", broken_scheduling)
    settings = trainer_settings
    handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        code = main(
            [
                *("trainer", "serve", "--instance", settings.instance),
                *("--data-dir", str(settings.data_dir)),
                *("--registry-dir", str(settings.registry_dir)),
                *("--broker-port", str(broker_settings.port)),
                *("--topic-root", broker_settings.topic_root),
            ]
        )
        event = next_event(errors, "thread_died")
    finally:
        watcher.stop()
        for signum, handler in handlers.items():
            signal.signal(signum, handler)  # `har trainer serve` took them for its service
    assert code == EXIT_THREAD_DIED
    assert "trainer-upkeep" in str(event["message"])
    assert "a bug outside the per-job handling" in str(event["message"])
    status_reader, statuses = connect(broker_settings, [(status_topic, 1)])
    try:
        status = codec.decode_status(receive(statuses, WAIT).payload)  # retained
    finally:
        status_reader.stop()
    assert status.state == "failed"
    assert [r.threadName for r in logged_exceptions] == ["trainer-upkeep"]


@pytest.mark.broker
def test_the_birth_message_does_not_read_the_registry_on_pahos_thread(
    trainer_settings: TrainerSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    service = TrainerService(trainer_settings)
    readers: list[str] = []
    read_current = service.registry.current

    def current() -> str | None:
        readers.append(threading.current_thread().name)
        return read_current()

    monkeypatch.setattr(service.registry, "current", current)
    service.start()
    try:
        assert service.wait_connected(WAIT)  # set once the birth message is out
    finally:
        service.shutdown()
    assert not [name for name in readers if name.startswith("paho")]
