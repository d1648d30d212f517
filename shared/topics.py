"""Topic names: the only place that knows how topics are spelled.

Every topic lives under a configurable root (default ``har/v1``); the version in the root lets a
future, incompatible contract run beside this one on the same broker.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

DEFAULT_ROOT = "har/v1"

# Device ids and model versions become topic levels: keep them to a safe, printable alphabet.
_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$")


def is_valid_id(value: str) -> bool:
    """True if ``value`` may be used as a device id or model version (one topic level)."""
    return bool(_ID_PATTERN.fullmatch(value))


def _check_id(kind: str, value: str) -> str:
    if not is_valid_id(value):
        raise ValueError(
            f"invalid {kind} {value!r}: use 1-64 characters from A-Z a-z 0-9 _ . -, "
            "starting with a letter or digit"
        )
    return value


@dataclass(frozen=True, slots=True)
class Topics:
    """Builds every topic of the contract under one root."""

    root: str = DEFAULT_ROOT

    def __post_init__(self) -> None:
        if not self.root or self.root.startswith("/") or self.root.endswith("/"):
            raise ValueError(f"topic root {self.root!r}: non-empty, no leading or trailing /")
        if any(ch in self.root for ch in "+#\0"):
            raise ValueError(f"topic root {self.root!r} must not contain wildcards or NUL")

    # --- per device -----------------------------------------------------------------------
    def device(self, device_id: str) -> str:
        return f"{self.root}/devices/{_check_id('device id', device_id)}"

    def sensor(self, device_id: str) -> str:
        return f"{self.device(device_id)}/sensor"

    def prediction(self, device_id: str) -> str:
        return f"{self.device(device_id)}/prediction"

    def confirmation(self, device_id: str) -> str:
        return f"{self.device(device_id)}/confirmation"

    def status(self, device_id: str) -> str:
        return f"{self.device(device_id)}/status"

    def error(self, device_id: str) -> str:
        return f"{self.device(device_id)}/error"

    def command(self, device_id: str) -> str:
        return f"{self.device(device_id)}/command"

    def receipt(self, device_id: str) -> str:
        return f"{self.device(device_id)}/receipt"

    def confirmed(self, device_id: str) -> str:
        return f"{self.device(device_id)}/confirmed"

    def forgotten(self, device_id: str) -> str:
        return f"{self.device(device_id)}/forgotten"

    # --- fleet-wide subscriptions (single-level wildcard on the device id) ---------------------
    def all_sensor(self) -> str:
        return f"{self.root}/devices/+/sensor"

    def all_prediction(self) -> str:
        return f"{self.root}/devices/+/prediction"

    def all_confirmation(self) -> str:
        return f"{self.root}/devices/+/confirmation"

    def all_confirmed(self) -> str:
        return f"{self.root}/devices/+/confirmed"

    def all_forgotten(self) -> str:
        return f"{self.root}/devices/+/forgotten"

    def all_status(self) -> str:
        return f"{self.root}/devices/+/status"

    def all_error(self) -> str:
        return f"{self.root}/devices/+/error"

    # --- models -----------------------------------------------------------------------------
    def model_manifest(self) -> str:
        return f"{self.root}/model/manifest"

    def model_chunk(self, version: str, index: int) -> str:
        if index < 0:
            raise ValueError("chunk index must be >= 0")
        return f"{self.root}/model/{_check_id('model version', version)}/chunk/{index}"

    def model_chunks(self, version: str) -> str:
        return f"{self.root}/model/{_check_id('model version', version)}/chunk/+"

    # --- trainer ----------------------------------------------------------------------------
    def trainer_status(self, instance: str) -> str:
        return f"{self.root}/trainer/{_check_id('trainer instance', instance)}/status"

    def trainer_error(self) -> str:
        return f"{self.root}/trainer/error"

    def trainer_command(self) -> str:
        return f"{self.root}/trainer/command"

    # --- parsing ----------------------------------------------------------------------------
    def device_of(self, topic: str) -> str | None:
        """The device id in a per-device topic under this root, or None if it is not one."""
        prefix = f"{self.root}/devices/"
        if not topic.startswith(prefix):
            return None
        rest = topic[len(prefix) :].split("/")
        if len(rest) != 2 or not is_valid_id(rest[0]):
            return None
        return rest[0]

    def kind_of(self, topic: str) -> str | None:
        """The last level of a per-device topic (``sensor``, ``prediction`` ...), or None."""
        if self.device_of(topic) is None:
            return None
        return topic.rsplit("/", 1)[1]

    def chunk_of(self, topic: str) -> tuple[str, int] | None:
        """(version, index) of a model chunk topic under this root, or None."""
        prefix = f"{self.root}/model/"
        if not topic.startswith(prefix):
            return None
        parts = topic[len(prefix) :].split("/")
        if len(parts) != 3 or parts[1] != "chunk" or not parts[2].isdigit():
            return None
        if not is_valid_id(parts[0]):
            return None
        return parts[0], int(parts[2])
