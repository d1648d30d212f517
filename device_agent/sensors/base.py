"""The sensor-source contract: one reading type, one protocol, and the pacing the sources share.

Every source is read by one consumer thread with ``read(stop, max_samples)``; ``counters()`` and
``exhausted`` may be read from any thread (each counter has a single writer, so a reader sees a
plain int, perhaps one step stale).
"""

from __future__ import annotations

import math
import threading
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from types import TracebackType
from typing import Protocol, TypeVar, runtime_checkable

from shared.messages import MAX_ABS_ACCELERATION, MAX_SAMPLE_RATE_HZ

Xyz = tuple[float, float, float]


@dataclass(frozen=True, slots=True)
class SensorReading:
    """One accelerometer sample.

    ``t_ns`` is the device clock in ns since the epoch: anchored to the wall clock when the source
    starts and advanced by the monotonic clock (or by the data's own spacing for replayed and
    synthetic data; stdin lines may bring their own stamps), and it never goes backwards within
    a source. ``xyz`` is in m/s^2. ``label`` is the true activity when the source knows it
    (replay, synthetic), else ``None``.
    """

    t_ns: int
    xyz: Xyz
    label: str | None = None


@runtime_checkable
class SensorSource(Protocol):
    """What the agent reads from. Implementations: IIO, WISDM replay, synthetic, stdin CSV."""

    @property
    def sample_rate_hz(self) -> float:
        """Nominal sampling rate: the spacing the agent declares in its batches."""
        ...

    @property
    def exhausted(self) -> bool:
        """True once the stream has ended (or the source is closed) and every reading has been
        returned; ``read`` then returns ``[]`` at once. Live sources are never exhausted."""
        ...

    def read(self, stop: threading.Event, max_samples: int) -> list[SensorReading]:
        """Blocks until at least one reading is available, then returns 1..max_samples readings
        in time order. Returns ``[]`` when ``stop`` is set or the source is exhausted."""
        ...

    def counters(self) -> dict[str, int]:
        """Monotonic counters for the device status (samples_read, read errors, ...)."""
        ...

    def close(self) -> None:
        """Releases files and threads; idempotent. The source is exhausted afterwards."""
        ...


def check_max_samples(max_samples: int) -> None:
    if max_samples < 1:
        raise ValueError(f"max_samples must be >= 1, got {max_samples}")


def is_plausible(xyz: Xyz) -> bool:
    """Finite and within what ``SensorBatch`` accepts: anything else is a unit error or garbage."""
    return all(math.isfinite(v) and abs(v) <= MAX_ABS_ACCELERATION for v in xyz)


def check_speed(speed: float) -> float:
    """``speed`` as a pacing factor: 1 = real time, 0 or inf = as fast as possible."""
    if math.isnan(speed) or speed < 0:
        raise ValueError(f"speed must be >= 0 (0 or inf = as fast as possible), got {speed}")
    return speed


def check_rate(sample_rate_hz: float) -> float:
    if not (math.isfinite(sample_rate_hz) and 0 < sample_rate_hz <= MAX_SAMPLE_RATE_HZ):
        raise ValueError(
            f"sample_rate_hz must be in (0, {MAX_SAMPLE_RATE_HZ:g}], got {sample_rate_hz}"
        )
    return sample_rate_hz


class WallAnchoredClock:
    """Epoch nanoseconds that never go backwards: the wall clock once, then monotonic steps.

    Stamps stay comparable with other devices' yet an NTP step during a run cannot reorder them.
    """

    __slots__ = ("_mono0", "_wall0")

    def __init__(self) -> None:
        self._wall0 = time.time_ns()
        self._mono0 = time.monotonic_ns()

    def now_ns(self) -> int:
        return self._wall0 + (time.monotonic_ns() - self._mono0)


class DataTimePacer:
    """Releases a sample ``offset_ns`` after the first one at ``offset_ns / speed`` real time.

    The clock starts at the first ``wait_until_due``. Stamps are the start time plus the data
    offset (not divided by ``speed``), so they keep the recording's spacing at any speed.
    """

    def __init__(self, speed: float) -> None:
        self._speed = check_speed(speed)
        self._mono0: int | None = None
        self._wall0 = 0

    @property
    def unpaced(self) -> bool:
        return self._speed == 0 or math.isinf(self._speed)

    def _start(self) -> int:
        if self._mono0 is None:
            self._wall0 = time.time_ns()
            self._mono0 = time.monotonic_ns()
        return self._mono0

    def _remaining_s(self, offset_ns: int) -> float:
        if self.unpaced:
            return 0.0
        due = self._start() + offset_ns / self._speed
        return (due - time.monotonic_ns()) / 1e9

    def is_due(self, offset_ns: int) -> bool:
        return self._remaining_s(offset_ns) <= 0

    def wait_until_due(self, offset_ns: int, stop: threading.Event) -> bool:
        """Waits on ``stop`` until the sample is due; False if ``stop`` was set first."""
        self._start()
        while not stop.is_set():
            remaining = self._remaining_s(offset_ns)
            if remaining <= 0:
                return True
            stop.wait(remaining)
        return False

    def stamp(self, offset_ns: int) -> int:
        self._start()
        return self._wall0 + offset_ns


class ClosesOnExit:
    """``with source: ...`` closes the source however the block ends."""

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self: _C) -> _C:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


_C = TypeVar("_C", bound=ClosesOnExit)


class PacedSource(ClosesOnExit, ABC):
    """A source of pre-computed or generated samples laid out on a data time axis.

    Subclasses say when their next sample is (``_next_offset``) and produce it (``_take``); this
    class waits for it in real time * speed and hands out every due sample at once.
    """

    def __init__(self, sample_rate_hz: float, speed: float) -> None:
        self._sample_rate_hz = check_rate(sample_rate_hz)
        self._pacer = DataTimePacer(speed)
        self._closed = False
        self._samples_read = 0

    @property
    def sample_rate_hz(self) -> float:
        return self._sample_rate_hz

    @property
    def exhausted(self) -> bool:
        return self._closed or self._next_offset() is None

    @abstractmethod
    def _next_offset(self) -> int | None:
        """Data time (ns after the first sample) of the next sample; None at the end."""

    @abstractmethod
    def _take(self, t_ns: int) -> SensorReading:
        """Returns the next sample stamped ``t_ns`` and advances past it."""

    def read(self, stop: threading.Event, max_samples: int) -> list[SensorReading]:
        check_max_samples(max_samples)
        if self._closed:
            return []
        offset = self._next_offset()
        if offset is None or not self._pacer.wait_until_due(offset, stop):
            return []
        readings: list[SensorReading] = []
        while len(readings) < max_samples and offset is not None and self._pacer.is_due(offset):
            readings.append(self._take(self._pacer.stamp(offset)))
            offset = self._next_offset()
        self._samples_read += len(readings)
        return readings

    def counters(self) -> dict[str, int]:
        return {"samples_read": self._samples_read}

    def close(self) -> None:
        self._closed = True
