"""Home Assistant MQTT discovery: retained configs that make a device appear as sensors there.

Home Assistant subscribes to ``<prefix>/#`` and creates one entity per retained JSON config on
``<prefix>/<component>/[<node_id>/]<object_id>/config``; an empty retained payload on the same
topic deletes the entity again. The entities read the device's own topics (its predictions and
its retained status), so nothing else is published for Home Assistant.

The node id is the device id: the shipped broker ACL lets a device write under
``<prefix>/sensor/<its username>/`` only. Home Assistant accepts ``[a-zA-Z0-9_-]`` in node and
object ids (its ``TOPIC_MATCHER``), a narrower alphabet than our device ids, which also allow
``.``: such a device cannot be discovered, and ``check_node_id`` says so.
"""

from __future__ import annotations

import json
import re
from typing import Any

from shared.mqtt_transport import Outbound
from shared.topics import Topics, is_valid_id

DEFAULT_PREFIX = "homeassistant"
COMPONENT = "sensor"

# Home Assistant's alphabet for <node_id> and <object_id> in a discovery topic.
_DISCOVERY_ID = re.compile(r"[A-Za-z0-9_-]+")

# The entities every device gets, by object id (the last level before /config).
ACTIVITY = "activity"
CONFIDENCE = "confidence"
MODEL = "model"
OBJECT_IDS = (ACTIVITY, CONFIDENCE, MODEL)

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
    """``<prefix>/sensor/<device_id>/<object_id>/config``."""
    if object_id not in OBJECT_IDS:
        raise ValueError(f"unknown entity {object_id!r}: one of {', '.join(OBJECT_IDS)}")
    return f"{check_prefix(prefix)}/{COMPONENT}/{check_node_id(device_id)}/{object_id}/config"


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


def discovery_configs(topics: Topics, device_id: str) -> dict[str, dict[str, Any]]:
    """The discovery config of each entity of ``device_id``, by object id."""
    check_node_id(device_id)
    prediction = topics.prediction(device_id)
    status = topics.status(device_id)
    return {
        ACTIVITY: {
            "name": "Activity",
            "unique_id": f"har_{device_id}_{ACTIVITY}",
            "icon": "mdi:run",
            "state_topic": prediction,
            "value_template": "{{ value_json.label }}",
            # prediction_id, probabilities, model_version ...: what an automation needs to
            # confirm or correct the prediction.
            "json_attributes_topic": prediction,
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
            "value_template": "{{ value_json.model_version }}",
            "json_attributes_topic": status,  # the counters, for diagnostics
            **_shared_fields(device_id, status),
        },
    }


def discovery_messages(
    topics: Topics, device_id: str, *, prefix: str = DEFAULT_PREFIX
) -> list[Outbound]:
    """Retained QoS 1 JSON configs that make ``device_id`` appear in Home Assistant."""
    return [
        Outbound(
            config_topic(device_id, object_id, prefix),
            json.dumps(config, separators=(",", ":"), ensure_ascii=False).encode(),
            qos=1,
            retain=True,
        )
        for object_id, config in discovery_configs(topics, device_id).items()
    ]


def removal_messages(device_id: str, *, prefix: str = DEFAULT_PREFIX) -> list[Outbound]:
    """Empty retained payloads on the config topics: Home Assistant deletes the entities."""
    return [
        Outbound(config_topic(device_id, object_id, prefix), b"", qos=1, retain=True)
        for object_id in OBJECT_IDS
    ]
