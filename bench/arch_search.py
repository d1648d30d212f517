"""Evidence for the architecture and window choice: held-out-user metrics over several splits.

Prints one JSON object per (configuration, split) and a summary (median over splits).
Example: python bench/arch_search.py --configs '{"arch":"cnn"}' '{"arch":"cnn-gru"}' --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from _common import DEFAULT_DATA  # also puts the repository on sys.path

from activity_model.wisdm import load_wisdm
from trainer_service.evaluation import evaluate
from trainer_service.training import TrainConfig, split_by_user, train_model


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--configs", nargs="+", default=['{"arch": "cnn"}'])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    args = parser.parse_args()
    data = load_wisdm(args.data)
    summary = []
    for text in args.configs:
        overrides = json.loads(text)
        rows = []
        for seed in args.seeds:
            values = {**overrides, "seed": seed}
            if overrides.get("arch") == "seed-lstm":
                config = TrainConfig.seed_lstm(**values)
            else:
                config = TrainConfig(**values)
            split = split_by_user(data, config)
            started = time.monotonic()
            result = train_model(split.train, split.val, config, data.labels, progress=False)
            seconds = time.monotonic() - started
            test = evaluate(result.tracker, split.test)
            row = {
                "config": overrides,
                "seed": seed,
                "test_users": split.users["test"],
                "test_accuracy": round(test["accuracy"], 4),
                "test_macro_f1": round(test["macro_f1"], 4),
                "val_macro_f1": round(result.best_val["macro_f1"], 4),
                "best_epoch": result.best_epoch,
                "epochs_run": len(result.history),
                "train_seconds": round(seconds, 1),
                "recall": {k: round(v["recall"], 3) for k, v in test["per_class"].items()},
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
        summary.append(
            {
                "config": overrides,
                "median_test_accuracy": statistics.median(r["test_accuracy"] for r in rows),
                "median_test_macro_f1": statistics.median(r["test_macro_f1"] for r in rows),
                "min_test_accuracy": min(r["test_accuracy"] for r in rows),
                "median_train_seconds": statistics.median(r["train_seconds"] for r in rows),
            }
        )
    print(json.dumps({"summary": summary}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
