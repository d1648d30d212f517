"""The exported ActivityTracker's signature names: the contract a runtime loads (no TensorFlow)."""

from __future__ import annotations

from typing import Final

# Every exported model has these.
COMMON: Final = ("predict", "reset_state", "metadata")
# A model a device can learn on (metadata ``personalisable``) also has these.
PERSONAL: Final = (
    "learn",
    "evaluate",
    "memory_check",
    "set_personal",
    "get_personal",
    "save_state",
    "restore_state",
)
