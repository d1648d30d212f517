"""A tiny but real model and its signed releases: a small CNN trained in about a second on three
synthetic activities that are easy to tell apart, exported and registered by the trainer's own
code. For what exercises distribution, the agent and the broker rather than accuracy: the tests
and ``bench/chaos.py``. Real data and the production architecture are ``har train``'s."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from shared.messages import ModelManifest
from shared.signing import generate_keypair, load_private_key
from trainer_service.registry import ModelRegistry

LABELS = ("Walking", "Sitting", "Laying")
WINDOW = 16
CHUNK_SIZE = 64 * 1024  # several chunks per release, to exercise reassembly


def synthetic_windows(
    n: int, seed: int = 0, window: int = WINDOW
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int32]]:
    """Three easily told apart 'activities': oscillation, gravity on y, gravity on z."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, len(LABELS), n).astype(np.int32)
    t = np.arange(window) / 20.0
    x = rng.normal(0.0, 0.3, (n, window, 3)).astype(np.float32)
    x[y == 0, :, 0] += 4.0 * np.sin(2 * np.pi * 2.0 * t)
    x[y == 0, :, 1] += 9.8
    x[y == 1, :, 1] += 9.8
    x[y == 2, :, 2] += 9.8
    return x.astype(np.float32), y


@dataclass(frozen=True)
class Release:
    manifest: ModelManifest
    payload: bytes


@dataclass(frozen=True)
class Releases:
    registry: ModelRegistry
    private_key: Ed25519PrivateKey
    public_key_path: Path
    first: Release
    second: Release


def export_tiny_version(out_dir: Path, *, seed: int, steps: int, label_shift: int = 0) -> Path:
    """Train a small CNN on separable synthetic windows and export it as a version folder.

    ``label_shift`` trains it on deliberately wrong labels (class i taught as class i + shift).
    """
    from activity_model.tracker import ActivityTracker, TrackerSpec
    from activity_model.windowing import WindowSet
    from trainer_service.evaluation import evaluate
    from trainer_service.training import export_version

    spec = TrackerSpec(arch="cnn", labels=LABELS, window=WINDOW, width=8, optimizer="adam")
    x, y = synthetic_windows(256, seed=seed)
    y = ((y + label_shift) % len(LABELS)).astype(np.int32)
    flat = x.reshape(-1, 3)
    tracker = ActivityTracker(
        spec, mean=flat.mean(0), std=flat.std(0), learning_rate=1e-2, seed=seed
    )
    for i in range(steps):
        batch = slice((i * 32) % 256, (i * 32) % 256 + 32)
        tracker.train_step(x[batch], y[batch], np.ones(32, np.float32))
    test_x, test_y = synthetic_windows(64, seed=seed + 100)
    test = WindowSet(x=test_x, y=test_y, users=np.zeros(64, np.int32), labels=LABELS)
    metrics = {"test": evaluate(tracker, test), "validation": evaluate(tracker, test)}
    return export_version(
        tracker,
        out_dir,
        metrics=metrics,
        config={"arch": "cnn", "window": WINDOW, "seed": seed},
        data_summary={"synthetic": True},
        memory_source=WindowSet(x=x, y=y, users=np.arange(256, dtype=np.int32) % 4, labels=LABELS),
    )


def make_releases(root: Path) -> Releases:
    """Two registered, signed versions: the second is the first's child."""
    registry = ModelRegistry(root / "registry")
    private_path, public_path = generate_keypair(root / "keys")
    private_key = load_private_key(private_path)
    first_info = registry.add(
        export_tiny_version(root / "stage" / "v0001", seed=1, steps=40), parent=None
    )
    second_info = registry.add(
        export_tiny_version(root / "stage" / "v0002", seed=2, steps=60), parent=first_info.version
    )
    first = registry.promote(first_info.version, private_key, chunk_size=CHUNK_SIZE)
    second = registry.promote(second_info.version, private_key, chunk_size=CHUNK_SIZE)
    return Releases(
        registry=registry,
        private_key=private_key,
        public_key_path=public_path,
        first=Release(first, registry.payload(first.version)),
        second=Release(second, registry.payload(second.version)),
    )
