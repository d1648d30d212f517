"""Runtime cost of the exported models, as a device sees them, side by side in one run.

For each architecture a SavedModel is exported (weights do not change the cost), then a fresh
child process measures: load time, predict latency for one window (p50/p99) and for 32, learn
latency on 32 windows, persist (save_state) and restore latency, RSS after import and after
load, SavedModel and state sizes. Prints JSON; latencies are medians of many calls.

    python bench/model_runtime.py [--archs cnn cnn-gru seed-lstm] [--model DIR ...]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from _common import REPO, percentiles, rss_mb

from activity_model.loading import load_model


def _timed(call: Any, repeat: int) -> list[float]:
    for _ in range(5):
        call()
    samples = []
    for _ in range(repeat):
        started = time.perf_counter()
        call()
        samples.append(time.perf_counter() - started)
    return samples


def measure(saved_model: Path) -> dict[str, Any]:
    """Runs in a fresh process: everything a device pays for this model."""
    rss_start = rss_mb()
    started = time.perf_counter()
    import tensorflow as tf  # noqa: F401 - the import is part of what a device pays

    import_s = time.perf_counter() - started
    rss_import = rss_mb()

    started = time.perf_counter()
    model = load_model(saved_model)
    load_s = time.perf_counter() - started
    rss_load = rss_mb()
    rng = np.random.default_rng(0)
    t = model.input_spec.window
    one = rng.normal(0, 3, (1, t, 3)).astype(np.float32)
    batch = rng.normal(0, 3, (32, t, 3)).astype(np.float32)
    labels = rng.integers(0, len(model.labels), 32).astype(np.int32)
    state = Path(tempfile.mkdtemp()) / "model.state"
    predict_one = _timed(lambda: model.predict(one), 300)
    predict_32 = _timed(lambda: model.predict(batch), 100)
    learn_32: list[float] = []
    persist: list[float] = []
    restore: list[float] = []
    if model.personalisable:  # the seed-lstm baseline does not learn on the device
        ones, eye = np.ones(32, np.float32), np.eye(3, dtype=np.float32)
        learn_32 = _timed(lambda: model.learn(batch, labels, ones, eye), 100)
        persist = _timed(lambda: model.save_state(state), 50)
        restore = _timed(lambda: model.restore_state(state), 50)
    size = sum(p.stat().st_size for p in saved_model.rglob("*") if p.is_file())
    return {
        "arch": model.arch,
        "window": t,
        "import_tensorflow_s": round(import_s, 2),
        "load_s": round(load_s, 3),
        "predict_1_window": percentiles(predict_one),
        "predict_32_windows": percentiles(predict_32),
        "learn_32_windows": percentiles(learn_32),
        "persist_state": percentiles(persist),
        "restore_state": percentiles(restore),
        "rss_mb": {
            "start": round(rss_start, 1),
            "after_import": round(rss_import, 1),
            "after_load": round(rss_load, 1),
            "after_run": round(rss_mb(), 1),
        },
        "saved_model_bytes": size,
        "state_file_bytes": state.stat().st_size if state.exists() else 0,
    }


def _export(arch: str, out: Path) -> Path:
    from activity_model.export import export_tracker
    from activity_model.tracker import ActivityTracker, TrackerSpec

    labels = ("Walking", "Upstairs", "Downstairs", "Sitting", "Standing", "Laying")
    window = 32 if arch == "seed-lstm" else 80
    spec = TrackerSpec(
        arch=arch, labels=labels, window=window, optimizer="sgd" if arch == "seed-lstm" else "adam"
    )
    export_tracker(ActivityTracker(spec, mean=(0, 5, 0), std=(3, 3, 3)), out)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--archs", nargs="+", default=["cnn", "cnn-gru", "seed-lstm"])
    parser.add_argument("--model", type=Path, nargs="*", default=[], help="exported SavedModels")
    parser.add_argument("--measure", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure)))
        return 0
    workdir = Path(tempfile.mkdtemp(prefix="har-bench-"))
    models = list(args.model)
    if not models:
        models = [_export(arch, workdir / arch) for arch in args.archs]
    results = []
    env = {**os.environ, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "2"}
    for saved_model in models:
        done = subprocess.run(
            [sys.executable, __file__, "--measure", str(saved_model)],
            capture_output=True,
            text=True,
            env=env,
            check=True,
        )
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
    print(
        json.dumps(
            {"cpu_count": os.cpu_count(), "note": "one fresh process per model", "models": results},
            indent=2,
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
