"""Thread-safe event counters for status messages, logs and tests."""

from __future__ import annotations

import threading
from collections import Counter


class Counters:
    """Named monotonically increasing counts, safe to bump from any thread."""

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._counts: Counter[str] = Counter()

    def add(self, name: str, amount: int = 1) -> None:
        with self._changed:
            self._counts[name] += amount
            self._changed.notify_all()

    def raise_to(self, name: str, value: int) -> None:
        """Keep the highest ``value`` seen under ``name`` (a high-water mark)."""
        with self._changed:
            if value > self._counts[name]:
                self._counts[name] = value
                self._changed.notify_all()

    def get(self, name: str) -> int:
        with self._changed:
            return self._counts[name]

    def snapshot(self) -> dict[str, int]:
        with self._changed:
            return dict(self._counts)

    def wait_until(self, name: str, at_least: int, timeout: float) -> bool:
        """Block until counter ``name`` reaches ``at_least``; False on timeout."""
        with self._changed:
            return self._changed.wait_for(lambda: self._counts[name] >= at_least, timeout)


class LatencyRecorder:
    """The most recent durations of named operations, for percentiles in benchmarks and logs."""

    def __init__(self, keep: int = 4096) -> None:
        self._lock = threading.Lock()
        self._keep = keep
        self._samples: dict[str, list[float]] = {}

    def record(self, name: str, seconds: float) -> None:
        with self._lock:
            samples = self._samples.setdefault(name, [])
            samples.append(seconds)
            if len(samples) > 2 * self._keep:
                del samples[: len(samples) - self._keep]

    def samples(self, name: str) -> list[float]:
        with self._lock:
            return list(self._samples.get(name, [])[-self._keep :])
