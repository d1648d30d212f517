"""Fixed-length windows cut from contiguous recordings of one user doing one activity.

A *segment* is a maximal run of consecutive samples with the same user and activity whose
timestamps increase by at most ``max_gap_ns``; a window never crosses a segment boundary, so it
never mixes two people, two activities or two recordings.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

import numpy as np
import numpy.typing as npt

from activity_model.wisdm import WisdmData
from shared.errors import DataError

# Chosen by measurement (docs/model.md, "Window length"): 80 samples = 4 s at 20 Hz, hop 2 s.
DEFAULT_WINDOW: Final = 80
DEFAULT_HOP: Final = 40
SAMPLE_RATE_HZ: Final = 20.0
# Samples are 50 ms apart; anything beyond half a second is a break in the recording.
DEFAULT_MAX_GAP_NS: Final = 500_000_000


@dataclass(frozen=True)
class WindowSet:
    """Windows of raw acceleration (m/s^2) with their labels and the user each came from.

    ``segment`` numbers the contiguous recording each window was cut from (windows of one
    segment are consecutive and in time order); -1 where unknown (e.g. device confirmations).
    """

    x: npt.NDArray[np.float32]  # (n, T, 3)
    y: npt.NDArray[np.int32]  # (n,)
    users: npt.NDArray[np.int32]  # (n,)
    labels: tuple[str, ...]
    weights: npt.NDArray[np.float32] | None = None  # (n,)
    segment: npt.NDArray[np.int64] | None = None  # (n,)

    def __post_init__(self) -> None:
        n = self.x.shape[0]
        if self.x.ndim != 3 or self.x.shape[2] != 3:
            raise ValueError(f"x must have shape (n, T, 3), got {self.x.shape}")
        for name in ("y", "users", "weights", "segment"):
            value = getattr(self, name)
            if value is not None and value.shape != (n,):
                raise ValueError(f"{name} must have shape ({n},), got {value.shape}")
        if n and (int(self.y.min()) < 0 or int(self.y.max()) >= len(self.labels)):
            raise ValueError(f"y holds a class index outside 0..{len(self.labels) - 1}")

    def __len__(self) -> int:
        return int(self.x.shape[0])

    @property
    def window(self) -> int:
        return int(self.x.shape[1])

    def subset(self, index: npt.NDArray[np.intp] | npt.NDArray[np.bool_]) -> WindowSet:
        return WindowSet(
            x=self.x[index],
            y=self.y[index],
            users=self.users[index],
            labels=self.labels,
            weights=None if self.weights is None else self.weights[index],
            segment=None if self.segment is None else self.segment[index],
        )

    def for_users(self, users: Sequence[int] | npt.NDArray[np.int32]) -> WindowSet:
        return self.subset(np.isin(self.users, np.asarray(users)))

    def class_counts(self) -> dict[str, int]:
        counts = np.bincount(self.y, minlength=len(self.labels))
        return {label: int(c) for label, c in zip(self.labels, counts, strict=True)}

    def summary(self) -> dict[str, object]:
        return {
            "windows": len(self),
            "window_length": self.window,
            "users": sorted(int(u) for u in np.unique(self.users)),
            "class_counts": self.class_counts(),
        }


def segment_bounds(
    users: npt.NDArray[np.int32],
    activity: npt.NDArray[np.int32],
    timestamps: npt.NDArray[np.int64],
    max_gap_ns: int = DEFAULT_MAX_GAP_NS,
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """(start, end) indices of the contiguous segments, in file order (end exclusive)."""
    n = users.shape[0]
    if n == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    step = np.diff(timestamps)
    breaks = (
        (users[1:] != users[:-1])
        | (activity[1:] != activity[:-1])
        | (step <= 0)
        | (step > max_gap_ns)
    )
    starts = np.concatenate(([0], np.flatnonzero(breaks) + 1)).astype(np.int64)
    ends = np.concatenate((starts[1:], [n])).astype(np.int64)
    return starts, ends


def make_windows(
    data: WisdmData,
    window: int = DEFAULT_WINDOW,
    hop: int = DEFAULT_HOP,
    max_gap_ns: int = DEFAULT_MAX_GAP_NS,
) -> WindowSet:
    """Cuts windows of ``window`` samples every ``hop`` samples inside each segment."""
    if window < 1 or hop < 1:
        raise DataError(f"window and hop must be positive, got window={window}, hop={hop}")
    starts, ends = segment_bounds(data.users, data.activity, data.timestamps, max_gap_ns)
    lengths = ends - starts
    per_segment = np.where(lengths >= window, (lengths - window) // hop + 1, 0)
    segment_of_window = np.repeat(np.arange(starts.shape[0], dtype=np.int64), per_segment)
    # Position of each window inside its segment: 0, 1, 2... restarting at each segment.
    first_of_segment = np.concatenate(([0], np.cumsum(per_segment)[:-1]))
    rank = np.arange(segment_of_window.shape[0]) - np.repeat(first_of_segment, per_segment)
    window_start = starts[segment_of_window] + rank * hop
    index = window_start[:, None] + np.arange(window, dtype=np.int64)[None, :]
    return WindowSet(
        x=np.ascontiguousarray(data.xyz[index], dtype=np.float32),
        y=data.activity[window_start].astype(np.int32),
        users=data.users[window_start].astype(np.int32),
        labels=data.labels,
        segment=segment_of_window,
    )


def split_users(
    users: npt.NDArray[np.int32] | Sequence[int],
    *,
    val_fraction: float = 0.15,
    test_fraction: float = 0.2,
    seed: int = 0,
) -> tuple[list[int], list[int], list[int]]:
    """Partition of the distinct users into (train, validation, test), seeded.

    Every set gets at least one user when there are three or more users.
    """
    distinct = sorted(int(u) for u in np.unique(np.asarray(users)))
    if len(distinct) < 3:
        raise DataError(f"a by-user split needs at least 3 users, got {len(distinct)}")
    if not (0 < val_fraction < 1 and 0 < test_fraction < 1 and val_fraction + test_fraction < 1):
        raise DataError("val_fraction and test_fraction must be in (0, 1) and sum below 1")
    shuffled = [distinct[i] for i in np.random.default_rng(seed).permutation(len(distinct))]
    n_test = max(1, round(len(distinct) * test_fraction))
    n_val = max(1, round(len(distinct) * val_fraction))
    n_val = min(n_val, len(distinct) - n_test - 1)
    test = sorted(shuffled[:n_test])
    val = sorted(shuffled[n_test : n_test + n_val])
    train = sorted(shuffled[n_test + n_val :])
    return train, val, test


def concat_windows(sets: Sequence[WindowSet]) -> WindowSet:
    """One set holding all windows; labels must agree. Missing weights count as 1."""
    if not sets:
        raise DataError("nothing to concatenate")
    labels = sets[0].labels
    for other in sets[1:]:
        if other.labels != labels:
            raise DataError(f"label sets differ: {labels} vs {other.labels}")
        if other.window != sets[0].window:
            raise DataError(f"window lengths differ: {sets[0].window} vs {other.window}")
    any_weights = any(s.weights is not None for s in sets)
    weights = (
        np.concatenate(
            [np.ones(len(s), np.float32) if s.weights is None else s.weights for s in sets]
        )
        if any_weights
        else None
    )
    any_segment = any(s.segment is not None for s in sets)
    # Segment numbers are made distinct per input set, so concatenation never joins recordings.
    segments: list[npt.NDArray[np.int64]] = []
    offset = 0
    for s in sets:
        if s.segment is None:
            segments.append(np.full(len(s), -1, np.int64))
        else:
            segments.append(np.where(s.segment >= 0, s.segment + offset, -1))
            offset += int(s.segment.max(initial=-1)) + 1
    return WindowSet(
        x=np.concatenate([s.x for s in sets]),
        y=np.concatenate([s.y for s in sets]),
        users=np.concatenate([s.users for s in sets]),
        labels=labels,
        weights=weights,
        segment=np.concatenate(segments) if any_segment else None,
    )
