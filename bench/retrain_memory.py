"""What a retrain round costs the trainer service's memory, as the fleet's answers grow.

Each round hands the fleet's confirmed windows to the retrain process
(``trainer_service.retrain_process.write_confirmed`` over ``Store.confirmed_window_pages``).
This bench fills a real SQLite store with ``--windows`` confirmed windows (80 samples each, as
the production model's), then, in a process of its own, runs rounds over more and more of them
and reads that process's RSS after each. The service runs for months and the allocator keeps
what a round once held, so the RSS after a round must not grow with the number of windows.
Side by side, in another process: the same rounds holding every window at once, as the service
did before it paged them.

Prints JSON and writes it to ``--evidence`` (default docs/evidence/retrain_memory.json). Exits 1
when a process fails, or when the paged rounds' RSS after the largest round exceeds the one
after the smallest by more than 5 %.

    .venv/bin/python bench/retrain_memory.py [--windows 40000]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _common import REPO, rss_mb  # also puts the repository on sys.path

from shared.messages import Confirmation, Prediction, SensorBatch, WindowRef
from trainer_service.retrain_process import write_confirmed
from trainer_service.stores import open_store

PAGE = 1000  # confirmed_window_pages' default
PER_DEVICE = 100
WINDOW = 80
GROWTH_LIMIT = 0.05


def fill(store_url: str, windows: int) -> None:
    """``windows`` confirmed windows: PER_DEVICE per device, each joined to its batch."""
    store = open_store(store_url)
    rng = np.random.default_rng(0)
    try:
        for d in range(windows // PER_DEVICE):
            device = f"bench-{d:05d}"
            samples = rng.normal(0, 3, (WINDOW + PER_DEVICE, 3)).astype(np.float32)
            with store.transaction() as writer:
                writer.add_batch(SensorBatch(device, 0, 20.0, 1_700_000_000_000_000_000, samples))
                for i in range(PER_DEVICE):
                    ref = WindowRef(0, i, WINDOW)
                    writer.add_prediction(
                        Prediction(f"p{i}", device, ref, "Walking", 0, (1.0,), "v1", 1.0)
                    )
                    writer.add_confirmation(device, Confirmation(f"p{i}", "Walking", "user", 1.0))
        while store.join_pending(10_000):
            pass
    finally:
        store.close()


def rounds_in_this_process(url: str, windows: int, mode: str) -> list[dict[str, float]]:
    """RSS after rounds over more and more windows: ``pages`` as the service does now,
    ``whole`` holding every window at once as it did before (the comparison)."""
    store = open_store(url)
    me = os.getpid()
    rounds = []
    sizes = sorted({max(1, windows // 8), windows // 4, windows // 2})
    try:
        for count in [*sizes, windows, windows]:
            with tempfile.TemporaryDirectory(dir=Path(url.removeprefix("sqlite://")).parent) as out:
                pages = itertools.islice(store.confirmed_window_pages(), -(-count // PAGE))
                if mode == "whole":
                    pages = iter([[window for page in pages for window in page]])
                write_confirmed(Path(out), pages)
            rounds.append({"windows": count, "rss_after_mb": round(rss_mb(me), 1)})
    finally:
        store.close()
    return rounds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=40_000)
    parser.add_argument(
        "--evidence", type=Path, default=REPO / "docs" / "evidence" / "retrain_memory.json"
    )
    parser.add_argument("--child", nargs=2, metavar=("URL", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(rounds_in_this_process(args.child[0], args.windows, args.child[1])))
        return 0
    modes = {}
    with tempfile.TemporaryDirectory(prefix="har-bench-retrain-memory-") as tmp:
        url = f"sqlite://{Path(tmp) / 'trainer.sqlite3'}"
        started = time.monotonic()
        fill(url, args.windows)
        fill_s = time.monotonic() - started
        for mode in ("pages", "whole"):  # each in a process of its own, side by side
            done = subprocess.run(
                [sys.executable, __file__, "--windows", str(args.windows), "--child", url, mode],
                capture_output=True,
                text=True,
                check=False,
            )
            if done.returncode != 0:
                print(done.stderr[-3000:], file=sys.stderr)
                print(f"FAILED: the {mode} process exited with {done.returncode}", file=sys.stderr)
                return 1
            modes[mode] = json.loads(done.stdout)
    growth = {
        mode: round((r[-1]["rss_after_mb"] - r[0]["rss_after_mb"]) / r[0]["rss_after_mb"], 4)
        for mode, r in modes.items()
    }
    doc = {
        "bench": "retrain_memory",
        "machine_cores": os.cpu_count(),
        "windows": args.windows,
        "samples_per_window": WINDOW,
        "fill_s": round(fill_s, 1),
        # pages: the service now; whole: every window held at once (before 1e55f35)
        "rounds": modes,
        "growth_smallest_to_largest": growth,
        "target_met": growth["pages"] <= GROWTH_LIMIT,
    }
    text = json.dumps(doc, indent=2)
    print(text)
    args.evidence.write_text(text + "\n")
    if growth["pages"] > GROWTH_LIMIT:
        print(f"FAILED: the service grew {growth['pages']:.1%} over the rounds", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
