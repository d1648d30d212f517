"""The LiteRT form of an ActivityTracker: the same network and device learning, built-in ops only.

A wearable that cannot hold TensorFlow (about 0.5 GB) runs this ``.tflite`` file in
``ai-edge-litert`` instead. Neither ``ai-edge-litert`` nor recent TensorFlow wheels ship the Flex
delegate, so every op must be a LiteRT built-in. That decides the shape of this module:

- The features are the tracker's own ``_features`` (one definition of the network); convolution,
  pooling, the GRU cell and the alignment all convert to built-ins.
- ``learn`` cannot use GradientTape (the gradient of the softmax cross-entropy is not a built-in),
  so the gradient of the last layer is written out: softmax minus one-hot, times the features.
  It is the same fit as the SavedModel's ``learn`` (docs/model.md): from zero, full batch, Adam,
  the wearer's windows plus the memory plus the anchor.
- No state lives in the interpreter: ``predict`` and ``evaluate`` take the personal state as
  inputs, so nothing needs ``Save``/``Restore`` ops (not built-ins) or get/set signatures; the
  runtime holds the installed state and writes it with ``activity_model.state_file``.
- The learning settings are inputs of ``learn`` and the metadata (labels, model id, ...) is a
  JSON file beside the model: a LiteRT model has no string tables.

Export converts, then loads the result in the LiteRT interpreter, runs every signature and checks
that ``predict`` agrees with the SavedModel, before anything is written.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import numpy as np

from activity_model import signatures
from activity_model.tensorflow_import import import_tensorflow
from activity_model.tracker import ActivityTracker
from shared.errors import ModelError

if TYPE_CHECKING:
    import tensorflow as tf  # the names in annotations
else:
    tf = import_tensorflow()

# Export refuses a conversion whose predict differs from the SavedModel's by more than this.
PARITY_TOLERANCE: Final = 1e-4
_ADAM_BETA1: Final = 0.9
_ADAM_BETA2: Final = 0.999
_ADAM_EPSILON: Final = 1e-7


def _cross_entropy_and_gradient(
    logits: tf.Tensor, onehot: tf.Tensor, example_weights: tf.Tensor
) -> tuple[tf.Tensor, tf.Tensor]:
    """Weighted mean cross-entropy (weights already divided by their sum) and d loss / d logits."""
    log_probabilities = tf.nn.log_softmax(logits)
    per_example = -tf.reduce_sum(onehot * log_probabilities, axis=1)
    gradient = (tf.exp(log_probabilities) - onehot) * example_weights[:, None]
    return tf.reduce_sum(per_example * example_weights), gradient


def _normalised(weights: tf.Tensor) -> tf.Tensor:
    """``weights / sum(weights)``, and zeros when they sum to zero (as ``divide_no_nan``)."""
    return weights / tf.maximum(tf.reduce_sum(weights), 1e-30)


class LiteSignatures(tf.Module):  # type: ignore[misc]
    """The functions converted to LiteRT, over a trained and exported tracker's weights."""

    def __init__(self, tracker: ActivityTracker) -> None:
        super().__init__(name="ActivityTrackerLite")
        if not tracker.spec.personalisable:
            raise ModelError(f"a {tracker.spec.arch} model has no LiteRT form")
        self._tracker = tracker
        self._memory_features = tracker.memory_features.numpy()
        self._memory_labels = tracker.memory_labels.numpy()
        self.has_memory = len(self._memory_labels) > 0
        k = len(tracker.spec.labels)
        features = int(tracker.weights["dense_kernel"].shape[0])
        x_spec = tf.TensorSpec([None, tracker.spec.window, 3], tf.float32, name="sensor_data")
        align_spec = tf.TensorSpec([3, 3], tf.float32, name="align")
        kernel_spec = tf.TensorSpec([features, k], tf.float32, name="kernel_delta")
        bias_spec = tf.TensorSpec([k], tf.float32, name="bias_delta")
        self.functions: dict[str, Any] = {
            "predict": tf.function(
                self._predict, input_signature=[x_spec, align_spec, kernel_spec, bias_spec]
            ),
            "evaluate": tf.function(
                self._evaluate, input_signature=[x_spec, align_spec, kernel_spec, bias_spec]
            ),
            "learn": tf.function(
                self._learn,
                input_signature=[
                    x_spec,
                    tf.TensorSpec([None], tf.int32, name="labels"),
                    tf.TensorSpec([None], tf.float32, name="weights"),
                    align_spec,
                    tf.TensorSpec([], tf.int32, name="steps"),
                    tf.TensorSpec([], tf.float32, name="learning_rate"),
                    tf.TensorSpec([], tf.float32, name="memory_weight"),
                    tf.TensorSpec([], tf.float32, name="anchor"),
                ],
            ),
        }
        if self.has_memory:  # a LiteRT graph cannot hold an empty memory; the runtime knows
            self.functions["memory_check"] = tf.function(
                self._memory_check, input_signature=[kernel_spec, bias_spec]
            )

    def _logits(
        self,
        sensor_data: tf.Tensor,
        align: tf.Tensor,
        kernel_delta: tf.Tensor,
        bias_delta: tf.Tensor,
    ) -> tf.Tensor:
        tracker = self._tracker
        return tracker._head(tracker._features(sensor_data, align), kernel_delta, bias_delta)

    def _predict(
        self,
        sensor_data: tf.Tensor,
        align: tf.Tensor,
        kernel_delta: tf.Tensor,
        bias_delta: tf.Tensor,
    ) -> dict[str, tf.Tensor]:
        probabilities = tf.nn.softmax(self._logits(sensor_data, align, kernel_delta, bias_delta))
        return {
            "probabilities": probabilities,
            "class_index": tf.argmax(probabilities, axis=1, output_type=tf.int64),
        }

    def _evaluate(
        self,
        sensor_data: tf.Tensor,
        align: tf.Tensor,
        kernel_delta: tf.Tensor,
        bias_delta: tf.Tensor,
    ) -> dict[str, tf.Tensor]:
        personal = self._logits(sensor_data, align, kernel_delta, bias_delta)
        return {
            "probabilities": tf.nn.softmax(personal),
            "global_probabilities": tf.nn.softmax(
                self._tracker._head(self._tracker._features(sensor_data), None, None)
            ),
        }

    def _memory_check(self, kernel_delta: tf.Tensor, bias_delta: tf.Tensor) -> dict[str, tf.Tensor]:
        head = self._tracker._head
        memory = tf.constant(self._memory_features)
        labels = tf.constant(self._memory_labels)
        personal = tf.argmax(head(memory, kernel_delta, bias_delta), 1, output_type=tf.int32)
        base = tf.argmax(head(memory, None, None), 1, output_type=tf.int32)
        return {
            "correct": tf.equal(personal, labels),
            "global_correct": tf.equal(base, labels),
            "labels": tf.identity(labels),
        }

    def _learn(  # noqa: PLR0917 (the signature's inputs)
        self,
        sensor_data: tf.Tensor,
        labels: tf.Tensor,
        weights: tf.Tensor,
        align: tf.Tensor,
        steps: tf.Tensor,
        learning_rate: tf.Tensor,
        memory_weight: tf.Tensor,
        anchor: tf.Tensor,
    ) -> dict[str, tf.Tensor]:
        """``ActivityTracker._fit_personal`` with the gradient written out (see the module doc)."""
        tracker = self._tracker
        k = len(tracker.spec.labels)
        kernel, bias = tracker.weights["dense_kernel"], tracker.weights["dense_bias"]
        features = tracker._features(sensor_data, align)
        onehot = tf.one_hot(labels, k)
        example_weights = _normalised(weights)
        if self.has_memory:
            memory = tf.constant(self._memory_features)
            memory_onehot = tf.one_hot(tf.constant(self._memory_labels), k)
            memory_weights = tf.fill([len(self._memory_labels)], 1.0 / len(self._memory_labels))

        def gradients(
            kernel_delta: tf.Tensor, bias_delta: tf.Tensor
        ) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
            logits = tf.matmul(features, kernel + kernel_delta) + (bias + bias_delta)
            loss, d_logits = _cross_entropy_and_gradient(logits, onehot, example_weights)
            d_kernel = tf.matmul(features, d_logits, transpose_a=True)
            d_bias = tf.reduce_sum(d_logits, axis=0)
            if self.has_memory:
                logits = tf.matmul(memory, kernel + kernel_delta) + (bias + bias_delta)
                memory_loss, d_logits = _cross_entropy_and_gradient(
                    logits, memory_onehot, memory_weights
                )
                loss += memory_weight * memory_loss
                d_kernel += memory_weight * tf.matmul(memory, d_logits, transpose_a=True)
                d_bias += memory_weight * tf.reduce_sum(d_logits, axis=0)
            size = tf.reduce_sum(tf.square(kernel_delta)) + tf.reduce_sum(tf.square(bias_delta))
            loss += anchor * size
            return loss, d_kernel + 2.0 * anchor * kernel_delta, d_bias + 2.0 * anchor * bias_delta

        def adam(
            value: tf.Tensor, m: tf.Tensor, v: tf.Tensor, grad: tf.Tensor, scale: tf.Tensor
        ) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
            m = _ADAM_BETA1 * m + (1.0 - _ADAM_BETA1) * grad
            v = _ADAM_BETA2 * v + (1.0 - _ADAM_BETA2) * tf.square(grad)
            return value - scale * m / (tf.sqrt(v) + _ADAM_EPSILON), m, v

        def step(t: tf.Tensor, loss: tf.Tensor, *slots: tf.Tensor) -> tuple[tf.Tensor, ...]:
            kernel_delta, bias_delta, kernel_m, bias_m, kernel_v, bias_v = slots
            loss, d_kernel, d_bias = gradients(kernel_delta, bias_delta)
            tf_t = tf.cast(t, tf.float32)
            scale = (
                learning_rate
                * tf.sqrt(1.0 - tf.pow(_ADAM_BETA2, tf_t))
                / (1.0 - tf.pow(_ADAM_BETA1, tf_t))
            )
            kernel_delta, kernel_m, kernel_v = adam(
                kernel_delta, kernel_m, kernel_v, d_kernel, scale
            )
            bias_delta, bias_m, bias_v = adam(bias_delta, bias_m, bias_v, d_bias, scale)
            return t + 1, loss, kernel_delta, bias_delta, kernel_m, bias_m, kernel_v, bias_v

        zeros_kernel, zeros_bias = tf.zeros_like(kernel), tf.zeros_like(bias)
        start = (
            tf.constant(1),
            tf.constant(0.0),
            *(zeros_kernel, zeros_bias) * 3,
        )
        out = tf.while_loop(lambda t, *_: t <= steps, step, start)
        return {"kernel_delta": out[2], "bias_delta": out[3], "loss": out[1]}


def _metadata(tracker: ActivityTracker) -> dict[str, Any]:
    """The SavedModel's ``metadata()`` as JSON values, read from the same tracker."""
    values = {name: value.numpy() for name, value in tracker.metadata().items()}
    out: dict[str, Any] = {}
    for name, value in values.items():
        if name == "labels":
            out[name] = [label.decode() for label in value.tolist()]
        elif isinstance(value, bytes):
            out[name] = value.decode()
        else:
            out[name] = np.asarray(value).tolist()
    out["features"] = int(tracker.weights["dense_kernel"].shape[0])
    return out


def _convert(lite: LiteSignatures) -> bytes:
    with tempfile.TemporaryDirectory(prefix="har-litert-") as scratch:
        tf.saved_model.save(lite, scratch, signatures=lite.functions)
        converter = tf.lite.TFLiteConverter.from_saved_model(
            scratch, signature_keys=list(lite.functions)
        )
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
        try:
            model: bytes = converter.convert()
        except Exception as exc:  # the converter raises ConverterError and friends
            raise ModelError(f"cannot convert the model to LiteRT built-ins: {exc}") from exc
    return model


def _verify(model: bytes, tracker: ActivityTracker, lite: LiteSignatures) -> None:
    """Loads ``model`` in LiteRT, runs every signature, and compares predict with TensorFlow."""
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError as exc:
        raise ModelError(
            "exporting the LiteRT model needs ai-edge-litert to verify it: "
            "pip install 'har-edge[trainer]'"
        ) from exc
    interpreter = Interpreter(model_content=model, num_threads=1)
    missing = set(lite.functions) - set(interpreter.get_signature_list())
    if missing:
        raise ModelError(f"the converted LiteRT model lacks the signatures {sorted(missing)}")
    spec = tracker.spec
    k = len(spec.labels)
    features = int(tracker.weights["dense_kernel"].shape[0])
    rng = np.random.default_rng(0)
    windows = (rng.normal(0.0, 3.0, (8, spec.window, 3)) + np.array([0.0, 9.8, 0.0])).astype(
        np.float32
    )
    personal = {
        "align": np.eye(3, dtype=np.float32),
        "kernel_delta": np.zeros((features, k), np.float32),
        "bias_delta": np.zeros(k, np.float32),
    }
    lite_out = interpreter.get_signature_runner("predict")(sensor_data=windows, **personal)
    expected = tf.nn.softmax(tracker._head(tracker._features(tf.constant(windows)), None, None))
    gap = float(np.abs(lite_out["probabilities"] - expected.numpy()).max())
    if not gap <= PARITY_TOLERANCE:
        raise ModelError(f"the LiteRT predict differs from the SavedModel's by {gap:.2e}")
    learned = interpreter.get_signature_runner("learn")(
        sensor_data=windows,
        labels=np.arange(len(windows), dtype=np.int32) % k,
        weights=np.ones(len(windows), np.float32),
        align=personal["align"],
        steps=np.int32(2),
        learning_rate=np.float32(0.01),
        memory_weight=np.float32(1.0),
        anchor=np.float32(0.1),
    )
    evaluated = interpreter.get_signature_runner("evaluate")(sensor_data=windows, **personal)
    outputs = [*lite_out.values(), *learned.values(), *evaluated.values()]
    if lite.has_memory:
        checked = interpreter.get_signature_runner("memory_check")(
            kernel_delta=personal["kernel_delta"], bias_delta=personal["bias_delta"]
        )
        outputs.extend(checked.values())
    if not all(np.isfinite(np.asarray(out, np.float64)).all() for out in outputs):
        raise ModelError("the LiteRT model gave NaN or infinity on ordinary windows")


def export_litert(tracker: ActivityTracker, saved_model_dir: Path) -> Path:
    """Writes ``<saved_model_dir>/litert/`` (model and metadata) for an exported tracker."""
    lite = LiteSignatures(tracker)
    model = _convert(lite)
    _verify(model, tracker, lite)
    folder = Path(saved_model_dir) / signatures.LITERT_DIR
    folder.mkdir(parents=True, exist_ok=True)
    (folder / signatures.LITERT_MODEL).write_bytes(model)
    metadata = json.dumps(_metadata(tracker), indent=2, sort_keys=True) + "\n"
    (folder / signatures.LITERT_METADATA).write_text(metadata, encoding="utf-8")
    return folder
