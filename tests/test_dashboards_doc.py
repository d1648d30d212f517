"""docs/dashboards.md cannot rot: its recipes run, its topics and configs are the code's.

- every topic the page names is one ``shared.topics.Topics`` builds (or a discovery topic of
  ``shared.homeassistant``);
- every JSON block parses; the Home Assistant config shown is the one the agent publishes;
- the ``mosquitto_sub`` recipes run against a real broker holding messages our codec wrote, and
  print what the page says they print; the removal recipe really deletes the retained configs;
- the Node-RED flow (docs/node-red-flow.json) and its code are checked in
  tests/test_node_red_flow.py;
- the manual Home Assistant YAML uses our topics and the same templates, on fields real
  messages have.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from device_agent.settings import AgentSettings
from shared import codec, homeassistant
from shared.config import BrokerSettings, load_settings
from shared.messages import DeviceStatus, ErrorEvent
from shared.mqtt_transport import Outbound
from shared.topics import Topics
from tests.homeassistant_helpers import (
    MODEL_LABELS,
    publish_all,
    resolve,
    retained_under,
    sample_messages,
    template_fields,
)

REPO = Path(__file__).resolve().parent.parent
DOC = (REPO / "docs" / "dashboards.md").read_text(encoding="utf-8")
ROOT = "har/v1"
DEVICE = "wrist-0001"
# The page's broker: the shipped one, over TLS (its plain port answers on its own host only).
DOC_BROKER = '-h broker.lan -p 8883 --cafile ca.crt -u operator -P "$OPERATOR_PASSWORD"'
DOC_DEVICE_BROKER = '-h broker.lan -p 8883 --cafile ca.crt -u wrist-0001 -P "$DEVICE_PASSWORD"'

_BLOCK = re.compile(r"^```(\w+)(?: ([\w-]+))?\n(.*?)\n```$", re.MULTILINE | re.DOTALL)


def all_blocks() -> list[tuple[str, str | None, str]]:
    """(language, label or None, body) of every fenced block at the start of a line."""
    return [(m.group(1), m.group(2), m.group(3)) for m in _BLOCK.finditer(DOC)]


def block(label: str) -> str:
    found = [body for _, name, body in all_blocks() if name == label]
    assert len(found) == 1, f"expected one block labelled {label!r}, found {len(found)}"
    return found[0]


def test_blocks_are_found() -> None:
    # Guards the parsing the other tests rely on.
    labels = {name for _, name, _ in all_blocks()}
    assert {
        "labels",
        "node-red-predictions",
        "homeassistant-activity",
        "remove-discovery",
    } <= labels
    assert {"homeassistant-correct-template", "homeassistant-recorder"} <= labels


@pytest.mark.parametrize(
    "body", [body for lang, _, body in all_blocks() if lang == "json"], ids=lambda b: b[:30]
)
def test_json_blocks_parse(body: str) -> None:
    json.loads(body)


# ------------------------------------------------------------------------------ topics


def is_contract_topic(topic: str) -> bool:
    topics = Topics(ROOT)
    filters = {
        topics.all_sensor(),
        topics.all_prediction(),
        topics.all_confirmation(),
        topics.all_status(),
        topics.all_error(),
        topics.model_manifest(),
        topics.trainer_error(),
        topics.trainer_command(),
    }
    if topic in filters:
        return True
    device, kind = topics.device_of(topic), topics.kind_of(topic)
    return device is not None and kind is not None and getattr(topics, kind)(device) == topic


def test_every_har_topic_on_the_page_is_one_of_the_contract() -> None:
    named = set(re.findall(r"har/v1/[^\s'\"`)\]]+", DOC))
    assert len(named) >= 5
    # The ACL line that lets Home Assistant (its own login) command every device.
    acl_filter = f"{Topics(ROOT).device('DEVICE').rsplit('/', 1)[0]}/+/command"
    assert acl_filter in named
    assert {t for t in named - {acl_filter} if not is_contract_topic(t)} == set()


def test_every_discovery_topic_on_the_page_is_one_the_agent_publishes() -> None:
    published = {
        m.topic for m in homeassistant.discovery_messages(Topics(ROOT), DEVICE, MODEL_LABELS)
    }
    acl_filters = {f"homeassistant/{c}/%u/#" for c in ("sensor", "select", "button")}
    acl_filters.add("homeassistant/#")
    birth = "homeassistant/status"  # Home Assistant's own, which its login may publish
    named = set(re.findall(r"homeassistant/[^\s'\"`)\]]+", DOC))
    # The removal recipe's loop: "homeassistant/$entity/config" for each <component>/<id>/<entity>.
    loop = re.search(r"^for entity in (.*); do$", block("remove-discovery"), re.MULTILINE)
    assert loop is not None
    for topic in named - acl_filters - {birth}:
        concrete = topic.replace("<device_id>", DEVICE)
        expanded = {concrete.replace("$entity", entity) for entity in loop.group(1).split()}
        assert expanded <= published, f"{topic} is not a discovery topic of {DEVICE}"
    assert acl_filters <= named
    assert len(named - acl_filters - {birth}) == len(published) + 1  # the table's and the loop's
    # The ACL patterns, for username wrist-0001, cover every config the agent publishes.
    covered = {pattern.replace("%u", DEVICE).removesuffix("#") for pattern in acl_filters}
    covered.discard("homeassistant/")
    assert all(any(t.startswith(prefix) for prefix in covered) for t in published)


def test_acl_lines_shown_are_in_the_shipped_acl() -> None:
    shown = re.search(r"^\s*```text acl-lines\n(.*?)\n\s*```$", DOC, re.MULTILINE | re.DOTALL)
    assert shown is not None
    acl = (REPO / "deploy" / "mosquitto" / "acl").read_text(encoding="utf-8").splitlines()
    lines = [line.strip() for line in shown.group(1).splitlines()]
    assert lines
    assert [line for line in lines if line not in acl] == []


# ------------------------------------------------------------------------------ mosquitto_sub


def fleet_messages(root: str) -> list[Outbound]:
    """What two devices publish, as our codec writes it, retained so a recipe started later
    receives it at once."""
    topics = Topics(root)
    samples = sample_messages(DEVICE)
    sitting = dataclasses.replace(
        codec.decode_prediction(samples["prediction"][0]),
        prediction_id="0c4e2a9d8b7f4e6a9d1c3b5a7e9f1d2c",
        device_id="wrist-0002",
        label="Sitting",
        class_index=1,
        probabilities=(0.005, 0.97, 0.01, 0.005, 0.005, 0.005),
    )
    error = ErrorEvent(
        source=DEVICE,
        code="unknown_label",
        message="label 'Flying' is not one of the model's labels (Walking, Sitting, Laying)",
        ts=1763769641.0,
        topic=topics.confirmation(DEVICE),
    )
    payloads = [
        (topics.prediction(DEVICE), samples["prediction"][0]),
        (topics.prediction("wrist-0002"), codec.encode_prediction(sitting)),
        (topics.status(DEVICE), samples["status"][0]),
        (
            topics.status("wrist-0002"),
            codec.encode_status(DeviceStatus("wrist-0002", "offline", None, 1763769000.0)),
        ),
        (topics.error(DEVICE), codec.encode_error(error)),
    ]
    return [Outbound(topic, payload, qos=1, retain=True) for topic, payload in payloads]


def run_recipe(recipe: str, settings: BrokerSettings, count: int | None) -> str:
    """Run a shell recipe from the page against the test broker; its stdout."""
    command = recipe.replace("\\\n", " ")
    local = f"-h {settings.host} -p {settings.port}"
    assert DOC_BROKER in command or DOC_DEVICE_BROKER in command, command
    command = command.replace(DOC_BROKER, local).replace(DOC_DEVICE_BROKER, local)
    command = command.replace(f"'{ROOT}/", f"'{settings.topic_root}/")
    if count is not None:  # a live stream: stop after the messages the test expects
        command = command.replace("mosquitto_sub ", f"mosquitto_sub -C {count} ", 1)
    result = subprocess.run(
        ["bash", "-c", command], capture_output=True, text=True, timeout=30, check=False
    )
    assert result.stderr.strip() in ("", "Timed out"), result.stderr
    return result.stdout.replace(f"{settings.topic_root}/", f"{ROOT}/")


# (recipe, messages it stops after or None when it stops by itself, needs jq)
RECIPES = [
    ("all-predictions", 2, False),
    ("one-device", 1, False),
    ("labels", 2, True),
    ("fleet-status", None, True),
    ("errors", 1, True),
]


@pytest.mark.broker
@pytest.mark.parametrize(("label", "count", "needs_jq"), RECIPES, ids=[r[0] for r in RECIPES])
def test_mosquitto_sub_recipe_prints_what_the_page_says(
    broker_settings: BrokerSettings, label: str, count: int | None, needs_jq: bool
) -> None:
    if shutil.which("mosquitto_sub") is None:
        pytest.skip("mosquitto_sub is not installed (apt install mosquitto-clients)")
    if needs_jq and shutil.which("jq") is None:
        pytest.skip("jq is not installed (apt install jq)")
    publish_all(broker_settings, fleet_messages(broker_settings.topic_root))
    printed = run_recipe(block(label), broker_settings, count).splitlines()
    expected = block(f"{label}-output").splitlines()
    if label == "all-predictions":  # the page shortens the line with "..."
        assert len(printed) == count
        for line in expected:
            shown = line.removesuffix("...")
            assert any(p.startswith(shown) for p in printed), f"{shown!r} not in {printed}"
    else:
        assert sorted(printed) == sorted(expected)


@pytest.mark.broker
def test_removal_recipe_deletes_the_retained_configs(broker_settings: BrokerSettings) -> None:
    if shutil.which("mosquitto_pub") is None:
        pytest.skip("mosquitto_pub is not installed (apt install mosquitto-clients)")
    prefix = homeassistant.DEFAULT_PREFIX  # the recipe's; the broker is this test's own
    topics = Topics(broker_settings.topic_root)
    publish_all(
        broker_settings,
        homeassistant.discovery_messages(topics, DEVICE, MODEL_LABELS, prefix=prefix),
    )
    assert len(retained_under(broker_settings, prefix)) == len(homeassistant.OBJECT_IDS)
    run_recipe(block("remove-discovery"), broker_settings, None)
    assert retained_under(broker_settings, prefix) == []


# ------------------------------------------------------------------------------ Home Assistant


def test_discovery_config_shown_is_the_one_the_agent_publishes() -> None:
    shown = json.loads(block("homeassistant-activity"))
    published = {
        m.topic: json.loads(m.payload)
        for m in homeassistant.discovery_messages(Topics(ROOT), DEVICE, MODEL_LABELS)
    }
    assert shown == published[homeassistant.config_topic(DEVICE, homeassistant.ACTIVITY)]
    select = published[homeassistant.config_topic(DEVICE, homeassistant.CORRECT)]
    assert block("homeassistant-correct-template") == select["command_template"]


def test_recorder_exclusions_shown_match_the_volatile_sensors_only() -> None:
    configs = homeassistant.discovery_configs(Topics(ROOT), DEVICE, MODEL_LABELS)

    def entity_id(object_id: str) -> str:
        # Home Assistant names a discovered entity <device name> <entity name>, slugified.
        name = f"{DEVICE} {configs[object_id]['name']}".lower()
        return f"{homeassistant.COMPONENTS[object_id]}.{re.sub(r'[^a-z0-9]+', '_', name)}"

    globs = re.findall(r"^\s+- (sensor\.\S+)$", block("homeassistant-recorder"), re.MULTILINE)
    excluded = {
        object_id
        for object_id in configs
        if any(fnmatch.fnmatchcase(entity_id(object_id), glob) for glob in globs)
    }
    assert excluded == {homeassistant.CONFIDENCE, homeassistant.MODEL}


def test_toml_shown_turns_the_option_on(tmp_path: Path) -> None:
    (body,) = [body for lang, _, body in all_blocks() if lang == "toml"]
    config = tmp_path / "agent.toml"
    config.write_text(f'device_id = "{DEVICE}"\n{body}\n', encoding="utf-8")
    settings = load_settings(AgentSettings, config_file=config)
    assert settings.agent.homeassistant_discovery
    assert settings.agent.homeassistant_prefix == homeassistant.DEFAULT_PREFIX


def test_manual_yaml_uses_our_topics_and_the_agents_templates() -> None:
    topics = Topics(ROOT)
    kinds = {topics.prediction(DEVICE): "prediction", topics.status(DEVICE): "status"}
    configs = homeassistant.discovery_configs(topics, DEVICE, MODEL_LABELS).values()
    agent_templates = {c["value_template"] for c in configs if "value_template" in c}
    agent_templates |= {a["value_template"] for c in configs for a in c["availability"]}
    command_templates = {c["command_template"] for c in configs if "command_template" in c}
    samples = sample_messages(DEVICE)
    topic: str | None = None
    checked = commands = 0
    for line in block("homeassistant-manual").splitlines():
        found = re.match(r"""\s*-?\s*(\w+): (["'])(.*)\2$""", line)
        if found is None:
            if line.strip().startswith("options:"):
                assert line.split(": ", 1)[1] == json.dumps(list(MODEL_LABELS))
            continue
        key, _, value = found.groups()
        if key == "command_topic":
            assert value == topics.command(DEVICE)
        elif key == "command_template":
            assert value in command_templates, f"{value} differs from the discovery configs'"
            commands += 1
        elif key.endswith("topic"):
            assert value in kinds, f"{value} is not {DEVICE}'s prediction or status topic"
            topic = value
        elif key == "value_template":
            assert value in agent_templates, f"{value} differs from the discovery configs'"
            assert topic is not None
            for payload in samples[kinds[topic]]:
                for path in template_fields(value):
                    resolve(json.loads(payload), path)
            checked += 1
    assert checked == 5
    assert commands == len(command_templates) == 2
