"""The device agent against a real Mosquitto broker, with real signed SavedModel releases."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import pytest

from device_agent.local_requests import FORGET_REQUEST
from shared import codec
from shared.config import BrokerSettings
from shared.messages import Confirmation, DeviceCommand
from shared.mqtt_transport import MqttConnection, Outbound
from shared.topics import Topics
from simulator.tiny_model import (
    CHUNK_SIZE,
    LABELS,
    Release,
    Releases,
    export_tiny_version,
)
from tests.agent_helpers import (
    DEVICE,
    WAIT,
    AgentFactory,
    Watcher,
    agent_settings,
    publish_release,
)
from tests.model_helpers import probe_windows
from tests.mosquitto import MosquittoProcess
from tests.mqtt_helpers import connect, receive

pytestmark = [pytest.mark.broker, pytest.mark.slow]


# The agent's behaviour with a model holds on both runtimes (activity_model/runtime.py).
RUNTIMES = pytest.mark.parametrize("runtime", ["tensorflow", "litert"])


def confirm(settings: BrokerSettings, prediction_id: str, label: str) -> None:
    connection, _ = connect(settings)
    try:
        message = Confirmation(prediction_id, label, "user", time.time())  # answered now
        topic = Topics(settings.topic_root).confirmation(DEVICE)
        assert connection.publish(Outbound(topic, codec.encode_confirmation(message))).wait(10)
    finally:
        connection.stop()


@RUNTIMES
def test_full_loop_batches_predictions_confirmation_learning(
    broker_settings: BrokerSettings,
    releases: Releases,
    tmp_path: Path,
    start_agent: AgentFactory,
    runtime: str,
) -> None:
    publish_release(broker_settings, releases.first)
    watcher = Watcher(broker_settings)
    # The memory check may refuse what one wrong label teaches (tests/test_learning.py): here
    # the confirmation's way from the broker to the learned state file is what is tested.
    settings = agent_settings(
        broker_settings, tmp_path / "device", releases, memory_tolerance=1.0, runtime=runtime
    )
    agent = start_agent(settings)
    try:
        assert agent.model_changed.wait(WAIT), "the agent never installed the retained model"
        assert agent.active_version == releases.first.manifest.version
        assert agent.active_model is not None
        assert agent.active_model.runtime == runtime

        seqs = [codec.decode_sensor_batch(watcher.pump("sensor").payload).seq for _ in range(5)]
        assert seqs == sorted(seqs)
        assert seqs == list(range(seqs[0], seqs[0] + 5))

        prediction = watcher.prediction()
        assert prediction.model_version == releases.first.manifest.version
        assert prediction.label in LABELS
        assert prediction.device_id == DEVICE

        model = agent.active_model
        assert model is not None
        assert not np.abs(model.installed().kernel_delta).any()  # nothing learned yet
        wrong_label = next(label for label in LABELS if label != prediction.label)
        confirm(broker_settings, prediction.prediction_id, wrong_label)
        assert agent.counters.wait_until("confirmations_applied", 1, WAIT)

        learned = model.installed()
        assert np.abs(learned.kernel_delta).any()  # the confirmation was learned
        # One confirmation is no evidence that the learned state beats the global model yet.
        assert learned.serve is False
        state = tmp_path / "device" / "learned" / f"{releases.first.manifest.version}.state"
        assert state.is_file()

        status = codec.decode_status(watcher.pump("status").payload)
        while status.state != "online" or "confirmations_applied" not in status.counters:
            status = codec.decode_status(watcher.pump("status").payload)
        assert status.model_version == releases.first.manifest.version
    finally:
        watcher.stop()


@RUNTIMES
def test_restart_keeps_what_the_device_learned(
    broker_settings: BrokerSettings,
    releases: Releases,
    tmp_path: Path,
    start_agent: AgentFactory,
    runtime: str,
) -> None:
    publish_release(broker_settings, releases.first)
    watcher = Watcher(broker_settings)
    settings = agent_settings(
        broker_settings, tmp_path / "device", releases, memory_tolerance=1.0, runtime=runtime
    )
    first = start_agent(settings)
    try:
        assert first.model_changed.wait(WAIT)
        for _ in range(3):
            prediction = watcher.prediction()
            confirm(broker_settings, prediction.prediction_id, "Laying")
        assert first.counters.wait_until("confirmations_applied", 3, WAIT)
        model = first.active_model
        assert model is not None
        probe, _ = probe_windows()
        learned = model.installed()
        served = model.predict(probe).probabilities
        assert np.abs(learned.kernel_delta).any()
        first.shutdown()

        second = start_agent(settings)
        restarted = second.active_model
        assert restarted is not None  # loaded at start, before any broker message
        assert restarted.runtime == runtime
        assert second.active_version == releases.first.manifest.version
        again = restarted.installed()
        np.testing.assert_array_equal(again.kernel_delta, learned.kernel_delta)
        np.testing.assert_array_equal(again.align, learned.align)
        assert again.serve == learned.serve
        assert second.counters.get("confirmations_applied") == 0  # restored, not learned again
        np.testing.assert_allclose(restarted.predict(probe).probabilities, served, atol=1e-6)
    finally:
        watcher.stop()


def test_broker_restart_mid_stream_loses_no_batch(
    broker: MosquittoProcess,
    broker_settings: BrokerSettings,
    releases: Releases,
    tmp_path: Path,
    start_agent: AgentFactory,
) -> None:
    watcher = Watcher(broker_settings, client_id="seq-counter")
    agent = start_agent(agent_settings(broker_settings, tmp_path / "device", releases))
    try:
        seen = {codec.decode_sensor_batch(watcher.pump("sensor").payload).seq for _ in range(5)}
        queued = agent.counters.get("batches_queued")
        broker.restart()  # graceful: persistent sessions and queued messages survive
        assert agent.counters.wait_until("batches_queued", queued + 25, WAIT)
        last = max(seen) + 20
        while max(seen) < last:
            seen.add(codec.decode_sensor_batch(watcher.pump("sensor").payload).seq)
        assert set(range(min(seen), last + 1)) <= seen, "a batch went missing"
    finally:
        watcher.stop()


def test_outbox_holds_batches_while_offline_and_sends_them_in_order(
    broker: MosquittoProcess,
    broker_settings: BrokerSettings,
    releases: Releases,
    tmp_path: Path,
    start_agent: AgentFactory,
) -> None:
    # The subscriber's persistent session exists before the outage, so the broker queues for it.
    watcher = Watcher(broker_settings, client_id="outbox-watch")
    watcher.stop()
    broker.stop()
    agent = start_agent(agent_settings(broker_settings, tmp_path / "device", releases))
    assert agent.counters.wait_until("batches_queued", 15, WAIT)
    depth, _ = agent._store.outbox_size()
    assert depth >= 15  # held on disk while the broker is away
    broker.start()
    watcher = Watcher(broker_settings, client_id="outbox-watch")
    try:
        received = [
            codec.decode_sensor_batch(watcher.pump("sensor").payload).seq for _ in range(15)
        ]
        first = received[0]
        assert received == list(range(first, first + 15)), "outbox replays in order, no gaps"
    finally:
        watcher.stop()


def test_tampered_or_foreign_models_are_rejected_and_the_current_one_kept(
    broker_settings: BrokerSettings, releases: Releases, tmp_path: Path, start_agent: AgentFactory
) -> None:
    publish_release(broker_settings, releases.first)
    watcher = Watcher(broker_settings)
    agent = start_agent(agent_settings(broker_settings, tmp_path / "device", releases))
    try:
        assert agent.model_changed.wait(WAIT)
        agent.model_changed.clear()
        current = releases.first.manifest.version

        tampered = bytearray(releases.second.payload)
        tampered[len(tampered) // 2] ^= 0x01
        publish_release(broker_settings, Release(releases.second.manifest, bytes(tampered)))
        event = watcher.error_with("model_rejected")
        assert "sha256" in str(event["message"])

        forged = dataclasses.replace(releases.second.manifest, size=releases.second.manifest.size)
        forged = dataclasses.replace(forged, metrics={"test_accuracy": 1.0})  # breaks signature
        publish_release(broker_settings, Release(forged, releases.second.payload))
        event = watcher.error_with("model_rejected")
        assert "signature" in str(event["message"])

        assert agent.active_version == current
        assert not agent.model_changed.is_set()
        assert watcher.prediction().model_version == current  # still serving
    finally:
        watcher.stop()


@RUNTIMES
def test_signed_update_is_installed_and_keeps_personalisation(
    broker_settings: BrokerSettings,
    releases: Releases,
    tmp_path: Path,
    start_agent: AgentFactory,
    runtime: str,
) -> None:
    publish_release(broker_settings, releases.first)
    watcher = Watcher(broker_settings)
    settings = agent_settings(
        broker_settings, tmp_path / "device", releases, memory_tolerance=1.0, runtime=runtime
    )
    agent = start_agent(settings)
    try:
        assert agent.model_changed.wait(WAIT)
        agent.model_changed.clear()
        for _ in range(2):
            confirm(broker_settings, watcher.prediction().prediction_id, "Sitting")
        assert agent.counters.wait_until("confirmations_applied", 2, WAIT)

        publish_release(broker_settings, releases.second)
        assert agent.model_changed.wait(WAIT)
        assert agent.active_version == releases.second.manifest.version
        model = agent.active_model
        assert model is not None
        assert model.runtime == runtime
        assert np.abs(model.installed().kernel_delta).any()  # the confirmations learned again
        while (prediction := watcher.prediction()).model_version != agent.active_version:
            pass
        assert prediction.model_version == releases.second.manifest.version
        models_dir = tmp_path / "device" / "models"
        pointer = json.loads((models_dir / "CURRENT").read_text())
        assert pointer == {
            "current": releases.second.manifest.version,
            "previous": releases.first.manifest.version,
        }
    finally:
        watcher.stop()


def test_malformed_confirmations_do_no_harm(
    broker_settings: BrokerSettings, releases: Releases, tmp_path: Path, start_agent: AgentFactory
) -> None:
    publish_release(broker_settings, releases.first)
    watcher = Watcher(broker_settings)
    agent = start_agent(agent_settings(broker_settings, tmp_path / "device", releases))
    connection: MqttConnection | None = None
    try:
        assert agent.model_changed.wait(WAIT)
        prediction = watcher.prediction()
        topic = Topics(broker_settings.topic_root).confirmation(DEVICE)
        connection, _ = connect(broker_settings)
        bad_payloads = [
            b"\x93\x01\x02",
            b'{"type":"confirmation","v":1,"prediction_id":"p","label":"x","ts":NaN}',
            b"{" * 70_000,
            codec.encode_confirmation(Confirmation("no-such-prediction", "Walking", "user", 1.0)),
            codec.encode_confirmation(
                Confirmation(prediction.prediction_id, "Flying", "user", 1.0)
            ),
        ]
        for payload in bad_payloads:
            assert connection.publish(Outbound(topic, payload)).wait(10)
        for code in ("malformed_confirmation",) * 3 + ("unknown_prediction", "unknown_label"):
            watcher.error_with(code)
        assert agent.counters.get("confirmations_applied") == 0
        # Still alive and learning: a good confirmation after the bad ones works.
        confirm(broker_settings, prediction.prediction_id, "Walking")
        assert agent.counters.wait_until("confirmations_applied", 1, WAIT)
        confirm(broker_settings, prediction.prediction_id, "Walking")  # a redelivery
        assert agent.counters.wait_until("confirmations_duplicate", 1, WAIT)
        assert agent.counters.get("confirmations_applied") == 1
    finally:
        if connection is not None:
            connection.stop()
        watcher.stop()


def test_an_update_worse_on_the_users_own_confirmations_is_refused(
    broker_settings: BrokerSettings, releases: Releases, tmp_path: Path, start_agent: AgentFactory
) -> None:
    bad_folder = export_tiny_version(tmp_path / "stage" / "v-bad", seed=3, steps=60, label_shift=1)
    bad_info = releases.registry.add(bad_folder, parent=releases.second.manifest.version)
    bad_manifest = releases.registry.promote(
        bad_info.version, releases.private_key, chunk_size=CHUNK_SIZE
    )
    bad = Release(bad_manifest, releases.registry.payload(bad_info.version))

    publish_release(broker_settings, releases.first)
    watcher = Watcher(broker_settings)
    settings = agent_settings(
        broker_settings,
        tmp_path / "device",
        releases,
        min_replay_for_gate=5,
    )
    agent = start_agent(settings)
    try:
        assert agent.model_changed.wait(WAIT)
        agent.model_changed.clear()
        for _ in range(8):  # the user confirms what the synthetic sensor really did
            prediction = watcher.prediction()
            assert prediction.truth is not None
            confirm(broker_settings, prediction.prediction_id, prediction.truth)
        assert agent.counters.wait_until("confirmations_applied", 8, WAIT)

        publish_release(broker_settings, bad)
        event = watcher.error_with("model_rejected")
        assert "worse by more than the margin" in str(event["message"])
        assert agent.active_version == releases.first.manifest.version
        assert not agent.model_changed.is_set()
    finally:
        watcher.stop()


def test_a_wearer_can_make_the_device_forget_every_confirmation(
    broker_settings: BrokerSettings,
    releases: Releases,
    tmp_path: Path,
    start_agent: AgentFactory,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from device_agent.cli import forget

    publish_release(broker_settings, releases.first)
    watcher = Watcher(broker_settings)
    settings = agent_settings(broker_settings, tmp_path / "device", releases, memory_tolerance=1.0)
    agent = start_agent(settings)
    connection: MqttConnection | None = None
    try:
        assert agent.model_changed.wait(WAIT)
        for _ in range(3):
            confirm(broker_settings, watcher.prediction().prediction_id, "Laying")
        assert agent.counters.wait_until("confirmations_applied", 3, WAIT)
        model = agent.active_model
        assert model is not None
        assert np.abs(model.installed().kernel_delta).any()

        topic = Topics(broker_settings.topic_root).command(DEVICE)
        connection, _ = connect(broker_settings)
        command = codec.encode_device_command(DeviceCommand("forget", "test-1", time.time()))
        assert connection.publish(Outbound(topic, command)).wait(10)
        assert agent.counters.wait_until("forgets", 1, WAIT)
        assert agent.counters.get("confirmations_forgotten") == 3
        assert not np.abs(model.installed().kernel_delta).any()  # the global model, unchanged
        assert model.installed().serve is False

        assert connection.publish(Outbound(topic, b'{"type":"device_command"}')).wait(10)
        watcher.error_with("malformed_command")

        # `har agent forget` on the device while the agent runs: a request file, no broker
        # connection (the broker would let it take the agent's place); it returns once done.
        confirm(broker_settings, watcher.prediction().prediction_id, "Laying")
        assert agent.counters.wait_until("confirmations_applied", 4, WAIT)
        assert forget(settings) == 0
        assert "the running agent forgot" in capsys.readouterr().out
        assert agent.counters.get("forgets") == 2
        assert agent.counters.get("confirmations_forgotten") == 4
        assert not (settings.state_dir / FORGET_REQUEST).exists()
        confirm(broker_settings, watcher.prediction().prediction_id, "Laying")
        assert agent.counters.wait_until("confirmations_applied", 5, WAIT)
    finally:
        if connection is not None:
            connection.stop()
        watcher.stop()
    agent.shutdown()
    # ... and with the agent stopped: done on its state folder.
    assert forget(settings) == 0
    assert "forgot 1 confirmations" in capsys.readouterr().out
    assert not list((tmp_path / "device" / "learned").glob("*.state"))
    # The trainer is told when the agent next runs: the forget waits in the outbox.
    from device_agent.store import AgentStore

    store = AgentStore(settings.store_path)
    try:
        waiting = [
            e for e in store.outbox_after(0, 10_000) if (e.receipt_key or "").startswith("f:")
        ]
    finally:
        store.close()
    assert [e.message.topic for e in waiting] == [
        Topics(broker_settings.topic_root).forgotten(DEVICE)
    ]


def test_a_correction_and_a_forget_reach_the_trainers_store(
    broker_settings: BrokerSettings,
    releases: Releases,
    tmp_path: Path,
    start_agent: AgentFactory,
    store_url: str,
) -> None:
    """The later answer wins in the trainer's store too (SQLite and PostgreSQL); a forget
    empties it of the device's answers, is receipted (so it leaves the agent's outbox), and
    keeps late relays out."""
    from tests.trainer_helpers import trainer_settings_for
    from trainer_service.service import TrainerService
    from trainer_service.settings import StoreSettings

    publish_release(broker_settings, releases.first)
    settings = trainer_settings_for(
        broker_settings, tmp_path / "trainer", store=StoreSettings(url=store_url)
    )
    trainer = TrainerService(settings)
    trainer.start()
    watcher = Watcher(broker_settings)
    agent = start_agent(agent_settings(broker_settings, tmp_path / "device", releases))
    connection, _ = connect(broker_settings)
    topics = Topics(broker_settings.topic_root)

    def answer(prediction_id: str, label: str, ts: float) -> None:
        message = Confirmation(prediction_id, label, "user", ts)
        payload = codec.encode_confirmation(message)
        assert connection.publish(Outbound(topics.confirmation(DEVICE), payload)).wait(10)

    def labels_stored() -> list[str]:
        return [w.label for w in trainer.store.confirmed_windows() if w.device_id == DEVICE]

    def wait_for_labels(wanted: list[str]) -> bool:
        # The window is joined once the batches it spans are stored: poll with a deadline.
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline:
            trainer.store.join_pending()
            if labels_stored() == wanted:
                return True
            time.sleep(0.2)
        return False

    try:
        assert trainer.wait_connected(WAIT)
        assert agent.model_changed.wait(WAIT)
        prediction_id = watcher.prediction().prediction_id
        answer(prediction_id, LABELS[0], 1.0)
        assert agent.counters.wait_until("confirmations_applied", 1, WAIT)
        answer(prediction_id, LABELS[1], 2.0)  # the wearer changed their mind
        assert agent.counters.wait_until("confirmations_corrected", 1, WAIT)
        assert trainer.counters.wait_until("confirmations_corrected", 1, WAIT)
        assert wait_for_labels([LABELS[1]])

        forget = DeviceCommand("forget", "wearer-1", 10.0)
        payload = codec.encode_device_command(forget)
        assert connection.publish(Outbound(topics.command(DEVICE), payload)).wait(10)
        assert trainer.counters.wait_until("forgets", 1, WAIT)
        assert trainer.counters.get("confirmations_forgotten") == 1
        assert labels_stored() == []
        assert trainer.store.confirmation_count() == 0
        # The trainer's receipt names the forget, which leaves the agent's outbox then.
        assert agent.counters.wait_until("forgets_receipted", 1, WAIT)
        # A late copy of the old answer is not stored again; a new answer is.
        answer(prediction_id, LABELS[2], 3.0)
        assert trainer.counters.wait_until("confirmations_after_forget", 1, WAIT)
        later = watcher.prediction().prediction_id
        answer(later, LABELS[0], 11.0)
        assert trainer.counters.wait_until("confirmations", 2, WAIT)
    finally:
        connection.stop()
        watcher.stop()
        trainer.shutdown()


def test_a_forged_manifest_does_not_block_the_real_release_it_imitates(
    broker_settings: BrokerSettings, releases: Releases, tmp_path: Path, start_agent: AgentFactory
) -> None:
    publish_release(broker_settings, releases.first)
    watcher = Watcher(broker_settings)
    agent = start_agent(agent_settings(broker_settings, tmp_path / "device", releases))
    connection: MqttConnection | None = None
    try:
        assert agent.model_changed.wait(WAIT)
        agent.model_changed.clear()
        # Someone who knows the coming release's sha256 announces it with a bad signature.
        forged = dataclasses.replace(releases.second.manifest, signature=b"\x00" * 64)
        topic = Topics(broker_settings.topic_root).model_manifest()
        connection, _ = connect(broker_settings)
        assert connection.publish(Outbound(topic, codec.encode_manifest(forged), 1, True)).wait(10)
        assert "signature" in str(watcher.error_with("model_rejected")["message"])

        publish_release(broker_settings, releases.second)  # the real one, same sha256
        assert agent.model_changed.wait(WAIT), "the real release was ignored"
        assert agent.active_version == releases.second.manifest.version
    finally:
        if connection is not None:
            connection.stop()
        watcher.stop()


def test_a_device_command_delivered_again_is_carried_out_once(
    broker_settings: BrokerSettings, releases: Releases, tmp_path: Path, start_agent: AgentFactory
) -> None:
    """A confirm_latest whose acknowledgement was lost comes again, when the latest prediction
    is another one: by its request id, the agent sees it did it already and does nothing."""
    topics = Topics(broker_settings.topic_root)
    publish_release(broker_settings, releases.first)
    watcher = Watcher(broker_settings)
    relay, relayed = connect(broker_settings, [(topics.confirmed(DEVICE), 1)])
    settings = agent_settings(broker_settings, tmp_path / "device", releases, memory_tolerance=1.0)
    agent = start_agent(settings)
    commander, _ = connect(broker_settings)
    seen: list[Confirmation] = []

    def send(request_id: str, ts: float) -> None:
        command = DeviceCommand("confirm_latest", request_id, ts)
        message = Outbound(topics.command(DEVICE), codec.encode_device_command(command))
        assert commander.publish(message).wait(10)

    def relayed_until(ts: float) -> list[Confirmation]:
        """Every confirmation the agent relayed (resends included) until one of ``ts``."""
        while not seen or seen[-1].ts != ts:
            seen.append(codec.decode_confirmation(receive(relayed, WAIT).payload))
        return seen

    try:
        first = watcher.prediction()
        send("app-1", 1000.0)
        assert relayed_until(1000.0)[-1].prediction_id == first.prediction_id
        later = watcher.prediction()  # the latest is another prediction now
        assert later.prediction_id != first.prediction_id
        send("app-1", 1000.0)  # the same command again, byte for byte
        send("app-2", 2000.0)
        relayed_until(2000.0)
    finally:
        commander.stop()
        relay.stop()
        watcher.stop()
    # Had app-1 run again, it would have confirmed a later prediction with ts 1000.
    assert {c.prediction_id for c in seen if c.ts == 1000.0} == {first.prediction_id}
    assert agent.counters.get("commands_duplicate") == 1
