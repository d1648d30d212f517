"""PNG plots of a model version and of the registry's versions.

The data behind each plot comes from a plain function (``row_normalised``,
``learning_curves``, ``version_points``) that the tests check; the ``plot_*`` functions only
draw it. matplotlib is imported only when a plot is drawn, and draws on the Agg canvas: no
display, no pyplot, no global backend switch.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt


def row_normalised(confusion: Sequence[Sequence[int]]) -> npt.NDArray[np.float64]:
    """Each true class's windows as shares of the predicted classes (rows sum to 1); a class
    without windows has a row of zeros."""
    matrix = np.asarray(confusion, dtype=np.float64)
    totals = matrix.sum(axis=1, keepdims=True)
    shares: npt.NDArray[np.float64] = np.divide(
        matrix, totals, out=np.zeros_like(matrix), where=totals > 0
    )
    return shares


def learning_curves(history: Iterable[dict[str, float]]) -> dict[str, list[float]]:
    """Per-epoch series from a training history (``TrainResult.history``, ``metrics.json``):
    ``epoch`` (counted from 1), ``loss`` (mean training loss of the epoch), ``val_accuracy``
    and ``val_macro_f1``."""
    curves: dict[str, list[float]] = {
        "epoch": [],
        "loss": [],
        "val_accuracy": [],
        "val_macro_f1": [],
    }
    for entry in history:
        curves["epoch"].append(float(entry["epoch"]) + 1)
        for name in ("loss", "val_accuracy", "val_macro_f1"):
            curves[name].append(float(entry[name]))
    return curves


@dataclass(frozen=True, slots=True)
class VersionPoint:
    """One model version on the accuracy-over-time plot."""

    version: str
    created: float  # Unix seconds
    test_accuracy: float | None  # on the base data's held-out users
    confirmed_accuracy: float | None  # on held-out recent confirmations (retrained versions)
    current: bool


def version_points(versions: Iterable[Any], current: str | None) -> list[VersionPoint]:
    """The registry's versions (``VersionInfo``, any order) as points, oldest first."""
    points = [
        VersionPoint(
            version=info.version,
            created=float(info.created),
            test_accuracy=info.metrics.get("test_accuracy"),
            confirmed_accuracy=info.metrics.get("confirmed_accuracy"),
            current=info.version == current,
        )
        for info in versions
    ]
    return sorted(points, key=lambda point: point.created)


def _figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height))
    FigureCanvasAgg(figure)
    return figure


def _save(figure: Any, path: Path) -> None:
    figure.tight_layout()
    figure.savefig(path, dpi=100, format="png")


def plot_confusion(metrics: dict[str, Any], path: Path, title: str = "") -> None:
    """The confusion matrix as counts and, beside it, row-normalised (recall on the diagonal).
    ``title`` (the version name) heads the figure with accuracy and macro-F1."""
    counts = np.asarray(metrics["confusion"], dtype=np.int64)
    shares = row_normalised(metrics["confusion"])
    labels = list(metrics["labels"])
    k = len(labels)
    figure = _figure(2 * (0.9 * k + 2.2), 0.9 * k + 2.2)
    for ax, values, heading in (
        (figure.add_subplot(1, 2, 1), counts, "windows"),
        (figure.add_subplot(1, 2, 2), shares, "share of the true class"),
    ):
        ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
        ax.set_xticks(range(k), labels, rotation=45, ha="right")
        ax.set_yticks(range(k), labels)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(heading)
        for i in range(k):
            for j in range(k):
                text = str(values[i, j]) if values is counts else f"{values[i, j]:.2f}"
                colour = "white" if shares[i, j] > 0.6 else "black"
                ax.text(j, i, text, ha="center", va="center", color=colour, fontsize=8)
    heading = f"accuracy {metrics['accuracy']:.3f}, macro-F1 {metrics['macro_f1']:.3f}"
    figure.suptitle(f"{title}: {heading}" if title else heading)
    _save(figure, path)


def plot_learning_curves(history: Iterable[dict[str, float]], path: Path, title: str = "") -> None:
    """Training loss, and validation accuracy and macro-F1, per epoch."""
    curves = learning_curves(history)
    figure = _figure(9, 3.6)
    loss_ax = figure.add_subplot(1, 2, 1)
    loss_ax.plot(curves["epoch"], curves["loss"], marker="o", color="tab:red")
    loss_ax.set_xlabel("epoch")
    loss_ax.set_ylabel("training loss")
    loss_ax.grid(alpha=0.3)
    score_ax = figure.add_subplot(1, 2, 2)
    score_ax.plot(curves["epoch"], curves["val_accuracy"], marker="o", label="accuracy")
    score_ax.plot(curves["epoch"], curves["val_macro_f1"], marker="s", label="macro-F1")
    score_ax.set_xlabel("epoch")
    score_ax.set_ylabel("validation")
    score_ax.set_ylim(0, 1)
    score_ax.grid(alpha=0.3)
    score_ax.legend(loc="lower right")
    figure.suptitle(f"{title}: learning curves" if title else "learning curves")
    _save(figure, path)


def plot_versions(points: Sequence[VersionPoint], path: Path) -> None:
    """Accuracy of each version against the time it was made; the current one is marked."""
    import datetime

    figure = _figure(9, 4)
    ax = figure.add_subplot(1, 1, 1)

    def when(point: VersionPoint) -> datetime.datetime:
        return datetime.datetime.fromtimestamp(point.created, tz=datetime.timezone.utc)

    for attribute, label, marker in (
        ("test_accuracy", "held-out users (base data)", "o"),
        ("confirmed_accuracy", "held-out recent confirmations", "s"),
    ):
        shown = [p for p in points if getattr(p, attribute) is not None]
        if shown:
            ax.plot(
                [when(p) for p in shown],
                [getattr(p, attribute) for p in shown],
                marker=marker,
                label=label,
            )
    for point in points:
        if point.test_accuracy is not None:
            ax.annotate(
                f"{point.version}{' (current)' if point.current else ''}",
                (when(point), point.test_accuracy),
                textcoords="offset points",
                xytext=(0, 6),
                ha="center",
                fontsize=7,
            )
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("test accuracy")
    ax.set_xlabel("created (UTC)")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="lower right")
    figure.autofmt_xdate()
    stamp = time.strftime("%Y-%m-%d %H:%M", time.gmtime())
    ax.set_title(f"accuracy per model version ({len(points)} versions, {stamp} UTC)")
    _save(figure, path)
