"""Training and registry plots: the data behind them, and that real PNGs are written."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from trainer_service.plots import (
    learning_curves,
    plot_confusion,
    plot_learning_curves,
    plot_versions,
    row_normalised,
    version_points,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
REPO = Path(__file__).resolve().parent.parent


def png_size(path: Path) -> tuple[int, int]:
    """Width and height from a PNG's IHDR chunk, after checking the signature."""
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    assert data[12:16] == b"IHDR"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def test_row_normalised_gives_each_true_class_shares_summing_to_one() -> None:
    shares = row_normalised([[8, 2, 0], [1, 3, 0], [0, 0, 0]])
    np.testing.assert_allclose(shares[0], [0.8, 0.2, 0.0])
    np.testing.assert_allclose(shares[1], [0.25, 0.75, 0.0])
    np.testing.assert_array_equal(shares[2], [0.0, 0.0, 0.0])  # no windows: no shares, no NaN


def test_learning_curves_follow_the_history_epoch_by_epoch() -> None:
    history = [
        {"epoch": 0, "loss": 1.2, "val_accuracy": 0.5, "val_macro_f1": 0.4},
        {"epoch": 1, "loss": 0.7, "val_accuracy": 0.75, "val_macro_f1": 0.7},
    ]
    assert learning_curves(history) == {
        "epoch": [1.0, 2.0],
        "loss": [1.2, 0.7],
        "val_accuracy": [0.5, 0.75],
        "val_macro_f1": [0.4, 0.7],
    }


def _info(version: str, created: float, **metrics: float) -> SimpleNamespace:
    return SimpleNamespace(version=version, created=created, metrics=metrics)


def test_version_points_are_oldest_first_with_their_accuracies_and_the_current_marked() -> None:
    infos = [
        _info("v2", 200.0, test_accuracy=0.9, confirmed_accuracy=0.8),
        _info("v1", 100.0, test_accuracy=0.85),
    ]
    points = version_points(infos, current="v2")
    assert [(p.version, p.test_accuracy, p.confirmed_accuracy, p.current) for p in points] == [
        ("v1", 0.85, None, False),
        ("v2", 0.9, 0.8, True),
    ]


def test_plots_are_written_as_pngs(tmp_path: Path) -> None:
    metrics = {
        "confusion": [[8, 2], [1, 3]],
        "labels": ["Walking", "Sitting"],
        "accuracy": 11 / 14,
        "macro_f1": 0.77,
    }
    plot_confusion(metrics, tmp_path / "confusion.png", title="v0007 (cnn)")
    history = [
        {"epoch": e, "loss": 1 / (e + 1), "val_accuracy": 0.5, "val_macro_f1": 0.4}
        for e in range(3)
    ]
    plot_learning_curves(history, tmp_path / "curves.png", title="v0007")
    points = version_points([_info("v1", 1.7e9, test_accuracy=0.8)], current="v1")
    plot_versions(points, tmp_path / "versions.png")
    width, height = png_size(tmp_path / "confusion.png")
    assert width > 1.5 * height  # two matrices side by side
    for name in ("curves.png", "versions.png"):
        assert min(png_size(tmp_path / name)) > 100


def test_plotting_needs_no_display_and_imports_matplotlib_only_when_drawing(
    tmp_path: Path,
) -> None:
    code = (
        "import sys\n"
        "import trainer_service.training, trainer_service.plots\n"
        "assert 'matplotlib' not in sys.modules, 'imported at module import'\n"
        "from trainer_service.plots import plot_confusion\n"
        "plot_confusion({'confusion': [[1]], 'labels': ['a'], 'accuracy': 1, 'macro_f1': 1},"
        f" __import__('pathlib').Path({str(tmp_path / 'c.png')!r}))\n"
        "assert 'matplotlib.pyplot' not in sys.modules, 'pyplot: a global backend'\n"
    )
    # No DISPLAY and no MPLBACKEND: a headless trainer.
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), "MPLCONFIGDIR": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=False
    )
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "c.png").read_bytes()[:8] == PNG_SIGNATURE


@pytest.mark.parametrize(
    "history", [[], [{"epoch": 0, "loss": 0.5, "val_accuracy": 1.0, "val_macro_f1": 1.0}]]
)
def test_short_histories_still_plot(tmp_path: Path, history: list[dict[str, float]]) -> None:
    plot_learning_curves(history, tmp_path / "curves.png")
    assert png_size(tmp_path / "curves.png")[0] > 100
