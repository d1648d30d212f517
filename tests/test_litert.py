"""The LiteRT form of a model: the same answers and the same learning as the SavedModel.

Parity is asserted on the same exported model loaded on both runtimes: probabilities within 1e-4
and the same class; one ``learn`` fit (50 Adam steps from zero) moves the personal correction
the same way within 1e-3 of its largest element.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from activity_model import signatures
from activity_model.loading import load_model
from shared.errors import ModelError
from simulator.tiny_model import LABELS, synthetic_windows
from tests.model_helpers import probe_windows, train_and_export_tiny

pytestmark = pytest.mark.slow

PROBABILITY_TOLERANCE = 1e-4
LEARN_TOLERANCE = 1e-3  # of the largest element of the correction


@pytest.fixture(scope="module", params=["cnn", "cnn-gru"])
def both(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """(TensorFlow model, LiteRT model) of one exported version."""

    out = train_and_export_tiny(
        tmp_path_factory.mktemp(request.param) / "saved_model", arch=request.param
    )
    return load_model(out, "tensorflow"), load_model(out, "litert")


def _windows() -> np.ndarray:
    x, _ = probe_windows()
    rng = np.random.default_rng(4)
    noisy = rng.normal(0.0, 4.0, x.shape).astype(np.float32) + x
    return np.concatenate([x, noisy]).astype(np.float32)


def test_the_bundle_holds_a_litert_model_with_builtin_ops_only(both: Any) -> None:
    tf_model, lite_model = both
    folder = tf_model.folder / signatures.LITERT_DIR
    assert (folder / signatures.LITERT_MODEL).stat().st_size > 0
    meta = json.loads((folder / signatures.LITERT_METADATA).read_text())
    assert (meta["model_id"], tuple(meta["labels"])) == (tf_model.model_id, LABELS)
    assert (lite_model.runtime, tf_model.runtime) == ("litert", "tensorflow")
    assert (lite_model.model_id, lite_model.labels, lite_model.arch) == (
        tf_model.model_id,
        tf_model.labels,
        tf_model.arch,
    )
    assert lite_model.learning_settings == tf_model.learning_settings
    np.testing.assert_allclose(lite_model.class_gravity, tf_model.class_gravity)
    # ai-edge-litert has no Flex delegate: a Select TF op would have failed to load or run.
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(folder / signatures.LITERT_MODEL))
    assert set(interpreter.get_signature_list()) == set(signatures.LITERT)
    flex = [op for op in interpreter._get_ops_details() if op["op_name"].startswith("Flex")]
    assert flex == []


def test_predict_agrees_on_both_runtimes(both: Any) -> None:
    tf_model, lite_model = both
    x = _windows()
    on_tf, on_lite = tf_model.predict(x), lite_model.predict(x)
    np.testing.assert_allclose(
        on_lite.probabilities, on_tf.probabilities, atol=PROBABILITY_TOLERANCE
    )
    assert on_lite.labels == on_tf.labels
    # One window at a time, as the agent predicts, resizes the interpreter's input: same answer.
    single = lite_model.predict(x[:1])
    np.testing.assert_allclose(single.probabilities, on_tf.probabilities[:1], atol=1e-4)


def test_one_learn_fit_moves_the_correction_the_same_way(both: Any) -> None:
    tf_model, lite_model = both
    x, y = synthetic_windows(24, seed=11)
    weights = np.linspace(0.5, 1.5, len(x)).astype(np.float32)
    turn = np.array([[1, 0, 0], [0, 0, -1], [0, 1, 0]], np.float32)
    tf_state, tf_loss = tf_model.learn(x, y, weights, turn)
    lite_state, lite_loss = lite_model.learn(x, y, weights, turn)
    scale = float(np.abs(tf_state.kernel_delta).max())
    assert scale > 0.01  # the fit moved something worth comparing
    np.testing.assert_allclose(
        lite_state.kernel_delta, tf_state.kernel_delta, atol=LEARN_TOLERANCE * scale
    )
    np.testing.assert_allclose(
        lite_state.bias_delta, tf_state.bias_delta, atol=LEARN_TOLERANCE * scale
    )
    assert lite_loss == pytest.approx(tf_loss, rel=1e-4)
    # Each runtime scores the other's correction the same way.
    probe, _ = probe_windows()
    on_tf, base_tf = tf_model.evaluate(probe, lite_state)
    on_lite, base_lite = lite_model.evaluate(probe, lite_state)
    np.testing.assert_allclose(on_lite, on_tf, atol=PROBABILITY_TOLERANCE)
    np.testing.assert_allclose(base_lite, base_tf, atol=PROBABILITY_TOLERANCE)
    tf_check, lite_check = tf_model.memory_check(lite_state), lite_model.memory_check(lite_state)
    np.testing.assert_array_equal(lite_check.labels, tf_check.labels)
    np.testing.assert_array_equal(lite_check.global_correct, tf_check.global_correct)
    assert (lite_check.correct != tf_check.correct).sum() <= 1  # a tie may fall either way


def test_tuned_learning_settings_apply_on_litert(both: Any) -> None:
    """``bench/personalize.py`` tunes the fit in-process: LiteRT follows as TensorFlow does."""
    x, y = synthetic_windows(12, seed=2)
    ones = np.ones(len(x), np.float32)
    tuned = {"fit_steps": 3.0, "fit_learning_rate": 0.05, "fit_anchor": 0.0}
    results = []
    for model in both:
        exported = model.learning_settings
        default, _ = model.learn(x, y, ones, np.eye(3))
        try:
            model.tune_learning(**tuned)
            results.append(model.learn(x, y, ones, np.eye(3))[0])
        finally:
            model.tune_learning(**exported)
        assert not np.allclose(results[-1].kernel_delta, default.kernel_delta, atol=1e-4)
    scale = float(np.abs(results[0].kernel_delta).max())
    np.testing.assert_allclose(
        results[1].kernel_delta, results[0].kernel_delta, atol=LEARN_TOLERANCE * scale
    )


def test_serving_a_learned_state_on_litert(both: Any) -> None:
    tf_model, lite_model = both
    probe, _ = probe_windows()
    target = np.full(len(probe), 2, np.int32)
    state, _ = lite_model.learn(probe, target, np.ones(len(probe), np.float32), np.eye(3))
    try:
        before = lite_model.predict(probe).probabilities
        lite_model.install(state.served(True))
        tf_model.install(state.served(True))
        after = lite_model.predict(probe).probabilities
        assert after[:, 2].mean() > before[:, 2].mean() + 0.1
        np.testing.assert_allclose(
            after, tf_model.predict(probe).probabilities, atol=PROBABILITY_TOLERANCE
        )
        assert lite_model.installed().serve is True
    finally:
        lite_model.install(lite_model.nothing_learned())
        tf_model.install(tf_model.nothing_learned())


def test_a_model_without_memory_learns_on_litert(tmp_path: Path) -> None:

    out = train_and_export_tiny(tmp_path / "saved_model", memory=False, steps=5)
    tf_model, lite_model = load_model(out, "tensorflow"), load_model(out, "litert")
    assert lite_model.memory_size == 0
    x, y = synthetic_windows(12, seed=3)
    tf_state, _ = tf_model.learn(x, y, np.ones(12, np.float32), np.eye(3))
    lite_state, _ = lite_model.learn(x, y, np.ones(12, np.float32), np.eye(3))
    scale = float(np.abs(tf_state.kernel_delta).max())
    np.testing.assert_allclose(
        lite_state.kernel_delta, tf_state.kernel_delta, atol=LEARN_TOLERANCE * scale
    )
    assert lite_model.memory_check(lite_state).labels.shape == (0,)
    assert tf_model.memory_check(tf_state).labels.shape == (0,)


def test_state_written_by_an_older_version_restores_on_tensorflow_only(
    both: Any, tmp_path: Path
) -> None:
    """Format 2 (TensorFlow's Save op) still restores once on TensorFlow; LiteRT says why not."""
    import tensorflow as tf

    tf_model, lite_model = both
    x, y = synthetic_windows(12, seed=5)
    state, _ = tf_model.learn(x, y, np.ones(12, np.float32), np.eye(3))
    old = tmp_path / "old.state"
    try:
        tf_model.install(state.served(True))
        tf_model._signatures["save_state"](path=tf.constant(str(old)))
        tf_model.install(tf_model.nothing_learned())
        assert tf_model.restore_state(old) is True
        np.testing.assert_allclose(tf_model.installed().kernel_delta, state.kernel_delta)
    finally:
        tf_model.install(tf_model.nothing_learned())
    with pytest.raises(ModelError, match="format not supported"):
        lite_model.restore_state(old)
    assert lite_model.installed().serve is False


def test_litert_refuses_a_model_without_its_form_or_with_a_broken_one(tmp_path: Path) -> None:

    seed = train_and_export_tiny(tmp_path / "seed", arch="seed-lstm")
    assert not (seed / signatures.LITERT_DIR).exists()
    with pytest.raises(ModelError, match=r"has no LiteRT form.*runtime = tensorflow"):
        load_model(seed, "litert")
    out = train_and_export_tiny(tmp_path / "cnn", steps=2)
    model_file = out / signatures.LITERT_DIR / signatures.LITERT_MODEL
    model_file.write_bytes(model_file.read_bytes()[:1000])
    with pytest.raises(ModelError, match="cannot load LiteRT model"):
        load_model(out, "litert")
    (out / signatures.LITERT_DIR / signatures.LITERT_METADATA).write_text("{")
    with pytest.raises(ModelError, match="cannot read the LiteRT metadata"):
        load_model(out, "litert")


def test_registry_refuses_a_litert_form_of_another_model(tmp_path: Path) -> None:
    from simulator.tiny_model import export_tiny_version
    from trainer_service.registry import ModelRegistry

    version = export_tiny_version(tmp_path / "stage" / "v0001", seed=1, steps=5)
    meta_file = version / "saved_model" / signatures.LITERT_DIR / signatures.LITERT_METADATA
    meta = json.loads(meta_file.read_text())
    meta_file.write_text(json.dumps({**meta, "model_id": "0" * 32}))
    with pytest.raises(ModelError, match=r"LiteRT form .* is another model"):
        ModelRegistry(tmp_path / "registry").add(version, parent=None)


def test_auto_takes_the_preferred_runtime_when_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    from activity_model import loading

    assert loading.resolve_runtime("litert") == "litert"
    assert loading.resolve_runtime("auto") == "tensorflow"  # both are installed here
    assert loading.resolve_runtime("auto", prefer="litert") == "litert"
    with pytest.raises(ModelError, match="unknown model runtime 'tflite'"):
        loading.resolve_runtime("tflite")
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "tensorflow" else real(name, *a),
    )
    assert loading.resolve_runtime("auto") == "litert"
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(ModelError, match=r"pip install 'har-edge\[agent-lite\]'"):
        loading.resolve_runtime("auto")
