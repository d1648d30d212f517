"""The plain values a model takes and gives, the same on every runtime: predictions, the personal
state a device learns, a memory check, the model's own metadata. No runtime is imported here."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from shared.messages import InputSpec

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


@dataclass(frozen=True)
class ModelMetadata:
    """What the exported model says about itself (its ``metadata`` signature, or JSON)."""

    labels: tuple[str, ...]
    arch: str
    model_id: str
    input_spec: InputSpec
    batch: int = 0
    global_step: int = 0
    personalisable: bool = False
    features: int = 0  # rows of the personal kernel correction
    class_gravity: npt.NDArray[np.float32] | None = None
    learning: dict[str, float] = field(default_factory=dict)
    memory_size: int = 0

    @classmethod
    def from_values(cls, meta: dict[str, Any]) -> ModelMetadata:
        """From the metadata signature's values (numpy) or its JSON copy (plain values)."""

        def text(value: Any) -> str:
            return value.decode() if isinstance(value, bytes) else str(value)

        labels = tuple(text(label) for label in np.asarray(meta["labels"]).tolist())
        k = len(labels)
        return cls(
            labels=labels,
            arch=text(np.asarray(meta["arch"]).item()),
            model_id=text(np.asarray(meta["model_id"]).item()),
            input_spec=InputSpec(
                window=int(meta["window"]),
                channels=int(meta["channels"]),
                sample_rate_hz=float(meta["sample_rate_hz"]),
            ),
            batch=int(meta["batch"]),
            global_step=int(meta.get("global_step", 0)),
            personalisable=bool(meta.get("personalisable", False)),
            features=int(meta.get("features", 0)),
            class_gravity=np.asarray(meta.get("class_gravity", np.zeros((k, 3))), np.float32),
            learning={
                name: float(meta[name])
                for name in ("fit_steps", "fit_learning_rate", "fit_memory_weight", "fit_anchor")
                if name in meta
            },
            memory_size=int(meta.get("memory_size", 0)),
        )
