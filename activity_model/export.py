"""Exporting a trained :class:`~activity_model.tracker.ActivityTracker`: the SavedModel, and
for a personalisable model its LiteRT form beside it (``activity_model.lite_export``)."""

from __future__ import annotations

from typing import Any

from activity_model.lite_export import export_litert
from activity_model.tensorflow_import import import_tensorflow
from activity_model.tracker import ActivityTracker, DeviceLearning, Memory


def export_tracker(
    tracker: ActivityTracker,
    out_dir: Any,
    *,
    memory: Memory | None = None,
    learning: DeviceLearning | None = None,
) -> str:
    """Writes ``tracker`` as a SavedModel in ``out_dir``; returns the model id it was given.

    ``memory`` (class-balanced training windows) is shipped inside, as its features under the
    final weights; without it a device learns from its wearer's windows and the anchor alone.
    The model id (a digest of architecture, labels, weights, memory and learning settings) lets
    ``restore_state`` refuse a state file written by a different model. A personalisable
    model also gets its LiteRT form in ``out_dir/litert/`` (``activity_model.lite_export``), for
    agents without TensorFlow.
    """
    tracker.set_memory(memory, learning or DeviceLearning())
    model_id = tracker.weights_digest()[:32]
    tracker.model_id.assign(model_id)
    tracker.reset_optimizer()
    tracker.reset_personal()
    if tracker.spec.arch == "seed-lstm":
        tracker.reset_state()
    import_tensorflow().saved_model.save(tracker, str(out_dir), signatures=tracker.signatures())
    if tracker.spec.personalisable:
        export_litert(tracker, out_dir)
    return model_id
