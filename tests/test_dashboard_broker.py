"""``har watch`` and ``har confirm`` against a real Mosquitto broker, in process and as commands."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from dashboard.client import FleetClient
from dashboard.controller import ConfirmAsPredicted, CorrectTo, Dashboard, Move
from dashboard.fleet_view import Accuracy, FleetView
from shared import codec
from shared.config import BrokerSettings
from shared.messages import (
    DeviceStatus,
)
from shared.mqtt_transport import MqttConnection, Outbound, PublishHandle
from shared.topics import Topics
from tests.dashboard_helpers import LABELS, manifest, prediction
from tests.mosquitto import BrokerUsers, MosquittoProcess, free_port
from tests.mqtt_helpers import connect, receive

pytestmark = pytest.mark.broker

REPO = Path(__file__).resolve().parent.parent
SHIPPED_ACL = REPO / "deploy" / "mosquitto" / "acl"
WAIT_S = 10.0
VERSION = "v0002"


def online(device: str, version: str = VERSION) -> DeviceStatus:
    return DeviceStatus(device_id=device, state="online", model_version=version, ts=time.time())


def publish(connection: MqttConnection, topic: str, payload: bytes, retain: bool = False) -> None:
    handle = connection.publish(Outbound(topic, payload, qos=1, retain=retain))
    assert handle.wait(WAIT_S), f"the broker did not acknowledge {topic}"


def publish_manifest(connection: MqttConnection, topics: Topics) -> None:
    """The model manifest, retained as the trainer publishes it."""
    publish(connection, topics.model_manifest(), codec.encode_manifest(manifest(VERSION)), True)


def pump_until(
    client: FleetClient, view: FleetView, condition: Callable[[], bool], what: str
) -> None:
    """Feed the view until ``condition`` holds; each wait is on the client's inbox."""
    deadline = time.monotonic() + WAIT_S
    while not condition():
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"timed out waiting for {what}"
        client.pump(view, min(remaining, 0.5))


@pytest.fixture
def fleet_client(broker_settings: BrokerSettings) -> Iterator[FleetClient]:
    client = FleetClient(broker_settings)
    client.start(WAIT_S)
    yield client
    client.stop()


@pytest.fixture
def publisher(broker_settings: BrokerSettings) -> Iterator[MqttConnection]:
    connection, _ = connect(broker_settings)
    yield connection
    connection.stop()


def show_prediction(publisher: MqttConnection, client: FleetClient, view: FleetView) -> None:
    """Publish prediction p-1 (Sitting) of wrist-1 and feed the view until it shows it."""
    payload = codec.encode_prediction(prediction("p-1", "Sitting", VERSION, "wrist-1"))
    publish(publisher, client.topics.prediction("wrist-1"), payload)
    pump_until(client, view, lambda: view.row("wrist-1") is not None, "the prediction")


class KeptHandles:
    """The real client, keeping the handles it returns so a test can wait for the broker."""

    def __init__(self, client: FleetClient) -> None:
        self.client = client
        self.handles: list[PublishHandle] = []

    def confirm(self, device_id: str, prediction_id: str, label: str) -> PublishHandle:
        handle = self.client.confirm(device_id, prediction_id, label)
        self.handles.append(handle)
        return handle


# ----------------------------------------------------------------------------------- in process


def test_view_sees_retained_manifest_and_status_then_live_predictions(
    broker_settings: BrokerSettings, publisher: MqttConnection
) -> None:
    topics = Topics(broker_settings.topic_root)
    publish_manifest(publisher, topics)
    publish(publisher, topics.status("wrist-1"), codec.encode_status(online("wrist-1")), True)
    view = FleetView()
    with FleetClient(broker_settings) as client:
        client.start(WAIT_S)  # retained messages arrive on subscribing
        pump_until(client, view, lambda: view.model is not None, "the retained manifest")
        pump_until(client, view, lambda: view.row("wrist-1") is not None, "the retained status")
        publish(
            publisher,
            topics.prediction("wrist-1"),
            codec.encode_prediction(prediction("p-1", "Jogging", VERSION, "wrist-1")),
        )
        publish(publisher, topics.prediction("wrist-1"), b'{"type":"prediction"}')
        pump_until(client, view, lambda: view.counts().bad_payloads == 1, "the bad payload")
    row = view.row("wrist-1")
    assert row is not None
    assert view.labels == LABELS
    assert row.presence == "online"
    assert row.latest is not None
    assert (row.latest.prediction_id, row.latest.label) == ("p-1", "Jogging")
    assert row.latest.confidence == pytest.approx(0.9)
    assert "missing field" in (view.last_bad_payload or "")


def test_confirm_reaches_a_subscriber_and_counts_in_the_accuracy(
    broker_settings: BrokerSettings, publisher: MqttConnection, fleet_client: FleetClient
) -> None:
    topics = Topics(broker_settings.topic_root)
    subscriber, inbox = connect(broker_settings, [(topics.all_confirmation(), 1)])
    view = FleetView()
    try:
        publish(
            publisher,
            topics.prediction("wrist-1"),
            codec.encode_prediction(prediction("p-7", "Walking", "v0003", "wrist-1")),
        )
        pump_until(fleet_client, view, lambda: view.row("wrist-1") is not None, "the prediction")
        handle = fleet_client.confirm("wrist-1", "p-7", "Jogging")
        assert handle.wait(WAIT_S)
        message = receive(inbox)
    finally:
        subscriber.stop()
    outcome = handle.outcome()
    assert outcome is not None
    assert outcome.accepted
    assert message.topic == topics.confirmation("wrist-1")
    received = codec.decode_confirmation(message.payload)
    assert (received.prediction_id, received.label, received.source) == ("p-7", "Jogging", "user")
    # The dashboard hears its own confirmation back: a correction of version v0003.
    pump_until(fleet_client, view, lambda: bool(view.accuracy()), "the confirmation")
    assert view.accuracy() == {"v0003": Accuracy(right=0, wrong=1)}


def test_keys_confirm_and_correct_the_selected_device_through_the_broker(
    broker_settings: BrokerSettings, publisher: MqttConnection, fleet_client: FleetClient
) -> None:
    topics = Topics(broker_settings.topic_root)
    subscriber, inbox = connect(broker_settings, [(topics.all_confirmation(), 1)])
    view = FleetView()
    confirmer = KeptHandles(fleet_client)
    dashboard = Dashboard(view, confirmer, ack_timeout_s=WAIT_S)
    try:
        publish_manifest(publisher, topics)
        for device, pid, label in (("wrist-1", "a-1", "Sitting"), ("wrist-2", "b-1", "Walking")):
            payload = codec.encode_prediction(prediction(pid, label, VERSION, device))
            publish(publisher, topics.prediction(device), payload)
        pump_until(fleet_client, view, lambda: len(view.rows()) == 2, "both devices")
        pump_until(fleet_client, view, lambda: view.model is not None, "the manifest")
        now = time.time()
        dashboard.handle(Move(+1), now)  # wrist-2
        dashboard.handle(ConfirmAsPredicted(), now)
        dashboard.handle(Move(-1), now)  # wrist-1
        dashboard.handle(CorrectTo(4), now)  # the 4th label: Standing
        received = [receive(inbox), receive(inbox)]
        for handle in confirmer.handles:
            assert handle.wait(WAIT_S)
    finally:
        subscriber.stop()
    dashboard.poll(time.time())
    assert dashboard.in_flight == 0
    assert dashboard.status.startswith("wrist-1 a-1 as Standing: accepted by the broker")
    sent = {
        (message.topic, codec.decode_confirmation(message.payload).label) for message in received
    }
    assert sent == {
        (topics.confirmation("wrist-2"), "Walking"),
        (topics.confirmation("wrist-1"), "Standing"),
    }
    pump_until(fleet_client, view, lambda: view.counts().confirmations_joined == 2, "the joins")
    assert view.accuracy() == {"v0002": Accuracy(right=1, wrong=1)}


def test_unanswered_confirmation_is_reported_after_the_timeout(
    broker: MosquittoProcess, broker_settings: BrokerSettings, publisher: MqttConnection
) -> None:
    view = FleetView()
    client = FleetClient(broker_settings)
    client.start(WAIT_S)
    try:
        show_prediction(publisher, client, view)
        broker.stop()
        dashboard = Dashboard(view, client, ack_timeout_s=2.0)
        sent_at = time.time()
        dashboard.handle(ConfirmAsPredicted(), sent_at)
        dashboard.poll(sent_at + 1.0)
        assert dashboard.in_flight == 1
        dashboard.poll(sent_at + 3.0)
    finally:
        client.stop()
    assert dashboard.in_flight == 0
    assert dashboard.status == (
        "wrist-1 p-1 as Sitting: no acknowledgement in 2 s (is the broker reachable?)"
    )


def test_confirmation_sent_while_the_broker_is_down_is_accepted_after_it_returns(
    broker: MosquittoProcess, publisher: MqttConnection, fleet_client: FleetClient
) -> None:
    view = FleetView()
    confirmer = KeptHandles(fleet_client)
    dashboard = Dashboard(view, confirmer, ack_timeout_s=WAIT_S)
    show_prediction(publisher, fleet_client, view)
    broker.stop()
    dashboard.handle(ConfirmAsPredicted(), time.time())
    (handle,) = confirmer.handles
    assert not handle.done
    broker.start()  # the client reconnects and paho sends the confirmation it kept
    assert handle.wait(WAIT_S)
    dashboard.poll(time.time())
    assert dashboard.in_flight == 0
    assert dashboard.status == "wrist-1 p-1 as Sitting: accepted by the broker, Success (0x00)"


# ------------------------------------------------------------------------------- access control

PASSWORDS = {"dashboard": "pw-dashboard", "wrist-0001": "pw-wrist", "trainer": "pw-trainer"}


def login(broker: MosquittoProcess, user: str, tmp_path: Path) -> BrokerSettings:
    password_file = tmp_path / f"{user}.password"
    password_file.write_text(PASSWORDS.get(user, "wrong") + "\n")
    return BrokerSettings(
        host=broker.host,
        port=broker.port,
        username=user,
        password_file=password_file,
        keepalive_s=5,
        reconnect_min_s=0.05,
        reconnect_max_s=0.5,
    )


def test_shipped_acl_lets_the_dashboard_watch_and_confirm(
    broker_factory: Callable[..., MosquittoProcess], tmp_path: Path
) -> None:
    broker = broker_factory(BrokerUsers(PASSWORDS, SHIPPED_ACL.read_text()))
    topics = Topics("har/v1")  # the root the shipped ACL names
    device, _ = connect(login(broker, "wrist-0001", tmp_path))
    trainer, _ = connect(login(broker, "trainer", tmp_path))
    view = FleetView()
    client = FleetClient(login(broker, "dashboard", tmp_path))
    client.start(WAIT_S)
    try:
        publish_manifest(trainer, topics)
        publish(device, topics.status("wrist-0001"), codec.encode_status(online("wrist-0001")))
        pump_until(client, view, lambda: view.model is not None, "the manifest")
        publish(
            device,
            topics.prediction("wrist-0001"),
            codec.encode_prediction(prediction("p-1", "Upstairs", VERSION, "wrist-0001")),
        )
        pump_until(
            client,
            view,
            lambda: (row := view.row("wrist-0001")) is not None and row.latest is not None,
            "the prediction",
        )
        handle = client.confirm("wrist-0001", "p-1", "Upstairs")
        assert handle.wait(WAIT_S)
        pump_until(client, view, lambda: bool(view.accuracy()), "the confirmation read back")
    finally:
        client.stop()
        device.stop()
        trainer.stop()
    outcome = handle.outcome()
    assert outcome is not None
    assert outcome.accepted
    assert view.accuracy() == {"v0002": Accuracy(right=1)}
    row = view.row("wrist-0001")
    assert row is not None
    assert row.presence == "online"


def test_refused_publish_is_reported_with_its_reason_code(
    broker_factory: Callable[..., MosquittoProcess], tmp_path: Path
) -> None:
    # A dashboard login that may read everything but write nothing.
    acl = "user dashboard\ntopic read har/v1/#\n"
    broker = broker_factory(BrokerUsers(PASSWORDS, acl))
    view = FleetView()
    client = FleetClient(login(broker, "dashboard", tmp_path))
    client.start(WAIT_S)
    confirmer = KeptHandles(client)
    try:
        view.apply_prediction(
            "wrist-0001", prediction("p-1", "Walking", VERSION, "wrist-0001"), 0.0
        )
        dashboard = Dashboard(view, confirmer, ack_timeout_s=WAIT_S)
        dashboard.handle(ConfirmAsPredicted(), time.time())
        assert confirmer.handles[0].wait(WAIT_S)
        dashboard.poll(time.time())
    finally:
        client.stop()
    outcome = confirmer.handles[0].outcome()
    assert outcome is not None
    assert not outcome.accepted
    assert outcome.code == 0x87
    assert dashboard.status == (
        "wrist-0001 p-1 as Walking: REFUSED by the broker, Not authorized (0x87)"
    )


# ------------------------------------------------------------------------------------- commands


def har(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "har", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})},
        check=False,
    )


def broker_args(settings: BrokerSettings) -> list[str]:
    return ["--port", str(settings.port), "--topic-root", settings.topic_root]


def test_har_confirm_checks_the_label_and_publishes(
    broker_settings: BrokerSettings, publisher: MqttConnection
) -> None:
    topics = Topics(broker_settings.topic_root)
    subscriber, inbox = connect(broker_settings, [(topics.all_confirmation(), 1)])
    try:
        no_manifest = har(
            "confirm", "wrist-1", "p-0", "Walking", "--manifest-wait", "0.5",
            *broker_args(broker_settings),
        )  # fmt: skip
        publish_manifest(publisher, topics)
        unknown = har("confirm", "wrist-1", "p-1", "Flying", *broker_args(broker_settings))
        bad_device = har("confirm", "wrist/1", "p-1", "Walking", *broker_args(broker_settings))
        good = har(
            "confirm", "wrist-1", "p-1", "Walking", "--source", "app",
            *broker_args(broker_settings),
        )  # fmt: skip
        unchecked = har(
            "confirm", "wrist-1", "p-2", "Flying", "--any-label", *broker_args(broker_settings)
        )
        # The refused ones were never published: the first message is the good one.
        first, second = receive(inbox), receive(inbox)
    finally:
        subscriber.stop()
    assert no_manifest.returncode == 2
    assert "no model manifest arrived" in no_manifest.stderr
    assert "--any-label" in no_manifest.stderr
    assert unknown.returncode == 2
    assert "'Flying' is not a label of model v0002" in unknown.stderr
    assert bad_device.returncode == 2
    assert "invalid device id 'wrist/1'" in bad_device.stderr
    assert good.returncode == 0, good.stderr
    assert "the broker accepted it" in good.stdout
    assert "WARNING" not in good.stderr, good.stderr  # its own clean stop is no warning
    assert unchecked.returncode == 0, unchecked.stderr
    assert first.topic == topics.confirmation("wrist-1")
    confirmed = codec.decode_confirmation(first.payload)
    assert (confirmed.prediction_id, confirmed.label, confirmed.source) == ("p-1", "Walking", "app")
    assert codec.decode_confirmation(second.payload).label == "Flying"


def test_har_confirm_fails_clearly_when_unreachable_or_refused(
    broker_factory: Callable[..., MosquittoProcess], tmp_path: Path
) -> None:
    nobody = har(
        "confirm", "wrist-1", "p-1", "Walking", "--any-label", "--port", str(free_port()),
        env={"HAR_CONNECT_TIMEOUT_S": "1"},
    )  # fmt: skip
    assert nobody.returncode == 2
    assert "cannot reach the broker at 127.0.0.1" in nobody.stderr

    broker = broker_factory(BrokerUsers(PASSWORDS, "user dashboard\ntopic read har/v1/#\n"))
    dashboard = login(broker, "dashboard", tmp_path)
    common = ["--port", str(broker.port), "--username", "dashboard", "--any-label"]
    refused = har(
        "confirm", "wrist-1", "p-1", "Walking", *common,
        "--password-file", str(dashboard.password_file),
    )  # fmt: skip
    assert refused.returncode == 2
    assert "the broker refused the confirmation: Not authorized (0x87)" in refused.stderr
    wrong_password = tmp_path / "wrong.password"
    wrong_password.write_text("not-the-password\n")
    bad_login = har(
        "confirm", "wrist-1", "p-1", "Walking", *common, "--password-file", str(wrong_password)
    )
    assert bad_login.returncode == 2
    assert "refused the login" in bad_login.stderr


def test_har_watch_once_prints_a_snapshot_from_a_config_file(
    broker_settings: BrokerSettings, publisher: MqttConnection, tmp_path: Path
) -> None:
    topics = Topics(broker_settings.topic_root)
    publish_manifest(publisher, topics)
    publish(publisher, topics.status("wrist-1"), codec.encode_status(online("wrist-1")), True)
    publish(publisher, topics.status("wrist-2"), b"not json", True)
    config = tmp_path / "watch.toml"
    config.write_text(
        f'[broker]\nhost = "127.0.0.1"\nport = {broker_settings.port}\n'
        f'topic_root = "{broker_settings.topic_root}"\n'
    )
    as_json = har("watch", "--once", "--wait", "1", "--json", "--config", str(config))
    as_text = har("watch", "--once", "--wait", "1", "--width", "160", "--config", str(config))
    assert as_json.returncode == 0, as_json.stderr
    snapshot = json.loads(as_json.stdout)
    assert snapshot["model"] == {"version": "v0002", "labels": list(LABELS)}
    assert [(d["device_id"], d["presence"]) for d in snapshot["devices"]] == [("wrist-1", "online")]
    assert snapshot["counts"]["bad_payloads"] == 1
    assert as_text.returncode == 0, as_text.stderr
    lines = as_text.stdout.splitlines()
    assert "devices 1 (1 online)  model v0002 (6 labels)  bad payloads 1" in lines[0]
    assert lines[2].startswith("  wrist-1 online  -")
    assert lines[3] == "accuracy of confirmed predictions: none confirmed yet"
    assert lines[4].startswith(f"last bad payload: {topics.status('wrist-2')}: status is not")
    assert len(lines) == 5  # a snapshot has no keys or status line
    assert all(len(line) <= 160 for line in lines)
