"""Loading an exported model on a runtime: the one place that picks and imports one.

``load_model(folder, runtime)`` gives an :class:`~activity_model.runtime.ActivityModel`:

- ``tensorflow`` (``activity_model.tensorflow_runtime``) calls the SavedModel's signatures;
- ``litert`` (``activity_model.litert_runtime``) runs the bundle's ``litert/activity.tflite`` in
  ``ai-edge-litert``, for devices without TensorFlow;
- ``auto`` is TensorFlow when it is installed, LiteRT otherwise.

Neither runtime is imported until chosen.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import Final

from activity_model import signatures
from activity_model.runtime import ActivityModel
from shared.errors import ModelError

logger = logging.getLogger(__name__)

RUNTIMES: Final = ("auto", "tensorflow", "litert")


def runtime_installed(runtime: str) -> bool:
    """Whether ``runtime``'s package is installed (found, not imported)."""
    module = {"tensorflow": "tensorflow", "litert": "ai_edge_litert"}[runtime]
    return importlib.util.find_spec(module) is not None


def resolve_runtime(choice: str, *, prefer: str = "tensorflow") -> str:
    """The runtime ``choice`` means here: ``auto`` takes ``prefer`` when it is installed, else the
    other. Nothing is imported to find out."""
    if choice not in RUNTIMES:
        raise ModelError(f"unknown model runtime {choice!r}; choose from {', '.join(RUNTIMES)}")
    if choice != "auto":
        return choice
    other = "litert" if prefer == "tensorflow" else "tensorflow"
    for runtime in (prefer, other):
        if runtime_installed(runtime):
            return runtime
    raise ModelError(
        "no model runtime is installed: pip install 'har-edge[agent-lite]' (LiteRT) "
        "or 'har-edge[agent]' (TensorFlow)"
    )


def load_model(
    saved_model_dir: Path, runtime: str = "auto", *, prefer: str = "tensorflow"
) -> ActivityModel:
    """Loads an exported model on ``runtime`` (see :func:`resolve_runtime`); a
    :class:`ModelError` says what is wrong with it. With ``auto``, a model that has no LiteRT
    form (the seed-lstm) runs on TensorFlow where it is installed."""
    folder = Path(saved_model_dir)
    chosen = resolve_runtime(runtime, prefer=prefer)
    lite_form = folder / signatures.LITERT_DIR / signatures.LITERT_MODEL
    if (
        runtime == "auto"
        and chosen == "litert"
        and not lite_form.is_file()
        and runtime_installed("tensorflow")
    ):
        logger.info("%s has no LiteRT form: it runs on TensorFlow", folder)
        chosen = "tensorflow"
    if chosen == "litert":
        from activity_model.litert_runtime import LiteRTModel

        return LiteRTModel.open(folder)
    from activity_model.tensorflow_runtime import TensorFlowModel

    return TensorFlowModel.open(folder)
