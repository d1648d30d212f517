"""One failure policy for every long-running loop of the agent, the trainer and the simulator.

- A failing message or job is the loop's to handle: logged, counted, published as an error event,
  and skipped (``ErrorSink`` is how a loop reports it). A message whose storage failed is not
  acknowledged, so the broker delivers it again.
- A loop that dies anyway (a bug outside the per-job handling) must not leave a process that
  looks healthy and does nothing. ``Supervisor`` runs each loop on its own thread, notices when
  one ends by an exception, and wakes the process's main thread, which reports it (status and
  error event) and exits with ``EXIT_THREAD_DIED`` so systemd restarts it.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Protocol

log = logging.getLogger(__name__)

EXIT_THREAD_DIED = 70  # EX_SOFTWARE (sysexits.h): an internal error; systemd restarts on it


class ErrorSink(Protocol):
    """Logs, counts and publishes a handled error; never raises."""

    def __call__(self, code: str, message: str, topic: str = "") -> None: ...


class Supervisor:
    """Starts a process's loops on named daemon threads and notices the first that dies."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._died = threading.Event()
        self._deaths: list[tuple[str, BaseException]] = []

    def add(self, name: str, loop: Callable[[], None]) -> threading.Thread:
        """A thread that runs ``loop`` (started by ``start``); returning from it is a clean end."""
        thread = threading.Thread(target=self._run, args=(name, loop), name=name, daemon=True)
        self._threads.append(thread)
        return thread

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    @property
    def threads(self) -> list[threading.Thread]:
        return list(self._threads)

    @property
    def death(self) -> tuple[str, BaseException] | None:
        """The first loop that died, and why; None while every loop is alive or ended cleanly."""
        with self._lock:
            return self._deaths[0] if self._deaths else None

    def wait(self, timeout: float) -> bool:
        """Block up to ``timeout`` seconds; True once a loop has died."""
        return self._died.wait(timeout)

    def dead_threads(self) -> list[str]:
        """Names of the threads that ended by an exception."""
        with self._lock:
            return [name for name, _ in self._deaths]

    def _run(self, name: str, loop: Callable[[], None]) -> None:
        try:
            loop()
        except BaseException as exc:
            log.critical(
                "thread %s died: the process stops so that it is restarted", name, exc_info=exc
            )
            with self._lock:
                self._deaths.append((name, exc))
            self._died.set()
