"""Home Assistant MQTT discovery: retained configs that make a device appear as sensors there.

Home Assistant subscribes to ``<prefix>/#`` and creates one entity per retained JSON config on
``<prefix>/<component>/[<node_id>/]<object_id>/config``; an empty retained payload on the same
topic deletes the entity again. The sensors read the device's own topics (its predictions and
its retained status), so nothing else is published for Home Assistant. The controls (a select
to correct, a button to confirm the latest prediction) publish device commands
(``confirm_latest``, ``correct_latest``) on the device's command topic.

The Activity sensor is an enum and the select's options are the current model's labels: the
configs depend on the model, and a device publishes them again when a model with other labels
replaces its own (before its first prediction from it). Before its first model a device has no
labels: it publishes the sensors without options and no controls.

The node id is the device id: the shipped broker ACL lets a device write under
``<prefix>/<component>/<its username>/`` only. Home Assistant accepts ``[a-zA-Z0-9_-]`` in node
and object ids (its ``TOPIC_MATCHER``), a narrower alphabet than our device ids, which also allow
``.``: such a device cannot be discovered, and ``check_node_id`` says so.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Any

from shared.mqtt_transport import Outbound
from shared.topics import Topics, is_valid_id

DEFAULT_PREFIX = "homeassistant"

# Home Assistant's alphabet for <node_id> and <object_id> in a discovery topic.
_DISCOVERY_ID = re.compile(r"[A-Za-z0-9_-]+")

# The entities a device gets, by object id (the last level before /config).
ACTIVITY = "activity"
CONFIDENCE = "confidence"
MODEL = "model"
CORRECT = "correct"  # select "What am I doing?": correct the latest prediction
CONFIRM = "confirm"  # button "Confirm": the latest prediction was right
# Home Assistant's component (the topic level before the node id) of each entity.
COMPONENTS = {
    ACTIVITY: "sensor",
    CONFIDENCE: "sensor",
    MODEL: "sensor",
    CORRECT: "select",
    CONFIRM: "button",
}
OBJECT_IDS = tuple(COMPONENTS)
SENSORS = (ACTIVITY, CONFIDENCE, MODEL)
CONTROLS = (CORRECT, CONFIRM)

ORIGIN_NAME = "har-edge"


def check_node_id(device_id: str) -> str:
    """``device_id`` if Home Assistant accepts it as a discovery node id, else ValueError."""
    if not is_valid_id(device_id):
        raise ValueError(f"invalid device id {device_id!r}")
    if not _DISCOVERY_ID.fullmatch(device_id):
        raise ValueError(
            f"device id {device_id!r} cannot be a Home Assistant discovery node id: Home "
            "Assistant allows only A-Z a-z 0-9 _ - there (no '.'); rename the device or turn "
            "Home Assistant discovery off for it"
        )
    return device_id


def check_prefix(prefix: str) -> str:
    """``prefix`` if it can be a discovery prefix (topic levels, no wildcards), else ValueError."""
    levels = prefix.split("/")
    if not prefix or "" in levels or any(ch in prefix for ch in "+#\0"):
        raise ValueError(
            f"Home Assistant discovery prefix {prefix!r}: non-empty topic levels without "
            "wildcards, no leading or trailing /"
        )
    return prefix


def config_topic(device_id: str, object_id: str, prefix: str = DEFAULT_PREFIX) -> str:
    """``<prefix>/<component>/<device_id>/<object_id>/config``."""
    if object_id not in COMPONENTS:
        raise ValueError(f"unknown entity {object_id!r}: one of {', '.join(OBJECT_IDS)}")
    component = COMPONENTS[object_id]
    return f"{check_prefix(prefix)}/{component}/{check_node_id(device_id)}/{object_id}/config"


def _shared_fields(device_id: str, status_topic: str) -> dict[str, Any]:
    """What every entity of a device has in common (a fresh dict: callers may change it)."""
    return {
        # The retained status says whether the device is there: "online", or "offline" from
        # its clean shutdown or the broker's last will.
        "availability": [
            {
                "topic": status_topic,
                "value_template": "{{ value_json.state }}",
                "payload_available": "online",
                "payload_not_available": "offline",
            }
        ],
        "qos": 1,
        "device": {
            "identifiers": [f"har_{device_id}"],
            "name": device_id,
            "model": "HAR device agent",
            "manufacturer": "HAR activity recognition",
        },
        "origin": {"name": ORIGIN_NAME},
    }


def _command_template(command: str, label_field: str = "") -> str:
    """A Home Assistant template that renders a ``device_command`` (docs/protocol.md); ``now()``
    is Home Assistant's clock, and the ``ts`` orders a correction after an earlier one. The
    request id is the press's time in microseconds: one per press, two presses a second apart
    or not (the agent's handling of a command once relies on it)."""
    return (
        f'{{"type":"device_command","v":1,"command":"{command}",{label_field}'
        '"request_id":"homeassistant-{{ (now().timestamp() * 1000000) | int }}",'
        '"ts":{{ now().timestamp() }}}'
    )


# The Model version sensor's attributes: every field of the status but ``state``, a name Home
# Assistant reserves for the entity's own state (it refuses such an attribute).
_STATUS_ATTRIBUTES = (
    "{{ {'device_id': value_json.device_id, 'model_version': value_json.model_version,"
    " 'counters': value_json.counters, 'ts': value_json.ts} | tojson }}"
)


def discovery_configs(
    topics: Topics,
    device_id: str,
    labels: Sequence[str] = (),
    *,
    controls: bool = True,
) -> dict[str, dict[str, Any]]:
    """The discovery config of each entity of ``device_id``, by object id.

    ``labels``: the device's current model's labels (none before its first model: then there
    are no controls). ``controls``: the select and button, for a device that handles
    ``confirm_latest`` and ``correct_latest`` commands (the device agent; not ``har sim``).
    """
    check_node_id(device_id)
    prediction = topics.prediction(device_id)
    status = topics.status(device_id)
    command = topics.command(device_id)
    options = {"options": list(labels)} if labels else {}
    configs: dict[str, dict[str, Any]] = {
        ACTIVITY: {
            "name": "Activity",
            "unique_id": f"har_{device_id}_{ACTIVITY}",
            "icon": "mdi:run",
            "device_class": "enum",
            **options,
            "state_topic": prediction,
            "value_template": "{{ value_json.label }}",
            # No json_attributes: Home Assistant records a state change whenever an attribute
            # changes, and a prediction's id, probabilities and time change every time.
            **_shared_fields(device_id, status),
        },
        CONFIDENCE: {
            "name": "Confidence",
            "unique_id": f"har_{device_id}_{CONFIDENCE}",
            "icon": "mdi:gauge",
            "state_topic": prediction,
            "value_template": "{{ (value_json.probabilities | max * 100) | round(1) }}",
            "unit_of_measurement": "%",
            "state_class": "measurement",
            "suggested_display_precision": 1,
            **_shared_fields(device_id, status),
        },
        MODEL: {
            "name": "Model version",
            "unique_id": f"har_{device_id}_{MODEL}",
            "icon": "mdi:brain",
            "entity_category": "diagnostic",
            "state_topic": status,
            # Before the first model the status has model_version null. Home Assistant's own
            # "no value" state is the text unknown: a text sensor before 2024.10 kept the
            # rendered text "None" as its state (home-assistant/core PR 127032).
            "value_template": "{{ value_json.model_version or 'unknown' }}",
            "json_attributes_topic": status,  # the counters, for diagnostics
            "json_attributes_template": _STATUS_ATTRIBUTES,
            **_shared_fields(device_id, status),
        },
    }
    if controls and labels:
        configs[CORRECT] = {
            "name": "What am I doing?",
            "unique_id": f"har_{device_id}_{CORRECT}",
            "icon": "mdi:account-question",
            "options": list(labels),
            # Shows the latest prediction; choosing an option corrects it to that label.
            "state_topic": prediction,
            "value_template": "{{ value_json.label }}",
            "command_topic": command,
            "command_template": _command_template(
                "correct_latest", '"label":{{ value | tojson }},'
            ),
            "retain": False,
            **_shared_fields(device_id, status),
        }
        configs[CONFIRM] = {
            "name": "Confirm",
            "unique_id": f"har_{device_id}_{CONFIRM}",
            "icon": "mdi:check-circle-outline",
            "command_topic": command,
            "command_template": _command_template("confirm_latest"),
            "retain": False,
            **_shared_fields(device_id, status),
        }
    return configs


def discovery_messages(
    topics: Topics,
    device_id: str,
    labels: Sequence[str] = (),
    *,
    prefix: str = DEFAULT_PREFIX,
    controls: bool = True,
) -> list[Outbound]:
    """Retained QoS 1 JSON configs that make ``device_id`` appear in Home Assistant
    (``labels`` and ``controls`` as in ``discovery_configs``)."""
    configs = discovery_configs(topics, device_id, labels, controls=controls)
    return [
        Outbound(
            config_topic(device_id, object_id, prefix),
            json.dumps(config, separators=(",", ":"), ensure_ascii=False).encode(),
            qos=1,
            retain=True,
        )
        for object_id, config in configs.items()
    ]


def removal_messages(device_id: str, *, prefix: str = DEFAULT_PREFIX) -> list[Outbound]:
    """Empty retained payloads on the config topics: Home Assistant deletes the entities."""
    return [
        Outbound(config_topic(device_id, object_id, prefix), b"", qos=1, retain=True)
        for object_id in OBJECT_IDS
    ]
