"""The exported ActivityTracker's signature names: the contract a runtime loads (no TensorFlow)."""

from __future__ import annotations

from typing import Final

# Every exported model has these.
COMMON: Final = ("predict", "reset_state", "metadata")
# ``predict`` again under the name TF Serving and other tools call when none is given.
DEFAULT: Final = "serving_default"
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
