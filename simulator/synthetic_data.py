"""Synthetic recordings in the WISDM raw format: the demo's embedded default data set.

Each user is the deterministic synthetic accelerometer with a seed of its own (so step rate,
amplitude and tilt vary between people), optionally worn rotated: a device strapped on
differently is exactly what a global model gets wrong and a user's confirmations can fix.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt

from device_agent.sensors import SyntheticAccelerometer

SAMPLE_RATE_HZ = 20.0
_SEGMENT_GAP_NS = 10_000_000_000  # 10 s between activities: a new contiguous segment


def rotation_about(axis: int, degrees: float) -> npt.NDArray[np.float64]:
    """The rotation matrix of a device turned ``degrees`` about its axis ``axis`` (0, 1, 2:
    x, y, z), turning the next axis towards the one after it (y towards z about x)."""
    angle = math.radians(degrees)
    c, s = math.cos(angle), math.sin(angle)
    j, k = (a for a in range(3) if a != axis)
    rotation = np.eye(3)
    rotation[j, j], rotation[j, k], rotation[k, j], rotation[k, k] = c, -s, s, c
    return rotation


def rotation_about_x(degrees: float) -> npt.NDArray[np.float64]:
    """The rotation matrix of a device turned ``degrees`` about its x axis."""
    return rotation_about(0, degrees)


def user_recording(
    activities: Sequence[str],
    seconds_per_activity: float,
    *,
    seed: int,
    rotation: npt.NDArray[np.float64] | None = None,
) -> tuple[npt.NDArray[np.float64], list[str]]:
    """(samples of shape (n, 3), the activity of each) of one synthetic person, in order."""
    per_activity = round(seconds_per_activity * SAMPLE_RATE_HZ)
    never = threading.Event()
    parts: list[npt.NDArray[np.float64]] = []
    labels: list[str] = []
    for rank, activity in enumerate(activities):
        source = SyntheticAccelerometer(
            SAMPLE_RATE_HZ,
            seed=seed * 1000 + rank,
            activities=[activity],
            segment_s=seconds_per_activity,
            speed=0.0,
        )
        readings = source.read(never, per_activity)
        while len(readings) < per_activity:
            readings += source.read(never, per_activity - len(readings))
        xyz = np.array([r.xyz for r in readings])
        parts.append(xyz if rotation is None else xyz @ rotation.T)
        labels.extend([activity] * per_activity)
    return np.concatenate(parts), labels


def user_lines(
    user: int,
    activities: Sequence[str],
    seconds_per_activity: float,
    *,
    seed: int,
    rotation: npt.NDArray[np.float64] | None = None,
    start_ns: int = 1_000_000_000_000,
) -> list[str]:
    """WISDM raw lines (``user,Activity,timestamp,x,y,z;``) for one synthetic user."""
    xyz, labels = user_recording(activities, seconds_per_activity, seed=seed, rotation=rotation)
    period_ns = round(1e9 / SAMPLE_RATE_HZ)
    per_activity = round(seconds_per_activity * SAMPLE_RATE_HZ)
    lines: list[str] = []
    t_ns = start_ns
    for i, ((x, y, z), activity) in enumerate(zip(xyz, labels, strict=True)):
        if i and i % per_activity == 0:
            t_ns += _SEGMENT_GAP_NS  # each activity is a contiguous segment of its own
        lines.append(f"{user},{activity},{t_ns},{x:.6f},{y:.6f},{z:.6f};")
        t_ns += period_ns
    return lines


def write_dataset(
    path: Path,
    users: Sequence[int],
    activities: Sequence[str],
    seconds_per_activity: float,
    *,
    seed: int = 0,
    rotation: npt.NDArray[np.float64] | None = None,
) -> Path:
    """Write a WISDM-format file with ``users``, each doing every activity in turn."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="ascii") as handle:
        for user in users:
            for line in user_lines(
                user, activities, seconds_per_activity, seed=seed + user, rotation=rotation
            ):
                handle.write(line + "\n")
    return path
