"""Classification metrics for activity models, and predictions from a tracker or a runtime model."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt

from activity_model.windowing import WindowSet


def confusion_matrix(
    y_true: npt.NDArray[np.integer[Any]], y_pred: npt.NDArray[np.integer[Any]], k: int
) -> npt.NDArray[np.int64]:
    """Rows are the true class, columns the predicted one."""
    matrix = np.zeros((k, k), dtype=np.int64)
    np.add.at(matrix, (np.asarray(y_true, np.int64), np.asarray(y_pred, np.int64)), 1)
    return matrix


def metrics_from_predictions(
    y_true: npt.NDArray[np.integer[Any]],
    y_pred: npt.NDArray[np.integer[Any]],
    labels: tuple[str, ...],
) -> dict[str, Any]:
    """Accuracy, macro-F1 (over classes present in ``y_true``), per-class figures, confusion."""
    k = len(labels)
    matrix = confusion_matrix(y_true, y_pred, k)
    support = matrix.sum(axis=1)
    predicted = matrix.sum(axis=0)
    hits = np.diag(matrix)
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.where(predicted > 0, hits / np.maximum(predicted, 1), 0.0)
        recall = np.where(support > 0, hits / np.maximum(support, 1), 0.0)
        f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
    present = support > 0
    n = int(support.sum())
    return {
        "n": n,
        "accuracy": float(hits.sum() / n) if n else 0.0,
        "macro_f1": float(f1[present].mean()) if present.any() else 0.0,
        "per_class": {
            label: {
                "precision": float(precision[i]),
                "recall": float(recall[i]),
                "f1": float(f1[i]),
                "support": int(support[i]),
            }
            for i, label in enumerate(labels)
        },
        "confusion": matrix.tolist(),
        "labels": list(labels),
    }


def predict_classes(model: Any, ws: WindowSet, batch_size: int = 512) -> npt.NDArray[np.int64]:
    """Class index per window from an ActivityTracker (in memory) or an ActivityModel (runtime).

    Stateful models (``seed-lstm``) see the windows in order, with their recurrent state reset
    at the start of each recording (``ws.segment``), as a device resets on an activity change.
    """
    from activity_model.runtime import ActivityModel

    if isinstance(model, ActivityModel):
        if model.arch == "seed-lstm":
            return _predict_stateful(
                model, ws, lambda x: int(model.predict(x[np.newaxis]).class_index[0])
            )
        return np.concatenate(
            [
                model.predict(ws.x[i : i + batch_size]).class_index
                for i in range(0, len(ws), batch_size)
            ]
        ).astype(np.int64)
    if model.spec.arch == "seed-lstm":
        batch = model.spec.window
        return _predict_stateful(
            model, ws, lambda x: int(model.predict(x.reshape(batch, 1, 3))["vote_index"].numpy())
        )
    out = [
        np.argmax(model.logits(ws.x[i : i + batch_size]).numpy(), axis=1)
        for i in range(0, len(ws), batch_size)
    ]
    return np.concatenate(out).astype(np.int64) if out else np.zeros(0, np.int64)


def _segment_starts(ws: WindowSet) -> npt.NDArray[np.bool_]:
    starts = np.ones(len(ws), dtype=bool)
    if ws.segment is not None and len(ws) > 1:
        starts[1:] = (ws.segment[1:] != ws.segment[:-1]) | (ws.segment[1:] < 0)
    return starts


def _predict_stateful(
    model: Any, ws: WindowSet, predict_one: Callable[[npt.NDArray[np.float32]], int]
) -> npt.NDArray[np.int64]:
    """``predict_one`` on each window in order, the model's state reset where a recording starts."""
    starts = _segment_starts(ws)
    out = np.zeros(len(ws), dtype=np.int64)
    for i in range(len(ws)):
        if starts[i]:
            model.reset_state()
        out[i] = predict_one(ws.x[i])
    return out


def evaluate(model: Any, ws: WindowSet) -> dict[str, Any]:
    """Metrics of ``model`` (tracker or runtime model) on the windows of ``ws``."""
    predicted = predict_classes(model, ws)
    return metrics_from_predictions(ws.y, predicted, ws.labels)
