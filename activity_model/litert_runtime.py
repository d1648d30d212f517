"""The LiteRT runtime: an :class:`ActivityModel` on ``ai-edge-litert``, without TensorFlow.

It runs ``<saved_model>/litert/activity.tflite``, exported beside the SavedModel in the same
signed bundle by ``activity_model.lite_export``, with that folder's ``metadata.json``. The
interpreter holds no state: this class keeps the installed personal state as arrays and gives it
to ``predict`` with every call, and persists it like the TensorFlow runtime does, so a device can
move between the two runtimes and keep what it learned.

The interpreter runs on one thread: a wearable has a core or two, and the device's other work
(MQTT, storage) needs them too.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from activity_model import signatures
from activity_model.runtime import ActivityModel, MemoryCheck, ModelMetadata, PersonalState
from shared.errors import ModelError, ModelInputError


class LiteRTModel(ActivityModel):
    """A loaded LiteRT model and the personal state installed on it."""

    runtime = "litert"

    def __init__(self, folder: Path, meta: ModelMetadata, interpreter: Any) -> None:
        super().__init__(folder, meta)
        self._interpreter = interpreter  # owns the tensors the runners use
        self._runners = {
            name: interpreter.get_signature_runner(name)
            for name in interpreter.get_signature_list()
        }
        self._installed = self._personal_only()

    @classmethod
    def open(cls, saved_model_dir: Path) -> LiteRTModel:
        folder = Path(saved_model_dir) / signatures.LITERT_DIR
        model_path = folder / signatures.LITERT_MODEL
        if not model_path.is_file():
            raise ModelError(
                f"{saved_model_dir} has no LiteRT form ({signatures.LITERT_DIR}/"
                f"{signatures.LITERT_MODEL}): a seed-lstm model, or one exported by an older "
                "version of this project. Run it with runtime = tensorflow, or export it again."
            )
        try:
            values = json.loads((folder / signatures.LITERT_METADATA).read_text(encoding="utf-8"))
            meta = ModelMetadata.from_values(values)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ModelError(
                f"cannot read the LiteRT metadata of {saved_model_dir}: {exc}"
            ) from exc
        if not meta.personalisable or meta.features <= 0:
            raise ModelError(f"the LiteRT metadata of {saved_model_dir} is not a device model")
        try:
            from ai_edge_litert.interpreter import Interpreter
        except ImportError as exc:
            raise ModelError(
                "the litert runtime needs ai-edge-litert: pip install 'har-edge[agent-lite]'"
            ) from exc
        try:
            interpreter = Interpreter(model_path=str(model_path), num_threads=1)
        except (ValueError, RuntimeError) as exc:
            raise ModelError(f"cannot load LiteRT model {model_path}: {exc}") from exc
        wanted = set(signatures.LITERT) - ({"memory_check"} if meta.memory_size == 0 else set())
        missing = sorted(wanted - set(interpreter.get_signature_list()))
        if missing:
            raise ModelError(f"{model_path} lacks the signatures {missing}; export it again")
        return cls(Path(saved_model_dir), meta, interpreter)

    def _run(self, name: str, **inputs: Any) -> dict[str, np.ndarray]:
        try:
            out: dict[str, np.ndarray] = self._runners[name](**inputs)
        except (ValueError, RuntimeError) as exc:
            raise ModelInputError(f"{name} refused its input: {exc}") from exc
        return out

    def _personal_inputs(self, state: PersonalState) -> dict[str, npt.NDArray[np.float32]]:
        return {
            "align": np.ascontiguousarray(state.align, np.float32),
            "kernel_delta": np.ascontiguousarray(state.kernel_delta, np.float32),
            "bias_delta": np.ascontiguousarray(state.bias_delta, np.float32),
        }

    # ----------------------------------------------------------------------------- inference
    def _run_predict(
        self, x: npt.NDArray[np.float32]
    ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float32]]:
        state = self._installed if self._installed.serve else self._personal_only()
        out = self._run("predict", sensor_data=x, **self._personal_inputs(state))
        return out["class_index"].astype(np.int64), out["probabilities"].astype(np.float32)

    # ----------------------------------------------------------------------------- learning
    def _run_learn(
        self,
        x: npt.NDArray[np.float32],
        y: npt.NDArray[np.int32],
        weights: npt.NDArray[np.float32],
        align: npt.NDArray[np.float32],
    ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32], float]:
        settings = self._learning
        out = self._run(
            "learn",
            sensor_data=x,
            labels=y,
            weights=weights,
            align=align,
            steps=np.int32(settings["fit_steps"]),
            learning_rate=np.float32(settings["fit_learning_rate"]),
            memory_weight=np.float32(settings["fit_memory_weight"]),
            anchor=np.float32(settings["fit_anchor"]),
        )
        return out["kernel_delta"], out["bias_delta"], float(out["loss"])

    def _run_evaluate(
        self, x: npt.NDArray[np.float32], state: PersonalState
    ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
        out = self._run("evaluate", sensor_data=x, **self._personal_inputs(state))
        return out["probabilities"], out["global_probabilities"]

    def _run_memory_check(self, state: PersonalState) -> MemoryCheck:
        if self.memory_size == 0:
            empty = np.zeros(0, np.bool_)
            return MemoryCheck(empty, empty.copy(), np.zeros(0, np.int32))
        inputs = self._personal_inputs(state)
        out = self._run(
            "memory_check", kernel_delta=inputs["kernel_delta"], bias_delta=inputs["bias_delta"]
        )
        return MemoryCheck(out["correct"], out["global_correct"], out["labels"])

    def _run_tune(self, name: str, value: float) -> None:
        """Nothing to do: the settings are inputs of ``learn``, read from ``_learning``."""

    def _run_install(self, state: PersonalState) -> None:
        self._installed = PersonalState(
            np.array(state.align, np.float32),
            np.array(state.kernel_delta, np.float32),
            np.array(state.bias_delta, np.float32),
            serve=state.serve,
        )

    def _run_installed(self) -> PersonalState:
        return self._installed
