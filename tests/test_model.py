"""The exported ActivityTracker: a fresh process loads it, predicts, learns, persists, restarts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from shared.errors import ModelError, ModelInputError
from tests.model_helpers import LABELS, WINDOW, probe_windows, synthetic_windows

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parent.parent


def _train_and_export(out: Path, *, arch: str = "cnn", seed: int = 0, steps: int = 30) -> Path:
    from shared.model.tracker import ActivityTracker, TrackerSpec, export_tracker

    window = 32 if arch == "seed-lstm" else WINDOW
    spec = TrackerSpec(
        arch=arch,
        labels=LABELS,
        window=window,
        width=8,
        optimizer="sgd" if arch == "seed-lstm" else "adam",
    )
    x, y = synthetic_windows(256, seed=seed, window=window)
    flat = x.reshape(-1, 3)
    tracker = ActivityTracker(
        spec, mean=flat.mean(0), std=flat.std(0), learning_rate=1e-2, seed=seed
    )
    if arch != "seed-lstm":
        for i in range(steps):
            batch = slice((i * 32) % 256, (i * 32) % 256 + 32)
            tracker.train_step(x[batch], y[batch], np.ones(32, np.float32))
    export_tracker(tracker, out, device_learning_rate=1e-2)
    return out


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _train_and_export(tmp_path_factory.mktemp("model") / "saved_model")


@pytest.fixture(scope="module")
def model(exported: Path) -> Any:
    from shared.model.runtime import ActivityModel

    return ActivityModel.load(exported)


def _device(action: str, saved_model: Path, state: Path) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "2"}
    done = subprocess.run(
        [sys.executable, "-m", "tests.model_helpers", action, str(saved_model), str(state)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def test_learning_persists_across_process_restarts(exported: Path, tmp_path: Path) -> None:
    state = tmp_path / "device" / "model.state"
    size_before = sum(p.stat().st_size for p in exported.rglob("*") if p.is_file())

    first = _device("learn-and-save", exported, state)
    losses = first["losses"]
    assert first["labels"] == list(LABELS)
    assert losses[-1] < 0.5 * losses[0], losses
    assert first["global_step"] == 30 + 15  # training steps, then the device's own
    before = np.asarray(first["probabilities_before"])
    after = np.asarray(first["probabilities_after"])
    assert after[:, 2].mean() > before[:, 2].mean() + 0.2  # predictions moved to "Laying"
    assert state.is_file()
    assert [p.name for p in state.parent.iterdir()] == ["model.state"]  # no temporary left

    second = _device("restore", exported, state)
    assert second["restored"] is True
    assert second["global_step_fresh"] == 30
    assert second["global_step"] == 45
    np.testing.assert_allclose(second["probabilities_fresh"], before, atol=1e-5)
    np.testing.assert_allclose(second["probabilities_restored"], after, atol=1e-5)
    # Persistence writes a state file; the SavedModel itself never grows.
    assert sum(p.stat().st_size for p in exported.rglob("*") if p.is_file()) == size_before


def test_metadata_and_predict_outputs(model: Any) -> None:
    assert model.labels == LABELS
    assert model.arch == "cnn"
    assert model.input_spec.window == WINDOW
    assert model.input_spec.channels == 3
    assert model.input_spec.sample_rate_hz == 20.0
    x, y = probe_windows()
    result = model.predict(x)
    assert result.class_index.shape == (len(x),)
    assert result.probabilities.shape == (len(x), len(LABELS))
    assert result.probabilities.dtype == np.float32
    np.testing.assert_allclose(result.probabilities.sum(axis=1), 1.0, rtol=1e-5)
    assert result.labels == [LABELS[i] for i in result.class_index]
    assert (result.class_index == y).mean() >= 0.9  # the tiny model did learn the toy task


def test_label_names_come_from_the_table_in_the_graph(model: Any) -> None:
    x, _ = probe_windows()
    raw = model._signatures["predict"](sensor_data=x)
    names = [s.decode() for s in raw["label"].numpy().tolist()]
    assert names == [LABELS[i] for i in raw["class_index"].numpy().tolist()]


@pytest.mark.parametrize(
    ("windows", "message"),
    [
        (np.zeros((2, WINDOW, 3), np.float64), "must be float32"),
        (np.zeros((2, WINDOW, 3), np.int32), "must be float32"),
        (np.zeros((2, WINDOW + 1, 3), np.float32), r"shape \(n, 16, 3\)"),
        (np.zeros((WINDOW, 3), np.float32), r"shape \(n, 16, 3\)"),
        (np.zeros((0, WINDOW, 3), np.float32), "1..4096 windows"),
        ([[[0.0] * 3] * WINDOW], "numpy array"),
    ],
)
def test_bad_windows_are_refused_with_a_clear_error(model: Any, windows: Any, message: str) -> None:
    with pytest.raises(ModelInputError, match=message):
        model.predict(windows)
    with pytest.raises(ModelInputError, match=message):
        model.learn(windows, np.zeros(2, np.int32))


def test_nan_and_bad_labels_are_refused_and_change_nothing(model: Any) -> None:
    x, _ = probe_windows()
    step = model.global_step
    poisoned = x.copy()
    poisoned[3, 5, 1] = np.nan
    with pytest.raises(ModelInputError, match="window 3 contains NaN"):
        model.predict(poisoned)
    with pytest.raises(ModelInputError, match="window 3 contains NaN"):
        model.learn(poisoned, np.zeros(len(x), np.int32))
    with pytest.raises(ModelInputError, match=r"must be in 0..2"):
        model.learn(x, np.full(len(x), 3, np.int32))
    with pytest.raises(ModelInputError, match="must be integers"):
        model.learn(x, np.zeros(len(x), np.float32))
    with pytest.raises(ModelInputError, match=r"shape \(12,\)"):
        model.learn(x, np.zeros(3, np.int32))
    assert model.global_step == step


def test_graph_itself_refuses_nan_and_out_of_range_labels(model: Any) -> None:
    """A non-Python client gets the same protection from the SavedModel's own checks."""
    import tensorflow as tf

    x, _ = probe_windows()
    poisoned = x.copy()
    poisoned[0, 0, 0] = np.inf
    with pytest.raises(tf.errors.InvalidArgumentError, match="NaN or infinity"):
        model._signatures["predict"](sensor_data=poisoned)
    with pytest.raises(tf.errors.InvalidArgumentError, match="label index out of range"):
        model._signatures["learn"](sensor_data=x, labels=np.full(len(x), 7, np.int32))


def test_restore_refuses_corrupt_or_foreign_state_and_keeps_weights(
    exported: Path, tmp_path: Path
) -> None:
    from shared.model.runtime import ActivityModel

    model = ActivityModel.load(exported)
    x, _ = probe_windows()
    assert model.restore_state(tmp_path / "absent.state") is False
    good = tmp_path / "good.state"
    model.save_state(good)
    reference = model.predict(x).probabilities

    corrupt = tmp_path / "corrupt.state"
    data = bytearray(good.read_bytes())
    data[len(data) // 2] ^= 0xFF
    corrupt.write_bytes(bytes(data))
    truncated = tmp_path / "truncated.state"
    truncated.write_bytes(good.read_bytes()[:200])
    foreign_model = _train_and_export(tmp_path / "other_model", seed=5, steps=3)
    foreign = tmp_path / "foreign.state"
    ActivityModel.load(foreign_model).save_state(foreign)

    for bad in (corrupt, truncated, foreign):
        with pytest.raises(ModelError, match="cannot restore model state"):
            model.restore_state(bad)
        np.testing.assert_array_equal(model.predict(x).probabilities, reference)
    with pytest.raises(ModelError, match="another model"):
        model.restore_state(foreign)
    assert model.restore_state(good) is True


def test_loading_something_else_is_a_model_error(tmp_path: Path) -> None:
    from shared.model.runtime import ActivityModel

    with pytest.raises(ModelError, match="not a SavedModel"):
        ActivityModel.load(tmp_path)
    (tmp_path / "saved_model.pb").write_bytes(b"not a protobuf")
    with pytest.raises(ModelError, match="cannot load SavedModel"):
        ActivityModel.load(tmp_path)


def test_seed_lstm_baseline_votes_per_window_and_learns(tmp_path: Path) -> None:
    from shared.model.runtime import ActivityModel

    exported = _train_and_export(tmp_path / "seed", arch="seed-lstm")
    model = ActivityModel.load(exported)
    assert model.arch == "seed-lstm"
    assert model.input_spec.window == 32
    x, _ = synthetic_windows(4, seed=3, window=32)
    result = model.predict(x)
    assert result.class_index.shape == (4,)
    # Probabilities are the share of the 32 samples voting for each class.
    np.testing.assert_allclose(result.probabilities.sum(axis=1), 1.0, rtol=1e-6)
    assert (result.class_index == result.probabilities.argmax(axis=1)).all()
    step = model.global_step
    model.learn(x, np.zeros(4, np.int32))
    assert model.global_step == step + 4  # one step per (32, 1, 3) window, as designed
    signatures = set(model._signatures.keys())
    assert {
        "predict",
        "learn",
        "save_state",
        "restore_state",
        "reset_state",
        "metadata",
    } <= signatures
