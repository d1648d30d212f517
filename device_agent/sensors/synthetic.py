"""A deterministic synthetic accelerometer: plausible per-activity signals with the true label."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

import numpy as np

from activity_model.wisdm import WISDM_ACTIVITIES, normalise_activity
from device_agent.sensors.base import PacedSource, SensorReading, Xyz

logger = logging.getLogger(__name__)

STANDARD_GRAVITY = 9.80665


@dataclass(frozen=True, slots=True)
class ActivityProfile:
    """How an activity looks to a phone in a trouser pocket (y roughly along the thigh).

    The signal is ``gravity`` (a direction, scaled to 1 g) plus, for a moving activity, a step
    oscillation at ``step_hz`` with a second harmonic (the heel strike) of ``amplitude`` per axis,
    plus Gaussian noise of ``noise`` m/s^2.
    """

    gravity: Xyz
    step_hz: float
    amplitude: Xyz
    noise: float


# Read-only on purpose: module state must not be mutable.
ACTIVITY_PROFILES: Mapping[str, ActivityProfile] = MappingProxyType(
    {
        "Walking": ActivityProfile((0.15, 0.95, 0.25), 2.0, (1.5, 3.0, 1.2), 0.3),
        "Jogging": ActivityProfile((0.10, 0.95, 0.30), 2.8, (3.5, 7.0, 2.5), 0.6),
        "Upstairs": ActivityProfile((0.20, 0.90, 0.40), 1.6, (1.2, 2.5, 1.5), 0.3),
        "Downstairs": ActivityProfile((0.15, 0.95, 0.30), 1.9, (1.8, 3.8, 1.5), 0.4),
        "Sitting": ActivityProfile((0.15, 0.20, 0.97), 0.0, (0.0, 0.0, 0.0), 0.05),
        "Standing": ActivityProfile((0.05, 0.99, 0.10), 0.0, (0.0, 0.0, 0.0), 0.08),
        "Laying": ActivityProfile((0.97, 0.10, 0.20), 0.0, (0.0, 0.0, 0.0), 0.05),
    }
)
DEFAULT_SEGMENT_S = 10.0


def parse_activities(names: str | Iterable[str]) -> tuple[str, ...]:
    """Canonical names from a comma-separated string or an iterable; empty means all of WISDM's.

    Raises ``ValueError`` naming the known activities if one is unknown.
    """
    raw = names.split(",") if isinstance(names, str) else list(names)
    wanted = tuple(normalise_activity(name) for name in raw if name.strip())
    unknown = [name for name in wanted if name not in ACTIVITY_PROFILES]
    if unknown:
        raise ValueError(
            f"unknown synthetic activit{'y' if len(unknown) == 1 else 'ies'} "
            f"{', '.join(map(repr, unknown))}; known: {', '.join(ACTIVITY_PROFILES)}"
        )
    return wanted or WISDM_ACTIVITIES


class SyntheticAccelerometer(PacedSource):
    """Cycles through ``activities`` in order, ``segment_s`` seconds each, forever.

    Deterministic: segment ``k`` is generated from ``(seed, k)`` alone, so the samples do not
    depend on how many are read at a time. Each segment jitters step rate (±10 %), amplitude
    (±15 %), phase and the phone's tilt, so windows of one activity are not identical. Paced at
    real time * ``speed`` (0 or ``inf``: as fast as the consumer reads). Each reading's ``label``
    is the activity it was generated from.
    """

    def __init__(
        self,
        sample_rate_hz: float = 20.0,
        seed: int = 0,
        activities: str | Iterable[str] = WISDM_ACTIVITIES,
        *,
        segment_s: float = DEFAULT_SEGMENT_S,
        speed: float = 1.0,
    ) -> None:
        super().__init__(sample_rate_hz, speed)
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        if not (math.isfinite(segment_s) and segment_s > 0):
            raise ValueError(f"segment_s must be > 0, got {segment_s}")
        self._activities = parse_activities(activities)
        self._seed = seed
        self._segment_len = max(1, round(segment_s * sample_rate_hz))
        self._period_ns = 1e9 / sample_rate_hz
        self._index = 0  # samples generated so far
        self._segment_k = -1
        self._segment: list[Xyz] = []
        self._segments = 0

    def activity_of_segment(self, k: int) -> str:
        return self._activities[k % len(self._activities)]

    def _next_offset(self) -> int:
        return round(self._index * self._period_ns)

    def _take(self, t_ns: int) -> SensorReading:
        k, i = divmod(self._index, self._segment_len)
        if k != self._segment_k:
            self._segment = self._generate(k)
            self._segment_k = k
            self._segments += 1
        self._index += 1
        return SensorReading(t_ns=t_ns, xyz=self._segment[i], label=self.activity_of_segment(k))

    def _generate(self, k: int) -> list[Xyz]:
        profile = ACTIVITY_PROFILES[self.activity_of_segment(k)]
        rng = np.random.default_rng([self._seed, k])
        n = self._segment_len
        t = (k * n + np.arange(n)) / self._sample_rate_hz
        tilt = np.asarray(profile.gravity) + rng.normal(0.0, 0.05, 3)
        gravity = STANDARD_GRAVITY * tilt / np.linalg.norm(tilt)
        signal = np.broadcast_to(gravity, (n, 3)).copy()
        if profile.step_hz > 0:
            step_hz = profile.step_hz * rng.uniform(0.9, 1.1)
            amplitude = np.asarray(profile.amplitude) * rng.uniform(0.85, 1.15, 3)
            phase = rng.uniform(0.0, 2 * math.pi, 3)
            angle = 2 * math.pi * step_hz * t[:, None] + phase[None, :]
            signal += amplitude * (np.sin(angle) + 0.35 * np.sin(2 * angle + 0.5))
        signal += rng.normal(0.0, profile.noise, (n, 3))
        return [(x, y, z) for x, y, z in signal.tolist()]

    def counters(self) -> dict[str, int]:
        return {**super().counters(), "segments": self._segments}
