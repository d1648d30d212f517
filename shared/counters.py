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
