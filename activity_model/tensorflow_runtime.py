"""The TensorFlow runtime: an :class:`ActivityModel` that calls the SavedModel's signatures.

No Python model class is needed, only the SavedModel. The SavedModel itself is never re-saved
(it would grow with every save): the personal state lives in its variables while running and in
a state file (``activity_model.state_file``) between runs.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from activity_model import signatures
from activity_model.runtime import ActivityModel, MemoryCheck, ModelMetadata, PersonalState
from activity_model.tensorflow_import import import_tensorflow
from shared.errors import ModelError, ModelInputError

logger = logging.getLogger(__name__)

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


class TensorFlowModel(ActivityModel):
    """A loaded SavedModel."""

    runtime = "tensorflow"

    def __init__(self, loaded: Any, saved_model_dir: Path) -> None:
        # The loaded object owns the variables: keep it referenced while signatures are used.
        self._loaded = loaded
        self._signatures = loaded.signatures
        values = {k: v.numpy() for k, v in self._signatures["metadata"]().items()}
        if bool(values.get("personalisable", False)):
            installed = self._signatures["get_personal"]()
            values["features"] = int(installed["kernel_delta"].shape[0])
        super().__init__(saved_model_dir, ModelMetadata.from_values(values))
        self._last_vote: int | None = None

    @classmethod
    def open(cls, saved_model_dir: Path) -> TensorFlowModel:
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

    def _call(self, name: str, **kwargs: Any) -> Any:
        tf = import_tensorflow()

        try:
            return self._signatures[name](**kwargs)
        except tf.errors.InvalidArgumentError as exc:
            raise ModelInputError(f"{name} refused its input: {_explain(exc.message)}") from exc
        except tf.errors.OpError as exc:
            raise ModelError(f"{name} failed: {_explain(exc.message)}") from exc

    # ----------------------------------------------------------------------------- inference
    def _run_predict(
        self, x: npt.NDArray[np.float32]
    ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float32]]:
        if self.arch == "seed-lstm":
            return self._predict_stateful(x)
        out = self._call("predict", sensor_data=x)
        return (
            out["class_index"].numpy().astype(np.int64),
            out["probabilities"].numpy().astype(np.float32),
        )

    def _predict_stateful(
        self, x: npt.NDArray[np.float32]
    ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float32]]:
        """The original design: each window is a (32, 1, 3) batch, read by majority vote.

        The recurrent state carries over from window to window and is reset when the voted
        activity changes, as the design prescribes.
        """
        indices: list[int] = []
        probabilities = []
        k = len(self.labels)
        for window in x:
            out = self._call("predict", sensor_data=window.reshape(self._meta.batch, 1, 3))
            vote = int(out["vote_index"].numpy())
            if self._last_vote is not None and vote != self._last_vote:
                self._signatures["reset_state"]()
            self._last_vote = vote
            per_sample = out["class_index"].numpy()
            indices.append(vote)
            probabilities.append(np.bincount(per_sample, minlength=k) / per_sample.shape[0])
        return np.asarray(indices, dtype=np.int64), np.asarray(probabilities, dtype=np.float32)

    def _run_reset_state(self) -> None:
        self._signatures["reset_state"]()
        self._last_vote = None

    # ----------------------------------------------------------------------------- learning
    def _run_learn(
        self,
        x: npt.NDArray[np.float32],
        y: npt.NDArray[np.int32],
        weights: npt.NDArray[np.float32],
        align: npt.NDArray[np.float32],
    ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32], float]:
        out = self._call("learn", sensor_data=x, labels=y, weights=weights, align=align)
        return out["kernel_delta"].numpy(), out["bias_delta"].numpy(), float(out["loss"].numpy())

    def _run_evaluate(
        self, x: npt.NDArray[np.float32], state: PersonalState
    ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
        out = self._call(
            "evaluate",
            sensor_data=x,
            align=state.align,
            kernel_delta=state.kernel_delta,
            bias_delta=state.bias_delta,
        )
        return out["probabilities"].numpy(), out["global_probabilities"].numpy()

    def _run_memory_check(self, state: PersonalState) -> MemoryCheck:
        out = self._call(
            "memory_check", kernel_delta=state.kernel_delta, bias_delta=state.bias_delta
        )
        return MemoryCheck(
            out["correct"].numpy(), out["global_correct"].numpy(), out["labels"].numpy()
        )

    def _run_tune(self, name: str, value: float) -> None:
        variable = getattr(self._loaded, name)
        variable.assign(np.asarray(value).astype(variable.dtype.as_numpy_dtype))

    def _run_install(self, state: PersonalState) -> None:
        self._call(
            "set_personal",
            align=state.align,
            kernel_delta=state.kernel_delta,
            bias_delta=state.bias_delta,
            serve=np.float32(1.0 if state.serve else 0.0),
        )

    def _run_installed(self) -> PersonalState:
        out = self._call("get_personal")
        return PersonalState(
            out["align"].numpy(),
            out["kernel_delta"].numpy(),
            out["bias_delta"].numpy(),
            serve=bool(out["serve"].numpy() > 0.5),
        )

    # ----------------------------------------------------------------------------- persistence
    def _restore_older_format(self, path: Path) -> None:
        """A format 2 state, written by the SavedModel's ``save_state`` before format 3; the next
        save writes format 3."""
        tf = import_tensorflow()

        with self._lock:
            try:
                self._signatures["restore_state"](path=tf.constant(str(path)))
            except tf.errors.OpError as exc:
                raise ModelError(_explain(exc.message)) from exc
