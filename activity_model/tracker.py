"""ActivityTracker: the model a device runs and learns on, and the trainer produces.

Written in plain TensorFlow ops (no Keras layers), so every variable has a name we chose, the
optimizer is two lines we can read, and the exported SavedModel needs no Python class: a Go or C
client can call its signatures too.

The global weights (the trainer's) never change on a device. What a device learns from its
wearer is a small **personal state** beside them: a 3x3 alignment applied to the raw input (how
this wearer's device sits) and a correction of the classifier's last layer. ``learn`` fits that
correction from zero on the wearer's confirmed windows together with a class-balanced **memory**
of the training data shipped inside the model, pulled towards the global weights (L2-SP), so a
run of confirmations of one activity cannot erase the others. See docs/model.md.

Signatures (see docs/model.md for ``saved_model_cli show --all``):

- ``predict(sensor_data)`` -> ``class_index`` (int64), ``label`` (string, from a lookup table in
  the graph) and ``probabilities``; with the installed personal state when it is being served.
- ``learn(sensor_data, labels, weights, align)`` -> ``kernel_delta``, ``bias_delta``, ``loss``:
  the personal correction fitted on these windows (seen through ``align``) and the memory. Pure:
  nothing installed changes.
- ``evaluate(sensor_data, align, kernel_delta, bias_delta)`` -> ``probabilities`` under that
  personal state and ``global_probabilities`` without it. Pure.
- ``memory_check(kernel_delta, bias_delta)`` -> ``correct`` and ``global_correct`` per memory
  window, and its ``labels``. Pure.
- ``set_personal(align, kernel_delta, bias_delta, serve)`` installs a personal state;
  ``get_personal()`` returns the installed one; ``serve`` = 0 serves the global model.
- ``save_state(path)`` / ``restore_state(path)``: the installed personal state, written with
  ``tf.raw_ops.Save``; ``restore_state`` checks the file belongs to this model (model id) and is
  intact (fingerprint) before assigning anything.
- ``metadata()``: labels, window length, channels, sample rate, architecture, model id, batch,
  whether the model can learn on a device, the learning settings, per-class gravity.
- ``reset_state()``: clears the recurrent state of the stateful ``seed-lstm`` (no-op otherwise).

The ``seed-lstm`` baseline (the article's design) has no personal state: it exports ``predict``,
``reset_state`` and ``metadata`` only.

Normalisation is part of the graph: callers feed raw m/s^2.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import numpy as np
import numpy.typing as npt

from activity_model import signatures
from activity_model.tensorflow_import import import_tensorflow
from shared.errors import ModelError

if TYPE_CHECKING:
    import tensorflow as tf  # the names in annotations
else:
    tf = import_tensorflow()

ARCHITECTURES: Final = ("cnn", "cnn-gru", "seed-lstm")
SEED_LSTM_BATCH: Final = 32  # the original design: a (32, 1, 3) batch of consecutive samples
SEED_LSTM_UNITS: Final = 64
STATE_FORMAT_VERSION: Final = 2

# Names under which non-weight tensors are stored in a state file.
_FINGERPRINT_KEY: Final = "_fingerprint"
_MODEL_ID_KEY: Final = "_model_id"
_FORMAT_KEY: Final = "_format"


@dataclass(frozen=True)
class TrackerSpec:
    """Everything needed to rebuild an ActivityTracker of the same shape."""

    arch: str
    labels: tuple[str, ...]
    window: int
    sample_rate_hz: float = 20.0
    channels: int = 3
    optimizer: str = "adam"
    dropout: float = 0.2
    width: int = 32

    def __post_init__(self) -> None:
        if self.arch not in ARCHITECTURES:
            raise ModelError(f"unknown architecture {self.arch!r}; choose from {ARCHITECTURES}")
        if not 2 <= len(self.labels) <= 64 or len(set(self.labels)) != len(self.labels):
            raise ModelError(f"need 2..64 distinct labels, got {self.labels}")
        if self.channels != 3:
            raise ModelError("the model reads 3-axis acceleration")
        if self.arch == "seed-lstm" and self.window != SEED_LSTM_BATCH:
            raise ModelError(f"seed-lstm reads windows of {SEED_LSTM_BATCH} samples")
        if self.arch != "seed-lstm" and self.window < 16:
            raise ModelError(f"window of {self.window} samples is too short for {self.arch}")
        if self.optimizer not in ("adam", "sgd"):
            raise ModelError(f"unknown optimizer {self.optimizer!r}")

    @property
    def personalisable(self) -> bool:
        """Whether a device can learn a personal state on it (not the stateful baseline)."""
        return self.arch != "seed-lstm"


@dataclass(frozen=True)
class DeviceLearning:
    """How ``learn`` fits a wearer's personal correction; baked into each exported version.

    Chosen on validation users with ``bench/personalize.py`` (docs/model.md).
    """

    steps: int = 50  # full-batch Adam steps from zero, per fit
    learning_rate: float = 0.01
    memory_weight: float = 1.0  # weight of the memory's loss beside the wearer's
    anchor: float = 0.1  # L2 pull of the correction towards zero (the global weights)
    memory_per_class: int = 32  # training windows per class shipped in the model

    def __post_init__(self) -> None:
        if not 1 <= self.steps <= 1000:
            raise ModelError("device learning steps must be within 1..1000")
        if not (self.learning_rate > 0 and self.memory_weight >= 0 and self.anchor >= 0):
            raise ModelError("device learning rate must be > 0, memory weight and anchor >= 0")
        if not 0 <= self.memory_per_class <= 1000:
            raise ModelError("memory_per_class must be within 0..1000")


@dataclass(frozen=True)
class Memory:
    """Training windows shipped inside a model, and each class's mean acceleration (gravity)."""

    windows: npt.NDArray[np.float32]  # (m, T, 3), class-balanced
    labels: npt.NDArray[np.int32]  # (m,)
    class_gravity: npt.NDArray[np.float32]  # (k, 3) mean raw acceleration per class


def _glorot(shape: Sequence[int], seed: tf.Tensor, fan_in: int, fan_out: int) -> tf.Tensor:
    limit = math.sqrt(6.0 / (fan_in + fan_out))
    return tf.random.stateless_uniform(shape, seed=seed, minval=-limit, maxval=limit)


def _mean_cross_entropy(labels: tf.Tensor, logits: tf.Tensor, weights: tf.Tensor) -> tf.Tensor:
    per_example = tf.nn.sparse_softmax_cross_entropy_with_logits(
        labels=tf.cast(labels, tf.int32), logits=logits
    )
    return tf.math.divide_no_nan(tf.reduce_sum(per_example * weights), tf.reduce_sum(weights))


def _adam_update(
    slots: Sequence[tuple[tf.Variable, tf.Variable, tf.Variable]],
    grads: Sequence[tf.Tensor],
    *,
    step: tf.Tensor,
    learning_rate: tf.Tensor,
) -> None:
    """One Adam update of each (variable, first moment, second moment) at step ``step`` (1-based),
    for the trainer's weights and for a device's fit alike."""
    beta1, beta2, eps = 0.9, 0.999, 1e-7
    scale = learning_rate * tf.sqrt(1.0 - tf.pow(beta2, step)) / (1.0 - tf.pow(beta1, step))
    for (variable, m, v), grad in zip(slots, grads, strict=True):
        m.assign(beta1 * m + (1.0 - beta1) * grad)
        v.assign(beta2 * v + (1.0 - beta2) * tf.square(grad))
        variable.assign_sub(scale * m / (tf.sqrt(v) + eps))


class ActivityTracker(tf.Module):  # type: ignore[misc]
    """Human activity classifier over windows of raw 3-axis acceleration, personalised on device."""

    def __init__(
        self,
        spec: TrackerSpec,
        *,
        mean: npt.ArrayLike = (0.0, 0.0, 0.0),
        std: npt.ArrayLike = (1.0, 1.0, 1.0),
        learning_rate: float = 1e-3,
        seed: int = 0,
    ) -> None:
        super().__init__(name="ActivityTracker")
        self.spec = spec
        k = len(spec.labels)
        self._num_classes = k
        self._batch = SEED_LSTM_BATCH if spec.arch == "seed-lstm" else None
        std_arr = np.maximum(np.asarray(std, np.float32), 1e-3)
        self.norm_mean = tf.Variable(np.asarray(mean, np.float32), trainable=False, name="mean")
        self.norm_std = tf.Variable(std_arr, trainable=False, name="std")
        self.global_step = tf.Variable(0, dtype=tf.int64, trainable=False, name="global_step")
        self.learning_rate = tf.Variable(learning_rate, dtype=tf.float32, trainable=False)
        self.model_id = tf.Variable("", dtype=tf.string, trainable=False, name="model_id")
        self.label_names = tf.constant(list(spec.labels), dtype=tf.string)
        self.label_table = tf.lookup.StaticHashTable(
            tf.lookup.KeyValueTensorInitializer(
                keys=tf.range(k, dtype=tf.int64), values=tf.constant(list(spec.labels))
            ),
            default_value="unknown",
        )
        self.weights = self._build_weights(spec, k, seed)
        names = list(self.weights)
        self._trainable_names = names
        # The trainer's optimizer (Adam moments); a device never touches the global weights.
        self.slots_m = {
            n: tf.Variable(tf.zeros_like(self.weights[n]), trainable=False) for n in names
        }
        self.slots_v = {
            n: tf.Variable(tf.zeros_like(self.weights[n]), trainable=False) for n in names
        }
        self.optimizer_step = tf.Variable(0.0, dtype=tf.float32, trainable=False)
        if spec.arch == "seed-lstm":
            zeros = tf.zeros((SEED_LSTM_BATCH, SEED_LSTM_UNITS))
            self.lstm_h = tf.Variable(zeros, trainable=False, name="lstm_h")
            self.lstm_c = tf.Variable(zeros, trainable=False, name="lstm_c")
        else:
            self._build_personal(k)
        self._dropout_seed = tf.Variable([seed, 7], dtype=tf.int64, trainable=False)
        self._build_signatures()

    # ----------------------------------------------------------------------------- weights
    def _build_weights(self, spec: TrackerSpec, k: int, seed: int) -> dict[str, tf.Variable]:
        shapes: dict[str, tuple[int, ...]] = {}
        w = spec.width
        if spec.arch == "cnn":
            shapes = {
                "conv1_kernel": (5, 3, w),
                "conv1_bias": (w,),
                "conv2_kernel": (5, w, w),
                "conv2_bias": (w,),
                "conv3_kernel": (5, w, 2 * w),
                "conv3_bias": (2 * w,),
                "conv4_kernel": (5, 2 * w, 2 * w),
                "conv4_bias": (2 * w,),
                "dense_kernel": (4 * w + 6, k),
                "dense_bias": (k,),
            }
        elif spec.arch == "cnn-gru":
            g = w + w // 2
            shapes = {
                "conv1_kernel": (5, 3, w),
                "conv1_bias": (w,),
                "conv2_kernel": (5, w, 2 * w),
                "conv2_bias": (2 * w,),
                "gru_kernel": (2 * w, 3 * g),
                "gru_recurrent": (g, 3 * g),
                "gru_bias": (3 * g,),
                "dense_kernel": (g, k),
                "dense_bias": (k,),
            }
        else:
            u = SEED_LSTM_UNITS
            shapes = {
                "lstm_kernel": (3, 4 * u),
                "lstm_recurrent": (u, 4 * u),
                "lstm_bias": (4 * u,),
                "dense_kernel": (u, k),
                "dense_bias": (k,),
            }
        weights: dict[str, tf.Variable] = {}
        for i, (name, shape) in enumerate(shapes.items()):
            if name.endswith("bias"):
                initial = np.zeros(shape, np.float32)
                if name == "lstm_bias":  # forget gate starts open, as Keras does
                    initial[SEED_LSTM_UNITS : 2 * SEED_LSTM_UNITS] = 1.0
                value = tf.constant(initial)
            else:
                fan_in = int(np.prod(shape[:-1]))
                value = _glorot(shape, tf.constant([seed, i], tf.int64), fan_in, shape[-1])
            weights[name] = tf.Variable(value, name=name)
        return weights

    def _build_personal(self, k: int) -> None:
        """The personal state a device installs, the memory it learns beside, and the settings."""
        features = int(self.weights["dense_kernel"].shape[0])
        self.personal_align = tf.Variable(tf.eye(3), trainable=False, name="personal_align")
        self.personal_kernel = tf.Variable(
            tf.zeros((features, k)), trainable=False, name="personal_kernel_delta"
        )
        self.personal_bias = tf.Variable(tf.zeros((k,)), trainable=False, name="personal_bias")
        self.personal_serve = tf.Variable(0.0, trainable=False, name="personal_serve")
        # Scratch variables of one ``learn`` fit (reset at its start): not part of any state.
        self._fit = {
            name: tf.Variable(tf.zeros(shape), trainable=False)
            for name, shape in (
                ("kernel", (features, k)),
                ("bias", (k,)),
                ("kernel_m", (features, k)),
                ("bias_m", (k,)),
                ("kernel_v", (features, k)),
                ("bias_v", (k,)),
            )
        }
        # Filled by export_tracker: features of the memory windows under the final weights.
        self.memory_features = tf.Variable(
            tf.zeros((0, features)), shape=tf.TensorShape([None, features]), trainable=False
        )
        self.memory_labels = tf.Variable(
            tf.zeros((0,), tf.int32), shape=tf.TensorShape([None]), trainable=False
        )
        self.class_gravity = tf.Variable(tf.zeros((k, 3)), trainable=False, name="class_gravity")
        defaults = DeviceLearning()
        self.fit_steps = tf.Variable(defaults.steps, dtype=tf.int32, trainable=False)
        self.fit_learning_rate = tf.Variable(defaults.learning_rate, trainable=False)
        self.fit_memory_weight = tf.Variable(defaults.memory_weight, trainable=False)
        self.fit_anchor = tf.Variable(defaults.anchor, trainable=False)

    def personal_variables(self) -> dict[str, tf.Variable]:
        """The installed personal state, by a stable name: what a state file holds."""
        if not self.spec.personalisable:
            return {}
        return {
            "align": self.personal_align,
            "kernel_delta": self.personal_kernel,
            "bias_delta": self.personal_bias,
            "serve": self.personal_serve,
        }

    # ----------------------------------------------------------------------------- forward
    def _normalise(self, sensor_data: tf.Tensor) -> tf.Tensor:
        return (sensor_data - self.norm_mean) / self.norm_std

    def _conv(self, x: tf.Tensor, name: str) -> tf.Tensor:
        y = tf.nn.conv1d(x, self.weights[f"{name}_kernel"], stride=1, padding="SAME")
        return tf.nn.relu(y + self.weights[f"{name}_bias"])

    def _dropout(self, x: tf.Tensor, training: bool) -> tf.Tensor:
        if not training or self.spec.dropout <= 0:
            return x
        seed = self._dropout_seed + tf.stack([tf.constant(0, tf.int64), self.global_step])
        return tf.nn.experimental.stateless_dropout(x, rate=self.spec.dropout, seed=seed)

    def _pool(self, x: tf.Tensor) -> tf.Tensor:
        return tf.nn.max_pool1d(x, ksize=2, strides=2, padding="SAME")

    def _features(self, sensor_data: tf.Tensor, align: tf.Tensor | None = None) -> tf.Tensor:
        """What the last layer reads, for windows turned by ``align`` (sample a -> align @ a)."""
        if align is not None:
            sensor_data = tf.einsum("ntc,dc->ntd", sensor_data, align)
        x = self._normalise(sensor_data)
        w = self.weights
        if self.spec.arch == "cnn":
            # Posture (sitting vs standing) is mostly the direction of gravity: give the
            # classifier each axis's mean and spread directly, beside the learned features.
            stats = [tf.reduce_mean(x, axis=1), tf.math.reduce_std(x, axis=1)]
            x = self._conv(x, "conv1")
            x = self._pool(self._conv(x, "conv2"))
            x = self._conv(x, "conv3")
            x = self._conv(x, "conv4")
            return tf.concat([tf.reduce_mean(x, axis=1), tf.reduce_max(x, axis=1), *stats], axis=1)
        x = self._pool(self._conv(x, "conv1"))  # cnn-gru
        x = self._pool(self._conv(x, "conv2"))
        g = w["gru_recurrent"].shape[0]
        h = tf.zeros((tf.shape(x)[0], g))
        inputs = tf.einsum("btc,cg->btg", x, w["gru_kernel"]) + w["gru_bias"]
        for t in range(int(x.shape[1])):
            xz, xr, xh = tf.split(inputs[:, t, :], 3, axis=1)
            hz, hr, hh = tf.split(tf.matmul(h, w["gru_recurrent"]), 3, axis=1)
            z = tf.sigmoid(xz + hz)
            r = tf.sigmoid(xr + hr)
            h = z * h + (1.0 - z) * tf.tanh(xh + r * hh)
        return h

    def _head(
        self, features: tf.Tensor, kernel_delta: tf.Tensor | None, bias_delta: tf.Tensor | None
    ) -> tf.Tensor:
        kernel, bias = self.weights["dense_kernel"], self.weights["dense_bias"]
        if kernel_delta is not None and bias_delta is not None:
            kernel, bias = kernel + kernel_delta, bias + bias_delta
        return tf.matmul(features, kernel) + bias

    def _logits_window(self, sensor_data: tf.Tensor, training: bool) -> tf.Tensor:
        """The global model's logits (what the trainer trains)."""
        features = self._dropout(self._features(sensor_data), training)
        return self._head(features, None, None)

    def _served_logits(self, sensor_data: tf.Tensor) -> tf.Tensor:
        """Logits with the installed personal state when it is served, else the global model's."""
        serve = self.personal_serve
        align = tf.eye(3) + serve * (self.personal_align - tf.eye(3))
        features = self._features(sensor_data, align)
        return self._head(features, serve * self.personal_kernel, serve * self.personal_bias)

    def _lstm_step(self, sensor_data: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        """Logits for each of the 32 samples, and the new (h, c): one timestep, stateful."""
        w = self.weights
        x = self._normalise(sensor_data[:, 0, :])
        gates = tf.matmul(x, w["lstm_kernel"]) + tf.matmul(self.lstm_h, w["lstm_recurrent"])
        i, f, g, o = tf.split(gates + w["lstm_bias"], 4, axis=1)
        c = tf.sigmoid(f) * self.lstm_c + tf.sigmoid(i) * tf.tanh(g)
        h = tf.sigmoid(o) * tf.tanh(c)
        return tf.matmul(h, w["dense_kernel"]) + w["dense_bias"], h, c

    # ----------------------------------------------------------------------------- checks
    def _check_inputs(self, sensor_data: tf.Tensor, labels: tf.Tensor | None = None) -> list[Any]:
        checks = [
            tf.debugging.assert_all_finite(sensor_data, "sensor_data contains NaN or infinity").op
        ]
        if labels is not None:
            k = tf.constant(self._num_classes, tf.int32)
            checks.append(tf.debugging.assert_non_negative(labels, message="negative label"))
            checks.append(tf.debugging.assert_less(labels, k, message="label index out of range"))
            checks.append(
                tf.debugging.assert_equal(
                    tf.shape(labels)[0],
                    tf.shape(sensor_data)[0],
                    message="labels and sensor_data differ in length",
                )
            )
        return checks

    def _checked(self, sensor_data: tf.Tensor, labels: tf.Tensor | None = None) -> tf.Tensor:
        with tf.control_dependencies(self._check_inputs(sensor_data, labels)):
            return tf.identity(sensor_data)

    def _check_personal(self, *tensors: tf.Tensor) -> list[Any]:
        return [
            tf.debugging.assert_all_finite(t, "personal state contains NaN or infinity").op
            for t in tensors
        ]

    # ----------------------------------------------------------------------------- training
    def _apply_gradients(self, grads: Sequence[tf.Tensor]) -> None:
        grads, _ = tf.clip_by_global_norm(list(grads), 5.0)
        lr = self.learning_rate
        if self.spec.optimizer == "sgd":
            for name, grad in zip(self._trainable_names, grads, strict=True):
                self.weights[name].assign_sub(lr * grad)
            return
        self.optimizer_step.assign_add(1.0)
        names = self._trainable_names
        _adam_update(
            [(self.weights[n], self.slots_m[n], self.slots_v[n]) for n in names],
            grads,
            step=self.optimizer_step,
            learning_rate=lr,
        )

    def _step(self, sensor_data: tf.Tensor, labels: tf.Tensor, weights: tf.Tensor) -> tf.Tensor:
        """One step of the trainer's optimizer on the global weights."""
        variables = [self.weights[n] for n in self._trainable_names]
        sensor_data = self._checked(sensor_data, labels)
        if self.spec.arch == "seed-lstm":
            with tf.GradientTape() as tape:
                logits, h, c = self._lstm_step(sensor_data)
                loss = _mean_cross_entropy(labels, logits, weights)
            grads = tape.gradient(loss, variables)
            self.lstm_h.assign(h)
            self.lstm_c.assign(c)
        else:
            with tf.GradientTape() as tape:
                logits = self._logits_window(sensor_data, training=True)
                loss = _mean_cross_entropy(labels, logits, weights)
            grads = tape.gradient(loss, variables)
        self._apply_gradients(grads)
        self.global_step.assign_add(1)
        return loss

    # ----------------------------------------------------------------------------- device
    def _fit_personal(
        self, sensor_data: tf.Tensor, labels: tf.Tensor, weights: tf.Tensor, align: tf.Tensor
    ) -> dict[str, tf.Tensor]:
        """The personal correction of the last layer, fitted from zero (full batch, Adam).

        Loss: the wearer's windows (weighted) + ``memory_weight`` x the memory's + ``anchor`` x
        the squared size of the correction. Only the scratch variables change.
        """
        sensor_data = self._checked(sensor_data, labels)
        checks = [
            *self._check_personal(align, weights),
            tf.debugging.assert_equal(
                tf.shape(weights)[0], tf.shape(labels)[0], message="weights and labels differ"
            ),
        ]
        with tf.control_dependencies(checks):
            features = tf.stop_gradient(self._features(sensor_data, align))
        memory, memory_labels = self.memory_features, self.memory_labels
        memory_weights = tf.ones(tf.shape(memory_labels), tf.float32)
        fit = self._fit
        for variable in fit.values():
            variable.assign(tf.zeros_like(variable))
        slots = [(fit[name], fit[f"{name}_m"], fit[f"{name}_v"]) for name in ("kernel", "bias")]
        loss = tf.constant(0.0)
        for step in tf.range(1, self.fit_steps + 1):
            with tf.GradientTape(watch_accessed_variables=False) as tape:
                tape.watch([fit["kernel"], fit["bias"]])
                loss = (
                    _mean_cross_entropy(
                        labels, self._head(features, fit["kernel"], fit["bias"]), weights
                    )
                    + self.fit_memory_weight
                    * _mean_cross_entropy(
                        memory_labels,
                        self._head(memory, fit["kernel"], fit["bias"]),
                        memory_weights,
                    )
                    + self.fit_anchor
                    * (
                        tf.reduce_sum(tf.square(fit["kernel"]))
                        + tf.reduce_sum(tf.square(fit["bias"]))
                    )
                )
            grads = tape.gradient(loss, [fit["kernel"], fit["bias"]])
            _adam_update(
                slots,
                grads,
                step=tf.cast(step, tf.float32),
                learning_rate=self.fit_learning_rate,
            )
        return {
            "kernel_delta": fit["kernel"].read_value(),
            "bias_delta": fit["bias"].read_value(),
            "loss": loss,
        }

    def _predict(self, sensor_data: tf.Tensor) -> dict[str, tf.Tensor]:
        sensor_data = self._checked(sensor_data)
        if self.spec.arch == "seed-lstm":
            logits, h, c = self._lstm_step(sensor_data)
            self.lstm_h.assign(h)
            self.lstm_c.assign(c)
        else:
            logits = self._served_logits(sensor_data)
        probabilities = tf.nn.softmax(logits)
        class_index = tf.argmax(probabilities, axis=1, output_type=tf.int64)
        out = {
            "class_index": class_index,
            "label": self.label_table.lookup(class_index),
            "probabilities": probabilities,
        }
        if self.spec.arch == "seed-lstm":
            # The original design's reading of a batch: the majority of its 32 samples.
            votes = tf.math.bincount(
                tf.cast(class_index, tf.int32), minlength=self._num_classes, dtype=tf.int32
            )
            vote = tf.argmax(votes, output_type=tf.int64)
            out["vote_index"] = vote
            out["vote_label"] = self.label_table.lookup(vote)
        return out

    # ----------------------------------------------------------------------------- state
    def _fingerprint(self, tensors: Sequence[tf.Tensor]) -> tf.Tensor:
        serialised = tf.stack([tf.io.serialize_tensor(t) for t in tensors])
        return tf.fingerprint(serialised)

    def _save_state(self, path: tf.Tensor) -> tf.Tensor:
        variables = self.personal_variables()
        values = [v.read_value() for v in variables.values()]
        names = [*variables, _FINGERPRINT_KEY, _MODEL_ID_KEY, _FORMAT_KEY]
        data = [
            *values,
            self._fingerprint(values),
            self.model_id.read_value(),
            tf.constant(STATE_FORMAT_VERSION, tf.int32),
        ]
        save = tf.raw_ops.Save(filename=path, tensor_names=names, data=data)
        with tf.control_dependencies([save]):
            return tf.identity(self.personal_serve)

    def _restore_state(self, path: tf.Tensor) -> tf.Tensor:
        variables = self.personal_variables()

        def read(name: str, dtype: tf.DType) -> tf.Tensor:
            return tf.raw_ops.Restore(file_pattern=path, tensor_name=name, dt=dtype)

        fmt = read(_FORMAT_KEY, tf.int32)
        model_id = read(_MODEL_ID_KEY, tf.string)
        stored = read(_FINGERPRINT_KEY, tf.uint8)
        values = [read(name, v.dtype) for name, v in variables.items()]
        checks = [
            tf.debugging.assert_equal(
                fmt, STATE_FORMAT_VERSION, message="state file format not supported"
            ),
            tf.debugging.assert_equal(
                model_id, self.model_id, message="state belongs to another model"
            ),
        ]
        checks += [
            tf.debugging.assert_equal(
                tf.shape(value, out_type=tf.int64),
                tf.constant(v.shape.as_list(), tf.int64),
                message=f"state tensor {name} has the wrong shape",
            )
            for (name, v), value in zip(variables.items(), values, strict=True)
        ]
        with tf.control_dependencies(checks):
            checks.append(
                tf.debugging.assert_equal(
                    self._fingerprint(values), stored, message="state file is corrupt"
                )
            )
        with tf.control_dependencies(checks):
            assigns = [v.assign(value) for v, value in zip(variables.values(), values, strict=True)]
        with tf.control_dependencies(assigns):
            return tf.identity(self.personal_serve)

    # ----------------------------------------------------------------------------- signatures
    def _build_signatures(self) -> None:
        spec = self.spec
        if spec.arch == "seed-lstm":
            x_spec = tf.TensorSpec([SEED_LSTM_BATCH, 1, 3], tf.float32, name="sensor_data")
            y_spec = tf.TensorSpec([SEED_LSTM_BATCH], tf.int32, name="labels")
        else:
            x_spec = tf.TensorSpec([None, spec.window, 3], tf.float32, name="sensor_data")
            y_spec = tf.TensorSpec([None], tf.int32, name="labels")
        w_spec = tf.TensorSpec([None], tf.float32, name="weights")
        path_spec = tf.TensorSpec([], tf.string, name="path")

        def predict(sensor_data: tf.Tensor) -> dict[str, tf.Tensor]:
            return self._predict(sensor_data)

        def train_step(sensor_data: tf.Tensor, labels: tf.Tensor, weights: tf.Tensor) -> tf.Tensor:
            return self._step(sensor_data, labels, weights)

        def logits(sensor_data: tf.Tensor) -> tf.Tensor:
            return self._logits_window(sensor_data, training=False)

        def reset_state() -> dict[str, tf.Tensor]:
            if spec.arch == "seed-lstm":
                self.lstm_h.assign(tf.zeros_like(self.lstm_h))
                self.lstm_c.assign(tf.zeros_like(self.lstm_c))
            return {"global_step": tf.identity(self.global_step)}

        def metadata() -> dict[str, tf.Tensor]:
            out = {
                "labels": self.label_names,
                "window": tf.constant(spec.window, tf.int32),
                "channels": tf.constant(spec.channels, tf.int32),
                "sample_rate_hz": tf.constant(spec.sample_rate_hz, tf.float32),
                "arch": tf.constant(spec.arch),
                "batch": tf.constant(self._batch or 0, tf.int32),
                "model_id": self.model_id.read_value(),
                "state_format": tf.constant(STATE_FORMAT_VERSION, tf.int32),
                "global_step": tf.identity(self.global_step),
                "personalisable": tf.constant(spec.personalisable),
            }
            if spec.personalisable:
                out |= {
                    "class_gravity": self.class_gravity.read_value(),
                    "memory_size": tf.shape(self.memory_labels)[0],
                    "fit_steps": self.fit_steps.read_value(),
                    "fit_learning_rate": self.fit_learning_rate.read_value(),
                    "fit_memory_weight": self.fit_memory_weight.read_value(),
                    "fit_anchor": self.fit_anchor.read_value(),
                }
            return out

        self.predict = tf.function(predict, input_signature=[x_spec])
        self.train_step = tf.function(train_step, input_signature=[x_spec, y_spec, w_spec])
        self.reset_state = tf.function(reset_state, input_signature=[])
        self.metadata = tf.function(metadata, input_signature=[])
        if spec.personalisable:
            self.logits = tf.function(logits, input_signature=[x_spec])
            self._build_personal_signatures(x_spec, y_spec, w_spec, path_spec)

    def _build_personal_signatures(
        self, x_spec: tf.TensorSpec, y_spec: tf.TensorSpec, w_spec: tf.TensorSpec, path_spec: Any
    ) -> None:
        features = int(self.weights["dense_kernel"].shape[0])
        k = self._num_classes
        align_spec = tf.TensorSpec([3, 3], tf.float32, name="align")
        kernel_spec = tf.TensorSpec([features, k], tf.float32, name="kernel_delta")
        bias_spec = tf.TensorSpec([k], tf.float32, name="bias_delta")
        serve_spec = tf.TensorSpec([], tf.float32, name="serve")

        def learn(
            sensor_data: tf.Tensor, labels: tf.Tensor, weights: tf.Tensor, align: tf.Tensor
        ) -> dict[str, tf.Tensor]:
            return self._fit_personal(sensor_data, labels, weights, align)

        def evaluate(
            sensor_data: tf.Tensor, align: tf.Tensor, kernel_delta: tf.Tensor, bias_delta: tf.Tensor
        ) -> dict[str, tf.Tensor]:
            sensor_data = self._checked(sensor_data)
            with tf.control_dependencies(self._check_personal(align, kernel_delta, bias_delta)):
                personal = self._head(self._features(sensor_data, align), kernel_delta, bias_delta)
            return {
                "probabilities": tf.nn.softmax(personal),
                "global_probabilities": tf.nn.softmax(self._logits_window(sensor_data, False)),
            }

        def memory_check(kernel_delta: tf.Tensor, bias_delta: tf.Tensor) -> dict[str, tf.Tensor]:
            memory, labels = self.memory_features, self.memory_labels
            personal = tf.argmax(self._head(memory, kernel_delta, bias_delta), 1, tf.int32)
            base = tf.argmax(self._head(memory, None, None), 1, output_type=tf.int32)
            return {
                "correct": tf.equal(personal, labels),
                "global_correct": tf.equal(base, labels),
                "labels": labels.read_value(),
            }

        def set_personal(
            align: tf.Tensor, kernel_delta: tf.Tensor, bias_delta: tf.Tensor, serve: tf.Tensor
        ) -> dict[str, tf.Tensor]:
            checks = self._check_personal(align, kernel_delta, bias_delta, serve)
            with tf.control_dependencies(checks):
                self.personal_align.assign(align)
                self.personal_kernel.assign(kernel_delta)
                self.personal_bias.assign(bias_delta)
                self.personal_serve.assign(tf.clip_by_value(serve, 0.0, 1.0))
            return {"serve": tf.identity(self.personal_serve)}

        def get_personal() -> dict[str, tf.Tensor]:
            return {name: v.read_value() for name, v in self.personal_variables().items()}

        def save_state(path: tf.Tensor) -> dict[str, tf.Tensor]:
            return {"serve": self._save_state(path)}

        def restore_state(path: tf.Tensor) -> dict[str, tf.Tensor]:
            return {"serve": self._restore_state(path)}

        self.learn = tf.function(learn, input_signature=[x_spec, y_spec, w_spec, align_spec])
        self.evaluate = tf.function(
            evaluate, input_signature=[x_spec, align_spec, kernel_spec, bias_spec]
        )
        self.memory_check = tf.function(memory_check, input_signature=[kernel_spec, bias_spec])
        self.set_personal = tf.function(
            set_personal, input_signature=[align_spec, kernel_spec, bias_spec, serve_spec]
        )
        self.get_personal = tf.function(get_personal, input_signature=[])
        self.save_state = tf.function(save_state, input_signature=[path_spec])
        self.restore_state = tf.function(restore_state, input_signature=[path_spec])

    def signatures(self) -> dict[str, Any]:
        names = [*signatures.COMMON, *(signatures.PERSONAL if self.spec.personalisable else ())]
        exported = {name: getattr(self, name) for name in names}
        exported[signatures.DEFAULT] = self.predict
        return exported

    # ----------------------------------------------------------------------------- weights I/O
    def get_weights(self) -> dict[str, npt.NDArray[np.float32]]:
        return {name: v.numpy() for name, v in self.weights.items()}

    def set_weights(self, values: dict[str, npt.NDArray[np.float32]]) -> None:
        for name, v in self.weights.items():
            v.assign(values[name])

    def reset_optimizer(self) -> None:
        """Zeroes the trainer's optimizer slots (they are not a device's business)."""
        for name in self._trainable_names:
            self.slots_m[name].assign(tf.zeros_like(self.slots_m[name]))
            self.slots_v[name].assign(tf.zeros_like(self.slots_v[name]))
        self.optimizer_step.assign(0.0)

    def reset_personal(self) -> None:
        """The global model with nothing learned: what every export starts from."""
        if not self.spec.personalisable:
            return
        self.personal_align.assign(tf.eye(3))
        self.personal_kernel.assign(tf.zeros_like(self.personal_kernel))
        self.personal_bias.assign(tf.zeros_like(self.personal_bias))
        self.personal_serve.assign(0.0)

    def features(self, windows: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        """Global features of ``windows`` (n, T, 3), in batches of 512."""
        parts = [
            self._features(tf.constant(windows[i : i + 512])).numpy()
            for i in range(0, len(windows), 512)
        ]
        width = int(self.weights["dense_kernel"].shape[0])
        return np.concatenate(parts) if parts else np.zeros((0, width), np.float32)

    def set_memory(self, memory: Memory | None, learning: DeviceLearning) -> None:
        """Ships ``memory`` (its features under the current weights) and the fit settings."""
        if not self.spec.personalisable:
            return
        k = self._num_classes
        if memory is None or len(memory.labels) == 0:
            self.memory_features.assign(tf.zeros((0, self.memory_features.shape[1])))
            self.memory_labels.assign(tf.zeros((0,), tf.int32))
            self.class_gravity.assign(tf.zeros((k, 3)))
        else:
            if memory.class_gravity.shape != (k, 3):
                raise ModelError(f"class gravity must have shape ({k}, 3)")
            self.memory_features.assign(self.features(memory.windows.astype(np.float32)))
            self.memory_labels.assign(memory.labels.astype(np.int32))
            self.class_gravity.assign(memory.class_gravity.astype(np.float32))
        self.fit_steps.assign(learning.steps)
        self.fit_learning_rate.assign(learning.learning_rate)
        self.fit_memory_weight.assign(learning.memory_weight)
        self.fit_anchor.assign(learning.anchor)

    def weights_digest(self) -> str:
        digest = hashlib.sha256(self.spec.arch.encode())
        for label in self.spec.labels:
            digest.update(label.encode() + b"\0")
        for name, value in self.get_weights().items():
            digest.update(name.encode())
            digest.update(np.ascontiguousarray(value).tobytes())
        digest.update(self.norm_mean.numpy().tobytes() + self.norm_std.numpy().tobytes())
        if self.spec.personalisable:
            for variable in (
                self.memory_features,
                self.memory_labels,
                self.class_gravity,
                self.fit_steps,
                self.fit_learning_rate,
                self.fit_memory_weight,
                self.fit_anchor,
            ):
                digest.update(np.ascontiguousarray(variable.numpy()).tobytes())
        return digest.hexdigest()


def tracker_from_saved_model(
    path: Path, spec: TrackerSpec, *, learning_rate: float, seed: int
) -> ActivityTracker:
    """A tracker to go on training from an exported SavedModel (fine-tuning): its weights,
    normalisation and global step, checked against ``spec`` (labels, architecture, window)."""
    if not (path / "saved_model.pb").is_file():
        raise ModelError(f"init_from {path} is not a SavedModel")
    loaded = tf.saved_model.load(str(path))
    meta = {k: v.numpy() for k, v in loaded.signatures["metadata"]().items()}
    labels = tuple(label.decode() for label in meta["labels"].tolist())
    arch = bytes(meta["arch"]).decode()
    window = int(meta["window"])
    if labels != spec.labels:
        raise ModelError(
            f"init_from model has labels {labels} but the training data has {spec.labels}; "
            "fine-tuning needs the same label set (train from scratch to change it)"
        )
    if arch != spec.arch or window != spec.window:
        raise ModelError(
            f"init_from model is {arch} over {window} samples, config asks for "
            f"{spec.arch} over {spec.window}"
        )
    weights = {name: v.numpy() for name, v in loaded.weights.items()}
    first_kernel = next(v for name, v in weights.items() if name.endswith("kernel"))
    width = int(first_kernel.shape[-1]) if arch != "seed-lstm" else spec.width
    spec = dataclasses.replace(spec, width=width)
    tracker = ActivityTracker(
        spec,
        mean=loaded.norm_mean.numpy(),
        std=loaded.norm_std.numpy(),
        learning_rate=learning_rate,
        seed=seed,
    )
    tracker.set_weights(weights)
    tracker.global_step.assign(int(meta["global_step"]))
    return tracker


def seed_graph_randomness(seed: int) -> None:
    """Seed TensorFlow's own randomness (initialisers, dropout) for a reproducible run."""
    tf.random.set_seed(seed)
