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

# The LiteRT form of a personalisable model, beside the SavedModel in the same signed bundle
# (``<saved_model>/litert/``): a ``.tflite`` file with built-in ops only, and its metadata as
# JSON (a LiteRT model has no lookup tables or string tensors to carry it).
LITERT_DIR: Final = "litert"
LITERT_MODEL: Final = "activity.tflite"
LITERT_METADATA: Final = "metadata.json"
LITERT: Final = ("predict", "learn", "evaluate", "memory_check")
