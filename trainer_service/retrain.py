"""One retraining round: base data plus the fleet's confirmed windows, a quality gate, a release.

The round starts from the current global model (fine-tuning) when there is one with the same
label set, otherwise it trains from scratch. It evaluates the candidate and the current model
side by side on the base data's held-out users and on a held-out slice of recent confirmations,
and registers the candidate only if it is not worse on either (``gate_margin`` allows some
noise). It runs in a child process (``trainer_service.retrain_process``); the service signs and
promotes what it registered.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from activity_model.loading import load_model
from activity_model.windowing import WindowSet, concat_windows
from shared.errors import DataError, ModelError
from trainer_service.registry import ModelRegistry
from trainer_service.settings import RetrainSettings
from trainer_service.store import ConfirmedWindow

log = logging.getLogger(__name__)

DEVICE_USER_BASE = -1_000_000  # device windows get user ids that no base-data user has


@dataclass(frozen=True)
class RetrainOutcome:
    promoted: bool  # the candidate passed the gate and is registered as ``version``
    version: str | None
    reason: str
    candidate: dict[str, Any] = field(default_factory=dict)
    current: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0


def is_holdout(prediction_id: str, every: int) -> bool:
    """Stable 1-in-``every`` choice: a held-out confirmation is never trained on, in any round."""
    digest = hashlib.sha256(prediction_id.encode()).digest()
    return int.from_bytes(digest[:4], "big") % every == 0


def confirmed_sets(
    confirmed: list[ConfirmedWindow],
    labels: tuple[str, ...],
    window: int,
    *,
    weight: float,
    holdout_every: int,
    recent_since: float,
) -> tuple[WindowSet, WindowSet, dict[str, int]]:
    """(training windows, held-out recent windows, counts) from the fleet's confirmations."""
    index = {label: i for i, label in enumerate(labels)}
    usable = [c for c in confirmed if c.label in index and c.window.shape == (window, 3)]
    devices = sorted({c.device_id for c in usable})
    user_of = {device: DEVICE_USER_BASE - i for i, device in enumerate(devices)}
    held = [c for c in usable if is_holdout(c.prediction_id, holdout_every)]
    train = [c for c in usable if not is_holdout(c.prediction_id, holdout_every)]
    recent_held = [c for c in held if c.received >= recent_since]

    def to_set(items: list[ConfirmedWindow], item_weight: float) -> WindowSet:
        if not items:
            return WindowSet(
                x=np.empty((0, window, 3), np.float32),
                y=np.empty(0, np.int32),
                users=np.empty(0, np.int32),
                labels=labels,
                weights=np.empty(0, np.float32),
            )
        return WindowSet(
            x=np.stack([c.window for c in items]).astype(np.float32),
            y=np.array([index[c.label] for c in items], np.int32),
            users=np.array([user_of[c.device_id] for c in items], np.int32),
            labels=labels,
            weights=np.full(len(items), item_weight, np.float32),
        )

    counts = {
        "confirmed_total": len(confirmed),
        "confirmed_usable": len(usable),
        "confirmed_unusable": len(confirmed) - len(usable),
        "confirmed_train": len(train),
        "confirmed_holdout": len(recent_held),
        "devices": len(devices),
    }
    return to_set(train, weight), to_set(recent_held, 1.0), counts


def _summary(metrics: dict[str, Any] | None) -> dict[str, float]:
    if not metrics:
        return {}
    return {"accuracy": float(metrics["accuracy"]), "macro_f1": float(metrics["macro_f1"])}


def gate(candidate: dict[str, Any], current: dict[str, Any], margin: float) -> tuple[bool, str]:
    """Promote only if the candidate is not worse (beyond ``margin``) on any evaluation."""
    if not current:
        return True, "first model: nothing to compare with"
    reasons = []
    for section, metric in (("test", "macro_f1"), ("confirmed", "accuracy")):
        if section not in candidate or section not in current:
            continue
        new, old = candidate[section][metric], current[section][metric]
        if new < old - margin:
            reasons.append(f"{section} {metric} {new:.4f} < current {old:.4f} - {margin}")
    if reasons:
        return False, "; ".join(reasons)
    return True, "not worse on held-out users or on held-out recent confirmations"


def train_candidate(
    *,
    base: Any,
    confirmed: list[ConfirmedWindow],
    registry: ModelRegistry,
    settings: RetrainSettings,
    now: float,
    on_epoch: Callable[[int, int], None] | None = None,
) -> RetrainOutcome:
    """Train, evaluate, gate and (if it passes) register a new version, not yet promoted:
    signing and promoting are the service's (``trainer_service.retrain_process``).

    ``on_epoch`` is passed to ``train_model``: it hears each epoch as it starts."""
    from trainer_service.evaluation import evaluate
    from trainer_service.training import TrainConfig, export_version, split_by_user, train_model

    started = time.monotonic()
    current = registry.current()
    current_dir = registry.saved_model_dir(current) if current else None
    current_model = load_model(current_dir, "tensorflow") if current_dir else None
    # Fine-tuning continues the current model; it is also what the candidate is compared with.
    tuned = current_model if current_model and current_model.labels == base.labels else None
    if current_model is not None and tuned is None:
        log.warning(
            "current model %s has labels %s, the base data %s: training from scratch",
            current,
            current_model.labels,
            base.labels,
        )
    if tuned is not None:
        tuning: dict[str, Any] = {
            "epochs": settings.epochs,
            "patience": settings.patience,
            "min_epochs": 0,  # fine-tuning a model that already knows: any epoch may be best
            "seed": settings.seed,
            "window": tuned.input_spec.window,
        }
        if tuned.arch == "seed-lstm":  # its own design: SGD at 1e-4, no augmentation
            config = TrainConfig.seed_lstm(**tuning)
        else:
            config = TrainConfig(arch=tuned.arch, learning_rate=settings.learning_rate, **tuning)
    else:
        config = TrainConfig(
            arch=settings.arch,
            epochs=settings.initial_epochs,
            seed=settings.seed,
        )
    split = split_by_user(base, config)
    fleet_train, fleet_holdout, counts = confirmed_sets(
        confirmed,
        base.labels,
        config.window,
        weight=settings.confirmed_weight,
        holdout_every=settings.holdout_every,
        recent_since=now - settings.holdout_days * 86400,
    )
    train = concat_windows([split.train, fleet_train]) if len(fleet_train) else split.train
    log.info(
        "retraining %s: %d base windows + %d confirmed windows from %d devices",
        f"from {current}" if tuned is not None else "from scratch",
        len(split.train),
        len(fleet_train),
        counts["devices"],
    )
    result = train_model(
        train,
        split.val,
        config,
        base.labels,
        init_from=current_dir if tuned is not None else None,
        progress=False,
        on_epoch=on_epoch,
    )
    candidate: dict[str, Any] = {"test": evaluate(result.tracker, split.test)}
    previous: dict[str, Any] = {}
    if tuned is not None:
        previous["test"] = evaluate(tuned, split.test)
    if len(fleet_holdout):
        candidate["confirmed"] = evaluate(result.tracker, fleet_holdout)
        if tuned is not None:
            previous["confirmed"] = evaluate(tuned, fleet_holdout)
    passed, reason = gate(candidate, previous, settings.gate_margin)
    summaries = {k: _summary(v) for k, v in candidate.items()}
    current_summaries = {k: _summary(v) for k, v in previous.items()}
    if not passed:
        log.warning("candidate refused: %s", reason)
        return RetrainOutcome(
            False, None, reason, summaries, current_summaries, time.monotonic() - started
        )
    name = registry.new_version_name(config.arch)
    staging = registry.root / "staging"
    shutil.rmtree(staging / name, ignore_errors=True)
    metrics = {
        **candidate,
        "validation": result.best_val,
        "best_epoch": result.best_epoch,
        "epochs_run": len(result.history),
        "history": result.history,
        "current": previous,
        "gate": reason,
        "split": "by user",
    }
    folder = export_version(
        result.tracker,
        staging / name,
        metrics=metrics,
        config=config,
        data_summary={
            "base": {"train": split.train.summary(), "test": split.test.summary()},
            "fleet": counts,
            "users": split.users,
        },
        memory_source=split.train,  # the base data only: no device's own windows
    )
    info = registry.add(
        folder, parent=current, summary={**counts, "base_train_windows": len(split.train)}
    )
    return RetrainOutcome(
        True, info.version, reason, summaries, current_summaries, time.monotonic() - started
    )


def load_base(path: Path | None) -> Any:
    """The base training set (a WisdmData), with a clear error when it is missing."""
    from activity_model.wisdm import load_wisdm

    if path is None:
        raise DataError("no base_data configured: retraining needs the base training set")
    if not path.exists():
        raise DataError(f"base_data {path} does not exist (`har data download` fetches WISDM)")
    data = load_wisdm(path)
    log.info("base data %s: %s", path, data.report.to_dict().get("records_kept", "?"))
    if len(data.labels) < 2:
        raise ModelError(f"base data {path} has fewer than two activities")
    return data
