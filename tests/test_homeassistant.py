"""Home Assistant discovery: the configs (pure), their templates against real messages, the
agent option against a real broker."""

from __future__ import annotations

import dataclasses
import json
import re
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from device_agent.agent import DeviceAgent
from device_agent.sensors import open_sensor
from device_agent.settings import AgentSettings, AgentTuning
from shared import codec, homeassistant
from shared.config import BrokerSettings, load_settings
from shared.errors import ConfigError
from shared.messages import DeviceStatus, Prediction, WindowRef
from shared.mqtt_transport import InboundMessage, Outbound
from shared.topics import Topics
from tests.model_helpers import LABELS
from tests.mosquitto import MosquittoProcess
from tests.mqtt_helpers import connect, receive
from tests.release_helpers import Releases, make_releases
from tests.test_agent import DEVICE, WAIT, Watcher, agent_settings, publish_release

ROOT = "har/v1"
# Home Assistant's discovery.py TOPIC_MATCHER, anchored, after the discovery prefix.
HA_TOPIC_MATCHER = re.compile(
    r"(?P<component>\w+)/(?:(?P<node_id>[a-zA-Z0-9_-]+)/)?(?P<object_id>[a-zA-Z0-9_-]+)/config"
)
TEMPLATE_FIELD = re.compile(r"value_json((?:\.\w+)+)")


# ------------------------------------------------------------------------- real messages


def sample_messages(device_id: str = "wrist-0001") -> dict[str, list[bytes]]:
    """Payloads our codec really writes, by the last topic level they are published on."""
    prediction = Prediction(
        prediction_id="9b1f0c2e4d6a48b7a3e5f1c2d3b4a596",
        device_id=device_id,
        window=WindowRef(batch_seq=41, offset=15, length=80),
        label="Walking",
        class_index=5,
        probabilities=(0.011, 0.062, 0.004, 0.009, 0.012, 0.902),
        model_version="v0007",
        ts=1763769612.25,
    )
    replayed = dataclasses.replace(prediction, truth="Jogging")
    online = DeviceStatus(device_id, "online", "v0007", 1763769600.0, {"predictions": 758})
    offline = DeviceStatus(device_id, "offline", None, 1763769000.0)
    return {
        "prediction": [codec.encode_prediction(prediction), codec.encode_prediction(replayed)],
        "status": [codec.encode_status(online), codec.encode_status(offline)],
    }


def template_fields(template: str) -> list[tuple[str, ...]]:
    """The field paths a Home Assistant template reads from ``value_json``."""
    paths = [
        tuple(match.group(1).strip(".").split(".")) for match in TEMPLATE_FIELD.finditer(template)
    ]
    assert paths, f"template {template!r} reads no value_json field"
    return paths


def resolve(doc: Any, path: tuple[str, ...]) -> Any:
    """``value_json.a.b`` evaluated on a decoded message; fails if a field is missing."""
    for key in path:
        assert isinstance(doc, dict), f"{'.'.join(path)}: {key!r} of a non-object"
        assert key in doc, f"{'.'.join(path)}: no field {key!r}"
        doc = doc[key]
    return doc


def templates_of(config: dict[str, Any]) -> list[tuple[str, str]]:
    """(topic, template) of every template in a discovery config."""
    found = [(config["state_topic"], config["value_template"])]
    found += [(entry["topic"], entry["value_template"]) for entry in config["availability"]]
    return found


# ------------------------------------------------------------------------- configs (pure)


def configs_by_topic(prefix: str = homeassistant.DEFAULT_PREFIX) -> dict[str, dict[str, Any]]:
    messages = homeassistant.discovery_messages(Topics(ROOT), "wrist-0001", prefix=prefix)
    return {message.topic: json.loads(message.payload) for message in messages}


def test_discovery_messages_are_retained_qos1_json_on_home_assistant_topics() -> None:
    messages = homeassistant.discovery_messages(Topics(ROOT), "wrist-0001")
    assert len(messages) == len(homeassistant.OBJECT_IDS) == 3
    for message in messages:
        assert message.retain
        assert message.qos == 1
        assert message.content_type == codec.CONTENT_TYPE_JSON
        assert isinstance(json.loads(message.payload.decode("utf-8")), dict)
        prefix, rest = message.topic.split("/", 1)
        assert prefix == "homeassistant"
        match = HA_TOPIC_MATCHER.fullmatch(rest)
        assert match is not None, f"{message.topic} is not a discovery topic Home Assistant reads"
        assert match["component"] == "sensor"
        assert match["node_id"] == "wrist-0001"  # the ACL: pattern write homeassistant/sensor/%u/#
        assert match["object_id"] in homeassistant.OBJECT_IDS


def test_configs_name_the_devices_topics_and_identify_it() -> None:
    topics = Topics(ROOT)
    configs = configs_by_topic()
    assert sorted(configs) == [
        "homeassistant/sensor/wrist-0001/activity/config",
        "homeassistant/sensor/wrist-0001/confidence/config",
        "homeassistant/sensor/wrist-0001/model/config",
    ]
    unique_ids = [config["unique_id"] for config in configs.values()]
    assert len(set(unique_ids)) == len(unique_ids)
    for config in configs.values():
        assert config["name"]
        assert config["qos"] == 1
        assert config["state_topic"] in (
            topics.prediction("wrist-0001"),
            topics.status("wrist-0001"),
        )
        assert config["device"]["identifiers"] == ["har_wrist-0001"]
        assert config["device"]["name"] == "wrist-0001"
        assert config["origin"]["name"] == homeassistant.ORIGIN_NAME
        (availability,) = config["availability"]
        assert availability["topic"] == topics.status("wrist-0001")
    activity = configs["homeassistant/sensor/wrist-0001/activity/config"]
    assert activity["json_attributes_topic"] == topics.prediction("wrist-0001")
    assert (
        configs["homeassistant/sensor/wrist-0001/confidence/config"]["unit_of_measurement"] == "%"
    )


def test_every_template_reads_fields_the_real_messages_have() -> None:
    topics = Topics(ROOT)
    kinds = {topics.prediction("wrist-0001"): "prediction", topics.status("wrist-0001"): "status"}
    samples = sample_messages()
    checked = 0
    for config in configs_by_topic().values():
        for topic, template in templates_of(config):
            for payload in samples[kinds[topic]]:
                for path in template_fields(template):
                    resolve(json.loads(payload), path)
                    checked += 1
    assert checked == 12  # 3 state and 3 availability templates, 2 real messages each


def test_availability_template_reads_the_states_home_assistant_expects() -> None:
    (availability,) = configs_by_topic()["homeassistant/sensor/wrist-0001/activity/config"][
        "availability"
    ]
    (path,) = template_fields(availability["value_template"])
    online, offline = (json.loads(p) for p in sample_messages()["status"])
    assert resolve(online, path) == availability["payload_available"] == "online"
    assert resolve(offline, path) == availability["payload_not_available"] == "offline"


def test_templates_render_with_jinja2_as_home_assistant_does() -> None:
    # Jinja2 is Home Assistant's template engine; it runs here when it is installed.
    jinja2_sandbox = pytest.importorskip("jinja2.sandbox")
    environment = jinja2_sandbox.ImmutableSandboxedEnvironment()
    configs = {topic.split("/")[-2]: config for topic, config in configs_by_topic().items()}
    prediction, replayed = sample_messages()["prediction"]
    online, offline = sample_messages()["status"]

    def render(template: str, payload: bytes) -> str:
        value = payload.decode("utf-8")
        return str(
            environment.from_string(template).render(value=value, value_json=json.loads(value))
        )

    assert render(configs["activity"]["value_template"], prediction) == "Walking"
    assert render(configs["activity"]["value_template"], replayed) == "Walking"
    assert render(configs["confidence"]["value_template"], prediction) == "90.2"
    assert render(configs["model"]["value_template"], online) == "v0007"
    # Home Assistant's MQTT sensor treats the text "None" as unknown: no model installed yet.
    assert render(configs["model"]["value_template"], offline) == "None"
    availability = configs["activity"]["availability"][0]["value_template"]
    assert [render(availability, p) for p in (online, offline)] == ["online", "offline"]


def test_removal_messages_empty_the_same_topics() -> None:
    removals = homeassistant.removal_messages("wrist-0001")
    assert sorted(m.topic for m in removals) == sorted(configs_by_topic())
    assert all(m.payload == b"" and m.retain and m.qos == 1 for m in removals)


def test_a_custom_prefix_is_the_first_levels() -> None:
    assert sorted(configs_by_topic("site/ha")) == sorted(
        "site/ha/" + topic.split("/", 1)[1] for topic in configs_by_topic()
    )


@pytest.mark.parametrize("prefix", ["", "/ha", "ha/", "a//b", "ha/+", "ha/#", "h\0a"])
def test_bad_prefixes_are_refused(prefix: str) -> None:
    with pytest.raises(ValueError, match="discovery prefix"):
        homeassistant.discovery_messages(Topics(ROOT), "wrist-0001", prefix=prefix)


def test_a_dotted_device_id_is_refused_with_the_reason() -> None:
    with pytest.raises(ValueError, match=r"no '\.'"):
        homeassistant.discovery_messages(Topics(ROOT), "wrist.0001")
    with pytest.raises(ValueError, match="invalid device id"):
        homeassistant.removal_messages("wrist/0001")


@given(st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}", fullmatch=True))
def test_any_device_id_is_discoverable_unless_it_has_a_dot(device_id: str) -> None:
    if "." in device_id:
        with pytest.raises(ValueError, match="Home Assistant"):
            homeassistant.discovery_messages(Topics(ROOT), device_id)
        return
    for message in homeassistant.discovery_messages(Topics(ROOT), device_id):
        match = HA_TOPIC_MATCHER.fullmatch(message.topic.split("/", 1)[1])
        assert match is not None
        assert match["node_id"] == device_id
        assert json.loads(message.payload)["device"]["name"] == device_id


# ------------------------------------------------------------------------- agent settings


def test_settings_refuse_discovery_for_a_dotted_device_id(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"homeassistant_discovery: .*no '\.'"):
        AgentSettings(device_id="wrist.1", agent=AgentTuning(homeassistant_discovery=True))
    assert not AgentSettings(device_id="wrist.1").agent.homeassistant_discovery  # off: allowed


def test_settings_refuse_a_bad_prefix() -> None:
    with pytest.raises(ConfigError, match=r"agent\.homeassistant_prefix"):
        AgentTuning(homeassistant_prefix="ha/#")


def test_settings_load_from_toml_and_environment(tmp_path: Path) -> None:
    config = tmp_path / "agent.toml"
    config.write_text('device_id = "wrist-1"\n[agent]\nhomeassistant_discovery = true\n')
    settings = load_settings(
        AgentSettings, config_file=config, environ={"HAR_AGENT_HOMEASSISTANT_PREFIX": "site/ha"}
    )
    assert settings.agent.homeassistant_discovery
    assert settings.agent.homeassistant_prefix == "site/ha"
    assert AgentTuning().homeassistant_prefix == "homeassistant"
    assert not AgentTuning().homeassistant_discovery


# ------------------------------------------------------------------------- real broker


def retained_under(settings: BrokerSettings, prefix: str) -> list[InboundMessage]:
    """Every retained message a new subscriber to ``<prefix>/#`` gets.

    Mosquitto sends a new subscription's retained messages right after its SUBACK, before
    anything published later: a marker published after the SUBACK arrives behind all of them.
    """
    connection, inbox = connect(settings, [(f"{prefix}/#", 1)])
    try:
        marker = f"{prefix}/end-marker-{uuid.uuid4().hex}"
        assert connection.publish(Outbound(marker, b"end")).wait(10)
        received = []
        while (message := receive(inbox)).topic != marker:
            received.append(message)
        return received
    finally:
        connection.stop()


def publish_all(settings: BrokerSettings, messages: list[Outbound]) -> None:
    connection, _ = connect(settings)
    try:
        for message in messages:
            assert connection.publish(message).wait(10)
    finally:
        connection.stop()


@pytest.mark.broker
def test_configs_stay_retained_and_removal_deletes_them(broker_settings: BrokerSettings) -> None:
    prefix = f"ha-{uuid.uuid4().hex[:8]}"
    topics = Topics(broker_settings.topic_root)
    publish_all(broker_settings, homeassistant.discovery_messages(topics, "wrist-1", prefix=prefix))
    received = retained_under(broker_settings, prefix)
    assert sorted(m.topic for m in received) == [
        f"{prefix}/sensor/wrist-1/{object_id}/config"
        for object_id in sorted(homeassistant.OBJECT_IDS)
    ]
    assert all(m.retain for m in received)
    assert all(json.loads(m.payload)["state_topic"].startswith(topics.root) for m in received)

    publish_all(broker_settings, homeassistant.removal_messages("wrist-1", prefix=prefix))
    assert retained_under(broker_settings, prefix) == []


@pytest.fixture(scope="module")
def releases(tmp_path_factory: pytest.TempPathFactory) -> Releases:
    return make_releases(tmp_path_factory.mktemp("releases"))


@pytest.fixture
def agents() -> Iterator[list[DeviceAgent]]:
    """Agents a test starts; every one is shut down afterwards."""
    running: list[DeviceAgent] = []
    yield running
    for agent in running:
        agent.shutdown()


def start(settings: AgentSettings, running: list[DeviceAgent]) -> DeviceAgent:
    agent = DeviceAgent(settings, open_sensor(settings.sensor))
    running.append(agent)
    agent.start()
    return agent


@pytest.mark.broker
@pytest.mark.slow
def test_agent_publishes_retained_configs_even_when_the_broker_is_down_at_start(
    broker: MosquittoProcess,
    broker_settings: BrokerSettings,
    releases: Releases,
    tmp_path: Path,
    agents: list[DeviceAgent],
) -> None:
    prefix = f"ha-{uuid.uuid4().hex[:8]}"
    settings = agent_settings(
        broker_settings,
        tmp_path / "device",
        releases,
        homeassistant_discovery=True,
        homeassistant_prefix=prefix,
    )
    broker.stop()
    agent = start(settings, agents)
    broker.start()
    publish_release(broker_settings, releases.first)
    # The configs were queued first: once three messages are acknowledged, they are retained.
    assert agent.counters.wait_until("messages_sent", 3, WAIT)

    received = retained_under(broker_settings, prefix)
    expected = homeassistant.discovery_messages(
        Topics(broker_settings.topic_root), DEVICE, prefix=prefix
    )
    assert [(m.topic, m.payload, m.retain) for m in received] == [
        (m.topic, m.payload, True) for m in expected
    ]

    # The templates read fields of what this agent really publishes.
    watcher = Watcher(broker_settings, client_id="ha-watch")
    try:
        assert agent.model_changed.wait(WAIT)
        prediction = json.loads(watcher.pump("prediction").payload)
        status = json.loads(watcher.pump("status").payload)
    finally:
        watcher.stop()
    configs = {m.topic.split("/")[-2]: json.loads(m.payload) for m in received}
    (label,) = template_fields(configs["activity"]["value_template"])
    assert resolve(prediction, label) in LABELS
    (probabilities,) = template_fields(configs["confidence"]["value_template"])
    assert 0.0 < max(resolve(prediction, probabilities)) <= 1.0
    (state,) = template_fields(configs["activity"]["availability"][0]["value_template"])
    assert resolve(status, state) == "online"


@pytest.mark.broker
@pytest.mark.slow
def test_agent_without_the_option_publishes_nothing_for_home_assistant(
    broker_settings: BrokerSettings, releases: Releases, tmp_path: Path, agents: list[DeviceAgent]
) -> None:
    agent = start(agent_settings(broker_settings, tmp_path / "device", releases), agents)
    assert agent.counters.wait_until("messages_sent", 3, WAIT)  # sensor batches got through
    assert retained_under(broker_settings, homeassistant.DEFAULT_PREFIX) == []
