"""Home Assistant discovery: the configs (pure), their templates against real messages, the
agent option against a real broker, and Home Assistant itself with a real agent on the shipped
broker config."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import queue
import random
import re
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlencode

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from device_agent.agent import DeviceAgent
from device_agent.sensors import open_sensor
from device_agent.settings import AgentSettings, AgentTuning
from har.local_broker import LOOPBACK, ShippedMosquitto, free_port, shipped_logins
from shared import codec, homeassistant
from shared.config import BrokerSettings, load_settings
from shared.errors import ConfigError
from shared.messages import (
    Confirmation,
    DeviceCommand,
    Prediction,
    WindowRef,
)
from shared.mqtt_transport import Outbound
from shared.topics import Topics
from simulator.tiny_model import LABELS, Releases, make_releases
from tests.agent_helpers import DEVICE, WAIT, Watcher, agent_settings, publish_release
from tests.homeassistant_helpers import (
    MODEL_LABELS,
    publish_all,
    resolve,
    retained_under,
    sample_messages,
    template_fields,
)
from tests.mosquitto import MosquittoProcess
from tests.mqtt_helpers import connect, receive

ROOT = "har/v1"
# Home Assistant's discovery.py TOPIC_MATCHER, anchored, after the discovery prefix.
HA_TOPIC_MATCHER = re.compile(
    r"(?P<component>\w+)/(?:(?P<node_id>[a-zA-Z0-9_-]+)/)?(?P<object_id>[a-zA-Z0-9_-]+)/config"
)


# ------------------------------------------------------------------------- real messages


def templates_of(config: dict[str, Any]) -> list[tuple[str, str]]:
    """(topic, template) of every template in a discovery config that reads a message."""
    found = [(entry["topic"], entry["value_template"]) for entry in config["availability"]]
    if "state_topic" in config:
        found.append((config["state_topic"], config["value_template"]))
    return found


# ------------------------------------------------------------------------- Home Assistant's rules

# Home Assistant's MQTT discovery schemas (homeassistant/components/mqtt: schemas.py MQTT_ENTITY_
# COMMON_SCHEMA, config.py MQTT_BASE/RO/RW_SCHEMA, sensor.py, select.py, button.py, as of 2024.9),
# the parts our configs use. Home Assistant drops a key it does not know without a word
# (vol.REMOVE_EXTRA), so a misspelt key would silently do nothing there: here it fails.
COMMON_KEYS = {
    "availability",
    "availability_mode",
    "device",
    "enabled_by_default",
    "encoding",
    "entity_category",
    "icon",
    "json_attributes_template",
    "json_attributes_topic",
    "name",
    "object_id",
    "origin",
    "qos",
    "unique_id",
}
# component: (required keys, optional keys)
COMPONENT_KEYS = {
    "sensor": (
        {"state_topic"},
        {
            "device_class",
            "expire_after",
            "force_update",
            "last_reset_value_template",
            "options",
            "state_class",
            "suggested_display_precision",
            "unit_of_measurement",
            "value_template",
        },
    ),
    "select": (
        {"command_topic", "options"},
        {"command_template", "optimistic", "retain", "state_topic", "value_template"},
    ),
    "button": (
        {"command_topic"},
        {"command_template", "device_class", "payload_press", "retain"},
    ),
}
SENSOR_STATE_CLASSES = {"measurement", "total", "total_increasing"}


def _topic(value: Any, *, wildcards: bool) -> bool:
    if not isinstance(value, str) or not value or len(value.encode()) > 65535 or "\0" in value:
        return False
    return wildcards or not any(ch in value for ch in "+#")


def home_assistant_problems(component: str, config: dict[str, Any]) -> list[str]:
    """What Home Assistant would refuse, or silently ignore, in a discovery ``config``."""
    jinja2 = pytest.importorskip("jinja2")
    problems: list[str] = []
    required, optional = COMPONENT_KEYS[component]
    problems += [f"missing {key}" for key in sorted(required - config.keys())]
    problems += [
        f"unknown key {key}" for key in sorted(config.keys() - required - optional - COMMON_KEYS)
    ]
    for key in ("state_topic", "json_attributes_topic"):
        if key in config and not _topic(config[key], wildcards=True):
            problems.append(f"{key} is not a topic to subscribe to")
    if "command_topic" in config and not _topic(config["command_topic"], wildcards=False):
        problems.append("command_topic is not a topic to publish on")
    templates = [value for key, value in config.items() if key.endswith("template")]
    for entry in config.get("availability", []):
        if set(entry) - {"topic", "value_template", "payload_available", "payload_not_available"}:
            problems.append(f"unknown availability keys {sorted(entry)}")
        if not _topic(entry.get("topic"), wildcards=True):
            problems.append("availability without a topic")
        templates += [entry[key] for key in entry if key == "value_template"]
    for template in templates:
        try:
            jinja2.Environment().parse(template)
        except jinja2.TemplateSyntaxError as exc:
            problems.append(f"template {template!r}: {exc}")
    if config.get("qos", 0) not in (0, 1, 2):
        problems.append("qos must be 0, 1 or 2")
    if "icon" in config and not re.fullmatch(r"\w+:[\w-]+", config["icon"]):
        problems.append(f"icon {config['icon']!r} is not prefix:name")
    if config.get("entity_category", "config") not in ("config", "diagnostic"):
        problems.append("entity_category must be config or diagnostic")
    device = config.get("device", {})
    if not device.get("identifiers") or not all(isinstance(i, str) for i in device["identifiers"]):
        problems.append("device needs identifiers (strings)")
    if not isinstance(config.get("origin", {}).get("name"), str):
        problems.append("origin needs a name")
    options = config.get("options")
    if options is not None and (
        not options
        or not all(isinstance(o, str) for o in options)
        or len(set(options)) != len(options)
    ):
        problems.append("options must be a non-empty list of distinct strings")
    if component == "sensor":
        # sensor.py validate_sensor_state_and_device_class_config (2024.9): an enum has options
        # or none, but no unit or state class; options need device_class enum.
        numeric = {"state_class", "unit_of_measurement"} & config.keys()
        if options is not None and config.get("device_class") != "enum":
            problems.append("options need device_class enum")
        if config.get("device_class") == "enum" and numeric:
            problems.append(f"an enum sensor cannot have {sorted(numeric)}")
        if config.get("state_class", "measurement") not in SENSOR_STATE_CLASSES:
            problems.append(f"state_class {config['state_class']!r}")
    return problems


# ------------------------------------------------------------------------- configs (pure)


def configs_by_topic(
    prefix: str = homeassistant.DEFAULT_PREFIX, labels: tuple[str, ...] = MODEL_LABELS
) -> dict[str, dict[str, Any]]:
    messages = homeassistant.discovery_messages(Topics(ROOT), "wrist-0001", labels, prefix=prefix)
    return {message.topic: json.loads(message.payload) for message in messages}


def by_object_id(configs: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {topic.split("/")[-2]: config for topic, config in configs.items()}


@pytest.mark.parametrize("labels", [(), MODEL_LABELS])
@pytest.mark.parametrize("controls", [True, False])
def test_home_assistant_accepts_every_config(labels: tuple[str, ...], controls: bool) -> None:
    messages = homeassistant.discovery_messages(
        Topics(ROOT), "wrist-0001", labels, controls=controls
    )
    for message in messages:
        component = HA_TOPIC_MATCHER.fullmatch(message.topic.split("/", 1)[1])
        assert component is not None
        config = json.loads(message.payload)
        assert home_assistant_problems(component["component"], config) == [], message.topic


@pytest.mark.parametrize(
    ("component", "change", "problem"),
    [
        ("sensor", {"device_clas": "enum"}, "unknown key device_clas"),
        ("sensor", {"state_class": "measurement"}, "an enum sensor cannot have"),
        ("sensor", {"device_class": None}, "options need device_class enum"),
        ("sensor", {"options": []}, "options must be a non-empty list"),
        ("sensor", {"value_template": "{{ value_json.label "}, "template"),
        ("select", {"options": None}, "missing options"),
        ("select", {"command_topic": "har/v1/devices/+/command"}, "not a topic to publish on"),
        ("button", {"payload_press": "PRESS", "json_attributes": "x"}, "unknown key"),
    ],
)
def test_the_rules_catch_what_home_assistant_refuses_or_ignores(
    component: str, change: dict[str, Any], problem: str
) -> None:
    # Guards the check above: each change breaks a config it accepts.
    object_id = {"sensor": "activity", "select": "correct", "button": "confirm"}[component]
    config = by_object_id(configs_by_topic())[object_id]
    assert home_assistant_problems(component, config) == []
    broken = {**config, **change}
    broken = {key: value for key, value in broken.items() if value is not None}
    assert any(problem in found for found in home_assistant_problems(component, broken))


# Run in a Python that has Home Assistant (its own virtual environment: it pins its own
# dependencies). Validates each config with the component's DISCOVERY_SCHEMA and renders the
# templates with Home Assistant's own engine and MQTT template classes.
HOME_ASSISTANT_CHECK = """
import asyncio, json, sys
from homeassistant.components.mqtt import button, select, sensor
from homeassistant.components.mqtt.models import MqttCommandTemplate, MqttValueTemplate
from homeassistant.const import __version__
from homeassistant.core import HomeAssistant
from homeassistant.helpers.template import Template

request = json.load(sys.stdin)
schemas = {"sensor": sensor.DISCOVERY_SCHEMA, "select": select.DISCOVERY_SCHEMA,
           "button": button.DISCOVERY_SCHEMA}

async def check():
    hass = HomeAssistant(request["config_dir"])
    results = {}
    for object_id, (component, config, payloads, value) in request["entities"].items():
        validated = schemas[component](dict(config))
        result = {"dropped": sorted(set(config) - set(validated))}
        if "value_template" in config:
            state = MqttValueTemplate(Template(config["value_template"], hass), hass=hass)
            result["states"] = [state.async_render_with_possible_json_value(p) for p in payloads]
        if "command_template" in config:
            command = MqttCommandTemplate(Template(config["command_template"], hass), hass=hass)
            result["command"] = command.async_render(value)
        results[object_id] = result
    await hass.async_stop(force=True)
    return results

print(json.dumps({"version": __version__, "results": asyncio.run(check())}))
"""


@pytest.fixture(scope="module")
def home_assistant_python() -> str:
    """``HAR_TEST_HOMEASSISTANT_PYTHON``: a Python with Home Assistant installed, in a virtual
    environment of its own (it pins its own dependencies; 2024.3.3 is the newest for Python 3.11):

        python3.11 -m venv ha && ha/bin/pip install uv
        ha/bin/uv pip install --python ha/bin/python homeassistant==2024.3.3 paho-mqtt==1.6.1 \\
            SQLAlchemy==2.0.27 fnv-hash-fast psutil-home-assistant janus Pillow securetar \\
            home-assistant-frontend==20240307.0 josepy==1.14.0 numpy==1.26.0 PyTurboJPEG==1.7.1

    (the MQTT integration's needs: Home Assistant runs with ``--skip-pip`` here). Module-scoped
    and listed first, so a test without it skips before the models are exported for it."""
    python = os.environ.get("HAR_TEST_HOMEASSISTANT_PYTHON")
    if not python:
        pytest.skip(
            "HAR_TEST_HOMEASSISTANT_PYTHON is not set (a Python with Home Assistant installed)"
        )
    return python


def test_home_assistant_itself_accepts_the_configs_and_renders_their_templates(
    home_assistant_python: str, tmp_path: Path
) -> None:
    """Home Assistant's schemas and template engine, not our copy of their rules."""
    configs = by_object_id(configs_by_topic())
    samples = {kind: [p.decode() for p in payloads] for kind, payloads in sample_messages().items()}
    state_kind = {Topics(ROOT).prediction("wrist-0001"): "prediction"}
    values = {homeassistant.CORRECT: "Jogging", homeassistant.CONFIRM: "PRESS"}
    request = {
        "config_dir": str(tmp_path),
        "entities": {
            object_id: [
                homeassistant.COMPONENTS[object_id],
                config,
                samples[state_kind.get(config.get("state_topic", ""), "status")],
                values.get(object_id, ""),
            ]
            for object_id, config in configs.items()
        },
    }
    result = subprocess.run(
        [home_assistant_python, "-c", HOME_ASSISTANT_CHECK],
        input=json.dumps(request),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    answer = json.loads(result.stdout)
    version = tuple(int(part) for part in answer["version"].split(".")[:2])
    results = answer["results"]
    for object_id, found in results.items():
        # Home Assistant before 2024.9 has no options on a sensor and drops them.
        ignored = {"options"} if version < (2024, 9) and object_id == "activity" else set()
        assert set(found["dropped"]) == ignored, object_id
    assert results["activity"]["states"] == results["correct"]["states"] == ["Walking"] * 2
    assert results["confidence"]["states"] == ["90.2"] * 2
    assert results["model"]["states"] == ["v0007", "unknown"]
    correct = codec.decode_device_command(results["correct"]["command"].encode())
    assert (correct.command, correct.label) == ("correct_latest", "Jogging")
    confirm = codec.decode_device_command(results["confirm"]["command"].encode())
    assert (confirm.command, confirm.label) == ("confirm_latest", None)


def test_discovery_messages_are_retained_qos1_json_on_home_assistant_topics() -> None:
    for labels, entities in (((), homeassistant.SENSORS), (MODEL_LABELS, homeassistant.OBJECT_IDS)):
        messages = homeassistant.discovery_messages(Topics(ROOT), "wrist-0001", labels)
        assert len(messages) == len(entities)
        for message in messages:
            assert message.retain
            assert message.qos == 1
            assert message.content_type == codec.CONTENT_TYPE_JSON
            assert isinstance(json.loads(message.payload.decode("utf-8")), dict)
            prefix, rest = message.topic.split("/", 1)
            assert prefix == "homeassistant"
            match = HA_TOPIC_MATCHER.fullmatch(rest)
            assert match is not None, (
                f"{message.topic} is not a discovery topic Home Assistant reads"
            )
            assert match["node_id"] == "wrist-0001"  # the ACL: homeassistant/<component>/%u/#
            assert match["object_id"] in entities
            assert match["component"] == homeassistant.COMPONENTS[match["object_id"]]


def test_configs_name_the_devices_topics_and_identify_it() -> None:
    topics = Topics(ROOT)
    configs = configs_by_topic()
    assert sorted(configs) == [
        "homeassistant/button/wrist-0001/confirm/config",
        "homeassistant/select/wrist-0001/correct/config",
        "homeassistant/sensor/wrist-0001/activity/config",
        "homeassistant/sensor/wrist-0001/confidence/config",
        "homeassistant/sensor/wrist-0001/model/config",
    ]
    unique_ids = [config["unique_id"] for config in configs.values()]
    assert len(set(unique_ids)) == len(unique_ids)
    for config in configs.values():
        assert config["name"]
        assert config["qos"] == 1
        assert config.get("state_topic", topics.prediction("wrist-0001")) in (
            topics.prediction("wrist-0001"),
            topics.status("wrist-0001"),
        )
        assert config.get("command_topic", topics.command("wrist-0001")) == topics.command(
            "wrist-0001"
        )
        assert config["device"]["identifiers"] == ["har_wrist-0001"]
        assert config["device"]["name"] == "wrist-0001"
        assert config["origin"]["name"] == homeassistant.ORIGIN_NAME
        (availability,) = config["availability"]
        assert availability["topic"] == topics.status("wrist-0001")
    assert (
        configs["homeassistant/sensor/wrist-0001/confidence/config"]["unit_of_measurement"] == "%"
    )


def test_activity_is_an_enum_of_the_models_labels_and_the_select_offers_them() -> None:
    configs = by_object_id(configs_by_topic())
    assert configs["activity"]["device_class"] == "enum"
    assert configs["activity"]["options"] == list(MODEL_LABELS)
    assert configs["correct"]["options"] == list(MODEL_LABELS)
    other = by_object_id(configs_by_topic(labels=("Cycling", "Rowing")))
    assert other["activity"]["options"] == other["correct"]["options"] == ["Cycling", "Rowing"]
    # Before the first model: no labels, so no options and nothing to correct or confirm with.
    first = by_object_id(configs_by_topic(labels=()))
    assert sorted(first) == sorted(homeassistant.SENSORS)
    assert first["activity"]["device_class"] == "enum"
    assert "options" not in first["activity"]
    # har sim's devices take no commands: sensors only.
    simulated = homeassistant.discovery_configs(
        Topics(ROOT), "wrist-0001", MODEL_LABELS, controls=False
    )
    assert sorted(simulated) == sorted(homeassistant.SENSORS)


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
    assert checked == 18  # 4 state and 5 availability templates, 2 real messages each


def test_availability_template_reads_the_states_home_assistant_expects() -> None:
    (availability,) = configs_by_topic()["homeassistant/sensor/wrist-0001/activity/config"][
        "availability"
    ]
    (path,) = template_fields(availability["value_template"])
    online, offline = (json.loads(p) for p in sample_messages()["status"])
    assert resolve(online, path) == availability["payload_available"] == "online"
    assert resolve(offline, path) == availability["payload_not_available"] == "offline"


class FixedClock:
    """Home Assistant's ``now()`` in a template, at a fixed time."""

    def __init__(self, ts: float) -> None:
        self._ts = ts

    def timestamp(self) -> float:
        return self._ts


def render(template: str, payload: bytes | None = None, **variables: Any) -> str:
    """A template rendered with Jinja2, Home Assistant's engine, in a sandbox as there: ``value``
    and ``value_json`` from a received ``payload``, or the given variables."""
    jinja2_sandbox = pytest.importorskip("jinja2.sandbox")
    environment = jinja2_sandbox.ImmutableSandboxedEnvironment()
    if payload is not None:
        variables["value"] = payload.decode("utf-8")
        variables["value_json"] = json.loads(payload)
    return str(environment.from_string(template).render(**variables))


def test_templates_render_with_jinja2_as_home_assistant_does() -> None:
    configs = by_object_id(configs_by_topic())
    prediction, replayed = sample_messages()["prediction"]
    online, offline = sample_messages()["status"]
    assert render(configs["activity"]["value_template"], prediction) == "Walking"
    assert render(configs["activity"]["value_template"], replayed) == "Walking"
    assert render(configs["correct"]["value_template"], prediction) == "Walking"
    assert render(configs["confidence"]["value_template"], prediction) == "90.2"
    assert render(configs["model"]["value_template"], online) == "v0007"
    # No model yet (model_version null): Home Assistant's own state for "no value", not "None".
    assert render(configs["model"]["value_template"], offline) == "unknown"
    availability = configs["activity"]["availability"][0]["value_template"]
    assert [render(availability, p) for p in (online, offline)] == ["online", "offline"]


@pytest.mark.parametrize("label", ["Jogging", 'Sitting "down", \\ überall', "Walking"])
def test_the_select_sends_a_correction_the_agent_decodes(label: str) -> None:
    template = by_object_id(configs_by_topic())["correct"]["command_template"]
    payload = render(template, value=label, now=lambda: FixedClock(1763769810.5))
    command = codec.decode_device_command(payload.encode())
    assert command == DeviceCommand(
        "correct_latest", "homeassistant-1763769810500000", 1763769810.5, label=label
    )


def test_the_button_sends_a_confirmation_the_agent_decodes() -> None:
    template = by_object_id(configs_by_topic())["confirm"]["command_template"]
    # Home Assistant passes the button's payload_press as `value`: the template ignores it.
    payload = render(template, value="PRESS", now=lambda: FixedClock(1763769805.25))
    command = codec.decode_device_command(payload.encode())
    assert command == DeviceCommand(
        "confirm_latest", "homeassistant-1763769805250000", 1763769805.25
    )


@pytest.mark.parametrize("control", ["correct", "confirm"])
def test_two_presses_in_one_second_carry_two_request_ids(control: str) -> None:
    template = by_object_id(configs_by_topic())[control]["command_template"]
    ids = {
        codec.decode_device_command(
            render(template, value="Jogging", now=lambda t=t: FixedClock(t)).encode()
        ).request_id
        for t in (1763769810.1, 1763769810.7)
    }
    assert len(ids) == 2


def test_the_model_sensors_attributes_are_the_status_but_its_reserved_state() -> None:
    """Home Assistant refuses an attribute named ``state``: every other field of the status
    is an attribute of the Model version sensor."""
    model = by_object_id(configs_by_topic())["model"]
    for payload in sample_messages()["status"]:
        attributes = json.loads(render(model["json_attributes_template"], payload))
        status = json.loads(payload)
        assert attributes == {k: v for k, v in status.items() if k not in ("type", "v", "state")}


def recorded_state_changes(config: dict[str, Any], payloads: list[bytes]) -> int:
    """How many rows Home Assistant's recorder writes for an MQTT sensor fed ``payloads`` on its
    state topic: one per change of the state or of the attributes (core.py StateMachine.async_set
    fires no state_changed event when both are the same)."""
    rows, last = 0, None
    for payload in payloads:
        state = render(config["value_template"], payload)
        attributes: Any = None
        if config.get("json_attributes_topic") == config["state_topic"]:
            template = config.get("json_attributes_template")
            attributes = json.loads(render(template, payload) if template else payload)
        if (state, attributes) != last:
            rows, last = rows + 1, (state, attributes)
    return rows


def test_the_activity_changes_state_only_when_the_activity_changes() -> None:
    labels = ["Walking"] * 50 + ["Sitting"] * 50 + ["Walking"] * 50  # 300 s of predictions
    rng = random.Random(1)
    payloads = []
    for index, label in enumerate(labels):
        weights = [rng.random() for _ in MODEL_LABELS]
        weights[MODEL_LABELS.index(label)] += 10
        prediction = Prediction.new(
            device_id="wrist-0001",
            window=WindowRef(batch_seq=index, offset=0, length=80),
            probabilities=np.asarray(weights),
            labels=MODEL_LABELS,
            model_version="v0007",
            ts=1763769600.0 + 2 * index,
        )
        payloads.append(codec.encode_prediction(prediction))
    configs = by_object_id(configs_by_topic())
    assert recorded_state_changes(configs["activity"], payloads) == 3
    # The way it was (every prediction in the attributes): a row per prediction.
    with_attributes = {
        **configs["activity"],
        "json_attributes_topic": configs["activity"]["state_topic"],
    }
    assert recorded_state_changes(with_attributes, payloads) == len(payloads)


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


@pytest.mark.broker
def test_configs_stay_retained_and_removal_deletes_them(broker_settings: BrokerSettings) -> None:
    prefix = f"ha-{uuid.uuid4().hex[:8]}"
    topics = Topics(broker_settings.topic_root)
    publish_all(
        broker_settings,
        homeassistant.discovery_messages(topics, "wrist-1", MODEL_LABELS, prefix=prefix),
    )
    received = retained_under(broker_settings, prefix)
    assert sorted(m.topic for m in received) == sorted(
        f"{prefix}/{component}/wrist-1/{object_id}/config"
        for object_id, component in homeassistant.COMPONENTS.items()
    )
    assert all(m.retain for m in received)
    for message in received:
        config = json.loads(message.payload)
        assert config.get("state_topic", config.get("command_topic")).startswith(topics.root)

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
def test_agent_announces_itself_with_the_broker_down_at_start_and_again_with_its_labels(
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
    topics = Topics(broker_settings.topic_root)
    before_model = homeassistant.discovery_messages(topics, DEVICE, prefix=prefix)
    with_model = homeassistant.discovery_messages(topics, DEVICE, LABELS, prefix=prefix)
    broker.stop()
    agent = start(settings, agents)
    broker.start()
    # Subscribed before the model comes: the configs queued at start arrive first (retained or
    # live), then those with the model's labels, queued at the swap.
    configs, inbox = connect(broker_settings, [(f"{prefix}/#", 1)])
    try:
        publish_release(broker_settings, releases.first)
        received = [receive(inbox, WAIT) for _ in range(len(before_model) + len(with_model))]
    finally:
        configs.stop()
    assert [(m.topic, m.payload) for m in received] == [
        (m.topic, m.payload) for m in [*before_model, *with_model]
    ]
    # Retained now: the configs with the labels (the broker hands them over in its own order).
    assert sorted(
        (m.topic, m.payload, m.retain) for m in retained_under(broker_settings, prefix)
    ) == sorted((m.topic, m.payload, True) for m in with_model)

    # The templates read fields of what this agent really publishes.
    watcher = Watcher(broker_settings, client_id="ha-watch")
    try:
        assert agent.model_changed.wait(WAIT)
        prediction = json.loads(watcher.pump("prediction").payload)
        status = json.loads(watcher.pump("status").payload)
    finally:
        watcher.stop()
    configs_now = by_object_id({m.topic: json.loads(m.payload) for m in with_model})
    for object_id in ("activity", "correct"):
        (label,) = template_fields(configs_now[object_id]["value_template"])
        assert resolve(prediction, label) in configs_now[object_id]["options"]
    (probabilities,) = template_fields(configs_now["confidence"]["value_template"])
    assert 0.0 < max(resolve(prediction, probabilities)) <= 1.0
    (state,) = template_fields(configs_now["activity"]["availability"][0]["value_template"])
    assert resolve(status, state) == "online"


def press(settings: BrokerSettings, config: dict[str, Any], ts: float, value: str) -> None:
    """What Home Assistant does when a control is used: render its command template (``value``:
    the chosen option, or the button's payload_press) and publish the result, QoS 1."""
    payload = render(config["command_template"], value=value, now=lambda: FixedClock(ts))
    publish_all(settings, [Outbound(config["command_topic"], payload.encode(), qos=config["qos"])])


@pytest.mark.broker
@pytest.mark.slow
def test_home_assistant_controls_confirm_and_correct_the_latest_prediction(
    broker_settings: BrokerSettings, releases: Releases, tmp_path: Path, agents: list[DeviceAgent]
) -> None:
    topics = Topics(broker_settings.topic_root)
    settings = agent_settings(
        broker_settings,
        tmp_path / "device",
        releases,
        homeassistant_discovery=True,
        homeassistant_prefix=f"ha-{uuid.uuid4().hex[:8]}",
        memory_tolerance=1.0,  # what is learned is tested elsewhere: here, that it is kept
    )
    controls = homeassistant.discovery_configs(topics, DEVICE, LABELS)
    button, select = controls["confirm"], controls["correct"]
    watcher = Watcher(broker_settings, client_id="ha-controls")
    relay, relayed = connect(broker_settings, [(topics.confirmed(DEVICE), 1)])
    predictions: dict[str, Prediction] = {}
    relayed_ts: set[float] = set()

    def relayed_at(ts: float) -> tuple[Prediction, Confirmation]:
        """The confirmation the agent kept and relayed for the command sent at ``ts``, and the
        prediction it confirms (relayed ones are resent until a trainer's receipt: skip those)."""
        while (confirmation := codec.decode_confirmation(receive(relayed, WAIT).payload)).ts != ts:
            relayed_ts.add(confirmation.ts)
        relayed_ts.add(ts)
        while confirmation.prediction_id not in predictions:
            prediction = watcher.prediction()
            predictions[prediction.prediction_id] = prediction
        return predictions[confirmation.prediction_id], confirmation

    agent = start(settings, agents)
    try:
        # Online: subscribed to its commands (it subscribes before it says so).
        while codec.decode_status(watcher.pump("status").payload).state != "online":
            pass
        # No model, no prediction yet: nothing to confirm, and the agent says so.
        press(broker_settings, button, 1763769800.0, "PRESS")
        error = watcher.error_with("no_latest_prediction")
        assert error["topic"] == topics.command(DEVICE)
        assert agent.counters.get("error_no_latest_prediction") == 1

        publish_release(broker_settings, releases.first)
        assert agent.model_changed.wait(WAIT)
        first = watcher.prediction()  # there is a latest prediction now
        predictions[first.prediction_id] = first

        press(broker_settings, button, 1763769805.25, "PRESS")
        confirmed, confirmation = relayed_at(1763769805.25)
        assert confirmation.label == confirmed.label  # "right as predicted"
        assert confirmation.source == "user"

        press(broker_settings, select, 1763769810.5, "Laying")
        corrected, correction = relayed_at(1763769810.5)
        assert correction.label == "Laying"
        assert corrected.model_version == releases.first.manifest.version

        # Choosing the label the select shows is a confirmation of the latest prediction,
        # kept and relayed like the button's (docs/dashboards.md), not a no-op.
        shown = watcher.prediction()
        predictions[shown.prediction_id] = shown
        press(broker_settings, select, 1763769812.5, shown.label)
        same, kept = relayed_at(1763769812.5)
        assert kept.label == shown.label
        assert kept.source == "user"
        assert same.model_version == releases.first.manifest.version

        # A label the model does not know: reported, nothing kept, the agent carries on.
        press(broker_settings, select, 1763769815.0, "Flying")
        error = watcher.error_with("unknown_label")
        assert "'Flying'" in str(error["message"])
        assert agent.counters.get("error_unknown_label") == 1
        press(broker_settings, button, 1763769820.0, "PRESS")
        relayed_at(1763769820.0)
        assert 1763769815.0 not in relayed_ts  # the unknown label was not kept
    finally:
        watcher.stop()
        relay.stop()


@pytest.mark.broker
@pytest.mark.slow
def test_agent_without_the_option_publishes_nothing_for_home_assistant(
    broker_settings: BrokerSettings, releases: Releases, tmp_path: Path, agents: list[DeviceAgent]
) -> None:
    agent = start(agent_settings(broker_settings, tmp_path / "device", releases), agents)
    assert agent.counters.wait_until("messages_sent", 3, WAIT)  # sensor batches got through
    assert retained_under(broker_settings, homeassistant.DEFAULT_PREFIX) == []


# ------------------------------------------------------------------------- Home Assistant itself

HA_USER = "homeassistant"  # its own login and ACL block (deploy/mosquitto/logins and acl)
# One connection per login on the shipped broker (use_username_as_clientid): the device, Home
# Assistant, the trainer that releases the model, an operator who watches what the agent relays.
LOGINS = {
    DEVICE: "pw-device",
    HA_USER: "pw-homeassistant",
    "trainer": "pw-trainer",
    "operator": "pw-operator",
}
HA_WAIT = 120.0  # its start: about 2 s here, 6 s the first time (imports)
# Only what the test drives: the REST API, the config flow API and onboarding, on loopback,
# with a fixed core config (location, units, time zone).
HA_CONFIGURATION = """\
homeassistant:
  name: HAR test
  latitude: 52.52
  longitude: 13.40
  elevation: 34
  unit_system: metric
  time_zone: UTC
  country: DE
  currency: EUR
http:
  server_host: {host}
  server_port: {port}
api:
config:
onboarding:
"""

T = TypeVar("T")


class HomeAssistant:
    """``hass -c DIR --skip-pip`` from the virtual environment of ``python`` (``--skip-pip``:
    nothing may be installed at run time), driven through its REST API like its frontend."""

    def __init__(self, python: str, config_dir: Path) -> None:
        self.config_dir = config_dir
        self.port = free_port()
        self.token = ""
        config_dir.mkdir()
        (config_dir / "configuration.yaml").write_text(
            HA_CONFIGURATION.format(host=LOOPBACK, port=self.port)
        )
        bin_dir = Path(python).parent
        with (config_dir / "hass.out").open("wb") as out:  # what it prints before its log starts
            self.process = subprocess.Popen(
                [str(bin_dir / "hass"), "-c", str(config_dir), "--skip-pip"],
                cwd=config_dir,
                env={"PATH": f"{bin_dir}{os.pathsep}{os.defpath}", "HOME": str(config_dir)},
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    def problems_logged(self) -> list[str]:
        """The warnings and errors in its log, but for its start-up notes (homeassistant.bootstrap:
        pip skipped, the Python version): a config it refuses or a template that fails is
        logged, not answered."""
        log = (self.config_dir / "home-assistant.log").read_text(errors="replace")
        return [
            line
            for line in log.splitlines()
            if re.match(r"\S+ \S+ (WARNING|ERROR|CRITICAL) ", line)
            and "[homeassistant.bootstrap]" not in line
        ]

    def log_tail(self) -> str:
        """The end of its log; what it printed, if it died before it opened its log."""
        log = self.config_dir / "home-assistant.log"
        return (log if log.exists() else self.config_dir / "hass.out").read_text()[-4000:]

    def until(self, what: str, probe: Callable[[], T | None], timeout: float = HA_WAIT) -> T:
        """What ``probe`` returns once it returns something: polled, since an HTTP API has no
        event to wait on. Waiting on the process paces the polls and notices one that died."""
        deadline = time.monotonic() + timeout
        while (found := probe()) is None:
            try:
                code = self.process.wait(timeout=0.25)
            except subprocess.TimeoutExpired:
                code = None
            assert code is None, f"Home Assistant exited ({code}) before {what}\n{self.log_tail()}"
            assert time.monotonic() < deadline, f"no {what} in {timeout} s\n{self.log_tail()}"
        return found

    def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> tuple[int, Any]:
        """(HTTP status, decoded answer); a body is JSON, or a form for ``/auth/token``."""
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        data = None
        if body is not None and path == "/auth/token":
            data, headers["Content-Type"] = urlencode(body), "application/x-www-form-urlencoded"
        elif body is not None:
            data, headers["Content-Type"] = json.dumps(body), "application/json"
        connection = http.client.HTTPConnection(LOOPBACK, self.port, timeout=30)
        try:
            connection.request(method, path, data, headers)
            response = connection.getresponse()
            text = response.read().decode()
        finally:
            connection.close()
        try:
            return response.status, json.loads(text)
        except json.JSONDecodeError:
            return response.status, text

    def up(self) -> bool | None:
        try:
            return self.call("GET", "/api/onboarding")[0] == 200 or None
        except OSError:  # not listening yet
            return None

    def onboard(self) -> None:
        """Its owner user, then an access token for that user, as the onboarding page does."""
        self.until("its HTTP API", self.up)
        client_id = f"http://{LOOPBACK}:{self.port}/"
        status, user = self.call(
            "POST",
            "/api/onboarding/users",
            {
                "client_id": client_id,
                "name": "Owner",
                "username": "owner",
                "password": "owner-password",
                "language": "en",
            },
        )
        assert status == 200, user
        status, token = self.call(
            "POST",
            "/auth/token",
            {"grant_type": "authorization_code", "code": user["auth_code"], "client_id": client_id},
        )
        assert status == 200, token
        self.token = token["access_token"]

    def add_mqtt(self, broker: ShippedMosquitto, username: str, password: str) -> None:
        """The MQTT integration, through its config flow (Settings > Add integration > MQTT):
        the broker step tries the login before it creates the entry."""
        status, form = self.call("POST", "/api/config/config_entries/flow", {"handler": "mqtt"})
        assert (status, form.get("step_id")) == (200, "broker"), form
        status, entry = self.call(
            "POST",
            f"/api/config/config_entries/flow/{form['flow_id']}",
            {
                "broker": broker.host,
                "port": broker.port,
                "username": username,
                "password": password,
            },
        )
        assert (status, entry.get("type")) == (200, "create_entry"), entry.get("errors", entry)

    def states(self) -> dict[str, dict[str, Any]]:
        """Every entity's state, by its friendly name (its device's name, then its own)."""
        status, states = self.call("GET", "/api/states")
        assert status == 200, states
        return {state["attributes"].get("friendly_name"): state for state in states}

    def use(self, domain: str, service: str, data: dict[str, Any]) -> None:
        status, answer = self.call("POST", f"/api/services/{domain}/{service}", data)
        assert status == 200, answer

    def stop(self) -> None:
        """SIGTERM, as a supervisor would stop it; killed if it takes too long."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@pytest.fixture
def shipped_broker(tmp_path: Path) -> Iterator[ShippedMosquitto]:
    """Mosquitto with the shipped config and ACL (requested first: stopped last)."""
    (tmp_path / "broker").mkdir()
    broker = ShippedMosquitto(tmp_path / "broker", passwords=LOGINS)
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture
def home_assistant(home_assistant_python: str, tmp_path: Path) -> Iterator[HomeAssistant]:
    """A fresh Home Assistant, onboarded: an owner and a token, no integration yet."""
    started = HomeAssistant(home_assistant_python, tmp_path / "homeassistant")
    try:
        started.onboard()
        yield started
    finally:
        started.stop()


def login(broker: ShippedMosquitto, user: str) -> BrokerSettings:
    return BrokerSettings(
        host=broker.host,
        port=broker.port,
        topic_root=ROOT,  # the shipped ACL names the root literally
        username=user,
        password=LOGINS[user],
        keepalive_s=5,
        reconnect_min_s=0.05,
        reconnect_max_s=0.5,
    )


def entities_showing_the_model(
    home_assistant: HomeAssistant, names: dict[str, str]
) -> dict[str, dict[str, Any]] | None:
    """The device's entities by object id, once all exist, the select shows a prediction (so
    its options came, the device is available, its predictions reach Home Assistant) and the
    Model version sensor a version (the status sent after the model was installed came too)."""
    states = home_assistant.states()
    found = {object_id: states.get(f"{DEVICE} {name}") for object_id, name in names.items()}
    entities = {object_id: state for object_id, state in found.items() if state is not None}
    if len(entities) < len(names):
        return None
    shows_a_prediction = entities[homeassistant.CORRECT]["state"] in LABELS
    shows_a_version = entities[homeassistant.MODEL]["state"] not in ("unknown", "unavailable")
    return entities if shows_a_prediction and shows_a_version else None


@pytest.mark.broker
@pytest.mark.slow
def test_home_assistant_itself_shows_a_real_agent_and_its_controls_reach_it(
    home_assistant_python: str,
    releases: Releases,
    shipped_broker: ShippedMosquitto,
    agents: list[DeviceAgent],
    home_assistant: HomeAssistant,
    tmp_path: Path,
) -> None:
    """A real Home Assistant, set up as a person would (onboarding, the MQTT integration's
    config flow) on the shipped broker config and ACL with its own login, shows the entities a
    real agent announces; its Confirm button and its "What am I doing?" select reach the agent,
    which keeps the confirmation and the correction and relays them to the trainer."""
    assert HA_USER in shipped_logins()
    topics = Topics(ROOT)
    agent = start(
        agent_settings(
            login(shipped_broker, DEVICE),
            tmp_path / "device",
            releases,
            homeassistant_discovery=True,
            memory_tolerance=1.0,  # what is learned is tested elsewhere: here, that it is kept
        ),
        agents,
    )
    publish_release(login(shipped_broker, "trainer"), releases.first)
    assert agent.model_changed.wait(WAIT)  # the configs with the model's labels are queued
    # What the agent relays to the trainer is the proof that it applied a command: it relays a
    # confirmation only once it has kept it. Its predictions tell what a confirmation confirms.
    relay, inbox = connect(
        login(shipped_broker, "operator"),
        [(topics.confirmed(DEVICE), 1), (topics.prediction(DEVICE), 1)],
    )
    predictions: dict[str, Prediction] = {}

    def relayed_since(ts: float) -> tuple[Confirmation, Prediction]:
        """The first confirmation relayed for a command Home Assistant stamped at ``ts`` or later
        (its clock is this machine's), and the prediction it confirms."""
        confirmation = None
        deadline = time.monotonic() + WAIT  # predictions keep coming: a deadline of its own
        while confirmation is None or confirmation.prediction_id not in predictions:
            remaining, message = deadline - time.monotonic(), None
            with contextlib.suppress(queue.Empty):
                message = receive(inbox, remaining) if remaining > 0 else None
            assert message is not None, (
                f"the agent relayed no confirmation of a command stamped from {ts} on "
                f"(relayed: {confirmation}) in {WAIT} s; Home Assistant's log:\n"
                f"{home_assistant.log_tail()}"
            )
            if message.topic == topics.prediction(DEVICE):
                prediction = codec.decode_prediction(message.payload)
                predictions[prediction.prediction_id] = prediction
            elif confirmation is None:
                relayed = codec.decode_confirmation(message.payload)
                confirmation = relayed if relayed.ts >= ts else None  # else an earlier one, again
        return confirmation, predictions[confirmation.prediction_id]

    try:
        home_assistant.add_mqtt(shipped_broker, HA_USER, LOGINS[HA_USER])
        names = {
            object_id: config["name"]
            for object_id, config in homeassistant.discovery_configs(topics, DEVICE, LABELS).items()
        }
        entities = home_assistant.until(
            "the agent's entities showing its model and a prediction",
            lambda: entities_showing_the_model(home_assistant, names),
        )
        assert entities[homeassistant.CORRECT]["attributes"]["options"] == list(LABELS)
        assert entities[homeassistant.ACTIVITY]["state"] in LABELS
        assert 0.0 < float(entities[homeassistant.CONFIDENCE]["state"]) <= 100.0
        assert entities[homeassistant.MODEL]["state"] == releases.first.manifest.version

        pressed = time.time()
        home_assistant.use(
            "button", "press", {"entity_id": entities[homeassistant.CONFIRM]["entity_id"]}
        )
        confirmation, confirmed = relayed_since(pressed)
        assert (confirmation.label, confirmation.source) == (confirmed.label, "user")

        # A label other than the one the select shows: a correction.
        shown = entities[homeassistant.CORRECT]["state"]
        chosen = next(label for label in LABELS if label != shown)
        chosen_at = time.time()
        home_assistant.use(
            "select",
            "select_option",
            {"entity_id": entities[homeassistant.CORRECT]["entity_id"], "option": chosen},
        )
        correction, corrected = relayed_since(chosen_at)
        assert (correction.label, correction.source) == (chosen, "user")
        assert correction.ts > confirmation.ts
        assert corrected.model_version == releases.first.manifest.version
        assert agent.counters.get("commands_received") == 2  # one command per use, nothing else
        assert home_assistant.problems_logged() == []
    finally:
        relay.stop()
