"""Training an ActivityTracker: by-user splits, class weighting, early stopping, export.

Usable from ``har train`` and programmatically by the trainer service, e.g. to fine-tune the
current global model (``init_from``) on the base data plus confirmed device windows carrying a
weight (``WindowSet.weights``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from activity_model.windowing import (
    DEFAULT_HOP,
    DEFAULT_MAX_GAP_NS,
    DEFAULT_WINDOW,
    WindowSet,
    make_windows,
    split_users,
)
from shared.errors import ModelError
from trainer_service.evaluation import evaluate
from trainer_service.plots import plot_confusion, plot_learning_curves

logger = logging.getLogger(__name__)

SEED_LSTM_LEARNING_RATE = 1e-4


@dataclass(frozen=True)
class TrainConfig:
    """How a model is trained. Defaults are the measured choice (docs/model.md)."""

    arch: str = "cnn"
    window: int = DEFAULT_WINDOW
    hop: int = 10  # training windows overlap heavily: cheap augmentation
    eval_hop: int = DEFAULT_HOP
    epochs: int = 40
    batch_size: int = 64
    learning_rate: float = 1e-3
    # How a device fits its wearer's personal state, baked into the export (DeviceLearning;
    # chosen on validation users with bench/personalize.py, docs/model.md).
    device_fit_steps: int = 50
    device_fit_learning_rate: float = 0.01
    device_memory_weight: float = 1.0
    device_anchor: float = 0.1
    device_memory_per_class: int = 32
    patience: int = 8
    # Epochs before validation may pick the weights or stop the run (at most half of them): a
    # noisy validation set of a few people otherwise keeps an epoch-0 model.
    min_epochs: int = 12
    seed: int = 0
    val_fraction: float = 0.15
    test_fraction: float = 0.2
    val_users: tuple[int, ...] | None = None
    test_users: tuple[int, ...] | None = None
    class_weighting: str = "balanced"  # or "none"
    width: int = 32
    dropout: float = 0.2
    augment: bool = True
    # How far augmentation turns a window: "small" (about 9 degrees each way: how phones sit
    # on different people); "about_gravity" (also any angle about the window's own gravity, a
    # device worn turned, its posture kept) or "about_x" (about the device's x axis).
    # bench/placement.py compares them (docs/model.md).
    rotation: str = "about_gravity"
    spin_share: float = 0.5  # share of the windows turned about gravity (or x)
    max_gap_ns: int = DEFAULT_MAX_GAP_NS

    def __post_init__(self) -> None:
        if self.class_weighting not in ("balanced", "none"):
            raise ModelError(
                f"class_weighting must be balanced or none, not {self.class_weighting}"
            )
        if self.rotation not in ("small", "about_gravity", "about_x"):
            raise ModelError(
                f"rotation must be small, about_gravity or about_x, not {self.rotation}"
            )
        if not 0.0 <= self.spin_share <= 1.0:
            raise ModelError(f"spin_share must be within 0..1, not {self.spin_share}")
        if self.epochs < 1 or self.batch_size < 1 or self.patience < 1:
            raise ModelError("epochs, batch_size and patience must be positive")

    @classmethod
    def seed_lstm(cls, **overrides: Any) -> TrainConfig:
        """The original design: stateful LSTM(64) over (32, 1, 3), SGD at 1e-4."""
        values: dict[str, Any] = {
            "arch": "seed-lstm",
            "window": 32,
            "hop": 32,
            "eval_hop": 32,
            "learning_rate": SEED_LSTM_LEARNING_RATE,
            "augment": False,
        }
        values.update(overrides)
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def device_learning(config: TrainConfig | dict[str, Any]) -> Any:
    """The DeviceLearning an export bakes in, from a TrainConfig or its saved dict."""
    from activity_model.tracker import DeviceLearning

    values = config.to_dict() if isinstance(config, TrainConfig) else config
    defaults = TrainConfig()
    return DeviceLearning(
        steps=int(values.get("device_fit_steps", defaults.device_fit_steps)),
        learning_rate=float(
            values.get("device_fit_learning_rate", defaults.device_fit_learning_rate)
        ),
        memory_weight=float(values.get("device_memory_weight", defaults.device_memory_weight)),
        anchor=float(values.get("device_anchor", defaults.device_anchor)),
        memory_per_class=int(
            values.get("device_memory_per_class", defaults.device_memory_per_class)
        ),
    )


def select_memory(windows: WindowSet, per_class: int, seed: int = 0) -> Any:
    """A class-balanced memory of ``windows`` for devices to rehearse (a ``Memory``).

    Each class takes up to ``per_class`` windows, drawn in turn from each person who has that
    class, so the memory shows how different people do it. Class gravity is the mean raw
    acceleration of every window of the class.
    """
    from activity_model.tracker import Memory

    k = len(windows.labels)
    rng = np.random.default_rng(seed)
    chosen: list[int] = []
    gravity = np.zeros((k, 3), np.float32)
    for label in range(k):
        of_class = np.flatnonzero(windows.y == label)
        if of_class.size == 0:
            continue
        gravity[label] = windows.x[of_class].mean(axis=(0, 1))
        by_user = [
            rng.permutation(of_class[windows.users[of_class] == user]).tolist()
            for user in rng.permutation(np.unique(windows.users[of_class]))
        ]
        taken = 0
        while taken < min(per_class, of_class.size):
            for queue in by_user:
                if queue and taken < per_class:
                    chosen.append(queue.pop())
                    taken += 1
    index = np.asarray(chosen, np.int64)
    return Memory(windows.x[index].astype(np.float32), windows.y[index].astype(np.int32), gravity)


@dataclass
class TrainResult:
    """The trained tracker (best weights on validation) and how it got there."""

    tracker: Any
    best_epoch: int
    best_val: dict[str, Any]
    history: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0


@dataclass(frozen=True)
class DataSplit:
    train: WindowSet
    val: WindowSet
    test: WindowSet
    users: dict[str, list[int]]


def split_by_user(data: Any, config: TrainConfig) -> DataSplit:
    """Windows of ``data`` (a WisdmData) split so that no person is in two sets.

    Training windows use ``config.hop``; validation and test windows use ``config.eval_hop``.
    """
    all_users = np.unique(data.users)
    if config.test_users is not None or config.val_users is not None:
        test = sorted(config.test_users or ())
        val = sorted(config.val_users or ())
        if set(test) & set(val):
            raise ModelError(f"users {sorted(set(test) & set(val))} are in validation and test")
        train = sorted(set(all_users.tolist()) - set(test) - set(val))
        if not val or not train:
            raise ModelError("need at least one training and one validation user")
    else:
        train, val, test = split_users(
            all_users,
            val_fraction=config.val_fraction,
            test_fraction=config.test_fraction,
            seed=config.seed,
        )
    dense = make_windows(data, config.window, config.hop, config.max_gap_ns)
    sparse = make_windows(data, config.window, config.eval_hop, config.max_gap_ns)
    return DataSplit(
        train=dense.for_users(train),
        val=sparse.for_users(val),
        test=sparse.for_users(test),
        users={"train": train, "val": val, "test": test},
    )


def class_weights(y: npt.NDArray[np.int32], k: int) -> npt.NDArray[np.float32]:
    """Inverse-frequency weights per class, 1 on average over the samples."""
    counts = np.bincount(y, minlength=k).astype(np.float64)
    weights = np.where(counts > 0, len(y) / (k * np.maximum(counts, 1)), 0.0)
    present = counts > 0
    weights[present] *= k / present.sum()
    return weights.astype(np.float32)


def _sample_weights(ws: WindowSet, config: TrainConfig) -> npt.NDArray[np.float32]:
    weights = np.ones(len(ws), np.float32) if ws.weights is None else ws.weights.astype(np.float32)
    if config.class_weighting == "balanced":
        weights = weights * class_weights(ws.y, len(ws.labels))[ws.y]
    return weights


def spin(
    x: npt.NDArray[np.float32], rng: np.random.Generator, share: float, about: str = "gravity"
) -> npt.NDArray[np.float32]:
    """Turn a ``share`` of the windows (n, T, 3) by a random angle about an axis: each window's
    own mean acceleration (``"gravity"``: what a device worn turned about gravity sees, its
    posture unchanged), or the device's ``"x"``, ``"y"`` or ``"z"`` axis."""
    n = x.shape[0]
    if about == "gravity":
        axis = x.mean(axis=1).astype(np.float64)
        axis /= np.maximum(np.linalg.norm(axis, axis=1, keepdims=True), 1e-9)
    else:
        axis = np.tile(np.eye(3)["xyz".index(about)], (n, 1))
    angle = rng.uniform(0.0, 2.0 * np.pi, n) * (rng.random(n) < share)
    cos, sin = np.cos(angle)[:, None, None], np.sin(angle)[:, None, None]
    cross = np.zeros((n, 3, 3))
    cross[:, 0, 1], cross[:, 0, 2], cross[:, 1, 2] = -axis[:, 2], axis[:, 1], -axis[:, 0]
    cross -= cross.transpose(0, 2, 1)
    outer = axis[:, :, None] * axis[:, None, :]
    rot = cos * np.eye(3) + sin * cross + (1.0 - cos) * outer  # Rodrigues
    spun: npt.NDArray[np.float32] = np.einsum("ntc,ndc->ntd", x, rot).astype(np.float32)
    return spun


def _augment(
    x: npt.NDArray[np.float32], rng: np.random.Generator, config: TrainConfig
) -> npt.NDArray[np.float32]:
    """Small random rotations and gains: phones sit a little differently on every person;
    unless ``rotation = "small"``, a share also turned about gravity or x (a device worn
    turned)."""
    if config.rotation != "small":
        x = spin(x, rng, config.spin_share, config.rotation.removeprefix("about_"))
    n = x.shape[0]
    angles = rng.normal(0.0, 0.15, size=(n, 3))  # radians, about 9 degrees
    cx, cy, cz = np.cos(angles).T
    sx, sy, sz = np.sin(angles).T
    rot = np.empty((n, 3, 3), np.float32)
    rot[:, 0, 0] = cy * cz
    rot[:, 0, 1] = -cy * sz
    rot[:, 0, 2] = sy
    rot[:, 1, 0] = sx * sy * cz + cx * sz
    rot[:, 1, 1] = -sx * sy * sz + cx * cz
    rot[:, 1, 2] = -sx * cy
    rot[:, 2, 0] = -cx * sy * cz + sx * sz
    rot[:, 2, 1] = cx * sy * sz + sx * cz
    rot[:, 2, 2] = cx * cy
    gain = rng.normal(1.0, 0.05, size=(n, 1, 1)).astype(np.float32)
    rotated: npt.NDArray[np.float32] = np.einsum("ntc,ndc->ntd", x, rot).astype(np.float32)
    return rotated * gain


def build_tracker(
    config: TrainConfig, labels: tuple[str, ...], train: WindowSet | None, init_from: Path | None
) -> Any:
    """A fresh tracker normalised on ``train``, or a copy of the model in ``init_from``."""
    from activity_model.tracker import ActivityTracker, TrackerSpec, tracker_from_saved_model

    spec = TrackerSpec(
        arch=config.arch,
        labels=labels,
        window=config.window,
        optimizer="sgd" if config.arch == "seed-lstm" else "adam",
        dropout=config.dropout,
        width=config.width,
    )
    if init_from is None:
        if train is None:
            raise ModelError("a new tracker needs training windows to normalise on")
        flat = train.x.reshape(-1, 3)
        return ActivityTracker(
            spec,
            mean=flat.mean(axis=0),
            std=flat.std(axis=0),
            learning_rate=config.learning_rate,
            seed=config.seed,
        )
    return tracker_from_saved_model(
        Path(init_from), spec, learning_rate=config.learning_rate, seed=config.seed
    )


def train_model(
    train: WindowSet,
    val: WindowSet,
    config: TrainConfig,
    labels: tuple[str, ...] | None = None,
    *,
    init_from: Path | None = None,
    progress: bool = True,
    on_epoch: Callable[[int, int], None] | None = None,
) -> TrainResult:
    """Trains with early stopping on validation macro-F1; returns the best weights seen.

    ``on_epoch(epoch, epochs)`` is called as each epoch starts, with the epoch counted from 1
    and the most epochs this run may take (early stopping may end it sooner)."""
    from activity_model.tracker import seed_graph_randomness

    labels = labels or train.labels
    if train.labels != labels or val.labels != labels:
        raise ModelError(f"windows carry labels {train.labels}/{val.labels}, expected {labels}")
    if len(train) == 0 or len(val) == 0:
        raise ModelError("training and validation sets must not be empty")
    if train.window != config.window:
        raise ModelError(f"windows have {train.window} samples, config says {config.window}")
    leaked = set(np.unique(train.users).tolist()) & set(np.unique(val.users).tolist())
    if leaked:
        logger.warning("users %s are in both training and validation sets", sorted(leaked))
    seed_graph_randomness(config.seed)
    started = time.monotonic()
    tracker = build_tracker(config, labels, train, init_from)
    tracker.learning_rate.assign(config.learning_rate)
    rng = np.random.default_rng(config.seed)
    weights = _sample_weights(train, config)
    run_epoch = _epoch_stateful if config.arch == "seed-lstm" else _epoch_batched

    best_score, best_epoch, best_val = -1.0, -1, {}
    warm_up = min(config.min_epochs, (config.epochs + 1) // 2)
    best_weights = tracker.get_weights()
    history: list[dict[str, float]] = []
    bar = _progress(config.epochs, progress)
    for epoch in range(config.epochs):
        if on_epoch is not None:
            on_epoch(epoch + 1, config.epochs)
        loss = run_epoch(tracker, train, weights, config, rng)
        val_metrics = evaluate(tracker, val)
        history.append(
            {
                "epoch": epoch,
                "loss": loss,
                "val_accuracy": val_metrics["accuracy"],
                "val_macro_f1": val_metrics["macro_f1"],
            }
        )
        if epoch + 1 < warm_up:
            pass  # validation neither picks nor stops yet
        elif val_metrics["macro_f1"] > best_score:
            best_score, best_epoch, best_val = val_metrics["macro_f1"], epoch, val_metrics
            best_weights = tracker.get_weights()
        elif (epoch - best_epoch) % max(config.patience // 2, 1) == 0:
            # Validation stalled: halve the step size (reduce on plateau).
            tracker.learning_rate.assign(float(tracker.learning_rate.numpy()) * 0.5)
        bar.update(1)
        bar.set_postfix(
            loss=f"{loss:.3f}", val_f1=f"{val_metrics['macro_f1']:.3f}", best=best_epoch
        )
        logger.debug("epoch %d loss %.4f val %s", epoch, loss, val_metrics["macro_f1"])
        if epoch + 1 >= warm_up and epoch - best_epoch >= config.patience:
            logger.info("early stop at epoch %d (best %d)", epoch, best_epoch)
            break
    bar.close()
    tracker.set_weights(best_weights)
    return TrainResult(
        tracker=tracker,
        best_epoch=best_epoch,
        best_val=best_val,
        history=history,
        seconds=time.monotonic() - started,
    )


def _progress(total: int, enabled: bool) -> Any:
    from tqdm import tqdm

    # leave=True: the finished bar stays, showing the epochs run and the last loss and F1.
    return tqdm(total=total, desc="epochs", unit="epoch", disable=not enabled, leave=True)


def _epoch_batched(
    tracker: Any,
    train: WindowSet,
    weights: npt.NDArray[np.float32],
    config: TrainConfig,
    rng: np.random.Generator,
) -> float:
    order = rng.permutation(len(train))
    losses = []
    for start in range(0, len(order), config.batch_size):
        index = np.sort(order[start : start + config.batch_size])
        x = train.x[index]
        if config.augment:
            x = _augment(x, rng, config)
        loss = tracker.train_step(x, train.y[index], weights[index])
        losses.append(float(loss))
    return float(np.mean(losses))


def _epoch_stateful(
    tracker: Any,
    train: WindowSet,
    weights: npt.NDArray[np.float32],
    config: TrainConfig,
    rng: np.random.Generator,
) -> float:
    """The original design's training: windows of a recording in order, state carried across,
    reset when the recording (so the activity) changes; recordings in shuffled order."""
    segment = train.segment if train.segment is not None else np.arange(len(train))
    boundaries = np.flatnonzero(np.diff(segment) != 0) + 1
    runs = np.split(np.arange(len(train)), boundaries)
    batch = config.window
    losses = []
    for run_index in rng.permutation(len(runs)):
        tracker.reset_state()
        for i in runs[run_index]:
            y = np.full(batch, train.y[i], np.int32)
            w = np.full(batch, weights[i], np.float32)
            losses.append(float(tracker.train_step(train.x[i].reshape(batch, 1, 3), y, w)))
    tracker.reset_state()
    return float(np.mean(losses))


def _write_json(path: Path, value: Any) -> None:
    path.write_text(json.dumps(value, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def export_version(
    tracker: Any,
    out_dir: Path,
    *,
    metrics: dict[str, Any],
    config: TrainConfig | dict[str, Any],
    data_summary: dict[str, Any],
    memory_source: WindowSet | None = None,
) -> Path:
    """Writes one model version folder and returns it.

    ``out_dir`` receives ``saved_model/``, ``metrics.json``, ``confusion.png`` (the test
    confusion matrix, counts and row-normalised), ``learning_curves.png`` (when ``metrics`` holds
    the per-epoch ``history``), ``config.json`` and ``data_summary.json``. Everything is
    written into a temporary sibling folder first and renamed at the end, so a reader never
    sees half a version. ``out_dir`` must not exist.
    ``memory_source`` (the base training windows) gives the memory shipped for on-device learning.
    """
    from activity_model.export import export_tracker

    out_dir = Path(out_dir)
    if out_dir.exists():
        raise ModelError(f"{out_dir} already exists: model versions are immutable")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    config_dict = config.to_dict() if isinstance(config, TrainConfig) else dict(config)
    learning = device_learning(config_dict)
    memory = None
    if memory_source is not None and len(memory_source):
        seed = int(config_dict.get("seed", 0))
        memory = select_memory(memory_source, learning.memory_per_class, seed)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        model_id = export_tracker(
            tracker, staging / "saved_model", memory=memory, learning=learning
        )
        test_metrics = metrics.get("test", metrics)
        title = f"{out_dir.name} ({tracker.spec.arch})"
        plot_confusion(test_metrics, staging / "confusion.png", title=title)
        if metrics.get("history"):
            plot_learning_curves(metrics["history"], staging / "learning_curves.png", title=title)
        _write_json(staging / "metrics.json", {**metrics, "model_id": model_id})
        _write_json(staging / "config.json", config_dict)
        _write_json(staging / "data_summary.json", data_summary)
        os.replace(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    logger.info("exported model %s to %s", model_id, out_dir)
    return out_dir


def train_and_export(
    data: Any, config: TrainConfig, out_dir: Path, *, progress: bool = True
) -> tuple[Path, dict[str, Any]]:
    """The whole ``har train`` procedure on a loaded WisdmData; returns (folder, metrics)."""
    split = split_by_user(data, config)
    if len(split.test) == 0:
        raise ModelError("the test users have no complete window")
    result = train_model(split.train, split.val, config, data.labels, progress=progress)
    test_metrics = evaluate(result.tracker, split.test)
    metrics = {
        "test": test_metrics,
        "validation": result.best_val,
        "best_epoch": result.best_epoch,
        "epochs_run": len(result.history),
        "train_seconds": round(result.seconds, 1),
        "history": result.history,
        "split": "by user",
    }
    summary = {
        "source": data.report.to_dict(),
        "labels": list(data.labels),
        "samples_per_class": data.class_counts(),
        "users": split.users,
        "train": split.train.summary(),
        "validation": split.val.summary(),
        "test": split.test.summary(),
    }
    folder = export_version(
        result.tracker,
        out_dir,
        metrics=metrics,
        config=config,
        data_summary=summary,
        memory_source=split.train,
    )
    return folder, metrics


__all__ = [
    "DataSplit",
    "TrainConfig",
    "TrainResult",
    "class_weights",
    "device_learning",
    "export_version",
    "select_memory",
    "split_by_user",
    "train_and_export",
    "train_model",
]
