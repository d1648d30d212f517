"""The demo's child processes, and stopping every one of them on Ctrl-C or SIGTERM.

SIGINT and SIGTERM become an ``Interrupted`` exception in the main thread, so the ``finally``
blocks that stop the children run. Two details make that reliable: a signal that arrives while a
child is being started (``StopSignals.deferred``) waits until its pid is recorded, and once one
signal was taken, later ones are ignored so they cannot cut the clean-up short. Every child's
pid is written to ``pids.json`` as it starts, for the operator and the tests.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
STOP_TIMEOUT_S = 60.0


def say(text: str) -> None:
    print(f"[demo {time.strftime('%H:%M:%S')}] {text}", flush=True)


class Interrupted(Exception):  # noqa: N818 - it is not an error: the operator asked to stop
    def __init__(self, signum: int) -> None:
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum = signum


class StopSignals:
    """While entered, SIGINT and SIGTERM raise ``Interrupted`` in the main thread (once)."""

    def __init__(self) -> None:
        self._previous: dict[int, Any] = {}
        self._deferring = False
        self._holding = False
        self._pending: int | None = None
        self.taken: int | None = None

    def __enter__(self) -> StopSignals:
        for signum in STOP_SIGNALS:
            self._previous[signum] = signal.signal(signum, self._on_signal)
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        if self.taken is not None:
            return  # already stopping: let the clean-up finish
        if self._holding:
            self.taken = signum  # the clean-up has begun: it stops everything anyway
            return
        if self._deferring:
            self._pending = signum
            return
        self.taken = signum
        raise Interrupted(signum)

    def hold(self) -> None:
        """From now on a signal is only recorded (in ``taken``): the clean-up is under way."""
        self._holding = True

    @contextmanager
    def deferred(self) -> Iterator[None]:
        """A signal arriving inside is raised on the way out, after the block completed."""
        self._deferring = True
        try:
            yield
        finally:
            self._deferring = False
            pending, self._pending = self._pending, None
            if pending is not None and self.taken is None:
                self.taken = pending
                raise Interrupted(pending)


class Children:
    """Named child processes, started in order and stopped with SIGTERM (then SIGKILL)."""

    def __init__(self, workdir: Path, signals: StopSignals) -> None:
        self._workdir = workdir
        self._signals = signals
        self._processes: dict[str, subprocess.Popen[bytes]] = {}
        self.pids: dict[str, int] = {}
        self.exit_codes: dict[str, int] = {}

    @property
    def pid_file(self) -> Path:
        return self._workdir / "pids.json"

    def started(self, name: str, start: Callable[[], int]) -> int:
        """Run ``start`` (which starts one process and returns its pid) and record the pid."""
        with self._signals.deferred():
            pid = start()
            self._record(name, pid)
        return pid

    def start(self, name: str, *arguments: str, python: Path | None = None) -> int:
        """``python -m har ARGUMENTS`` as ``name``, its output in ``<workdir>/<name>.log``; with
        this interpreter, or ``python`` (another venv's)."""
        log_path = self._workdir / f"{name}.log"
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
        with self._signals.deferred(), log_path.open("wb") as log_file:
            process = subprocess.Popen(
                [str(python or sys.executable), "-m", "har", *arguments],
                stdout=log_file,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
            )
            self._processes[name] = process
            self._record(name, process.pid)
        return process.pid

    def _record(self, name: str, pid: int) -> None:
        self.pids[name] = pid
        temporary = self.pid_file.with_suffix(".tmp")
        temporary.write_text(json.dumps(self.pids, indent=2))
        temporary.replace(self.pid_file)

    def exited(self) -> dict[str, int]:
        """The running-set children that have exited on their own, with their exit codes."""
        return {
            name: code
            for name, process in self._processes.items()
            if (code := process.poll()) is not None
        }

    def stop(self, *names: str) -> None:
        """SIGTERM to each of ``names`` at once, then wait for all (SIGKILL after a timeout)."""
        chosen = [name for name in names if name in self._processes]
        for name in chosen:
            if self._processes[name].poll() is None:
                self._processes[name].send_signal(signal.SIGTERM)
        for name in chosen:
            process = self._processes.pop(name)
            try:
                code = process.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                say(f"{name} did not stop within {STOP_TIMEOUT_S:.0f} s: killing it")
                process.kill()
                code = process.wait()
            self.exit_codes[name] = code
            say(f"{name} stopped (exit code {code})")

    def stop_all(self) -> None:
        self.stop(*reversed(list(self._processes)))
