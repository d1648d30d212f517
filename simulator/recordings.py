"""What the simulated wearers do: WISDM-format users replayed, or synthetic people."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from activity_model.wisdm import WISDM_ACTIVITIES, load_wisdm
from shared.errors import ConfigError
from simulator.settings import SimSettings

SYNTHETIC_SECONDS_PER_ACTIVITY = 60.0


@dataclass(frozen=True, slots=True)
class Recording:
    """One person's samples (n, 3) in m/s^2 and the activity of each sample."""

    person: str
    xyz: npt.NDArray[np.float32]
    labels: tuple[str, ...]

    def __post_init__(self) -> None:
        if self.xyz.ndim != 2 or self.xyz.shape[1] != 3 or self.xyz.shape[0] == 0:
            raise ValueError(f"recording of {self.person}: samples must be (n>0, 3)")
        if len(self.labels) != self.xyz.shape[0]:
            raise ValueError(f"recording of {self.person}: one label per sample")

    def __len__(self) -> int:
        return int(self.xyz.shape[0])


class Cursor:
    """Endless replay of a recording from a start offset: the recording loops."""

    def __init__(self, recording: Recording, start: int = 0) -> None:
        self._recording = recording
        self._position = start % len(recording)

    def take(self, n: int) -> tuple[npt.NDArray[np.float32], list[str]]:
        rec = self._recording
        indices = (self._position + np.arange(n)) % len(rec)
        self._position = int((self._position + n) % len(rec))
        return rec.xyz[indices], [rec.labels[i] for i in indices.tolist()]


def load_recordings(settings: SimSettings) -> list[Recording]:
    """The people the fleet replays: every (chosen) user of the data file, or synthetic people."""
    if settings.data_file is None:
        return synthetic_recordings(settings.synthetic_people, settings.seed)
    data = load_wisdm(settings.data_file)
    present = sorted({int(u) for u in data.users.tolist()})
    wanted = [int(u) for u in settings.users] or present
    missing = sorted(set(wanted) - set(present))
    if missing:
        raise ConfigError(f"users {missing} are not in {settings.data_file} (it has {present})")
    recordings = []
    for user in wanted:
        rows = np.flatnonzero(data.users == user)
        labels = tuple(data.labels[i] for i in data.activity[rows].tolist())
        recordings.append(Recording(f"user-{user}", data.xyz[rows].astype(np.float32), labels))
    return recordings


def synthetic_recordings(people: int, seed: int) -> list[Recording]:
    from simulator.synthetic_data import user_recording

    recordings = []
    for person in range(people):
        xyz, labels = user_recording(
            WISDM_ACTIVITIES, SYNTHETIC_SECONDS_PER_ACTIVITY, seed=seed * 1000 + 100 + person
        )
        recordings.append(Recording(f"synthetic-{person}", xyz.astype(np.float32), tuple(labels)))
    return recordings


def cursor_for(recordings: list[Recording], device_index: int) -> Cursor:
    """Device i replays person i mod P; devices sharing a person start at different moments."""
    recording = recordings[device_index % len(recordings)]
    lap = device_index // len(recordings)
    # Golden-ratio spacing spreads any number of devices over the recording without collisions.
    start = int((lap * 0.6180339887 % 1.0) * len(recording))
    return Cursor(recording, start)
