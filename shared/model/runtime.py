"""Running an exported ActivityTracker: the only module the agent and the trainer service import.

It loads the SavedModel's signatures (no Python model class needed), checks every input before
TensorFlow sees it, and persists the installed personal state as a single state file written to
a temporary name, fsynced and renamed, so a crash leaves the old state or the new one, never a
broken one. The SavedModel itself is never re-saved: it would grow with every save.

A personal state (:class:`PersonalState`) is plain arrays: ``learn`` returns one, ``evaluate``
and ``memory_check`` score one, ``install`` makes ``predict`` use it. What to learn from and
whether a state is good enough is the caller's policy (``device_agent.learning``).

Input contract: ``windows`` is a float32 array of shape ``(n, T, 3)`` in m/s^2. Other dtypes are
refused rather than cast, so a unit or format mistake upstream is noticed where it happens.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from shared.errors import ModelError, ModelInputError
from shared.fileio import replacing
from shared.messages import InputSpec
from shared.model import signatures
from shared.model.tensorflow_import import import_tensorflow

logger = logging.getLogger(__name__)

MAX_WINDOWS_PER_CALL: Final = 4096


@dataclass(frozen=True)
class PredictResult:
    """The model's reading of each window: class index, label and class probabilities."""

    class_index: npt.NDArray[np.int64]  # (n,)
    labels: list[str]
    probabilities: npt.NDArray[np.float32]  # (n, k)


@dataclass(frozen=True)
class PersonalState:
    """What a device learned from its wearer, beside the global weights it never changes.

    ``align`` turns each raw sample (a -> align @ a) the way this wearer's device sits;
    ``kernel_delta`` / ``bias_delta`` correct the last layer; ``serve`` says whether ``predict``
    uses them (False: the global model answers, whatever is learned).
    """

    align: npt.NDArray[np.float32]  # (3, 3)
    kernel_delta: npt.NDArray[np.float32]  # (features, k)
    bias_delta: npt.NDArray[np.float32]  # (k,)
    serve: bool = False

    @classmethod
    def nothing_learned(cls, features: int, classes: int) -> PersonalState:
        return cls(
            np.eye(3, dtype=np.float32),
            np.zeros((features, classes), np.float32),
            np.zeros(classes, np.float32),
            serve=False,
        )

    def served(self, serve: bool) -> PersonalState:
        return PersonalState(self.align, self.kernel_delta, self.bias_delta, serve)


@dataclass(frozen=True)
class MemoryCheck:
    """Which memory windows a personal state still labels right, beside the global model."""

    correct: npt.NDArray[np.bool_]  # (m,)
    global_correct: npt.NDArray[np.bool_]  # (m,)
    labels: npt.NDArray[np.int32]  # (m,)


_STATE_ERRORS: Final = (
    "state belongs to another model",
    "state file is corrupt",
    "state file format not supported",
    "has the wrong shape",
)


def _explain(message: str) -> str:
    """The useful line of a TensorFlow error: our own assertion text if there is one."""
    for known in _STATE_ERRORS:
        for line in message.splitlines():
            if known in line:
                return line.strip()[:300]
    lines = [ln.strip() for ln in message.splitlines() if ln.strip()]
    noise = ("Graph execution error", "[[", "Detected", "File ", "<stack traces")
    useful = [ln for ln in lines if not ln.startswith(noise)]
    return (useful or lines or ["unknown error"])[0][:300]


class ActivityModel:
    """A loaded SavedModel with checked ``predict``/``learn`` and atomic state persistence."""

    def __init__(self, loaded: Any, saved_model_dir: Path) -> None:
        # The loaded object owns the variables: keep it referenced while signatures are used.
        self._loaded = loaded
        self._dir = saved_model_dir
        self._signatures = loaded.signatures
        self._lock = threading.Lock()
        meta = {k: v.numpy() for k, v in self._signatures["metadata"]().items()}
        self._labels = tuple(label.decode() for label in meta["labels"].tolist())
        self._arch = bytes(meta["arch"]).decode()
        self._batch = int(meta["batch"])
        self._model_id = bytes(meta["model_id"]).decode()
        self._input_spec = InputSpec(
            window=int(meta["window"]),
            channels=int(meta["channels"]),
            sample_rate_hz=float(meta["sample_rate_hz"]),
        )
        self._personalisable = bool(meta.get("personalisable", False))
        k = len(self._labels)
        self._class_gravity = np.asarray(meta.get("class_gravity", np.zeros((k, 3))), np.float32)
        self._learning = {
            name: float(meta[name])
            for name in ("fit_steps", "fit_learning_rate", "fit_memory_weight", "fit_anchor")
            if name in meta
        }
        self._memory_size = int(meta.get("memory_size", 0))
        self._last_vote: int | None = None
        self._nothing_learned: PersonalState | None = None
        if self._personalisable:
            installed = self._signatures["get_personal"]()
            features = int(installed["kernel_delta"].shape[0])
            self._nothing_learned = PersonalState.nothing_learned(features, k)

    @classmethod
    def load(cls, saved_model_dir: Path) -> ActivityModel:
        """Loads a SavedModel directory; :class:`ModelError` says what is wrong with it."""
        saved_model_dir = Path(saved_model_dir)
        if not (saved_model_dir / "saved_model.pb").is_file():
            raise ModelError(f"{saved_model_dir} is not a SavedModel (no saved_model.pb)")
        tf = import_tensorflow()

        try:
            loaded = tf.saved_model.load(str(saved_model_dir))
        except Exception as exc:  # TF raises many unrelated types for a broken model
            raise ModelError(f"cannot load SavedModel {saved_model_dir}: {exc}") from exc
        missing = [name for name in signatures.COMMON if name not in loaded.signatures]
        if missing:
            raise ModelError(
                f"{saved_model_dir} lacks the signatures {missing}; is it an ActivityTracker?"
            )
        try:
            model = cls(loaded, saved_model_dir)
        except Exception as exc:
            raise ModelError(f"cannot read metadata of {saved_model_dir}: {exc}") from exc
        missing = [name for name in signatures.PERSONAL if name not in loaded.signatures]
        if model.personalisable and missing:
            raise ModelError(
                f"{saved_model_dir} lacks the signatures {missing}: exported by an older "
                "version of this project? Export it again."
            )
        return model

    # ----------------------------------------------------------------------------- properties
    @property
    def folder(self) -> Path:
        """The SavedModel directory this model was loaded from."""
        return self._dir

    @property
    def labels(self) -> tuple[str, ...]:
        return self._labels

    @property
    def input_spec(self) -> InputSpec:
        return self._input_spec

    @property
    def arch(self) -> str:
        return self._arch

    @property
    def model_id(self) -> str:
        return self._model_id

    @property
    def global_step(self) -> int:
        return int(self._signatures["metadata"]()["global_step"].numpy())

    @property
    def personalisable(self) -> bool:
        """Whether a device can learn a personal state on this model (not the seed-lstm)."""
        return self._personalisable

    @property
    def class_gravity(self) -> npt.NDArray[np.float32]:
        """Mean raw acceleration of each class in the training data, (k, 3); zeros if unknown."""
        return self._class_gravity.copy()

    @property
    def memory_size(self) -> int:
        """Training windows shipped in the model for on-device learning to rehearse."""
        return self._memory_size

    @property
    def learning_settings(self) -> dict[str, float]:
        """How ``learn`` fits (steps, step size, memory weight, anchor), as exported."""
        return dict(self._learning)

    # ----------------------------------------------------------------------------- checks
    def _check_windows(self, windows: object) -> npt.NDArray[np.float32]:
        if not isinstance(windows, np.ndarray):
            raise ModelInputError(f"windows must be a numpy array, got {type(windows).__name__}")
        if windows.dtype != np.float32:
            raise ModelInputError(
                f"windows must be float32 m/s^2, got {windows.dtype} (use .astype(np.float32))"
            )
        t = self._input_spec.window
        if windows.ndim != 3 or windows.shape[1:] != (t, 3):
            raise ModelInputError(f"windows must have shape (n, {t}, 3), got {windows.shape}")
        if not 1 <= windows.shape[0] <= MAX_WINDOWS_PER_CALL:
            raise ModelInputError(
                f"give 1..{MAX_WINDOWS_PER_CALL} windows per call, got {windows.shape[0]}"
            )
        if not np.isfinite(windows).all():
            bad = int(np.flatnonzero(~np.isfinite(windows).all(axis=(1, 2)))[0])
            raise ModelInputError(f"window {bad} contains NaN or infinity")
        return np.ascontiguousarray(windows)

    def _check_labels(self, label_indices: object, n: int) -> npt.NDArray[np.int32]:
        if not isinstance(label_indices, np.ndarray):
            raise ModelInputError("label_indices must be a numpy array of class indices")
        if label_indices.dtype.kind not in "iu":
            raise ModelInputError(f"label_indices must be integers, got {label_indices.dtype}")
        if label_indices.shape != (n,):
            raise ModelInputError(
                f"label_indices must have shape ({n},) to match the windows, "
                f"got {label_indices.shape}"
            )
        k = len(self._labels)
        if n and (int(label_indices.min()) < 0 or int(label_indices.max()) >= k):
            raise ModelInputError(
                f"label_indices must be in 0..{k - 1} ({', '.join(self._labels)}), "
                f"got {int(label_indices.min())}..{int(label_indices.max())}"
            )
        return label_indices.astype(np.int32)

    # ----------------------------------------------------------------------------- inference
    def predict(self, windows: np.ndarray) -> PredictResult:
        x = self._check_windows(windows)
        with self._lock:
            if self._arch == "seed-lstm":
                return self._predict_stateful(x)
            out = self._call("predict", sensor_data=x)
        index = out["class_index"].numpy().astype(np.int64)
        return PredictResult(
            class_index=index,
            labels=[self._labels[i] for i in index.tolist()],
            probabilities=out["probabilities"].numpy().astype(np.float32),
        )

    def _predict_stateful(self, x: npt.NDArray[np.float32]) -> PredictResult:
        """The original design: each window is a (32, 1, 3) batch, read by majority vote.

        The recurrent state carries over from window to window and is reset when the voted
        activity changes, as the design prescribes.
        """
        indices: list[int] = []
        probabilities = []
        k = len(self._labels)
        for window in x:
            out = self._call("predict", sensor_data=window.reshape(self._batch, 1, 3))
            vote = int(out["vote_index"].numpy())
            if self._last_vote is not None and vote != self._last_vote:
                self._signatures["reset_state"]()
            self._last_vote = vote
            per_sample = out["class_index"].numpy()
            indices.append(vote)
            probabilities.append(np.bincount(per_sample, minlength=k) / per_sample.shape[0])
        index = np.asarray(indices, dtype=np.int64)
        return PredictResult(
            class_index=index,
            labels=[self._labels[i] for i in indices],
            probabilities=np.asarray(probabilities, dtype=np.float32),
        )

    def reset_state(self) -> None:
        """Forgets the recurrent state (seed-lstm); call at the start of a new recording."""
        with self._lock:
            self._signatures["reset_state"]()
            self._last_vote = None

    # ----------------------------------------------------------------------------- learning
    def _personal_only(self) -> PersonalState:
        if self._nothing_learned is None:
            raise ModelError(f"a {self._arch} model cannot learn on the device")
        return self._nothing_learned

    def nothing_learned(self) -> PersonalState:
        """The personal state of the global model: identity alignment, no correction."""
        return self._personal_only()

    def _check_state(self, state: PersonalState) -> None:
        blank = self._personal_only()
        for name in ("align", "kernel_delta", "bias_delta"):
            value, expected = getattr(state, name), getattr(blank, name)
            if not isinstance(value, np.ndarray) or value.shape != expected.shape:
                raise ModelInputError(f"personal {name} must have shape {expected.shape}")
            if not np.isfinite(value).all():
                raise ModelInputError(f"personal {name} contains NaN or infinity")

    def learn(
        self,
        windows: np.ndarray,
        label_indices: np.ndarray,
        weights: np.ndarray,
        align: npt.NDArray[np.float32],
    ) -> tuple[PersonalState, float]:
        """The personal correction fitted on these windows (seen through ``align``) beside the
        model's memory, and the loss it ended at. Nothing installed changes."""
        self._personal_only()
        x = self._check_windows(windows)
        y = self._check_labels(label_indices, x.shape[0])
        w = np.asarray(weights, np.float32)
        if w.shape != y.shape or not np.isfinite(w).all() or (w < 0).any():
            raise ModelInputError(f"weights must be {y.shape[0]} finite values >= 0")
        align = np.array(align, np.float32)
        if align.shape != (3, 3) or not np.isfinite(align).all():
            raise ModelInputError("align must be a finite 3x3 matrix")
        with self._lock:
            out = self._call("learn", sensor_data=x, labels=y, weights=w, align=align)
        state = PersonalState(
            align,
            out["kernel_delta"].numpy(),
            out["bias_delta"].numpy(),
            serve=False,
        )
        return state, float(out["loss"].numpy())

    def evaluate(
        self, windows: np.ndarray, state: PersonalState
    ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
        """(probabilities under ``state``, probabilities of the global model) for ``windows``."""
        x = self._check_windows(windows)
        self._check_state(state)
        with self._lock:
            out = self._call(
                "evaluate",
                sensor_data=x,
                align=state.align,
                kernel_delta=state.kernel_delta,
                bias_delta=state.bias_delta,
            )
        return out["probabilities"].numpy(), out["global_probabilities"].numpy()

    def memory_check(self, state: PersonalState) -> MemoryCheck:
        """How the model's memory fares under ``state``'s correction (alignment aside: the
        memory is in the training data's frame)."""
        self._check_state(state)
        with self._lock:
            out = self._call(
                "memory_check", kernel_delta=state.kernel_delta, bias_delta=state.bias_delta
            )
        return MemoryCheck(
            out["correct"].numpy(), out["global_correct"].numpy(), out["labels"].numpy()
        )

    def tune_learning(self, **settings: float) -> None:
        """Change how ``learn`` fits (``fit_steps``, ``fit_learning_rate``, ``fit_memory_weight``,
        ``fit_anchor``) in this process only: ``bench/personalize.py`` compares settings this
        way without exporting again. A device runs what the signed model says."""
        for name, value in settings.items():
            if name not in self._learning:
                raise ModelError(f"unknown learning setting {name!r}")
            variable = getattr(self._loaded, name)
            variable.assign(np.asarray(value).astype(variable.dtype.as_numpy_dtype))
            self._learning[name] = float(value)

    def install(self, state: PersonalState) -> None:
        """Make ``predict`` use ``state`` (or the global model, when ``state.serve`` is False)."""
        self._check_state(state)
        with self._lock:
            self._call(
                "set_personal",
                align=state.align,
                kernel_delta=state.kernel_delta,
                bias_delta=state.bias_delta,
                serve=np.float32(1.0 if state.serve else 0.0),
            )

    def installed(self) -> PersonalState:
        self._personal_only()
        with self._lock:
            out = self._call("get_personal")
        return PersonalState(
            out["align"].numpy(),
            out["kernel_delta"].numpy(),
            out["bias_delta"].numpy(),
            serve=bool(out["serve"].numpy() > 0.5),
        )

    def _call(self, name: str, **kwargs: Any) -> Any:
        tf = import_tensorflow()

        try:
            return self._signatures[name](**kwargs)
        except tf.errors.InvalidArgumentError as exc:
            raise ModelInputError(f"{name} refused its input: {_explain(exc.message)}") from exc
        except tf.errors.OpError as exc:
            raise ModelError(f"{name} failed: {_explain(exc.message)}") from exc

    # ----------------------------------------------------------------------------- persistence
    def save_state(self, path: Path) -> None:
        """Writes the installed personal state to ``path``, atomically.

        Written to a temporary file in the same directory, fsynced, renamed over ``path`` and the
        directory fsynced: after a crash at any instant ``path`` holds the old state or the new.
        """
        tf = import_tensorflow()

        self._personal_only()
        path = Path(path)
        with replacing(path, suffix=".tmp") as tmp, self._lock:
            try:
                self._signatures["save_state"](path=tf.constant(str(tmp)))
            except tf.errors.OpError as exc:
                raise ModelError(f"cannot write model state to {path}: {exc.message}") from exc

    def restore_state(self, path: Path) -> bool:
        """Loads state written by :meth:`save_state`; False if there is none.

        Raises :class:`ModelError` if the file is corrupt or belongs to another model; the
        installed state is then left as it was.
        """
        tf = import_tensorflow()

        self._personal_only()
        path = Path(path)
        if not path.is_file():
            return False
        with self._lock:
            try:
                self._signatures["restore_state"](path=tf.constant(str(path)))
            except tf.errors.OpError as exc:
                raise ModelError(
                    f"cannot restore model state from {path}: {_explain(exc.message)}"
                ) from exc
            self._last_vote = None
        logger.info("restored the personal state from %s", path)
        return True
