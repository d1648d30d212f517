"""The real programs, as operators run them: `har agent` and `har trainer serve` in processes of
their own, stopped with SIGTERM or killed with SIGKILL."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from device_agent.store import AgentStore
from shared import codec
from shared.config import BrokerSettings
from shared.messages import Confirmation, DeviceStatus, SensorBatch
from shared.mqtt_transport import Outbound
from shared.signing import generate_keypair
from shared.topics import Topics
from simulator.tiny_model import CHUNK_SIZE, Releases, make_releases
from tests.mqtt_helpers import connect, receive
from tests.process_helpers import REPO, Program, broker_table
from trainer_service.distribution import publish_all, release_messages
from trainer_service.store import SqliteStore

pytestmark = [pytest.mark.broker, pytest.mark.slow]
WAIT = 90.0
# The light agent's environment (scripts/setup.sh): the project with agent-lite, no TensorFlow.
LITE_PYTHON = REPO / ".venv-lite" / "bin" / "python"


@pytest.fixture
def programs() -> Iterator[list[Program]]:
    started: list[Program] = []
    yield started
    for program in started:
        if program.process.poll() is None:
            program.process.kill()
            program.process.wait()


def statuses(inbox: object, topic: str) -> Iterator[DeviceStatus]:
    while True:
        message = receive(inbox, WAIT)  # type: ignore[arg-type]
        if message.topic == topic and message.payload:
            yield codec.decode_status(message.payload)


@pytest.fixture(scope="module")
def releases(tmp_path_factory: pytest.TempPathFactory) -> Releases:
    return make_releases(tmp_path_factory.mktemp("releases"))


@pytest.mark.parametrize("environment", ["full", "light"])
def test_agent_on_sigterm_flushes_persists_says_offline_and_exits_zero(
    broker_settings: BrokerSettings,
    releases: Releases,
    tmp_path: Path,
    programs: list[Program],
    environment: str,
) -> None:
    """``light``: the agent as a wearable runs it, from a venv without TensorFlow (agent-lite),
    on the default ``runtime = "auto"``: it installs, predicts, learns and persists on LiteRT."""
    python = Path(sys.executable)
    if environment == "light":
        assert LITE_PYTHON.exists(), f"{LITE_PYTHON} is missing: run scripts/setup.sh"
        python = LITE_PYTHON
        no_tensorflow = [str(python), "-c", "import tensorflow"]
        assert subprocess.run(no_tensorflow, capture_output=True, check=False).returncode != 0
    topics = Topics(broker_settings.topic_root)
    publisher, _ = connect(broker_settings)
    publish_all(
        publisher,
        release_messages(topics, releases.first.manifest, releases.first.payload, CHUNK_SIZE),
        10,
    )
    watcher, inbox = connect(
        broker_settings, [(topics.status("wrist-7"), 1), (topics.prediction("wrist-7"), 1)]
    )
    config = tmp_path / "agent.toml"
    config.write_text(
        f'device_id = "wrist-7"\nstate_dir = "{tmp_path / "state"}"\n'
        f'public_key = "{releases.public_key_path}"\n\n{broker_table(broker_settings)}\n'
        '[sensor]\nkind = "synthetic"\nspeed = 5.0\nsynthetic_activities = "Walking,Sitting"\n\n'
        "[agent]\nstatus_interval_s = 0.5\n"
    )
    agent = Program(tmp_path / "agent.log", "agent", "--config", str(config), python=python)
    programs.append(agent)
    try:
        while True:  # the first prediction: the agent installed the model and serves it
            message = receive(inbox, WAIT)
            if message.topic == topics.prediction("wrist-7"):
                prediction = codec.decode_prediction(message.payload)
                break
        confirmation = Confirmation(prediction.prediction_id, "Sitting", "user", 1.0)
        publisher.publish(
            Outbound(topics.confirmation("wrist-7"), codec.encode_confirmation(confirmation))
        ).wait(10)
        for status in statuses(inbox, topics.status("wrist-7")):
            if status.counters.get("confirmations_applied", 0) >= 1:
                break
        assert agent.stop(signal.SIGTERM) == 0, agent.output()
        for status in statuses(inbox, topics.status("wrist-7")):
            if status.state == "offline":
                break
        assert status.model_version == releases.first.manifest.version
        assert status.counters["confirmations_applied"] == 1  # final counters, not the will's
    finally:
        watcher.stop()
        publisher.stop()
    version = releases.first.manifest.version
    assert (tmp_path / "state" / "learned" / f"{version}.state").is_file()
    store = AgentStore(tmp_path / "state" / "agent.sqlite3")
    # Flushed: everything went out. Sensor batches stay until a trainer's receipt (there is no
    # trainer here); nothing else does.
    depth, _ = store.outbox_size()
    assert store.outbox_after(0, 1000) == [], "SIGTERM must flush the outbox while connected"
    assert depth == store.outbox_awaiting_receipt() > 0
    assert store.replay_count() == 1
    store.close()
    runtime = "litert" if environment == "light" else "tensorflow"
    assert f"models run on {runtime}" in agent.output()


def test_trainer_killed_mid_stream_loses_no_accepted_batch(
    broker_settings: BrokerSettings, tmp_path: Path, programs: list[Program]
) -> None:
    topics = Topics(broker_settings.topic_root)
    private_key, _ = generate_keypair(tmp_path / "keys")
    config = tmp_path / "trainer.toml"
    config.write_text(
        f'instance = "t1"\ndata_dir = "{tmp_path / "data"}"\n'
        f'registry_dir = "{tmp_path / "registry"}"\nprivate_key = "{private_key}"\n'
        f"status_interval_s = 0.3\n\n{broker_table(broker_settings)}\n"
        "[ingest]\ncommit_batch = 20\n"
    )
    status_topic = topics.trainer_status("t1")
    watcher, inbox = connect(broker_settings, [(status_topic, 1)])
    total = 600

    paced = threading.Event()  # never set: its wait() paces the device at ~200 batches/s

    def stream(first: int, last: int) -> None:
        device, _ = connect(broker_settings)
        try:
            for seq in range(first, last):
                paced.wait(0.005)
                samples = np.full((20, 3), seq % 97, np.float32)
                payload = codec.encode_sensor_batch(SensorBatch("d1", seq, 20.0, seq, samples))
                device.publish(
                    Outbound(topics.sensor("d1"), payload, content_type=codec.CONTENT_TYPE_MSGPACK)
                ).wait(10)
        finally:
            device.stop()

    trainer = Program(tmp_path / "trainer-1.log", "trainer", "serve", "--config", str(config))
    programs.append(trainer)
    try:
        for status in statuses(inbox, status_topic):
            if status.state == "online":
                break  # subscribed: the broker now queues for its persistent session
        streamer = threading.Thread(target=stream, args=(0, total))
        streamer.start()
        for status in statuses(inbox, status_topic):
            if status.counters.get("stored_batches", 0) >= 100:
                break
        trainer.process.kill()  # SIGKILL, mid-stream and possibly mid-transaction
        trainer.process.wait(10)
        at_kill = SqliteStore(tmp_path / "data" / "trainer.sqlite3")
        stored_at_kill = len(at_kill.batch_seqs("d1"))
        at_kill.close()
        assert 0 < stored_at_kill < total, "the kill must land mid-stream"
        for status in statuses(inbox, status_topic):
            if status.state == "offline":
                break  # the broker published the dead trainer's last will
        streamer.join(WAIT)  # the broker keeps queueing for the dead trainer's session
        restarted = Program(tmp_path / "trainer-2.log", "trainer", "serve", "--config", str(config))
        programs.append(restarted)
        for status in statuses(inbox, status_topic):
            if status.state == "online" and status.counters.get("stored_batches", 0) >= total:
                break
        assert restarted.stop() == 0, restarted.output()
    finally:
        watcher.stop()
    store = SqliteStore(tmp_path / "data" / "trainer.sqlite3")
    assert store.batch_seqs("d1") == list(range(total))
    np.testing.assert_array_equal(store.batch("d1", 123), np.full((20, 3), 123 % 97, np.float32))
    store.close()
