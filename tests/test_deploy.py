"""The shipped deployment files, checked against the real Mosquitto binary.

The production broker config (deploy/mosquitto/mosquitto.conf) runs with only its absolute paths
and its two listeners (plain and TLS) rewritten for the test, and the ACL file exactly as shipped.
Users are created with mosquitto_passwd, the TLS certificates with deploy/make-certs.sh. Each ACL
test proves a denial with a positive control: the forbidden message is sent first and an allowed
one after it on the same connection, so once the control arrives the forbidden one would already
have arrived (the broker delivers one publisher's messages in order). No sleeps.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import queue
import re
import shutil
import socket
import ssl
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from har.local_broker import (
    CONTAINER_CERTS,
    LOOPBACK,
    SHIPPED_ACL,
    SHIPPED_CONF,
    SHIPPED_LOGINS,
    MosquittoProcess,
    ShippedMosquitto,
    accepts_connections,
    find_mosquitto,
    make_certs,
    shipped_logins,
)
from shared import codec, homeassistant
from shared.config import BrokerSettings, load_settings, read_toml
from shared.errors import BrokerError
from shared.messages import Confirmation, InputSpec, ModelChunk, ModelManifest
from shared.mqtt_transport import MqttConnection
from tests.deploy_helpers import (
    DEPLOY,
    PASSWORDS,
    REPO,
    ROOT,
    TOPICS,
    WAIT_S,
    Clients,
    settings_for,
    unique,
)
from tests.mqtt_helpers import connect

pytestmark = pytest.mark.broker

TEST_CONF = DEPLOY / "mosquitto" / "test.conf"
COMPOSE = DEPLOY / "docker-compose.yml"


@pytest.fixture(scope="module")
def shipped(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ShippedMosquitto]:
    if find_mosquitto() is None:
        pytest.fail("mosquitto is not installed: run scripts/setup.sh")
    broker = ShippedMosquitto(
        tmp_path_factory.mktemp("shipped-broker"), SHIPPED_CONF, PASSWORDS, SHIPPED_ACL
    )
    broker.start()
    yield broker
    broker.stop()


@pytest.fixture
def clients(shipped: ShippedMosquitto) -> Iterator[Clients]:
    opened = Clients(shipped)
    yield opened
    opened.close()


# ------------------------------------------------------------------------------ static checks


def conf_options(path: Path) -> dict[str, list[str]]:
    options: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, value = line.partition(" ")
            options.setdefault(name, []).append(value.strip())
    return options


def test_shipped_config_has_the_production_settings() -> None:
    options = conf_options(SHIPPED_CONF)
    assert options["allow_anonymous"] == ["false"]
    assert options["persistence"] == ["true"]
    # Sessions and retained messages reach the disk within seconds (a kill -9 keeps them), and
    # on a timer, not per queued message (bench/broker_persistence.py).
    assert int(options["autosave_interval"][0]) <= 10
    assert "autosave_on_changes" not in options
    assert "password_file" in options
    assert "acl_file" in options
    assert int(options["max_queued_messages"][0]) >= 100_000
    assert int(options["max_queued_bytes"][0]) > 0
    assert options["persistent_client_expiration"] == ["14d"]
    assert options["log_dest"] == ["stdout"]
    # Model chunks (256 KiB of data by default) and the decoders' JSON / batch limits must fit.
    assert int(options["max_packet_size"][0]) >= 256 * 1024 + 4096
    assert int(options["max_packet_size"][0]) >= codec.DEFAULT_LIMITS.max_batch_bytes
    # Plain MQTT on loopback only (no cleartext password crosses a network), and the TLS
    # listener on every interface, whose files make-certs.sh names and compose mounts.
    assert options["listener"] == ["1883 127.0.0.1", "8883"]
    # No client can take over another's session with its client id: a listener option, on both.
    listener_blocks = SHIPPED_CONF.read_text().split("\nlistener ")[1:]
    assert len(listener_blocks) == 2
    for block in listener_blocks:
        assert "\nuse_username_as_clientid true\n" in block, block.splitlines()[0]
    for option, name in (
        ("cafile", "ca.crt"),
        ("certfile", "server.crt"),
        ("keyfile", "server.key"),
    ):
        assert options[option] == [CONTAINER_CERTS + name]
    assert options["tls_version"] == ["tlsv1.2"]


def test_test_config_allows_anonymous_and_raises_queues() -> None:
    options = conf_options(TEST_CONF)
    assert options["allow_anonymous"] == ["true"]
    assert options["listener"] == ["1883"]
    assert options["persistence"] == ["true"]
    assert int(options["max_queued_messages"][0]) >= 100_000


def test_agent_example_config_loads_with_the_agent_settings() -> None:
    from device_agent.settings import AgentSettings

    settings = load_settings(AgentSettings, config_file=DEPLOY / "agent.example.toml")
    assert settings.broker.topic_root == ROOT, f"the shipped ACL is written for {ROOT}"
    # The ACL's device patterns take the username as the device id.
    assert settings.broker.username == settings.device_id
    assert settings.broker.password_file is not None, "passwords belong in their own file"
    # The systemd unit makes only /var/lib/har writable.
    assert settings.state_dir.is_relative_to("/var/lib/har")
    assert settings.models_dir.is_relative_to("/var/lib/har")


def test_trainer_example_config_loads_and_its_chunks_fit_the_broker() -> None:
    module = pytest.importorskip("trainer_service.settings", reason="trainer settings not merged")
    settings = load_settings(module.TrainerSettings, config_file=DEPLOY / "trainer.example.toml")
    assert settings.broker.topic_root == ROOT
    assert settings.broker.username == "trainer"
    assert settings.broker.password_file is not None
    for path in (settings.data_dir, settings.registry_dir, settings.private_key):
        assert path.is_relative_to("/var/lib/har"), f"{path} is outside the trainer's volume"
    max_packet = int(conf_options(SHIPPED_CONF)["max_packet_size"][0])
    for chunk_bytes in (settings.publish.chunk_bytes, module.PublishSettings().chunk_bytes):
        assert chunk_bytes + 4096 <= max_packet, "model chunks would exceed max_packet_size"


# ------------------------------------------------------------------------------ the real broker


def test_anonymous_and_wrong_password_are_refused(shipped: ShippedMosquitto) -> None:
    for settings in (
        settings_for(shipped, None),
        settings_for(shipped, None, tls=True),
        BrokerSettings(host=shipped.host, port=shipped.port, username="trainer", password="nope"),
    ):
        connection = MqttConnection(settings, client_id=f"intruder-{uuid.uuid4().hex[:6]}")
        connection.start()
        try:
            assert connection.wait_stopped(WAIT_S), "the broker let the client in"
            assert connection.fatal_error is not None
            assert not connection.connected
        finally:
            connection.stop()


def test_device_publishes_only_under_its_own_id(clients: Clients) -> None:
    trainer = clients.join("trainer", [f"{ROOT}/#"])
    device = clients.join("wrist-0001")
    allowed = [
        TOPICS.sensor("wrist-0001"),
        TOPICS.prediction("wrist-0001"),
        TOPICS.status("wrist-0001"),
        TOPICS.error("wrist-0001"),
        TOPICS.confirmed("wrist-0001"),  # kept confirmations, relayed to the trainer
    ]
    forbidden = [
        TOPICS.sensor("wrist-0002"),
        TOPICS.prediction("wrist-0002"),
        TOPICS.confirmed("wrist-0002"),
        TOPICS.status("wrist-0002"),
        TOPICS.confirmation("wrist-0001"),  # only people (dashboard) confirm
        TOPICS.command("wrist-0001"),  # `har agent forget` needs no broker
        TOPICS.receipt("wrist-0001"),  # only the trainer confirms it stored a batch
        TOPICS.receipt("wrist-0002"),
        TOPICS.model_manifest(),
        TOPICS.model_chunk("v9999", 0),
        TOPICS.trainer_command(),
        TOPICS.trainer_status("trainer-1"),
    ]
    sent_allowed = [(topic, unique("ok")) for topic in allowed]
    sent_forbidden = [(topic, unique("forbidden")) for topic in forbidden]
    for topic, payload in sent_allowed + sent_forbidden:
        device.publish(topic, payload)
    control = (TOPICS.sensor("wrist-0001"), unique("control"))
    device.publish(*control)

    seen = trainer.until(*control)
    for message in sent_allowed:
        assert message in seen, f"the device could not publish on {message[0]}"
    for message in sent_forbidden:
        assert message not in seen, f"the device published on {message[0]}"


def test_device_reads_only_its_own_receipts(clients: Clients) -> None:
    device = clients.join("wrist-0001", [f"{ROOT}/devices/+/receipt"])  # the ACL filters delivery
    trainer = clients.join("trainer")
    other = (TOPICS.receipt("wrist-0002"), unique("receipt-other"))
    own = (TOPICS.receipt("wrist-0001"), unique("receipt-own"))
    trainer.publish(*other)
    trainer.publish(*own)
    assert other not in device.until(*own), "a device received another device's receipt"


def test_trainer_shared_subscriptions_receive_what_the_trainer_ingests(
    clients: Clients,
) -> None:
    # The subscriptions of trainer_service.service, as the "trainer" user, persistent session.
    shared = [
        TOPICS.all_sensor(),
        TOPICS.all_prediction(),
        TOPICS.all_confirmation(),
        TOPICS.all_status(),
        TOPICS.trainer_command(),
    ]
    trainer = clients.join("trainer", [f"$share/trainers/{f}" for f in shared], persistent=True)
    device = clients.join("wrist-0002")
    dashboard = clients.join("dashboard")
    operator = clients.join("operator")
    expected = []
    for publisher, topic in (
        (device, TOPICS.sensor("wrist-0002")),
        (device, TOPICS.prediction("wrist-0002")),
        (device, TOPICS.status("wrist-0002")),
        (dashboard, TOPICS.confirmation("wrist-0002")),
        (operator, TOPICS.trainer_command()),
    ):
        message = (topic, unique("shared"))
        publisher.publish(*message)
        expected.append(message)
    for message in expected:  # each arrives; order across publishers is not guaranteed
        assert message in trainer.until(*message)


def test_device_receives_its_confirmations_and_the_model(clients: Clients) -> None:
    trainer = clients.join("trainer")
    version = f"v{uuid.uuid4().hex[:8]}"
    manifest = codec.encode_manifest(
        ModelManifest(
            version=version,
            sha256="ab" * 32,
            size=256 * 1024,
            labels=("Sitting", "Walking"),
            input=InputSpec(window=80),
            metrics={"accuracy": 0.9},
            created=1_700_000_000.0,
            chunks=1,
            signature=b"\x01" * 64,
        )
    )
    # A full-size chunk (the default trainer chunk_bytes) must pass max_packet_size.
    chunk = codec.encode_model_chunk(
        ModelChunk(version=version, index=0, count=1, data=os.urandom(256 * 1024))
    )
    trainer.publish(TOPICS.model_manifest(), manifest, retain=True)
    trainer.publish(TOPICS.model_chunk(version, 0), chunk, retain=True)

    # The device subscribes after the model was released: the retained messages bring it, on
    # subscribing, before anything published later.
    device = clients.join(
        "wrist-0001",
        [
            f"{ROOT}/devices/+/confirmation",  # broader than allowed: the ACL filters delivery
            TOPICS.model_manifest(),
            TOPICS.model_chunks(version),
        ],
    )
    dashboard = clients.join("dashboard")
    confirmation = codec.encode_confirmation(
        Confirmation(prediction_id="p-1", label="Walking", source="user", ts=1_700_000_000.0)
    )
    other = (TOPICS.confirmation("wrist-0002"), confirmation + b" ")
    own = (TOPICS.confirmation("wrist-0001"), confirmation)
    dashboard.publish(*other)
    dashboard.publish(*own)

    seen = device.until(*own)
    assert other not in seen, "a device received another device's confirmation"
    assert (TOPICS.model_manifest(), manifest) in seen
    assert (TOPICS.model_chunk(version, 0), chunk) in seen
    assert codec.decode_confirmation(seen[-1][1]).label == "Walking"


def test_dashboard_sees_predictions_but_not_raw_sensor_data(clients: Clients) -> None:
    dashboard = clients.join("dashboard", [f"{ROOT}/devices/#"])
    device = clients.join("wrist-0002")
    sensor = (TOPICS.sensor("wrist-0002"), unique("raw"))
    prediction = (TOPICS.prediction("wrist-0002"), unique("prediction"))
    device.publish(*sensor)
    device.publish(*prediction)
    seen = dashboard.until(*prediction)
    assert sensor not in seen


def test_operator_commands_the_trainer_and_a_dashboard_cannot(
    clients: Clients,
) -> None:
    trainer = clients.join("trainer", [TOPICS.trainer_command()])
    dashboard = clients.join("dashboard")
    operator = clients.join("operator")
    from_dashboard = unique("dashboard-retrain")
    from_operator = unique("operator-retrain")
    dashboard.publish(TOPICS.trainer_command(), from_dashboard)
    # The dashboard's publish was acknowledged before this one is sent, so the broker routed
    # (or dropped) it first.
    operator.publish(TOPICS.trainer_command(), from_operator)
    seen = trainer.until(TOPICS.trainer_command(), from_operator)
    assert (TOPICS.trainer_command(), from_dashboard) not in seen


def test_forbidden_publish_gets_not_authorized_reason_code(shipped: ShippedMosquitto) -> None:
    """What docs/protocol.md tells firmware authors: MQTT 5 PUBACK 0x87 means "not your topic"."""
    acked: queue.Queue[tuple[int, int]] = queue.Queue()
    connected = threading.Event()
    client = paho.Client(
        callback_api_version=CallbackAPIVersion.VERSION2,
        client_id=f"raw-{uuid.uuid4().hex[:8]}",
        protocol=paho.MQTTv5,
    )
    client.username_pw_set("wrist-0001", PASSWORDS["wrist-0001"])

    def on_connect(*_: object) -> None:
        connected.set()

    def on_publish(
        _c: paho.Client, _u: object, mid: int, reason: ReasonCode, _p: Properties | None
    ) -> None:
        acked.put((mid, reason.value))

    client.on_connect = on_connect
    client.on_publish = on_publish
    client.connect(shipped.host, shipped.port)
    client.loop_start()
    try:
        assert connected.wait(WAIT_S)
        denied = client.publish(TOPICS.sensor("wrist-0002"), b"x", qos=1)
        allowed = client.publish(TOPICS.sensor("wrist-0001"), b"x", qos=1)
        codes = dict(acked.get(timeout=WAIT_S) for _ in range(2))
    finally:
        client.disconnect()
        client.loop_stop()
    assert codes[denied.mid] == 0x87
    # 0x10: accepted, nobody subscribed at the moment.
    assert codes[allowed.mid] in (0x00, 0x10)


def test_dashboard_reads_every_confirmation_its_relay_and_the_manifest(clients: Clients) -> None:
    """What a dashboard needs for the accuracy of confirmed predictions per model version, and
    to send an answer again until the device relayed it."""
    dashboard = clients.join(
        "dashboard",
        [TOPICS.all_confirmation(), TOPICS.all_confirmed(), TOPICS.model_manifest()],
    )
    trainer = clients.join("trainer")
    operator = clients.join("operator")
    wrist = clients.join("wrist-0001")
    manifest = (TOPICS.model_manifest(), unique("manifest"))
    trainer.publish(*manifest)  # not retained: the retained one of another test stays
    confirmations = [(TOPICS.confirmation(device), unique("confirmed")) for device in PASSWORDS]
    for message in confirmations[:2]:  # wrist-0001 and wrist-0002
        operator.publish(*message)
    relay = (TOPICS.confirmed("wrist-0001"), unique("relayed"))
    wrist.publish(*relay)
    for message in (manifest, *confirmations[:2], relay):
        assert message in dashboard.until(*message)


def test_device_publishes_home_assistant_discovery_under_its_own_id_only(
    clients: Clients,
) -> None:
    dashboard = clients.join("homeassistant", ["homeassistant/#"])
    operator = clients.join("operator", ["homeassistant/#"])
    device = clients.join("wrist-0001")
    forbidden = [
        ("homeassistant/sensor/wrist-0002/activity/config", unique("ha-other-device")),
        ("homeassistant/binary_sensor/wrist-0001/worn/config", unique("ha-other-component")),
        ("homeassistant/status", unique("ha-birth")),
    ]
    for message in forbidden:
        device.publish(*message)
    # What the agent publishes with agent.homeassistant_discovery on (not retained here, so
    # nothing is left on the module's broker).
    own = [
        (m.topic, m.payload)
        for m in homeassistant.discovery_messages(TOPICS, "wrist-0001", ("Walking", "Sitting"))
    ]
    assert len(own) == len(homeassistant.OBJECT_IDS), "sensors, select and button"
    for message in own:
        device.publish(*message)
    seen = dashboard.until(*own[-1])
    for message in own:
        assert message in seen, f"the device could not publish {message[0]}"
    for message in forbidden:
        assert message not in seen, f"the device published on {message[0]}"
    assert own[-1] in operator.until(*own[-1])


def test_home_assistant_controls_reach_the_device_with_home_assistants_login(
    clients: Clients,
) -> None:
    """The select and the button publish device commands, with Home Assistant's login."""
    device = clients.join("wrist-0001", [TOPICS.command("wrist-0001")])
    dashboard = clients.join("homeassistant")
    configs = homeassistant.discovery_configs(TOPICS, "wrist-0001", ("Walking", "Sitting"))
    sent = []
    for control in homeassistant.CONTROLS:
        message = (configs[control]["command_topic"], unique(f"ha-{control}"))
        dashboard.publish(*message)
        sent.append(message)
    seen = device.until(*sent[-1])
    assert all(message in seen for message in sent)


# ------------------------------------------------------------- one login per integration

# The messages an integration might read or write, by name: who publishes each in the read
# tests, and its topic.
DEVICE_1 = "wrist-0001"
MESSAGES = {
    "sensor": ("wrist-0001", TOPICS.sensor(DEVICE_1)),
    "prediction": ("wrist-0001", TOPICS.prediction(DEVICE_1)),
    "status": ("wrist-0001", TOPICS.status(DEVICE_1)),
    "error": ("wrist-0001", TOPICS.error(DEVICE_1)),
    "discovery": ("wrist-0001", f"homeassistant/sensor/{DEVICE_1}/activity/config"),
    "confirmation": ("operator", TOPICS.confirmation(DEVICE_1)),
    "command": ("operator", TOPICS.command(DEVICE_1)),
    "trainer_command": ("operator", TOPICS.trainer_command()),
    "manifest": ("trainer", TOPICS.model_manifest()),
    "birth": ("homeassistant", "homeassistant/status"),
}
# What each integration's login may read and write: exactly what its client needs, and the
# released model, which the ACL lets everyone read (it is signed).
RIGHTS = {
    "dashboard": (
        {"prediction", "status", "error", "confirmation", "manifest"},
        {"confirmation", "command"},
    ),
    "homeassistant": (
        {"prediction", "status", "discovery", "birth", "manifest"},
        {"command", "birth"},
    ),
    "nodered": ({"prediction", "status", "error", "manifest"}, {"confirmation"}),
    "watch": ({"prediction", "status", "error", "confirmation", "manifest"}, {"confirmation"}),
    "scripts": ({"manifest"}, {"confirmation", "command"}),
}


def test_every_login_is_in_the_acl_and_add_device_refuses_it() -> None:
    acl_users = re.findall(r"^user (\S+)$", SHIPPED_ACL.read_text(), re.MULTILINE)
    logins = shipped_logins()
    assert list(logins) == acl_users, f"{SHIPPED_LOGINS} and the ACL's users differ"
    assert set(RIGHTS) < set(logins)
    assert all(purpose for purpose in logins.values()), "every login says who uses it"


def test_the_clients_subscribe_to_what_their_login_may_read() -> None:
    """``har watch`` and ``har confirm`` ask for nothing their login's ACL block drops."""
    from dashboard.feed import subscriptions

    filters = {topic for topic, _ in subscriptions(TOPICS)}
    names = {
        name
        for name, (_, topic) in MESSAGES.items()
        if any(paho.topic_matches_sub(f, topic) for f in filters)
    }
    assert names == RIGHTS["watch"][0]


@pytest.mark.parametrize("login", sorted(RIGHTS))
def test_an_integrations_login_receives_exactly_what_it_needs(clients: Clients, login: str) -> None:
    reads, _ = RIGHTS[login]
    reader = clients.join(login, [f"{ROOT}/#", "homeassistant/#"])
    observer = clients.join("operator", [f"{ROOT}/#", "homeassistant/#"])
    publishers = {login: reader, "operator": observer}  # one connection per login
    sent = {}
    for name, (user, topic) in MESSAGES.items():
        if user not in publishers:
            publishers[user] = clients.join(user)
        message = (topic, unique(name))
        publishers[user].publish(*message)
        # Mosquitto routes a publish to every subscriber at once: once the operator has it, the
        # reader's copy (if any) is queued before whatever is published next.
        observer.until(*message)
        sent[name] = message
    control = (TOPICS.model_manifest(), unique("control"))
    publishers["trainer"].publish(*control)
    seen = set(reader.until(*control))
    assert {name for name, message in sent.items() if message in seen} == reads


@pytest.mark.parametrize("login", sorted(RIGHTS))
def test_an_integrations_login_publishes_exactly_what_it_needs(
    clients: Clients, login: str
) -> None:
    _, writes = RIGHTS[login]
    observer = clients.join("operator", [f"{ROOT}/#", "homeassistant/#"])
    writer = clients.join(login)
    sent = {}
    for name, (_, topic) in MESSAGES.items():
        sent[name] = (topic, unique(f"{login}-{name}"))
        writer.publish(*sent[name])
    # The broker handles one client's publishes in order: once the control arrived, every
    # message before it that the ACL let through has arrived too.
    control = sent[sorted(writes)[0]]
    writer.publish(control[0], control[1] + b"-control")
    seen = set(observer.until(control[0], control[1] + b"-control"))
    assert {name for name, message in sent.items() if message in seen} == writes


def test_a_client_kicked_off_by_another_on_its_login_says_so(shipped: ShippedMosquitto) -> None:
    """Two clients on one login take turns (the broker takes the client id from the login):
    the one that keeps being kicked off logs an error that names the login."""
    said = Said("another client logged in as 'watch' takes this connection's place")
    transport_log = logging.getLogger("shared.mqtt_transport")
    transport_log.addHandler(said)
    settings = dataclasses.replace(
        settings_for(shipped, "watch"), reconnect_min_s=0.01, reconnect_max_s=0.05
    )
    first = MqttConnection(settings, client_id="first", persistent_session=False)
    second = MqttConnection(settings, client_id="second", persistent_session=False)
    try:
        first.start()
        second.start()
        assert said.event.wait(30.0), "neither client said why it keeps being disconnected"
    finally:
        first.stop()
        second.stop()
        transport_log.removeHandler(said)
    assert said.records[0].levelno == logging.ERROR
    assert "deploy/mosquitto/logins" in said.records[0].getMessage()


class Said(logging.Handler):
    """Sets ``event`` when a log record's message contains ``words`` (from any thread)."""

    def __init__(self, words: str) -> None:
        super().__init__(logging.DEBUG)
        self.words = words
        self.event = threading.Event()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if self.words in record.getMessage():
            self.records.append(record)
            self.event.set()


def test_tls_client_with_the_ca_logs_in_and_the_acl_applies_there_too(clients: Clients) -> None:
    trainer = clients.join("trainer", [f"{ROOT}/#", "homeassistant/#"])  # on the plain listener
    device = clients.join("wrist-0001", tls=True)
    forbidden = [
        (TOPICS.sensor("wrist-0002"), unique("tls-forbidden")),
        (TOPICS.model_manifest(), unique("tls-forbidden")),
        (TOPICS.trainer_command(), unique("tls-forbidden")),
    ]
    for message in forbidden:
        device.publish(*message)
    allowed = (TOPICS.sensor("wrist-0001"), unique("tls-ok"))
    device.publish(*allowed)
    seen = trainer.until(*allowed)
    for message in forbidden:
        assert message not in seen, f"over TLS the device published on {message[0]}"


def test_a_device_cannot_take_over_another_devices_session(
    shipped: ShippedMosquitto, clients: Clients
) -> None:
    """Its own valid login with the victim's client id must neither end the victim's connection
    nor destroy the queued messages of its persistent session."""
    victim_id = "har-agent-wrist-0002"  # the client id the agent asks for
    victim_settings = settings_for(shipped, "wrist-0002")
    confirmations = [TOPICS.confirmation("wrist-0002")]
    online = clients.join_as(victim_settings, confirmations, client_id=victim_id, persistent=True)
    dashboard = clients.join("dashboard")
    attacker = settings_for(shipped, "wrist-0001")

    def attack() -> None:
        for client_id in (victim_id, "wrist-0002"):  # as asked for, and as the broker names it
            intruder, _ = connect(attacker, client_id=client_id)  # clean start
            intruder.stop()

    attack()
    first = (TOPICS.confirmation("wrist-0002"), unique("confirmed-online"))
    dashboard.publish(*first)
    online.until(*first)
    assert online.connection.connect_count == 1, "the victim was disconnected"

    # Offline, with a confirmation queued for it: the attack must not wipe the queue.
    online.connection.stop()
    queued = (TOPICS.confirmation("wrist-0002"), unique("confirmed-offline"))
    dashboard.publish(*queued)
    attack()
    back = clients.join_as(victim_settings, confirmations, client_id=victim_id, persistent=True)
    assert queued in back.until(*queued)


def non_loopback_ipv4() -> str | None:
    """An IPv4 address of this machine outside 127.0.0.0/8, or None."""
    try:
        output = subprocess.run(
            ["ip", "-4", "-o", "addr", "show", "scope", "global"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
        found = re.findall(r"\binet (\d+\.\d+\.\d+\.\d+)/", output)
    except (OSError, subprocess.SubprocessError):
        found = []
    with contextlib.suppress(OSError):
        found.append(socket.gethostbyname(socket.gethostname()))
    return next((address for address in found if not address.startswith("127.")), None)


def test_plain_mqtt_listens_on_loopback_only_and_tls_everywhere(tmp_path: Path) -> None:
    address = non_loopback_ipv4()
    if address is None:
        pytest.skip("this machine has no non-loopback IPv4 address to try the plain port on")
    # Bound as shipped: plain on 127.0.0.1, TLS on every interface (this one test binds beyond
    # loopback, to show what a host on the network would reach).
    broker = ShippedMosquitto(tmp_path, SHIPPED_CONF, PASSWORDS, SHIPPED_ACL, bind_as_shipped=True)
    broker.start()
    try:
        assert accepts_connections(LOOPBACK, broker.port)
        assert not accepts_connections(address, broker.port, timeout=2.0), (
            f"the plain listener accepts connections on {address}"
        )
        # The positive control: the address is reachable, and TLS answers there.
        trusting = ssl.create_default_context(cafile=broker.ca_file)
        with (
            socket.create_connection((address, broker.tls_port), timeout=WAIT_S) as raw,
            trusting.wrap_socket(raw, server_hostname="localhost") as tls,
        ):
            assert tls.version() in ("TLSv1.2", "TLSv1.3")
    finally:
        broker.stop()


def raw_session(broker: MosquittoProcess, user: str) -> tuple[paho.Client, bool, queue.Queue]:
    """``user``'s persistent session, resumed as it is, subscribing to nothing: a bare paho
    client, so the session-present flag and the broker's own subscriptions show."""
    connacks: queue.Queue[bool] = queue.Queue()
    messages: queue.Queue[tuple[str, bytes]] = queue.Queue()
    client = paho.Client(
        callback_api_version=CallbackAPIVersion.VERSION2, client_id=user, protocol=paho.MQTTv5
    )
    client.username_pw_set(user, PASSWORDS[user])
    client.on_connect = lambda _c, _u, flags, reason, _p: connacks.put(
        not reason.is_failure and bool(flags.session_present)
    )
    client.on_message = lambda _c, _u, message: messages.put((message.topic, message.payload))
    properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    properties.SessionExpiryInterval = 3600
    client.connect(broker.host, broker.port, clean_start=False, properties=properties)
    client.loop_start()
    return client, connacks.get(timeout=WAIT_S), messages


def test_a_session_and_retained_messages_survive_kill_9(tmp_path: Path) -> None:
    """A broker killed with SIGKILL one autosave interval after a change still has it."""
    interval = int(conf_options(SHIPPED_CONF)["autosave_interval"][0])
    (tmp_path / "broker").mkdir()
    broker = ShippedMosquitto(tmp_path / "broker", SHIPPED_CONF, PASSWORDS, SHIPPED_ACL)
    broker.start()
    opened = Clients(broker)
    try:
        # The trainer's persistent session and its subscription, then it goes offline.
        trainer = opened.join("trainer", [TOPICS.all_sensor()], persistent=True)
        trainer.connection.stop()
        device = opened.join("wrist-0001")
        status = (TOPICS.status("wrist-0001"), unique("status"))
        device.publish(*status, retain=True)
        # Wait, with a deadline, for the next save: mosquitto writes a new file and renames it.
        database = tmp_path / "broker" / "mosquitto.db"
        before = database.stat().st_ino if database.exists() else None
        deadline = time.monotonic() + interval + 3
        while not database.exists() or database.stat().st_ino == before:
            assert time.monotonic() < deadline, f"no save within {interval} s + 3 s"
            time.sleep(0.05)
        broker.kill()
        broker.start()

        client, session_present, messages = raw_session(broker, "trainer")
        try:
            assert session_present, "the trainer's session did not survive"
            fresh = (TOPICS.sensor("wrist-0001"), unique("after-restart"))
            opened.join("wrist-0001").publish(*fresh)
            assert messages.get(timeout=WAIT_S) == fresh, "its subscription did not survive"
        finally:
            client.disconnect()
            client.loop_stop()
        operator = opened.join("operator", [TOPICS.status("wrist-0001")])
        assert operator.until(*status) == [status], "the retained status did not survive"
    finally:
        opened.close()
        broker.stop()


def test_production_broker_refuses_to_start_without_its_tls_files(tmp_path: Path) -> None:
    broker = ShippedMosquitto(tmp_path, SHIPPED_CONF, PASSWORDS, SHIPPED_ACL)
    shutil.rmtree(broker.certs_dir)
    try:
        with pytest.raises(BrokerError, match="Unable to load CA certificates"):
            broker.start()
        assert not broker.running
    finally:
        broker.stop()  # closes the pipe of the process that exited


@pytest.mark.parametrize("trusted", ["another CA", "the system CA store"])
def test_tls_client_that_does_not_trust_the_ca_is_refused(
    shipped: ShippedMosquitto, tmp_path: Path, trusted: str
) -> None:
    ca_file = make_certs(tmp_path, LOOPBACK) / "ca.crt" if trusted == "another CA" else None
    # What paho's tls_set (MqttConnection) sets up: verify the chain and the host name against
    # ca_file, or against the system's CAs without one. (A plain socket here, because paho leaves
    # the socket of a failed handshake to the garbage collector.)
    context = ssl.create_default_context(cafile=ca_file)
    with (
        socket.create_connection((shipped.host, shipped.tls_port), timeout=WAIT_S) as raw,
        pytest.raises(ssl.SSLCertVerificationError, match="certificate verify failed"),
    ):
        context.wrap_socket(raw, server_hostname=shipped.host)
    # The positive control: the broker's own CA is accepted on the same port.
    trusting = ssl.create_default_context(cafile=shipped.ca_file)
    with (
        socket.create_connection((shipped.host, shipped.tls_port), timeout=WAIT_S) as raw,
        trusting.wrap_socket(raw, server_hostname=shipped.host) as tls,
    ):
        assert tls.version() in ("TLSv1.2", "TLSv1.3")


# ------------------------------------------------------------------------------ compose healthcheck


def compose_healthcheck_command() -> str:
    """The mosquitto healthcheck of docker-compose.yml, as the container's shell will see it."""
    text = COMPOSE.read_text()
    match = re.search(r'- "CMD-SHELL"\n\s*- >-\n((?:\s{10}.*\n)+)', text)
    assert match, "healthcheck block not found in docker-compose.yml"
    folded = " ".join(line.strip() for line in match.group(1).splitlines())
    return folded.replace("$$", "$")  # compose's escape for a literal $


def run_healthcheck(port: int, user: str = "", password: str = "") -> int:
    command = compose_healthcheck_command().replace("-p 1883", f"-p {port}")
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HEALTHCHECK_USER": user}
    env["HEALTHCHECK_PASSWORD"] = password
    result = subprocess.run(["/bin/sh", "-c", command], env=env, timeout=20, check=False)
    return result.returncode


def test_compose_defaults_match_the_test_harness() -> None:
    text = COMPOSE.read_text()
    # tests/conftest.py: service "mosquitto", container port 1883 on an ephemeral loopback port.
    assert "\n  mosquitto:\n" in text
    assert '"${HAR_MOSQUITTO_BIND:-127.0.0.1}:${HAR_MOSQUITTO_PORT:-}:1883"' in text
    assert "${HAR_MOSQUITTO_CONF:-./mosquitto/test.conf}" in text
    for relative in re.findall(r"\./mosquitto/[\w.]+", text):
        assert (DEPLOY / relative).exists(), f"docker-compose.yml mounts missing {relative}"


def test_compose_healthcheck_works_with_test_and_production_configs(
    shipped: ShippedMosquitto, tmp_path: Path
) -> None:
    test_broker = ShippedMosquitto(tmp_path, TEST_CONF)
    test_broker.start()
    try:
        assert accepts_connections(test_broker.host, test_broker.port)
        assert run_healthcheck(test_broker.port) == 0, test_broker.log_text()
    finally:
        test_broker.stop()
    assert run_healthcheck(shipped.port, "healthcheck", PASSWORDS["healthcheck"]) == 0
    # Anonymous against the production config must fail: the check is real, not "port open".
    assert run_healthcheck(shipped.port) != 0


# ------------------------------------------------------------------------------ images and services

AGENT_DOCKERFILE = DEPLOY / "agent.Dockerfile"
TRAINER_DOCKERFILE = DEPLOY / "trainer.Dockerfile"


def compose_services() -> dict[str, str]:
    """Each service's block of docker-compose.yml by name (the file's own two-space layout)."""
    text = COMPOSE.read_text()
    services = text.split("\nservices:\n", 1)[1].split("\nvolumes:\n", 1)[0]
    blocks = re.split(r"^  (?=[a-z][\w-]*:\n)", services, flags=re.MULTILINE)
    return {block.split(":", 1)[0]: block for block in blocks if block.strip()}


def compose_value(block: str, key: str) -> str:
    match = re.search(rf"^\s+{key}: (.+)$", block, flags=re.MULTILINE)
    assert match, f"no {key} in {block!r}"
    return match.group(1).strip()


def dockerfile_cmd(path: Path) -> list[str]:
    match = re.search(r"^CMD (\[.*\])$", path.read_text(), flags=re.MULTILINE)
    assert match, f"no exec-form CMD in {path.name}"
    command: list[str] = json.loads(match.group(1))
    return command


def har_subcommands() -> set[str]:
    from har.cli import build_parser

    parser = build_parser()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return set(action.choices)
    raise AssertionError("har has no subcommands")


def test_compose_builds_each_service_from_an_existing_dockerfile_and_dockerignore() -> None:
    services = compose_services()
    assert set(services) == {"mosquitto", "trainer", "trainer-2", "postgres", "sim"}
    built = {
        name: compose_value(block, "dockerfile")
        for name, block in services.items()
        if "dockerfile:" in block
    }
    assert built == {"trainer": "deploy/trainer.Dockerfile", "sim": "deploy/agent.Dockerfile"}
    packages = read_toml(REPO / "pyproject.toml")["tool"]["setuptools"]["packages"]["find"]
    for dockerfile in built.values():
        assert (REPO / dockerfile).is_file()
        # BuildKit reads <dockerfile>.dockerignore; it must let every package in, because `har`
        # imports each package's subcommands.
        ignore = (REPO / f"{dockerfile}.dockerignore").read_text().splitlines()
        assert ignore[ignore.index("*") :].count("*") == 1, "everything is excluded first"
        for package in packages["include"]:
            assert f"!{package.rstrip('*')}/" in ignore, f"{dockerfile} image lacks {package}"


def test_images_install_their_extra_and_run_their_role_by_default() -> None:
    agent_image = AGENT_DOCKERFILE.read_text()
    # One recipe, two images: the agent extra by default, agent-lite with a build argument.
    assert "\nARG AGENT_EXTRA=agent\n" in agent_image
    assert 'pip install "/src[${AGENT_EXTRA}]"' in agent_image
    assert "--build-arg AGENT_EXTRA=agent-lite" in agent_image
    extras = read_toml(REPO / "pyproject.toml")["project"]["optional-dependencies"]
    assert not any(r.startswith("tensorflow") for r in extras["agent-lite"])
    assert "pip install '/src[trainer,postgres]'" in TRAINER_DOCKERFILE.read_text()
    assert dockerfile_cmd(AGENT_DOCKERFILE) == ["har", "agent", "--config", "/etc/har/agent.toml"]
    assert dockerfile_cmd(TRAINER_DOCKERFILE) == [
        *["har", "trainer", "serve", "--config", "/etc/har/trainer.toml"]
    ]
    # The device's systemd unit runs the same command as the agent image.
    unit = (DEPLOY / "systemd" / "har-agent.service").read_text()
    exec_start = re.search(r"^ExecStart=(\S+) (.*)$", unit, flags=re.MULTILINE)
    assert exec_start
    assert exec_start.group(1).endswith("/bin/har")
    assert exec_start.group(2).split() == dockerfile_cmd(AGENT_DOCKERFILE)[1:]


def test_compose_sim_service_runs_n_simulated_devices_after_a_healthy_broker() -> None:
    sim = compose_services()["sim"]
    assert json.loads(compose_value(sim, "command")) == [
        *["har", "sim", "--config", "/etc/har/sim.toml"]
    ]
    # The device count: HAR_SIM_DEVICES, 3 by default, as the `devices` override of sim.toml.
    assert compose_value(sim, "HAR_DEVICES") == '"${HAR_SIM_DEVICES:-3}"'
    assert compose_value(sim, "HAR_BROKER_HOST") == "mosquitto"
    assert re.search(r"depends_on:\n\s+mosquitto:\n\s+condition: service_healthy\n", sim)
    # A plain `docker compose up` starts no simulated devices next to real ones.
    assert compose_value(sim, "profiles") == '["sim"]'
    assert '"${HAR_ETC:-/etc/har}:/etc/har:ro"' in sim


def test_compose_and_image_commands_parse_with_the_har_cli() -> None:
    from har.cli import build_parser

    commands = [dockerfile_cmd(AGENT_DOCKERFILE), dockerfile_cmd(TRAINER_DOCKERFILE)]
    for block in compose_services().values():
        if "command:" in block:
            commands.append(json.loads(compose_value(block, "command")))
    known = har_subcommands()
    for command in commands:
        assert command[0] == "har"
        if command[1] == "sim" and "sim" not in known:
            continue  # `har sim` is being written: its parser is checked once it is registered
        args = build_parser().parse_args(command[1:])
        assert args.config == Path(command[-1]), command


def test_compose_publishes_the_tls_listener_and_mounts_its_certificates() -> None:
    broker = compose_services()["mosquitto"]
    assert '"${HAR_MOSQUITTO_TLS_BIND:-127.0.0.1}:${HAR_MOSQUITTO_TLS_PORT:-}:8883"' in broker
    mount = re.search(r'"\$\{HAR_MOSQUITTO_CERTS:-([^}]+)\}:([^:]+):ro"', broker)
    assert mount, "no certificates mount"
    assert mount.group(2) == CONTAINER_CERTS.rstrip("/")
    assert (DEPLOY / mount.group(1)).is_dir()


def test_sim_example_config_loads_with_the_sim_settings() -> None:
    module = pytest.importorskip("simulator.settings", reason="har sim settings not merged")
    example = DEPLOY / "sim.example.toml"
    settings = load_settings(module.SimSettings, config_file=example)
    assert settings.devices == 3, "the same default as HAR_SIM_DEVICES in docker-compose.yml"
    assert settings.device_prefix == "sim-"
    assert settings.broker.topic_root == ROOT
    assert settings.public_key == Path("/etc/har/model-signing.pub")
    # The agent image's only writable place (the sim-data volume).
    assert settings.state_dir.is_relative_to("/var/lib/har")
    # What docker-compose.yml does: the environment overrides the file.
    env = {"HAR_DEVICES": "7", "HAR_BROKER_HOST": "mosquitto"}
    overridden = load_settings(module.SimSettings, config_file=example, environ=env)
    assert overridden.devices == 7
    assert overridden.broker.host == "mosquitto"


def test_compose_containers_reach_the_production_broker_over_tls() -> None:
    """The production config answers plain MQTT on the broker's own loopback only, so the
    containers' broker settings follow HAR_BROKER_CONTAINER_*: plain by default (test.conf),
    TLS to "mosquitto" in production."""
    module = pytest.importorskip("trainer_service.settings", reason="trainer settings not merged")
    for name in ("trainer", "sim"):
        block = compose_services()[name]
        assert compose_value(block, "HAR_BROKER_PORT") == '"${HAR_BROKER_CONTAINER_PORT:-1883}"'
        assert compose_value(block, "HAR_BROKER_TLS") == '"${HAR_BROKER_CONTAINER_TLS:-false}"'
        assert compose_value(block, "HAR_BROKER_CA_FILE") == '"${HAR_BROKER_CONTAINER_CA:-}"'
    example = DEPLOY / "trainer.example.toml"
    defaults = {"HAR_BROKER_PORT": "1883", "HAR_BROKER_TLS": "false", "HAR_BROKER_CA_FILE": ""}
    plain = load_settings(module.TrainerSettings, config_file=example, environ=defaults)
    assert (plain.broker.port, plain.broker.tls, plain.broker.ca_file) == (1883, False, None)
    production = {
        "HAR_BROKER_PORT": "8883",
        "HAR_BROKER_TLS": "true",
        "HAR_BROKER_CA_FILE": "/etc/har/ca.crt",
    }
    tls = load_settings(module.TrainerSettings, config_file=example, environ=production)
    assert (tls.broker.port, tls.broker.tls) == (8883, True)
    assert tls.broker.ca_file == Path("/etc/har/ca.crt")


def test_light_agent_drop_in_overrides_the_unit_with_room_above_its_measured_peak() -> None:
    drop_in = (DEPLOY / "systemd" / "har-agent.service.d" / "lite.conf").read_text()
    unit = (DEPLOY / "systemd" / "har-agent.service").read_text()
    assert re.search(r"^\[Service\]$", drop_in, flags=re.MULTILINE)
    settings = dict(re.findall(r"^(\w+)=(.*)$", drop_in, flags=re.MULTILINE))
    assert settings, "the drop-in sets nothing"
    for key in settings:  # it adjusts the unit's own settings, it adds none
        assert re.search(rf"^{key}=", unit, flags=re.MULTILINE), key

    def megabytes(value: str) -> float:
        number, unit_letter = float(value[:-1]), value[-1]
        return number * {"M": 1, "G": 1024}[unit_letter]

    evidence = json.loads((REPO / "docs" / "evidence" / "agent.json").read_text())
    peak = evidence["runs"]["litert"]["rss_mb"]["peak"]
    assert peak * 1.4 < megabytes(settings["MemoryHigh"]) < megabytes(settings["MemoryMax"])
