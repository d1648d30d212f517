"""Helpers for model tests: tiny synthetic data and a child-process 'device' that uses a model.

Run as ``python -m tests.model_helpers ACTION SAVED_MODEL STATE RUNTIME`` to act like a device in
a fresh process: the child prints one JSON line with what it saw.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from activity_model.loading import load_model
from simulator.tiny_model import LABELS, WINDOW, synthetic_windows


def probe_windows(window: int = WINDOW) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int32]]:
    return synthetic_windows(12, seed=99, window=window)


def tiny_memory(x: npt.NDArray[np.float32], y: npt.NDArray[np.int32], per_class: int = 8) -> Any:
    """A class-balanced memory and the class gravity of these windows (as the trainer picks)."""
    from activity_model.tracker import Memory

    index = np.concatenate([np.flatnonzero(y == c)[:per_class] for c in range(len(LABELS))])
    gravity = np.stack([x[y == c].mean(axis=(0, 1)) for c in range(len(LABELS))])
    return Memory(x[index], y[index], gravity.astype(np.float32))


def train_and_export_tiny(
    out: Path, *, arch: str = "cnn", seed: int = 0, steps: int = 30, memory: bool = True
) -> Path:
    """A small model of ``arch`` trained ``steps`` steps on the synthetic windows and exported
    (with a memory, unless it is the seed-lstm or ``memory`` is False) to ``out``."""
    from activity_model.export import export_tracker
    from activity_model.tracker import ActivityTracker, TrackerSpec

    window = 32 if arch == "seed-lstm" else WINDOW
    spec = TrackerSpec(
        arch=arch,
        labels=LABELS,
        window=window,
        width=8,
        optimizer="sgd" if arch == "seed-lstm" else "adam",
    )
    x, y = synthetic_windows(256, seed=seed, window=window)
    flat = x.reshape(-1, 3)
    tracker = ActivityTracker(
        spec, mean=flat.mean(0), std=flat.std(0), learning_rate=1e-2, seed=seed
    )
    if arch != "seed-lstm":
        for i in range(steps):
            batch = slice((i * 32) % 256, (i * 32) % 256 + 32)
            tracker.train_step(x[batch], y[batch], np.ones(32, np.float32))
    export_tracker(
        tracker, out, memory=tiny_memory(x, y) if memory and arch != "seed-lstm" else None
    )
    return out


def _device(action: str, saved_model: Path, state: Path, runtime: str) -> dict[str, Any]:

    if runtime == "litert":
        from tests.no_tensorflow import block_tensorflow

        block_tensorflow()
    model = load_model(saved_model, runtime)
    x, _ = probe_windows(model.input_spec.window)
    out: dict[str, Any] = {"arch": model.arch, "labels": list(model.labels)}
    if action == "learn-and-save":
        out["probabilities_before"] = model.predict(x).probabilities.tolist()
        # Teach the model that everything is "Laying": predictions must move towards it.
        target = np.full(len(x), 2, np.int32)
        learned, loss = model.learn(x, target, np.ones(len(x), np.float32), np.eye(3))
        out["loss"] = loss
        model.install(learned.served(True))
        model.save_state(state)
        out["probabilities_after"] = model.predict(x).probabilities.tolist()
    elif action == "restore":
        out["probabilities_fresh"] = model.predict(x).probabilities.tolist()
        out["serving_fresh"] = model.installed().serve
        out["restored"] = model.restore_state(state)
        out["serving"] = model.installed().serve
        out["probabilities_restored"] = model.predict(x).probabilities.tolist()
    else:
        raise SystemExit(f"unknown action {action}")
    out["runtime"] = model.runtime
    out["tensorflow_imported"] = "tensorflow" in sys.modules
    return out


def main(argv: list[str]) -> int:
    action, saved_model, state, runtime = argv
    print(json.dumps(_device(action, Path(saved_model), Path(state), runtime)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
