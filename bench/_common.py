"""Shared bits of the bench scripts: the default data path, importing the project, measuring."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared/data/hapt-wisdm-format/hapt_users01-24_raw.txt"

if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def har_train(data: Path, out_dir: Path, version: str, *, epochs: int = 2, seed: int = 0) -> Path:
    """A version folder of the production architecture, made by ``har train`` in a child
    process (so the caller's RSS stays its own)."""
    import subprocess

    subprocess.run(
        [
            sys.executable,
            "-m",
            "har",
            "train",
            "--data",
            str(data),
            "--out",
            str(out_dir),
            "--version",
            version,
            "--epochs",
            str(epochs),
            "--seed",
            str(seed),
            "--no-progress",
        ],
        check=True,
        capture_output=True,
    )
    return out_dir / version


def rss_mb(pid: int | str = "self", *, field: str = "VmRSS") -> float:
    """Resident memory of process ``pid`` (this one by default) in MB, from /proc; ``VmHWM`` for
    its peak. (``ru_maxrss`` would not do for a peak: it survives exec, so a child started from
    a big parent starts with the parent's.)"""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def percentiles(seconds: list[float], digits: int = 3) -> dict[str, float | int]:
    """Count, p50, p99 and max of durations given in seconds, in milliseconds."""
    import numpy as np

    if not seconds:
        return {"n": 0}
    ms = np.asarray(seconds) * 1000
    return {
        "n": len(seconds),
        "p50_ms": round(float(np.percentile(ms, 50)), digits),
        "p99_ms": round(float(np.percentile(ms, 99)), digits),
        "max_ms": round(float(ms.max()), digits),
    }


def medians(runs: list[Any]) -> Any:
    """Field by field, the median of the runs' numbers (the runs share one structure)."""
    import numpy as np

    first = runs[0]
    if isinstance(first, dict):
        return {key: medians([run[key] for run in runs]) for key in first}
    if isinstance(first, (int, float)) and not isinstance(first, bool):
        values = [run for run in runs if run is not None]
        return round(float(np.median(values)), 3) if values else None
    return first


class BrokerWatcher:
    """A bench's own MQTT client: every message on ``subscriptions`` goes to ``take(topic,
    payload)`` on a reader thread, then is acknowledged. ``stop()`` after the last one counts."""

    def __init__(
        self,
        settings: Any,
        client_id: str,
        subscriptions: list[tuple[str, int]],
        take: Any,
        queue_size: int = 100_000,
    ) -> None:
        import queue
        import threading

        from shared.mqtt_transport import MqttConnection

        self._inbox: Any = queue.Queue(maxsize=queue_size)
        self._take = take
        self._stop = threading.Event()
        self._connection = MqttConnection(
            settings,
            client_id=client_id,
            subscriptions=subscriptions,
            inbox=self._inbox,
            persistent_session=False,
        )
        self._reader = threading.Thread(target=self._read, name=client_id)

    def start(self) -> None:
        self._connection.start()
        self._reader.start()

    def _read(self) -> None:
        import queue

        while not self._stop.is_set():
            try:
                message = self._inbox.get(timeout=0.2)
            except queue.Empty:
                continue
            self._take(message.topic, message.payload)
            message.ack()

    def stop(self) -> None:
        self._stop.set()
        self._reader.join()
        self._connection.stop()
