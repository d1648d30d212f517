"""Which sensor the agent reads, as settings, and the factory that opens it."""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from device_agent.sensors.base import SensorSource, check_rate, check_speed
from device_agent.sensors.iio import DEFAULT_SYSFS_ROOT, IioAccelerometer, find_iio_accelerometer
from device_agent.sensors.replay import WisdmReplay
from device_agent.sensors.stdin import StdinCsv
from device_agent.sensors.synthetic import (
    DEFAULT_SEGMENT_S,
    SyntheticAccelerometer,
    parse_activities,
)
from shared.errors import ConfigError

SENSOR_KINDS = ("iio", "replay", "synthetic", "stdin")


@dataclass(frozen=True, slots=True)
class SensorSettings:
    """The ``[sensor]`` table of the agent's settings (``HAR_SENSOR_*`` in the environment).

    ``kind`` picks the source: ``iio`` (a Linux IIO accelerometer: ``iio_device``, or the first
    one found under ``iio_sysfs_root``), ``replay`` (user ``replay_user`` of the WISDM-format
    ``replay_file``, optionally only ``replay_activity``), ``synthetic`` (``synthetic_activities``
    in turn, comma-separated, empty = WISDM's six, ``synthetic_segment_s`` each) or ``stdin``
    (``x,y,z`` / ``t_ns,x,y,z`` lines). ``speed`` paces replay and synthetic data (1 = real
    time, 0 = as fast as possible); ``loop`` restarts a replay at its end.
    """

    kind: str = "synthetic"
    sample_rate_hz: float = 20.0
    iio_device: Path | None = None
    iio_sysfs_root: Path = DEFAULT_SYSFS_ROOT
    replay_file: Path | None = None
    replay_user: int = 1
    replay_activity: str | None = None
    speed: float = 1.0
    loop: bool = False
    seed: int = 0
    synthetic_activities: str = ""
    synthetic_segment_s: float = DEFAULT_SEGMENT_S

    def __post_init__(self) -> None:
        kind = self.kind.strip().lower()
        if kind not in SENSOR_KINDS:
            raise ConfigError(f"sensor.kind {self.kind!r} is not one of {', '.join(SENSOR_KINDS)}")
        object.__setattr__(self, "kind", kind)
        try:
            check_rate(self.sample_rate_hz)
            check_speed(self.speed)
        except ValueError as exc:
            raise ConfigError(f"sensor.{exc}") from exc
        if self.replay_user < 0:
            raise ConfigError(f"sensor.replay_user must be >= 0, got {self.replay_user}")
        if self.seed < 0:
            raise ConfigError(f"sensor.seed must be >= 0, got {self.seed}")
        if not (math.isfinite(self.synthetic_segment_s) and self.synthetic_segment_s > 0):
            raise ConfigError(
                f"sensor.synthetic_segment_s must be > 0, got {self.synthetic_segment_s}"
            )
        try:
            parse_activities(self.synthetic_activities)
        except ValueError as exc:
            raise ConfigError(f"sensor.synthetic_activities: {exc}") from exc
        if kind == "replay" and self.replay_file is None:
            raise ConfigError("sensor.kind = replay needs sensor.replay_file (a WISDM-format file)")


def open_sensor(spec: SensorSettings, *, stdin: TextIO | None = None) -> SensorSource:
    """Opens the source ``spec`` describes; ``stdin`` replaces ``sys.stdin`` for kind stdin.

    Raises :class:`ConfigError` when the settings do not fit what is there (no IIO device, a
    user missing from the replay file) and :class:`DataError` when the replay file is unreadable.
    """
    if spec.kind == "iio":
        device = spec.iio_device or find_iio_accelerometer(spec.iio_sysfs_root)
        return IioAccelerometer(device, spec.sample_rate_hz)
    if spec.kind == "replay":
        assert spec.replay_file is not None  # checked by SensorSettings
        return WisdmReplay(
            spec.replay_file,
            spec.replay_user,
            speed=spec.speed,
            loop=spec.loop,
            activity=spec.replay_activity,
            sample_rate_hz=spec.sample_rate_hz,
        )
    if spec.kind == "synthetic":
        return SyntheticAccelerometer(
            spec.sample_rate_hz,
            spec.seed,
            spec.synthetic_activities,
            segment_s=spec.synthetic_segment_s,
            speed=spec.speed,
        )
    if stdin is not None:
        return StdinCsv(stdin, spec.sample_rate_hz)
    return StdinCsv(_open_stdin(), spec.sample_rate_hz, close_stream=True)


def _open_stdin() -> TextIO:
    """Our own text reader on fd 0: undecodable bytes become U+FFFD (one malformed line)
    instead of a lost chunk, and closing it leaves ``sys.stdin`` alone."""
    try:
        fd = sys.stdin.fileno()
    except (AttributeError, OSError, ValueError):
        return sys.stdin  # replaced by a harness: use it as it is
    return open(fd, encoding="utf-8", errors="replace", closefd=False)
