"""Replay of one user from a WISDM-format file, with the true activity of each sample."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np

from activity_model.wisdm import load_wisdm, normalise_activity
from device_agent.sensors.base import PacedSource, SensorReading, Xyz
from shared.errors import ConfigError
from shared.messages import MAX_ABS_ACCELERATION

logger = logging.getLogger(__name__)

# WISDM v1.1 is documented as 20 Hz.
WISDM_SAMPLE_RATE_HZ = 20.0
# A step longer than this, or backwards, is a break between recording sessions: it is replayed
# as a gap of this length, long enough for a consumer to see the break (and not cut windows
# across it), short enough that a replay never stalls and never runs backwards.
DEFAULT_MAX_GAP_S = 1.0


class WisdmReplay(PacedSource):
    """Replays the records of ``user`` (in file order) at real time * ``speed``.

    Samples keep the file's spacing, with two repairs counted in ``timestamp_fixes``: a repeated
    timestamp becomes one nominal period, and a step backwards or longer than ``max_gap_s`` (a
    break between sessions) becomes a gap of exactly ``max_gap_s``. Stamps are re-based so the
    first sample is stamped with the time of the first ``read``. ``speed`` 0 or ``inf`` replays
    as fast as the consumer reads. With ``loop`` the recording starts over after a
    ``max_gap_s`` gap (stamps keep increasing); otherwise the source is exhausted after the last
    record.

    Each :class:`SensorReading` carries the sample's true activity in ``label``. ``activity``
    (any spelling :func:`activity_model.wisdm.normalise_activity` accepts) keeps only that
    activity's records. Raises :class:`DataError` if the file cannot be read and
    :class:`ConfigError` if the user (or activity) has no records in it.
    """

    def __init__(
        self,
        path: Path | str,
        user: int,
        speed: float = 1.0,
        loop: bool = False,
        activity: str | None = None,
        *,
        sample_rate_hz: float = WISDM_SAMPLE_RATE_HZ,
        max_gap_s: float = DEFAULT_MAX_GAP_S,
    ) -> None:
        super().__init__(sample_rate_hz, speed)
        if not (math.isfinite(max_gap_s) and max_gap_s > 0):
            raise ValueError(f"max_gap_s must be > 0, got {max_gap_s}")
        data = load_wisdm(path)
        mine = data.users == user
        if not mine.any():
            present = sorted({int(u) for u in np.unique(data.users)})
            raise ConfigError(
                f"user {user} has no records in {path}; users present: {_short_list(present)}"
            )
        if activity is not None:
            wanted = normalise_activity(activity)
            theirs = sorted({data.labels[int(a)] for a in np.unique(data.activity[mine])})
            if wanted not in theirs:
                raise ConfigError(
                    f"user {user} has no {wanted!r} records in {path}; "
                    f"their activities: {', '.join(theirs)}"
                )
            mine &= data.activity == data.labels.index(wanted)
        xyz = data.xyz[mine]
        plausible = (np.abs(xyz) <= MAX_ABS_ACCELERATION).all(axis=1)
        if not plausible.all():
            logger.warning(
                "%s: dropped %d records of user %d beyond %g m/s^2",
                path,
                int((~plausible).sum()),
                user,
                MAX_ABS_ACCELERATION,
            )
        keep = np.flatnonzero(mine)[plausible]
        if keep.size == 0:
            raise ConfigError(f"user {user} has no plausible records in {path}")

        gap_ns = round(max_gap_s * 1e9)
        steps = np.diff(data.timestamps[keep])
        repeated = steps == 0
        session_break = (steps < 0) | (steps > gap_ns)
        steps = np.where(repeated, round(1e9 / sample_rate_hz), steps)
        steps = np.where(session_break, gap_ns, steps)
        self._offsets: list[int] = np.concatenate(([0], np.cumsum(steps))).tolist()
        # fixed[i]: the step into record i is not the recorded one.
        self._fixed: list[bool] = [False, *(repeated | session_break).tolist()]
        self._xyz: list[Xyz] = [(x, y, z) for x, y, z in data.xyz[keep].tolist()]
        self._labels: list[str] = [data.labels[a] for a in data.activity[keep].tolist()]
        self._gap_ns = gap_ns
        self._loop = loop
        self._index = 0
        self._pass_offset = 0  # data time at which the current pass started
        self._loops = 0
        self._timestamp_fixes = 0
        logger.info(
            "replaying %d records of user %d from %s (%s) at speed %g%s",
            len(self._xyz),
            user,
            path,
            ", ".join(sorted(set(self._labels))),
            speed,
            ", looping" if loop else "",
        )

    @property
    def n_records(self) -> int:
        """Records in one pass."""
        return len(self._xyz)

    def _next_offset(self) -> int | None:
        if self._index >= len(self._xyz):
            return None
        return self._pass_offset + self._offsets[self._index]

    def _take(self, t_ns: int) -> SensorReading:
        i = self._index
        self._timestamp_fixes += self._fixed[i]
        self._index += 1
        if self._index == len(self._xyz) and self._loop:
            # Starting over is a break in the recording, like one between sessions.
            self._pass_offset += self._offsets[-1] + self._gap_ns
            self._index = 0
            self._loops += 1
        return SensorReading(t_ns=t_ns, xyz=self._xyz[i], label=self._labels[i])

    def counters(self) -> dict[str, int]:
        return {
            **super().counters(),
            "loops": self._loops,
            "timestamp_fixes": self._timestamp_fixes,
        }


def _short_list(values: list[int], limit: int = 20) -> str:
    shown = ", ".join(str(v) for v in values[:limit])
    return shown + (f", ... ({len(values)} in all)" if len(values) > limit else "")
