"""On-device personalisation with the exported SavedModel's ``learn`` signature only.

For each held-out user (never seen in training), windows are taken in time order: the first
half is where the person confirms activities, the second half is what we score. For K in
(5, 10, 20, 50) confirmed windows picked at random from the first half, the device runs
``learn`` on them for a few steps, and we report accuracy on the later windows before and after,
per class, and on the classes the person did not confirm (personalising must not wreck them).
Prints JSON.

    python bench/personalize.py [--data FILE] [--model VERSION_DIR] [--steps 10]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from _common import DEFAULT_DATA

from shared.model.runtime import ActivityModel
from shared.windowing import make_windows
from shared.wisdm import load_wisdm
from trainer_service.evaluation import metrics_from_predictions
from trainer_service.training import TrainConfig, train_and_export


def _predict(model: ActivityModel, x: np.ndarray) -> np.ndarray:
    return np.concatenate(
        [model.predict(x[i : i + 512]).class_index for i in range(0, len(x), 512)]
    )


def _recall(y: np.ndarray, pred: np.ndarray, k: int) -> list[float | None]:
    return [float((pred[y == c] == c).mean()) if (y == c).any() else None for c in range(k)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--model", type=Path, help="a model version folder from `har train`")
    parser.add_argument("--ks", type=int, nargs="+", default=[5, 10, 20, 50])
    parser.add_argument("--steps", type=int, default=10, help="learn calls per personalisation")
    parser.add_argument(
        "--device-lrs", type=float, nargs="*", default=[], help="override the exported step size"
    )
    parser.add_argument("--repeats", type=int, default=3, help="random draws of the K windows")
    args = parser.parse_args()

    data = load_wisdm(args.data)
    version = args.model
    if version is None:
        version = Path(tempfile.mkdtemp(prefix="har-personalize-")) / "base"
        train_and_export(data, TrainConfig(), version, progress=False)
    summary = json.loads((version / "data_summary.json").read_text())
    config = json.loads((version / "config.json").read_text())
    test_users = summary["users"]["test"]
    model = ActivityModel.load(version / "saved_model")
    k = len(model.labels)
    initial = Path(tempfile.mkdtemp()) / "initial.state"
    model.save_state(initial)
    windows = make_windows(data, config["window"], config["eval_hop"])
    exported_lr = float(model._loaded.learning_rate.numpy())  # bench only: compare step sizes
    lrs = args.device_lrs or [exported_lr]

    rows: list[dict[str, Any]] = []
    rng = np.random.default_rng(0)
    for user in test_users:
        ws = windows.for_users([user])
        half = len(ws) // 2
        early, later = ws.subset(np.arange(half)), ws.subset(np.arange(half, len(ws)))
        model.restore_state(initial)
        before = _predict(model, later.x)
        for lr in lrs:
            for k_confirmed in args.ks:
                for repeat in range(args.repeats):
                    pick = rng.choice(len(early), size=min(k_confirmed, len(early)), replace=False)
                    model.restore_state(initial)
                    model._loaded.learning_rate.assign(lr)
                    for _ in range(args.steps):
                        model.learn(early.x[pick], early.y[pick])
                    after = _predict(model, later.x)
                    confirmed = set(early.y[pick].tolist())
                    others = ~np.isin(later.y, list(confirmed))
                    rows.append(
                        {
                            "user": user,
                            "lr": lr,
                            "k": k_confirmed,
                            "repeat": repeat,
                            "acc_before": float((before == later.y).mean()),
                            "acc_after": float((after == later.y).mean()),
                            "unconfirmed_before": float((before[others] == later.y[others]).mean())
                            if others.any()
                            else None,
                            "unconfirmed_after": float((after[others] == later.y[others]).mean())
                            if others.any()
                            else None,
                            "recall_before": _recall(later.y, before, k),
                            "recall_after": _recall(later.y, after, k),
                            "y": later.y,
                            "after": after,
                            "before": before,
                        }
                    )
    table = []
    for lr in lrs:
        for k_confirmed in args.ks:
            sel = [r for r in rows if r["lr"] == lr and r["k"] == k_confirmed]
            pooled_before = metrics_from_predictions(
                np.concatenate([r["y"] for r in sel]),
                np.concatenate([r["before"] for r in sel]),
                model.labels,
            )
            pooled_after = metrics_from_predictions(
                np.concatenate([r["y"] for r in sel]),
                np.concatenate([r["after"] for r in sel]),
                model.labels,
            )
            unconfirmed = [r for r in sel if r["unconfirmed_before"] is not None]
            table.append(
                {
                    "device_lr": lr,
                    "k": k_confirmed,
                    "median_user_accuracy_before": round(
                        statistics.median(r["acc_before"] for r in sel), 4
                    ),
                    "median_user_accuracy_after": round(
                        statistics.median(r["acc_after"] for r in sel), 4
                    ),
                    "pooled_accuracy_before": round(pooled_before["accuracy"], 4),
                    "pooled_accuracy_after": round(pooled_after["accuracy"], 4),
                    "unconfirmed_classes_accuracy_before": round(
                        statistics.mean(r["unconfirmed_before"] for r in unconfirmed), 4
                    )
                    if unconfirmed
                    else None,
                    "unconfirmed_classes_accuracy_after": round(
                        statistics.mean(r["unconfirmed_after"] for r in unconfirmed), 4
                    )
                    if unconfirmed
                    else None,
                    "recall_before": {
                        label: round(v["recall"], 3)
                        for label, v in pooled_before["per_class"].items()
                    },
                    "recall_after": {
                        label: round(v["recall"], 3)
                        for label, v in pooled_after["per_class"].items()
                    },
                    "users_improved": sum(r["acc_after"] > r["acc_before"] for r in sel),
                    "users_worse": sum(r["acc_after"] < r["acc_before"] for r in sel),
                    "runs": len(sel),
                }
            )
    print(
        json.dumps(
            {
                "model": str(version),
                "test_users": test_users,
                "protocol": (
                    "per held-out user: first half of their windows = confirmation pool, second "
                    f"half = scored; {args.steps} learn() calls on the K confirmed windows, "
                    f"{args.repeats} random draws per K; model state restored between runs"
                ),
                "exported_device_lr": exported_lr,
                "results": table,
            },
            indent=2,
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
