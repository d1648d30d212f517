"""Messages a dashboard shows, made for tests: a manifest and predictions."""

from __future__ import annotations

from shared.messages import (
    InputSpec,
    ModelManifest,
    Prediction,
    WindowRef,
)

LABELS = ("Downstairs", "Jogging", "Sitting", "Standing", "Upstairs", "Walking")


T0 = 1_763_769_600.0


def prediction(
    pid: str, label: str = "Walking", version: str = "v1", device: str = "wrist-1", **extra: object
) -> Prediction:
    index = LABELS.index(label)
    probabilities = [0.02] * len(LABELS)
    probabilities[index] = 0.9
    return Prediction(
        prediction_id=pid,
        device_id=device,
        window=WindowRef(batch_seq=1, offset=0, length=80),
        label=label,
        class_index=index,
        probabilities=tuple(probabilities),
        model_version=version,
        ts=T0,
        **extra,  # type: ignore[arg-type]
    )


def manifest(version: str = "v2", labels: tuple[str, ...] = LABELS) -> ModelManifest:
    return ModelManifest(
        version=version,
        sha256="0" * 64,
        size=10,
        labels=labels,
        input=InputSpec(window=80),
        metrics={},
        created=T0,
        chunks=1,
        signature=b"sig",
    )
