"""Held-out-user accuracy and macro-F1 of our model and of the seed-lstm baseline, in one run.

Each split puts different people in train / validation / test (never one person in two sets);
both models train on the same split and are scored on the same test users. Our model is scored
as exported, on each runtime a device can run it on: the SavedModel (TensorFlow) and its LiteRT
form (``agent.runtime = "litert"``); and turned about each axis by 90 and 180 degrees (a device
worn turned, no answers; ``bench/placement.py``). Prints JSON.

    python bench/accuracy.py [--data FILE] [--seeds 0 1 2] [--seed-lstm-epochs 10]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import DEFAULT_DATA
from placement import HEADLINE, TURNS
from placement import score as score_turned

from activity_model.loading import load_model
from activity_model.wisdm import load_wisdm
from trainer_service.evaluation import evaluate
from trainer_service.training import TrainConfig, split_by_user, train_model

TURNED = tuple(name for name in TURNS if name != "upright")  # upright is scored above
# Kwapisz et al. 2010, WISDM v1.1, 10-fold cross-validation over random 10 s windows (so the
# same people are in training and test data): not comparable with held-out users.
WISDM_PAPER = {
    "split": "10-fold CV over random 10 s windows (same users in train and test)",
    "accuracy": {"J48": 0.851, "logistic_regression": 0.781, "MLP": 0.917, "majority": 0.372},
}


def _run(data: Any, config: TrainConfig) -> dict[str, Any]:
    split = split_by_user(data, config)
    started = time.monotonic()
    result = train_model(split.train, split.val, config, data.labels, progress=False)
    seconds = time.monotonic() - started
    test = evaluate(result.tracker, split.test)
    run = {
        "test_users": split.users["test"],
        "test_windows": len(split.test),
        "accuracy": round(test["accuracy"], 4),
        "macro_f1": round(test["macro_f1"], 4),
        "recall": {k: round(v["recall"], 3) for k, v in test["per_class"].items()},
        "best_epoch": result.best_epoch,
        "train_seconds": round(seconds, 1),
    }
    if result.tracker.spec.personalisable:
        run["turned"] = score_turned(result.tracker, split.test, TURNED)
        run["as_exported"] = _exported_runtimes(result.tracker, split.test)
    return run


def _exported_runtimes(tracker: Any, test: Any) -> dict[str, Any]:
    """The exported model on each runtime, on the same test windows: accuracy, and how far the
    two runtimes' answers are apart."""
    from activity_model.export import export_tracker

    with tempfile.TemporaryDirectory() as scratch:
        export_tracker(tracker, Path(scratch) / "saved_model")
        models = {
            runtime: load_model(Path(scratch) / "saved_model", runtime)
            for runtime in ("tensorflow", "litert")
        }
        out: dict[str, Any] = {}
        answers = {}
        for runtime, model in models.items():
            scores = evaluate(model, test)
            out[runtime] = {
                "accuracy": round(scores["accuracy"], 4),
                "macro_f1": round(scores["macro_f1"], 4),
            }
            answers[runtime] = [
                model.predict(test.x[i : i + 512]) for i in range(0, len(test), 512)
            ]
    gap = max(
        float(abs(a.probabilities - b.probabilities).max())
        for a, b in zip(answers["tensorflow"], answers["litert"], strict=True)
    )
    differ = sum(
        int((a.class_index != b.class_index).sum())
        for a, b in zip(answers["tensorflow"], answers["litert"], strict=True)
    )
    out["windows_classed_differently"] = differ
    out["max_probability_gap"] = float(f"{gap:.2e}")
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--seed-lstm-epochs", type=int, default=10)
    args = parser.parse_args()
    data = load_wisdm(args.data)
    models = {
        "ours (cnn)": lambda seed: TrainConfig(seed=seed, epochs=args.epochs),
        "seed-lstm": lambda seed: TrainConfig.seed_lstm(seed=seed, epochs=args.seed_lstm_epochs),
    }
    results: dict[str, Any] = {}
    for name, make in models.items():
        runs = [_run(data, make(seed)) for seed in args.seeds]
        results[name] = {
            "median_accuracy": statistics.median(r["accuracy"] for r in runs),
            "median_macro_f1": statistics.median(r["macro_f1"] for r in runs),
            "min_accuracy": min(r["accuracy"] for r in runs),
            "median_turned_accuracy": {
                turn: statistics.median(r["turned"][turn]["accuracy"] for r in runs)
                for turn in HEADLINE[1:]
            }
            if all("turned" in r for r in runs)
            else None,
            "splits": runs,
        }
    report = {
        "data": str(args.data),
        "labels": list(data.labels),
        "users": len(set(data.users.tolist())),
        "split": "by user: 20% test, 15% validation, rest train; one row per seed",
        "models": results,
        "reference_wisdm_paper": WISDM_PAPER,
        "bar": {"held_out_user_accuracy": 0.90, "goal": 0.95},
    }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
