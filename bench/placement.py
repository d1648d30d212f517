"""How the global model reads a device worn turned: training candidates side by side. Prints JSON.

The device turned about each of its axes by 90 and 180 degrees (the same rotation applied to
every sample of a person's windows) and upright, scored on people the model never saw, with
no answers at all: what every new wearer meets first. Each candidate (a JSON object of
``TrainConfig`` settings) trains on the three by-user splits of ``bench/personalize.py`` (16
people train, 4 validate; seed = split), and is scored separately on the split's 4 validation
people (where the choice is made) and its 4 test people (where it is reported).

    python bench/placement.py [--candidates '{}' '{"rotation": "about_gravity"}' ...]
        [--evidence docs/evidence/placement.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from _common import DEFAULT_DATA, REPO
from personalize import split_users

from activity_model.windowing import make_windows
from activity_model.wisdm import load_wisdm
from simulator.synthetic_data import rotation_about
from trainer_service.evaluation import evaluate
from trainer_service.training import TrainConfig, split_by_user, train_model

EVIDENCE = REPO / "docs/evidence/placement.json"
TURNS: dict[str, tuple[int, float] | None] = {
    "upright": None,
    "x90": (0, 90.0),
    "x180": (0, 180.0),
    "y90": (1, 90.0),
    "y180": (1, 180.0),
    "z90": (2, 90.0),
    "z180": (2, 180.0),
}
HEADLINE = ("upright", "x90", "x180")


def score(tracker: Any, windows: Any, turns: Sequence[str] = tuple(TURNS)) -> dict[str, Any]:
    """Accuracy, macro-F1 and recall per activity, upright and turned each way of ``turns``."""
    out = {}
    for name in turns:
        how = TURNS[name]
        x = windows.x if how is None else np.einsum("ntc,dc->ntd", windows.x, rotation_about(*how))
        scores = evaluate(tracker, dataclasses.replace(windows, x=x.astype(np.float32)))
        out[name] = {
            "accuracy": round(scores["accuracy"], 4),
            "macro_f1": round(scores["macro_f1"], 4),
            "recall": {k: round(v["recall"], 3) for k, v in scores["per_class"].items()},
        }
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--candidates", nargs="+", default=["{}"])
    parser.add_argument("--splits", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--evidence", type=Path, help=f"write the JSON here too ({EVIDENCE})")
    args = parser.parse_args()
    data = load_wisdm(args.data)
    windows = make_windows(data, TrainConfig().window, TrainConfig().eval_hop)
    splits = split_users(np.unique(data.users).tolist())
    candidates = []
    for text in args.candidates:
        settings = json.loads(text)
        runs = []
        for s in args.splits:
            people = splits[s]
            config = TrainConfig(
                **settings, seed=s, val_users=tuple(people["val"]), test_users=tuple(people["test"])
            )
            split = split_by_user(data, config)
            started = time.monotonic()
            result = train_model(split.train, split.val, config, data.labels, progress=False)
            run = {
                "split": s,
                "people": people,
                "best_epoch": result.best_epoch,
                "epochs_run": len(result.history),
                "train_seconds": round(time.monotonic() - started, 1),
                "validation": score(result.tracker, windows.for_users(people["val"])),
                "test": score(result.tracker, windows.for_users(people["test"])),
            }
            runs.append(run)
            print(json.dumps({"candidate": settings, "split": s}), flush=True)
        candidates.append({"settings": settings, "mean": _means(runs), "runs": runs})
    report = {
        "data": str(args.data),
        "question": "accuracy with no answers, upright and with the device turned",
        "turns": {
            k: None if v is None else f"{v[1]:g} degrees about {'xyz'[v[0]]}"
            for k, v in TURNS.items()
        },
        "candidates": candidates,
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.evidence:
        args.evidence.write_text(text + "\n", encoding="utf-8")
    return 0


def _means(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean accuracy over the splits, each group and turn; and the worst split's."""
    out: dict[str, Any] = {}
    for group in ("validation", "test"):
        for name in TURNS:
            values = [r[group][name]["accuracy"] for r in runs]
            out[f"{group}_{name}"] = round(statistics.mean(values), 4)
            out[f"{group}_{name}_worst"] = min(values)
    return out


if __name__ == "__main__":
    raise SystemExit(main())
