"""Accelerometer samples as text lines on a stream (normally stdin), e.g. piped from a sensor tool.

Each line is ``x,y,z`` or ``t_ns,x,y,z`` in m/s^2, separated by commas or by blanks; ``#`` starts
a comment and blank lines are ignored. A background thread reads the lines into a bounded queue,
so ``read`` can wait with a timeout and notice ``stop``; when the queue is full the thread stops
reading, which makes the writer block instead of losing samples.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
from dataclasses import dataclass
from typing import TextIO

from device_agent.sensors.base import (
    ClosesOnExit,
    SensorReading,
    WallAnchoredClock,
    Xyz,
    check_max_samples,
    check_rate,
)
from shared.messages import MAX_ABS_ACCELERATION

logger = logging.getLogger(__name__)

MAX_LINE_CHARS = 1024
DEFAULT_QUEUE_SIZE = 4096
# Lines without a timestamp are stamped one period apart; when that falls this far behind the
# arrival time (the writer paused or runs slow), stamps start again from the arrival time.
_REANCHOR_NS = 1_000_000_000
# How often a blocked read or a blocked queue put looks at its stop flags.
_POLL_S = 0.05
_LOG_CHARS = 80
# Every malformed line is counted; only the first few, then one in many, are logged.
_LOG_FIRST = 20
_LOG_EVERY = 1000
_MAX_INT64 = 2**63 - 1


class MalformedLineError(ValueError):
    """A line that is not ``x,y,z`` nor ``t_ns,x,y,z`` with plausible values."""


@dataclass(frozen=True, slots=True)
class CsvSample:
    t_ns: int | None
    xyz: Xyz


def _number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise MalformedLineError(f"{text[:20]!r} is not a number") from None
    if not math.isfinite(value):
        raise MalformedLineError(f"{text[:20]!r} is not finite")
    if abs(value) > MAX_ABS_ACCELERATION:
        raise MalformedLineError(f"{value:g} m/s^2 is beyond +-{MAX_ABS_ACCELERATION:g}")
    return value


def parse_csv_line(line: str) -> CsvSample | None:
    """One line as a sample; ``None`` for a blank or comment line.

    Raises :class:`MalformedLineError` (a ``ValueError``) with the reason for anything else.
    """
    content = line.split("#", 1)[0].strip()
    if not content:
        return None
    fields = [f.strip() for f in content.split(",")] if "," in content else content.split()
    if len(fields) not in (3, 4):
        raise MalformedLineError(f"expected 3 or 4 fields, got {len(fields)}")
    if any(not f for f in fields):
        raise MalformedLineError("empty field")
    t_ns: int | None = None
    if len(fields) == 4:
        stamp = fields.pop(0)
        # Plain digits only: "1e9" or "1_000" would be a float or a Python-ism, not a stamp.
        if not (stamp.isascii() and stamp.isdigit()) or len(stamp) > 19:
            raise MalformedLineError(f"timestamp {stamp[:24]!r} is not a non-negative integer (ns)")
        t_ns = int(stamp)
        if t_ns > _MAX_INT64:
            raise MalformedLineError("timestamp beyond int64")
    x, y, z = (_number(f) for f in fields)
    return CsvSample(t_ns=t_ns, xyz=(x, y, z))


class StdinCsv(ClosesOnExit):
    """Samples parsed from text lines on ``stream`` (see the module docstring for the format).

    Lines with ``t_ns`` keep it (it must not go backwards); lines without are stamped one
    ``1 / sample_rate_hz`` after the previous sample, starting from the arrival time of the
    first, and re-anchored to the arrival time after a pause. Don't mix the two forms in one
    stream. Malformed lines (and lines over ``MAX_LINE_CHARS``) are logged with their line number
    and counted in ``malformed_lines``; at end of stream the source becomes exhausted.

    The reader thread starts at the first ``read``. ``close`` stops it at the next line; a
    thread still blocked waiting for a line is a daemon and does not delay exit. The stream is
    closed by ``close`` only when ``close_stream`` is set and the thread has ended.
    """

    def __init__(
        self,
        stream: TextIO,
        sample_rate_hz: float = 20.0,
        *,
        queue_size: int = DEFAULT_QUEUE_SIZE,
        close_stream: bool = False,
    ) -> None:
        self._rate = check_rate(sample_rate_hz)
        if queue_size < 1:
            raise ValueError(f"queue_size must be >= 1, got {queue_size}")
        self._stream = stream
        self._close_stream = close_stream
        self._period_ns = round(1e9 / sample_rate_hz)
        # None in the queue marks the end of the stream.
        self._queue: queue.Queue[SensorReading | None] = queue.Queue(maxsize=queue_size)
        self._closing = threading.Event()
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()
        self._ended = False  # the consumer has taken the end marker
        # Written by the reader thread only.
        self._lines_read = 0
        self._malformed_lines = 0
        self._stream_errors = 0
        # Written by the consumer only.
        self._samples_read = 0

    @property
    def sample_rate_hz(self) -> float:
        return self._rate

    @property
    def exhausted(self) -> bool:
        return self._ended or self._closing.is_set()

    def _start(self) -> None:
        with self._start_lock:
            if self._thread is None and not self._closing.is_set():
                self._thread = threading.Thread(
                    target=self._run, name="sensor-stdin-reader", daemon=True
                )
                self._thread.start()

    def read(self, stop: threading.Event, max_samples: int) -> list[SensorReading]:
        check_max_samples(max_samples)
        if self.exhausted:
            return []
        self._start()
        first: SensorReading | None = None
        while first is None:
            if stop.is_set() or self._closing.is_set():
                return []
            try:
                item = self._queue.get(timeout=_POLL_S)
            except queue.Empty:
                continue
            if item is None:  # the end marker
                self._ended = True
                return []
            first = item
        readings = [first]
        while len(readings) < max_samples:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is None:  # the end marker
                self._ended = True
                break
            readings.append(item)
        self._samples_read += len(readings)
        return readings

    def _put(self, item: SensorReading | None) -> bool:
        """Queues ``item``, waiting while the queue is full; False if closing meanwhile."""
        while not self._closing.is_set():
            try:
                self._queue.put(item, timeout=_POLL_S)
            except queue.Full:
                continue
            return True
        return False

    def _malformed(self, line_no: int, text: str, reason: str) -> None:
        self._malformed_lines += 1
        count = self._malformed_lines
        if count <= _LOG_FIRST or count % _LOG_EVERY == 0:
            logger.warning(
                "sensor input line %d skipped (%s): %r (%d malformed so far)",
                line_no,
                reason,
                text[:_LOG_CHARS].rstrip("\n"),
                count,
            )

    def _run(self) -> None:
        try:
            self._read_lines()
        except Exception:
            # Last resort: a bug here must end the stream visibly, not kill the thread silently.
            self._stream_errors += 1
            logger.exception("sensor input reader failed")
        finally:
            self._put(None)  # the end marker

    def _read_lines(self) -> None:
        clock = WallAnchoredClock()
        last_t: int | None = None
        line_no = 0
        while not self._closing.is_set():
            try:
                line = self._stream.readline(MAX_LINE_CHARS + 1)
            except UnicodeDecodeError as exc:
                # The decoder drops the chunk it choked on (so later line numbers are
                # approximate); what follows may be fine.
                line_no += 1
                self._malformed(line_no, "", f"not UTF-8 text: {exc.reason}")
                continue
            except (OSError, ValueError) as exc:
                self._stream_errors += 1
                logger.error("cannot read sensor lines any more: %s", exc)  # noqa: TRY400
                return
            if not line:
                logger.info("end of sensor input after %d lines", line_no)
                return
            line_no += 1
            self._lines_read += 1
            if len(line) > MAX_LINE_CHARS and not line.endswith("\n"):
                self._skip_rest_of_line()
                self._malformed(line_no, line, f"longer than {MAX_LINE_CHARS} characters")
                continue
            try:
                parsed = parse_csv_line(line)
            except MalformedLineError as exc:
                self._malformed(line_no, line, str(exc))
                continue
            if parsed is None:
                continue
            now = clock.now_ns()
            if parsed.t_ns is not None:
                if last_t is not None and parsed.t_ns < last_t:
                    self._malformed(line_no, line, "timestamp goes backwards")
                    continue
                t_ns = parsed.t_ns
            elif last_t is None or last_t + self._period_ns < now - _REANCHOR_NS:
                t_ns = now
            else:
                t_ns = last_t + self._period_ns
            last_t = t_ns
            if not self._put(SensorReading(t_ns=t_ns, xyz=parsed.xyz)):
                return

    def _skip_rest_of_line(self) -> None:
        while not self._closing.is_set():
            try:
                part = self._stream.readline(MAX_LINE_CHARS + 1)
            except (OSError, ValueError):
                return  # the main loop's next readline meets and reports it
            if not part or part.endswith("\n"):
                return

    def counters(self) -> dict[str, int]:
        return {
            "samples_read": self._samples_read,
            "lines_read": self._lines_read,
            "malformed_lines": self._malformed_lines,
            "stream_errors": self._stream_errors,
        }

    def close(self, timeout: float = 1.0) -> None:
        """Stops the reader thread; waits up to ``timeout`` s for it to end."""
        self._closing.set()
        thread = self._thread
        if thread is not None:
            thread.join(timeout)
            if thread.is_alive():
                logger.debug("stdin reader still waiting for a line; leaving it (daemon)")
                return
        if self._close_stream:
            self._stream.close()
