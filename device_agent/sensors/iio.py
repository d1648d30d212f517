"""A Linux IIO accelerometer, polled through sysfs.

Per the kernel's IIO ABI (Documentation/ABI/testing/sysfs-bus-iio) an accelerometer exposes
``in_accel_{x,y,z}_raw``; the value in m/s^2 is ``(raw + offset) * scale``, where ``scale`` and
``offset`` are per axis (``in_accel_x_scale``) or shared (``in_accel_scale``), and a missing
offset is 0. Polling sysfs suits the ~20 Hz we need; the buffered ``/dev/iio:deviceN`` interface
would be needed for much higher rates.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from device_agent.sensors.base import (
    ClosesOnExit,
    SensorReading,
    WallAnchoredClock,
    check_max_samples,
    check_rate,
    is_plausible,
)
from shared.errors import ConfigError
from shared.mqtt_transport import backoff_delay

logger = logging.getLogger(__name__)

DEFAULT_SYSFS_ROOT = Path("/sys/bus/iio/devices")
AXES = ("x", "y", "z")
_RAW_FILES = tuple(f"in_accel_{axis}_raw" for axis in AXES)
_FREQUENCY_FILES = ("in_accel_sampling_frequency", "sampling_frequency")
# After this many consecutive failures a persistent fault is logged again at WARNING.
_REMIND_EVERY = 100
_MAX_VALUE_CHARS = 64


@dataclass(frozen=True, slots=True)
class _Calibration:
    scale: tuple[float, float, float]
    offset: tuple[float, float, float]


def _read_text(path: Path) -> str:
    # sysfs attributes are short; a bounded read guards against a wrong path to a big file.
    with path.open("r", encoding="ascii", errors="replace") as handle:
        return handle.read(_MAX_VALUE_CHARS).strip()


def _read_number(path: Path) -> float:
    text = _read_text(path)
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"{path.name} holds {text[:32]!r}, not a number") from None


def _read_int(path: Path) -> int:
    text = _read_text(path)
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"{path.name} holds {text[:32]!r}, not an integer") from None


def _device_number(path: Path) -> tuple[int, str]:
    """Sort key: iio:device2 before iio:device10."""
    digits = "".join(ch for ch in path.name if ch.isdigit())
    return (int(digits) if digits else -1, path.name)


def _describe(device: Path) -> str:
    try:
        name = _read_text(device / "name")
    except OSError:
        name = "?"
    return f"{device.name} (name {name!r})"


def missing_accel_files(device: Path) -> list[str]:
    return [name for name in _RAW_FILES if not (device / name).is_file()]


def find_iio_accelerometer(sysfs_root: Path = DEFAULT_SYSFS_ROOT) -> Path:
    """The first IIO device under ``sysfs_root`` with ``in_accel_{x,y,z}_raw``.

    Raises :class:`ConfigError` listing every device looked at and why it was passed over.
    """
    if not sysfs_root.is_dir():
        raise ConfigError(
            f"no IIO accelerometer: {sysfs_root} does not exist (is the IIO subsystem enabled "
            "and the sensor's driver loaded?)"
        )
    searched: list[str] = []
    for device in sorted(sysfs_root.iterdir(), key=_device_number):
        if not device.is_dir():
            continue
        missing = missing_accel_files(device)
        if not missing:
            logger.info("found IIO accelerometer %s at %s", _describe(device), device)
            return device
        searched.append(f"{_describe(device)}: no {', '.join(missing)}")
    raise ConfigError(
        f"no IIO accelerometer under {sysfs_root} (a device with {', '.join(_RAW_FILES)}); "
        f"searched: {'; '.join(searched) or 'nothing, the directory is empty'}"
    )


class IioAccelerometer(ClosesOnExit):
    """Polls ``device_dir``'s raw x, y, z at ``sample_rate_hz`` and converts them to m/s^2.

    On opening it asks the device for ``sample_rate_hz`` through its sampling-frequency
    attribute when there is one and logs what the device reports; failing to set it is only
    logged. A failed poll (EIO, a file gone after a hot-unplug, a value that is not a number) is
    logged, counted in ``read_errors`` and retried with exponential backoff up to
    ``max_backoff_s``; scale and offset are read again after a failure, since a re-plugged
    device may come back with other ones. A value beyond what a SensorBatch accepts is dropped
    and counted in ``out_of_range``. When the consumer falls behind, polls are skipped (counted
    in ``missed_polls``) rather than read in a burst, which would return one value many times.

    Readings are stamped when they are polled; the source is never exhausted until closed.
    """

    def __init__(
        self,
        device_dir: Path,
        sample_rate_hz: float,
        *,
        max_backoff_s: float = 5.0,
        set_frequency: bool = True,
    ) -> None:
        self._rate = check_rate(sample_rate_hz)
        if not device_dir.is_dir():
            raise ConfigError(f"IIO device {device_dir} does not exist")
        missing = missing_accel_files(device_dir)
        if missing:
            raise ConfigError(
                f"IIO device {_describe(device_dir)} at {device_dir} is not an accelerometer: "
                f"no {', '.join(missing)}"
            )
        self.device_dir = device_dir
        self._period_s = 1.0 / sample_rate_hz
        self._clock = WallAnchoredClock()
        self._max_backoff_s = max_backoff_s
        # Jitter keeps several agents that lost the same bus from retrying in lockstep.
        self._rng = random.Random()
        self._calibration: _Calibration | None = None
        self._warned_no_scale = False
        self._next_due: float | None = None  # time.monotonic() of the next poll
        self._closed = False
        self._failing = 0  # consecutive failed polls
        self._samples_read = 0
        self._read_errors = 0
        self._out_of_range = 0
        self._missed_polls = 0
        if set_frequency:
            self._request_frequency()
        try:
            self._calibration = self._read_calibration()
        except (OSError, ValueError) as exc:
            # Not fatal: the first poll reads it again and counts the failure.
            logger.warning("cannot read scale/offset of %s yet: %s", device_dir, exc)

    @property
    def sample_rate_hz(self) -> float:
        return self._rate

    @property
    def exhausted(self) -> bool:
        return self._closed

    def _request_frequency(self) -> None:
        attribute = next(
            (self.device_dir / n for n in _FREQUENCY_FILES if (self.device_dir / n).exists()),
            None,
        )
        if attribute is None:
            logger.info(
                "%s has no sampling-frequency attribute; polling at %g Hz",
                self.device_dir,
                self._rate,
            )
            return
        try:
            attribute.write_text(f"{self._rate:g}\n", encoding="ascii")
        except OSError as exc:
            # Read-only for non-root users, or a rate the driver rejects (EINVAL): poll anyway.
            logger.info("could not set %s to %g Hz: %s", attribute, self._rate, exc)
        try:
            reported = _read_text(attribute)
        except OSError as exc:
            logger.info("cannot read %s: %s", attribute, exc)
            return
        available = attribute.with_name(attribute.name + "_available")
        try:
            choices = _read_text(available) if available.is_file() else "not listed"
        except OSError:
            choices = "unreadable"
        logger.info(
            "%s reports %s Hz (requested %g Hz; available: %s)",
            attribute,
            reported,
            self._rate,
            choices,
        )

    def _axis_value(self, axis: str, kind: str, default: float | None) -> float:
        for name in (f"in_accel_{axis}_{kind}", f"in_accel_{kind}"):
            path = self.device_dir / name
            if path.is_file():
                return _read_number(path)
        if default is None:
            raise FileNotFoundError(f"no in_accel_{axis}_{kind} nor in_accel_{kind}")
        return default

    def _read_calibration(self) -> _Calibration:
        if not self.device_dir.is_dir():
            raise FileNotFoundError(f"{self.device_dir} is gone")
        try:
            scale = tuple(self._axis_value(axis, "scale", None) for axis in AXES)
        except FileNotFoundError:
            if (self.device_dir / _RAW_FILES[0]).is_file():
                # Some drivers expose raw values already in m/s^2 and no scale: take them as is.
                if not self._warned_no_scale:
                    self._warned_no_scale = True
                    logger.warning(
                        "%s has no in_accel scale; using raw values as m/s^2", self.device_dir
                    )
                scale = (1.0, 1.0, 1.0)
            else:
                raise
        offset = tuple(self._axis_value(axis, "offset", 0.0) for axis in AXES)
        calibration = _Calibration(
            scale=(scale[0], scale[1], scale[2]), offset=(offset[0], offset[1], offset[2])
        )
        logger.debug(
            "%s: scale %s, offset %s", self.device_dir, calibration.scale, calibration.offset
        )
        return calibration

    def _poll(self) -> SensorReading | None:
        """One attempt at reading a sample now; raises OSError or ValueError on failure."""
        if self._calibration is None:
            self._calibration = self._read_calibration()
        t_ns = self._clock.now_ns()
        raw = [_read_int(self.device_dir / name) for name in _RAW_FILES]
        cal = self._calibration
        x, y, z = ((r + o) * s for r, o, s in zip(raw, cal.offset, cal.scale, strict=True))
        xyz = (x, y, z)
        if not is_plausible(xyz):
            self._out_of_range += 1
            logger.debug("%s: dropped implausible sample %s (raw %s)", self.device_dir, xyz, raw)
            return None
        return SensorReading(t_ns=t_ns, xyz=xyz)

    def poll_once(self) -> SensorReading | None:
        """Reads one sample now, without pacing; None if it failed (logged and counted)."""
        try:
            reading = self._poll()
        except (OSError, ValueError) as exc:
            self._record_failure(exc)
            return None
        self._record_success()
        if reading is not None:
            self._samples_read += 1
        return reading

    def _record_failure(self, exc: Exception) -> None:
        self._read_errors += 1
        self._failing += 1
        self._calibration = None  # read again once the device answers
        if self._failing == 1 or self._failing % _REMIND_EVERY == 0:
            logger.warning(
                "IIO read from %s failed (%d in a row): %s; retrying with backoff",
                self.device_dir,
                self._failing,
                exc,
            )
        else:
            logger.debug("IIO read from %s failed again: %s", self.device_dir, exc)

    def _record_success(self) -> None:
        if self._failing:
            logger.info(
                "IIO reads from %s recovered after %d failures", self.device_dir, self._failing
            )
            self._failing = 0

    def read(self, stop: threading.Event, max_samples: int) -> list[SensorReading]:
        """Waits for the next poll time and returns one reading (``max_samples`` >= 1)."""
        check_max_samples(max_samples)
        while not stop.is_set() and not self._closed:
            now = time.monotonic()
            if self._next_due is None:
                self._next_due = now
            delay = self._next_due - now
            if delay > 0:
                if stop.wait(delay):
                    return []
                now = time.monotonic()
            late = now - self._next_due
            if late > self._period_s:
                skipped = int(late / self._period_s)
                self._missed_polls += skipped
                self._next_due += skipped * self._period_s
            reading = self.poll_once()
            if self._failing:
                # Capped: backoff_delay's 2 ** attempt overflows past attempt 1025.
                attempt = min(self._failing, 32)
                delay = backoff_delay(attempt, self._period_s, self._max_backoff_s, self._rng)
                self._next_due = time.monotonic() + delay
                continue
            self._next_due += self._period_s
            if reading is not None:
                return [reading]
        return []

    def counters(self) -> dict[str, int]:
        return {
            "samples_read": self._samples_read,
            "read_errors": self._read_errors,
            "out_of_range": self._out_of_range,
            "missed_polls": self._missed_polls,
        }

    def close(self) -> None:
        self._closed = True
