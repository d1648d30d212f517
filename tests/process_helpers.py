"""Programs of this project run as processes of their own, for tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from shared.config import BrokerSettings

REPO = Path(__file__).resolve().parent.parent


def broker_table(settings: BrokerSettings) -> str:
    return (
        f'[broker]\nhost = "{settings.host}"\nport = {settings.port}\n'
        f'topic_root = "{settings.topic_root}"\nkeepalive_s = 5\n'
        "reconnect_min_s = 0.1\nreconnect_max_s = 1.0\n"
    )


class Program:
    """`python -m har ...` with its output in a log file the failure message can show."""

    def __init__(self, log: Path, *args: str, python: Path = Path(sys.executable)) -> None:
        self.log = log
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": str(REPO)}
        with log.open("ab") as out:
            self.process = subprocess.Popen(
                [python, "-m", "har", *args], stdout=out, stderr=subprocess.STDOUT, env=env
            )

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        return self.process.wait(timeout=timeout)
