"""Segments and windows: a window never crosses a user, an activity or a gap in the recording."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from activity_model.windowing import (
    WindowSet,
    concat_windows,
    make_windows,
    segment_bounds,
    split_users,
)
from activity_model.wisdm import LoadReport, WisdmData
from shared.errors import DataError

PERIOD_NS = 50_000_000


def _data(users: list[int], activity: list[int], timestamps: list[int], k: int = 3) -> WisdmData:
    n = len(users)
    # x encodes the sample index, so a window's samples can be traced back to the source rows.
    xyz = np.stack([np.arange(n), np.zeros(n), np.zeros(n)], axis=1).astype(np.float32)
    return WisdmData(
        users=np.asarray(users, np.int32),
        activity=np.asarray(activity, np.int32),
        timestamps=np.asarray(timestamps, np.int64),
        xyz=xyz,
        labels=tuple(f"A{i}" for i in range(k)),
        report=LoadReport(source="test"),
    )


@st.composite
def recordings(draw: st.DrawFn) -> WisdmData:
    """Runs of samples with random users, activities, lengths and gaps between runs."""
    users: list[int] = []
    activity: list[int] = []
    timestamps: list[int] = []
    t = 1_000_000_000
    for _ in range(draw(st.integers(1, 8))):
        length = draw(st.integers(1, 40))
        user = draw(st.integers(1, 3))
        act = draw(st.integers(0, 2))
        t += draw(st.sampled_from([PERIOD_NS, 2 * PERIOD_NS, 10**10, -(10**9)]))
        for _ in range(length):
            users.append(user)
            activity.append(act)
            timestamps.append(t)
            t += draw(st.sampled_from([PERIOD_NS] * 8 + [10**10]))
    return _data(users, activity, timestamps)


@settings(max_examples=150, deadline=None)
@given(data=recordings(), window=st.integers(1, 12), hop=st.integers(1, 12))
def test_windows_never_cross_users_activities_or_gaps(
    data: WisdmData, window: int, hop: int
) -> None:
    ws = make_windows(data, window=window, hop=hop, max_gap_ns=5 * PERIOD_NS)
    assert ws.x.shape[1:] == (window, 3)
    for i in range(len(ws)):
        rows = ws.x[i, :, 0].astype(np.int64)
        assert np.array_equal(rows, np.arange(rows[0], rows[0] + window))  # contiguous rows
        assert len(set(data.users[rows].tolist())) == 1
        assert len(set(data.activity[rows].tolist())) == 1
        steps = np.diff(data.timestamps[rows])
        assert ((steps > 0) & (steps <= 5 * PERIOD_NS)).all()
        assert ws.users[i] == data.users[rows[0]]
        assert ws.y[i] == data.activity[rows[0]]


@settings(max_examples=100, deadline=None)
@given(data=recordings(), window=st.integers(1, 12), hop=st.integers(1, 12))
def test_every_possible_window_is_cut(data: WisdmData, window: int, hop: int) -> None:
    starts, ends = segment_bounds(data.users, data.activity, data.timestamps, 5 * PERIOD_NS)
    expected = sum(
        max(0, (int(e - s) - window) // hop + 1) for s, e in zip(starts, ends, strict=True)
    )
    assert len(make_windows(data, window=window, hop=hop, max_gap_ns=5 * PERIOD_NS)) == expected
    assert int((ends - starts).sum()) == len(data)


def test_segments_break_at_user_activity_and_gap() -> None:
    t = [0, 1, 2, 3, 100, 101, 102, 103, 104]
    data = _data(
        users=[1, 1, 1, 2, 2, 2, 2, 2, 2],
        activity=[0, 0, 1, 1, 1, 1, 1, 1, 1],
        timestamps=[1 + PERIOD_NS * v for v in t],
    )
    starts, ends = segment_bounds(data.users, data.activity, data.timestamps, 5 * PERIOD_NS)
    assert list(zip(starts.tolist(), ends.tolist(), strict=True)) == [
        (0, 2),
        (2, 3),
        (3, 4),
        (4, 9),
    ]
    ws = make_windows(data, window=2, hop=1, max_gap_ns=5 * PERIOD_NS)
    assert ws.x[:, 0, 0].tolist() == [0, 4, 5, 6, 7]
    assert ws.segment is not None
    assert ws.segment.tolist() == [0, 3, 3, 3, 3]


@settings(max_examples=50, deadline=None)
@given(n_users=st.integers(3, 40), seed=st.integers(0, 2**16))
def test_user_split_is_a_partition_with_no_shared_user(n_users: int, seed: int) -> None:
    users = np.repeat(np.arange(100, 100 + n_users), 3)
    train, val, test = split_users(users, val_fraction=0.2, test_fraction=0.2, seed=seed)
    assert min(len(train), len(val), len(test)) >= 1
    assert sorted(train + val + test) == list(range(100, 100 + n_users))
    assert split_users(users, val_fraction=0.2, test_fraction=0.2, seed=seed) == (train, val, test)


def test_user_split_needs_three_users() -> None:
    with pytest.raises(DataError, match="at least 3 users"):
        split_users([1, 1, 2])


def test_concat_keeps_weights_and_refuses_other_labels() -> None:
    x = np.zeros((2, 4, 3), np.float32)
    a = WindowSet(
        x=x, y=np.array([0, 1], np.int32), users=np.array([1, 1], np.int32), labels=("a", "b")
    )
    b = WindowSet(
        x=x,
        y=np.array([1, 1], np.int32),
        users=np.array([9, 9], np.int32),
        labels=("a", "b"),
        weights=np.array([3.0, 3.0], np.float32),
    )
    both = concat_windows([a, b])
    assert len(both) == 4
    assert both.weights is not None
    assert both.weights.tolist() == [1.0, 1.0, 3.0, 3.0]
    assert both.users.tolist() == [1, 1, 9, 9]
    other = WindowSet(x=x, y=np.array([0, 0], np.int32), users=a.users, labels=("a", "c"))
    with pytest.raises(DataError, match="label sets differ"):
        concat_windows([a, other])


def test_windowset_rejects_inconsistent_arrays() -> None:
    with pytest.raises(ValueError, match="y holds a class index"):
        WindowSet(
            x=np.zeros((1, 4, 3), np.float32),
            y=np.array([2], np.int32),
            users=np.array([1], np.int32),
            labels=("a", "b"),
        )
    with pytest.raises(ValueError, match=r"users must have shape \(1,\)"):
        WindowSet(
            x=np.zeros((1, 4, 3), np.float32),
            y=np.array([0], np.int32),
            users=np.array([1, 2], np.int32),
            labels=("a", "b"),
        )
