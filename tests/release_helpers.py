"""Tiny but real model releases for agent and trainer tests: trained, exported, signed."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from shared.messages import ModelManifest
from shared.signing import generate_keypair, load_private_key
from tests.model_helpers import LABELS, WINDOW, synthetic_windows
from trainer_service.registry import ModelRegistry

CHUNK_SIZE = 64 * 1024  # several chunks per release, to exercise reassembly


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
    from shared.model.tracker import ActivityTracker, TrackerSpec
    from shared.windowing import WindowSet
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
