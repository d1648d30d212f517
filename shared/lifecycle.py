"""Running a long-lived service until SIGTERM or SIGINT asks it to stop."""

from __future__ import annotations

import logging
import signal
from types import FrameType
from typing import Protocol

log = logging.getLogger(__name__)


class Service(Protocol):
    def run(self) -> int: ...

    def request_stop(self) -> None: ...


def run_until_signalled(service: Service) -> int:
    """Run ``service``; SIGTERM/SIGINT request a graceful stop. Returns the exit code."""

    def on_signal(signum: int, frame: FrameType | None) -> None:
        log.info("signal %s: stopping gracefully", signal.Signals(signum).name)
        service.request_stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    return service.run()
