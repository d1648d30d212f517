"""The exported ActivityTracker: a fresh process loads it, predicts, learns, persists, restarts."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from activity_model.loading import load_model
from shared.errors import ModelError, ModelInputError
from simulator.tiny_model import LABELS, WINDOW, synthetic_windows
from tests.model_helpers import probe_windows, train_and_export_tiny

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_and_export_tiny(tmp_path_factory.mktemp("model") / "saved_model")


@pytest.fixture(scope="module", params=["tensorflow", "litert"])
def model(exported: Path, request: pytest.FixtureRequest) -> Any:
    """The exported model on each runtime: every behaviour below holds on both."""

    return load_model(exported, request.param)


@pytest.fixture(scope="module")
def tf_model(exported: Path) -> Any:
    """The SavedModel's own signatures, for what only the TensorFlow runtime has."""

    return load_model(exported, "tensorflow")


def _device(action: str, saved_model: Path, state: Path, runtime: str) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "2"}
    command = ["-m", "tests.model_helpers", action, str(saved_model), str(state), runtime]
    done = subprocess.run(
        [sys.executable, *command],
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


@pytest.mark.parametrize(
    ("writer", "reader"),
    [
        ("tensorflow", "tensorflow"),
        ("litert", "litert"),
        ("tensorflow", "litert"),  # a device moved to the light agent keeps what it learned
        ("litert", "tensorflow"),
    ],
)
def test_learning_persists_across_process_restarts(
    exported: Path, tmp_path: Path, writer: str, reader: str
) -> None:
    state = tmp_path / "device" / "model.state"
    size_before = sum(p.stat().st_size for p in exported.rglob("*") if p.is_file())

    first = _device("learn-and-save", exported, state, writer)
    assert (first["runtime"], first["tensorflow_imported"]) == (writer, writer == "tensorflow")
    assert first["labels"] == list(LABELS)
    before = np.asarray(first["probabilities_before"])
    after = np.asarray(first["probabilities_after"])
    assert after[:, 2].mean() > before[:, 2].mean() + 0.2  # predictions moved to "Laying"
    assert state.is_file()
    assert [p.name for p in state.parent.iterdir()] == ["model.state"]  # no temporary left

    second = _device("restore", exported, state, reader)
    assert (second["runtime"], second["tensorflow_imported"]) == (reader, reader == "tensorflow")
    assert second["restored"] is True
    assert second["serving_fresh"] is False  # a fresh load serves the global model
    assert second["serving"] is True
    np.testing.assert_allclose(second["probabilities_fresh"], before, atol=1e-4)
    np.testing.assert_allclose(second["probabilities_restored"], after, atol=1e-4)
    # Persistence writes a state file; the SavedModel itself never grows.
    assert sum(p.stat().st_size for p in exported.rglob("*") if p.is_file()) == size_before


def test_learn_is_pure_and_the_memory_holds_untaught_classes(model: Any) -> None:
    """``learn`` returns a correction without installing it; fitted on one class only, the
    memory keeps the other classes' memory windows labelled as the global model does."""
    x, y = probe_windows()
    reference = model.predict(x).probabilities
    walking = x[y == 0]
    state, loss = model.learn(
        walking, np.zeros(len(walking), np.int32), np.ones(len(walking), np.float32), np.eye(3)
    )
    assert np.isfinite(loss)
    assert np.abs(state.kernel_delta).max() > 0
    np.testing.assert_array_equal(model.predict(x).probabilities, reference)  # nothing installed
    check = model.memory_check(state)
    assert check.labels.shape == (model.memory_size,)
    for label in (1, 2):
        mine = check.labels == label
        assert check.correct[mine].mean() >= check.global_correct[mine].mean()
    personal, base = model.evaluate(x, state)
    np.testing.assert_allclose(base, reference, atol=1e-6)
    assert personal.shape == base.shape


def test_evaluate_turns_windows_by_the_alignment(model: Any) -> None:
    """A device worn turned: the alignment that turns it back gives the global model's answer."""
    x, _ = probe_windows()
    turn = np.array([[1, 0, 0], [0, 0, -1], [0, 1, 0]], np.float32)  # 90 degrees about x
    worn = np.einsum("ntc,dc->ntd", x, turn).astype(np.float32)
    nothing = model.nothing_learned()
    aligned = dataclasses.replace(nothing, align=turn.T.copy())  # the inverse rotation
    personal, base = model.evaluate(worn, aligned)
    np.testing.assert_allclose(personal, model.predict(x).probabilities, atol=1e-5)
    assert not np.allclose(base, personal, atol=1e-2)


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


def test_label_names_come_from_the_table_in_the_graph(tf_model: Any) -> None:
    x, _ = probe_windows()
    raw = tf_model._signatures["predict"](sensor_data=x)
    names = [s.decode() for s in raw["label"].numpy().tolist()]
    assert names == [LABELS[i] for i in raw["class_index"].numpy().tolist()]


def test_the_default_signature_is_predict_for_tf_serving(tf_model: Any) -> None:
    x, _ = probe_windows()
    default = tf_model._signatures["serving_default"](sensor_data=x)
    predict = tf_model._signatures["predict"](sensor_data=x)
    assert set(default) == set(predict)
    np.testing.assert_array_equal(
        default["probabilities"].numpy(), predict["probabilities"].numpy()
    )


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
        model.learn(windows, np.zeros(2, np.int32), np.ones(2, np.float32), np.eye(3))


def test_nan_and_bad_labels_are_refused_and_change_nothing(model: Any) -> None:
    x, _ = probe_windows()
    ones = np.ones(len(x), np.float32)
    installed = model.installed()
    poisoned = x.copy()
    poisoned[3, 5, 1] = np.nan
    with pytest.raises(ModelInputError, match="window 3 contains NaN"):
        model.predict(poisoned)
    with pytest.raises(ModelInputError, match="window 3 contains NaN"):
        model.learn(poisoned, np.zeros(len(x), np.int32), ones, np.eye(3))
    with pytest.raises(ModelInputError, match=r"must be in 0..2"):
        model.learn(x, np.full(len(x), 3, np.int32), ones, np.eye(3))
    with pytest.raises(ModelInputError, match="must be integers"):
        model.learn(x, np.zeros(len(x), np.float32), ones, np.eye(3))
    with pytest.raises(ModelInputError, match=r"shape \(12,\)"):
        model.learn(x, np.zeros(3, np.int32), ones, np.eye(3))
    with pytest.raises(ModelInputError, match="weights"):
        model.learn(x, np.zeros(len(x), np.int32), -ones, np.eye(3))
    with pytest.raises(ModelInputError, match="3x3"):
        model.learn(x, np.zeros(len(x), np.int32), ones, np.full((3, 3), np.nan))
    bad = dataclasses.replace(installed, kernel_delta=installed.kernel_delta[:1])
    with pytest.raises(ModelInputError, match="kernel_delta must have shape"):
        model.install(bad)
    now = model.installed()
    np.testing.assert_array_equal(now.kernel_delta, installed.kernel_delta)
    np.testing.assert_array_equal(now.align, installed.align)


def test_graph_itself_refuses_nan_and_out_of_range_labels(tf_model: Any) -> None:
    """A non-Python client gets the same protection from the SavedModel's own checks."""
    import tensorflow as tf

    x, _ = probe_windows()
    poisoned = x.copy()
    poisoned[0, 0, 0] = np.inf
    with pytest.raises(tf.errors.InvalidArgumentError, match="NaN or infinity"):
        tf_model._signatures["predict"](sensor_data=poisoned)
    with pytest.raises(tf.errors.InvalidArgumentError, match="label index out of range"):
        tf_model._signatures["learn"](
            sensor_data=x,
            labels=np.full(len(x), 7, np.int32),
            weights=np.ones(len(x), np.float32),
            align=np.eye(3, dtype=np.float32),
        )
    nothing = tf_model.nothing_learned()
    with pytest.raises(tf.errors.InvalidArgumentError, match="personal state contains NaN"):
        tf_model._signatures["set_personal"](
            align=np.full((3, 3), np.nan, np.float32),
            kernel_delta=nothing.kernel_delta,
            bias_delta=nothing.bias_delta,
            serve=np.float32(1.0),
        )


@pytest.mark.parametrize("runtime", ["tensorflow", "litert"])
def test_restore_refuses_corrupt_or_foreign_state_and_keeps_weights(
    exported: Path, tmp_path: Path, runtime: str
) -> None:

    model = load_model(exported, runtime)
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
    foreign_model = train_and_export_tiny(tmp_path / "other_model", seed=5, steps=3)
    foreign = tmp_path / "foreign.state"
    load_model(foreign_model).save_state(foreign)

    for bad in (corrupt, truncated, foreign):
        with pytest.raises(ModelError, match="cannot restore model state"):
            model.restore_state(bad)
        np.testing.assert_array_equal(model.predict(x).probabilities, reference)
    with pytest.raises(ModelError, match="another model"):
        model.restore_state(foreign)
    assert model.restore_state(good) is True


def test_loading_something_else_is_a_model_error(tmp_path: Path) -> None:

    with pytest.raises(ModelError, match="not a SavedModel"):
        load_model(tmp_path)
    (tmp_path / "saved_model.pb").write_bytes(b"not a protobuf")
    with pytest.raises(ModelError, match="cannot load SavedModel"):
        load_model(tmp_path)


def test_seed_lstm_baseline_votes_per_window_and_cannot_learn_on_device(tmp_path: Path) -> None:

    exported = train_and_export_tiny(tmp_path / "seed", arch="seed-lstm")
    model = load_model(exported)
    assert model.arch == "seed-lstm"
    assert model.input_spec.window == 32
    x, _ = synthetic_windows(4, seed=3, window=32)
    result = model.predict(x)
    assert result.class_index.shape == (4,)
    # Probabilities are the share of the 32 samples voting for each class.
    np.testing.assert_allclose(result.probabilities.sum(axis=1), 1.0, rtol=1e-6)
    assert (result.class_index == result.probabilities.argmax(axis=1)).all()
    assert model.personalisable is False
    with pytest.raises(ModelError, match="cannot learn on the device"):
        model.learn(x, np.zeros(4, np.int32), np.ones(4, np.float32), np.eye(3))
    assert {"predict", "serving_default", "reset_state", "metadata"} <= set(model._signatures)
