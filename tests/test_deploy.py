"""The shipped deployment files, checked against the real Mosquitto binary.

The production broker config (deploy/mosquitto/mosquitto.conf) runs with only its absolute paths
and its listener rewritten for the test, and the ACL file exactly as shipped. Users are created
with mosquitto_passwd. Each ACL test proves a denial with a positive control: the forbidden
message is sent first and an allowed one after it on the same connection, so once the control
arrives the forbidden one would already have arrived (the broker delivers one publisher's
messages in order). No sleeps.
"""

from __future__ import annotations

import os
import queue
import re
import shutil
import subprocess
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from shared import codec
from shared.config import BrokerSettings, load_settings
from shared.messages import Confirmation, InputSpec, ModelChunk, ModelManifest
from shared.mqtt_transport import InboundMessage, MqttConnection, Outbound
from shared.topics import Topics
from tests.mosquitto import LOOPBACK, MosquittoProcess, accepts_connections, find_mosquitto
from tests.mqtt_helpers import connect, receive

pytestmark = pytest.mark.broker

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
SHIPPED_CONF = DEPLOY / "mosquitto" / "mosquitto.conf"
SHIPPED_ACL = DEPLOY / "mosquitto" / "acl"
TEST_CONF = DEPLOY / "mosquitto" / "test.conf"
COMPOSE = DEPLOY / "docker-compose.yml"

# The ACL names the topic root literally.
ROOT = "har/v1"
TOPICS = Topics(ROOT)
PASSWORDS = {
    "wrist-0001": "pw-wrist-1",
    "wrist-0002": "pw-wrist-2",
    "trainer": "pw-trainer",
    "dashboard": "pw-dashboard",
    "operator": "pw-operator",
    "healthcheck": "pw-health",
}
WAIT_S = 10.0


def _passwd_binary() -> str:
    found = shutil.which("mosquitto_passwd")
    if found:
        return found
    return "/usr/bin/mosquitto_passwd"


def adapt_config(text: str, *, port: int, workdir: Path, acl_file: Path | None) -> str:
    """The shipped config with its listener, absolute paths and log destination made local.

    Only those lines change; everything else (limits, persistence, anonymous access) runs as
    shipped. Any other absolute path fails the test, so a new one cannot slip by untested.
    """
    replaced: set[str] = set()
    lines = []
    for line in text.splitlines():
        option = line.split(maxsplit=1)[0] if line.strip() and not line.startswith("#") else ""
        local = {
            "listener": f"listener {port} {LOOPBACK}",
            "password_file": f"password_file {workdir / 'passwd'}",
            "acl_file": f"acl_file {acl_file}",
            "persistence_location": f"persistence_location {workdir}/",
            "log_dest": f"log_dest file {workdir / 'mosquitto.log'}",
        }
        if option in local:
            if option == "listener":
                assert line.strip() == "listener 1883", f"unexpected listener line {line!r}"
            assert option != "acl_file" or acl_file is not None
            lines.append(local[option])
            replaced.add(option)
        else:
            assert not (option and "/" in line), f"config line with a path not adapted: {line!r}"
            lines.append(line)
    assert {"listener", "persistence_location", "log_dest"} <= replaced
    if os.geteuid() == 0:
        # As root, mosquitto drops to user "mosquitto", which cannot read our temp files.
        lines.append("user root")
    return "\n".join(lines) + "\n"


class ShippedMosquitto(MosquittoProcess):
    """A mosquitto process running one of the shipped config files, adapted by ``adapt_config``."""

    def __init__(
        self,
        workdir: Path,
        config: Path,
        passwords: dict[str, str] | None = None,
        acl_file: Path | None = None,
    ) -> None:
        self._shipped = config
        self._passwords = passwords or {}
        self._acl_file = acl_file
        super().__init__(workdir)

    def _write_config(self) -> None:
        password_file = self.workdir / "passwd"
        password_file.write_text("")
        for user, password in self._passwords.items():
            subprocess.run(
                [_passwd_binary(), "-b", str(password_file), user, password],
                check=True,
                capture_output=True,
            )
        self.config_path.write_text(
            adapt_config(
                self._shipped.read_text(),
                port=self.port,
                workdir=self.workdir,
                acl_file=self._acl_file,
            )
        )


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


def settings_for(broker: MosquittoProcess, user: str | None) -> BrokerSettings:
    return BrokerSettings(
        host=broker.host,
        port=broker.port,
        topic_root=ROOT,
        username=user or "",
        password=PASSWORDS.get(user or "", ""),
        keepalive_s=5,
        reconnect_min_s=0.05,
        reconnect_max_s=0.5,
    )


@dataclass
class Client:
    connection: MqttConnection
    inbox: queue.Queue[InboundMessage]
    seen: list[tuple[str, bytes]] = field(default_factory=list)

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        handle = self.connection.publish(Outbound(topic, payload, qos=1, retain=retain))
        assert handle.wait(WAIT_S), f"no PUBACK for {topic}"

    def until(self, topic: str, payload: bytes) -> list[tuple[str, bytes]]:
        """Every message received so far, once (topic, payload) is among them."""
        while (topic, payload) not in self.seen:
            try:
                message = receive(self.inbox, timeout=WAIT_S)
            except queue.Empty:
                raise AssertionError(
                    f"{payload!r} never arrived on {topic}; got {self.seen}"
                ) from None
            self.seen.append((message.topic, message.payload))
        return list(self.seen)


class Clients:
    """Connected clients of one test, by user: subscribe first (``join``), then publish."""

    def __init__(self, broker: MosquittoProcess) -> None:
        self._broker = broker
        self._opened: list[MqttConnection] = []

    def join(
        self, user: str, subscriptions: list[str] | None = None, *, persistent: bool = False
    ) -> Client:
        connection, inbox = connect(
            settings_for(self._broker, user),
            [(topic, 1) for topic in subscriptions or []],
            client_id=f"{user}-{uuid.uuid4().hex[:8]}",
            persistent=persistent,
        )
        self._opened.append(connection)
        return Client(connection, inbox)

    def close(self) -> None:
        for connection in self._opened:
            connection.stop()


@pytest.fixture
def clients(shipped: ShippedMosquitto) -> Iterator[Clients]:
    opened = Clients(shipped)
    yield opened
    opened.close()


def unique(prefix: str) -> bytes:
    return f"{prefix}-{uuid.uuid4().hex[:8]}".encode()


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
    assert "password_file" in options
    assert "acl_file" in options
    assert int(options["max_queued_messages"][0]) >= 100_000
    assert int(options["max_queued_bytes"][0]) > 0
    assert options["persistent_client_expiration"] == ["14d"]
    assert options["log_dest"] == ["stdout"]
    # Model chunks (256 KiB of data by default) and the decoders' JSON / batch limits must fit.
    assert int(options["max_packet_size"][0]) >= 256 * 1024 + 4096
    assert int(options["max_packet_size"][0]) >= codec.DEFAULT_LIMITS.max_batch_bytes


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
    ]
    forbidden = [
        TOPICS.sensor("wrist-0002"),
        TOPICS.prediction("wrist-0002"),
        TOPICS.status("wrist-0002"),
        TOPICS.confirmation("wrist-0001"),  # only people (dashboard) confirm
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
        assert (DEPLOY / relative).is_file(), f"docker-compose.yml mounts missing {relative}"


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
