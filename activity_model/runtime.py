"""Running an exported ActivityTracker: the interface the agent and the trainer service use.

:class:`ActivityModel` is one interface over two runtimes (``activity_model.tensorflow_runtime``,
``activity_model.litert_runtime``); ``activity_model.loading.load_model`` picks one and imports
it only then. This class checks every input before a runtime sees it and
persists the installed personal state in one file format both runtimes read
(``activity_model.state_file``), so the rest of the agent does not know which runtime runs.

A personal state (:class:`PersonalState`) is plain arrays: ``learn`` returns one, ``evaluate``
and ``memory_check`` score one, ``install`` makes ``predict`` use it. What to learn from and
whether a state is good enough is the caller's policy (``device_agent.learning``).

Input contract: ``windows`` is a float32 array of shape ``(n, T, 3)`` in m/s^2. Other dtypes are
refused rather than cast, so a unit or format mistake upstream is noticed where it happens.
"""

from __future__ import annotations

import abc
import logging
import threading
from pathlib import Path

import numpy as np
import numpy.typing as npt

from activity_model import state_file
from activity_model.values import (
    MAX_WINDOWS_PER_CALL,
    MemoryCheck,
    ModelMetadata,
    PersonalState,
    PredictResult,
)
from shared.errors import ModelError, ModelInputError
from shared.messages import InputSpec

__all__ = [
    "MAX_WINDOWS_PER_CALL",
    "ActivityModel",
    "MemoryCheck",
    "ModelMetadata",
    "PersonalState",
    "PredictResult",
]

logger = logging.getLogger(__name__)


class ActivityModel(abc.ABC):
    """A loaded model with checked ``predict``/``learn`` and atomic state persistence."""

    runtime: str = ""  # "tensorflow" or "litert"

    def __init__(self, folder: Path, meta: ModelMetadata) -> None:
        self._dir = folder
        self._meta = meta
        self._lock = threading.Lock()
        self._nothing_learned: PersonalState | None = None
        if meta.personalisable:
            self._nothing_learned = PersonalState.nothing_learned(meta.features, len(meta.labels))
        self._learning = dict(meta.learning)

    # ----------------------------------------------------------------------------- properties
    @property
    def folder(self) -> Path:
        """The SavedModel directory this model was loaded from (the LiteRT form is inside)."""
        return self._dir

    @property
    def labels(self) -> tuple[str, ...]:
        return self._meta.labels

    @property
    def input_spec(self) -> InputSpec:
        return self._meta.input_spec

    @property
    def arch(self) -> str:
        return self._meta.arch

    @property
    def model_id(self) -> str:
        return self._meta.model_id

    @property
    def global_step(self) -> int:
        return self._meta.global_step

    @property
    def personalisable(self) -> bool:
        """Whether a device can learn a personal state on this model (not the seed-lstm)."""
        return self._meta.personalisable

    @property
    def class_gravity(self) -> npt.NDArray[np.float32]:
        """Mean raw acceleration of each class in the training data, (k, 3); zeros if unknown."""
        gravity = self._meta.class_gravity
        k = len(self.labels)
        return np.zeros((k, 3), np.float32) if gravity is None else gravity.copy()

    @property
    def memory_size(self) -> int:
        """Training windows shipped in the model for on-device learning to rehearse."""
        return self._meta.memory_size

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
        t = self.input_spec.window
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
        k = len(self.labels)
        if n and (int(label_indices.min()) < 0 or int(label_indices.max()) >= k):
            raise ModelInputError(
                f"label_indices must be in 0..{k - 1} ({', '.join(self.labels)}), "
                f"got {int(label_indices.min())}..{int(label_indices.max())}"
            )
        return label_indices.astype(np.int32)

    def _personal_only(self) -> PersonalState:
        if self._nothing_learned is None:
            raise ModelError(f"a {self.arch} model cannot learn on the device")
        return self._nothing_learned

    def _check_state(self, state: PersonalState) -> None:
        blank = self._personal_only()
        for name in ("align", "kernel_delta", "bias_delta"):
            value, expected = getattr(state, name), getattr(blank, name)
            if not isinstance(value, np.ndarray) or value.shape != expected.shape:
                raise ModelInputError(f"personal {name} must have shape {expected.shape}")
            if not np.isfinite(value).all():
                raise ModelInputError(f"personal {name} contains NaN or infinity")

    # ----------------------------------------------------------------------------- per runtime
    # Called with the lock held and inputs checked.
    @abc.abstractmethod
    def _run_predict(
        self, x: npt.NDArray[np.float32]
    ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float32]]: ...

    @abc.abstractmethod
    def _run_learn(
        self,
        x: npt.NDArray[np.float32],
        y: npt.NDArray[np.int32],
        weights: npt.NDArray[np.float32],
        align: npt.NDArray[np.float32],
    ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32], float]: ...

    @abc.abstractmethod
    def _run_evaluate(
        self, x: npt.NDArray[np.float32], state: PersonalState
    ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]: ...

    @abc.abstractmethod
    def _run_memory_check(self, state: PersonalState) -> MemoryCheck: ...

    @abc.abstractmethod
    def _run_install(self, state: PersonalState) -> None: ...

    @abc.abstractmethod
    def _run_installed(self) -> PersonalState: ...

    @abc.abstractmethod
    def _run_tune(self, name: str, value: float) -> None: ...

    def _run_reset_state(self) -> None:  # noqa: B027 (only the seed-lstm has recurrent state)
        """Forgets recurrent state between calls; only the stateful seed-lstm has any."""

    def _restore_older_format(self, path: Path) -> None:
        """Installs a state file this runtime wrote in an earlier format, if it can read it."""
        raise ModelError(f"state file format not supported: {path} (not a format 3 state)")

    # ----------------------------------------------------------------------------- inference
    def predict(self, windows: np.ndarray) -> PredictResult:
        x = self._check_windows(windows)
        with self._lock:
            index, probabilities = self._run_predict(x)
        return PredictResult(
            class_index=index,
            labels=[self.labels[i] for i in index.tolist()],
            probabilities=probabilities,
        )

    def reset_state(self) -> None:
        """Forgets the recurrent state (seed-lstm); call at the start of a new recording."""
        with self._lock:
            self._run_reset_state()

    # ----------------------------------------------------------------------------- learning
    def nothing_learned(self) -> PersonalState:
        """The personal state of the global model: identity alignment, no correction."""
        return self._personal_only()

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
            kernel_delta, bias_delta, loss = self._run_learn(x, y, w, align)
        return PersonalState(align, kernel_delta, bias_delta, serve=False), loss

    def evaluate(
        self, windows: np.ndarray, state: PersonalState
    ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
        """(probabilities under ``state``, probabilities of the global model) for ``windows``."""
        x = self._check_windows(windows)
        self._check_state(state)
        with self._lock:
            return self._run_evaluate(x, state)

    def memory_check(self, state: PersonalState) -> MemoryCheck:
        """How the model's memory fares under ``state``'s correction (alignment aside: the
        memory is in the training data's frame)."""
        self._check_state(state)
        with self._lock:
            return self._run_memory_check(state)

    def tune_learning(self, **settings: float) -> None:
        """Change how ``learn`` fits (``fit_steps``, ``fit_learning_rate``, ``fit_memory_weight``,
        ``fit_anchor``) in this process only: ``bench/personalize.py`` compares settings this
        way without exporting again. A device runs what the signed model says."""
        for name, value in settings.items():
            if name not in self._learning:
                raise ModelError(f"unknown learning setting {name!r}")
            with self._lock:
                self._run_tune(name, value)
            self._learning[name] = float(value)

    def install(self, state: PersonalState) -> None:
        """Make ``predict`` use ``state`` (or the global model, when ``state.serve`` is False)."""
        self._check_state(state)
        with self._lock:
            self._run_install(state)

    def installed(self) -> PersonalState:
        self._personal_only()
        with self._lock:
            return self._run_installed()

    # ----------------------------------------------------------------------------- persistence
    def save_state(self, path: Path) -> None:
        """Writes the installed personal state to ``path``, atomically.

        Written to a temporary file in the same directory, fsynced, renamed over ``path`` and the
        directory fsynced: after a crash at any instant ``path`` holds the old state or the new.
        """
        self._personal_only()
        state = self.installed()
        try:
            state_file.write_state(Path(path), state, self.model_id)
        except OSError as exc:
            raise ModelError(f"cannot write model state to {path}: {exc}") from exc

    def restore_state(self, path: Path) -> bool:
        """Loads state written by :meth:`save_state`; False if there is none.

        Raises :class:`ModelError` if the file is corrupt or belongs to another model; the
        installed state is then left as it was.
        """
        blank = self._personal_only()
        path = Path(path)
        if not path.is_file():
            return False
        try:
            if state_file.is_current_format(path):
                state = state_file.read_state(path, self.model_id, blank)
                with self._lock:
                    self._run_install(state)
            else:
                self._restore_older_format(path)
        except ModelError as exc:
            raise ModelError(f"cannot restore model state from {path}: {exc}") from exc
        logger.info("restored the personal state from %s", path)
        return True
