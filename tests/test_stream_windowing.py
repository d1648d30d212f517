"""The device's stream windower: windows are exact slices of the batch stream they reference."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from device_agent.windowing import StreamWindower


@given(
    batch_sizes=st.lists(st.integers(1, 60), min_size=1, max_size=40),
    length=st.integers(1, 50),
    data=st.data(),
)
def test_every_window_is_the_slice_its_reference_names(
    batch_sizes: list[int], length: int, data: st.DataObject
) -> None:
    hop = data.draw(st.integers(1, length))
    windower = StreamWindower(length, hop)
    batches: list[np.ndarray] = []
    windows = []
    total = 0
    for seq, size in enumerate(batch_sizes):
        samples = np.arange(total, total + size, dtype=np.float32)[:, None].repeat(3, axis=1)
        total += size
        batches.append(samples)
        windows += windower.push(seq, samples)
    stream = np.concatenate(batches)
    starts = [sum(batch_sizes[: w.ref.batch_seq]) + w.ref.offset for w in windows]
    assert starts == list(range(0, total - length + 1, hop))
    for window, start in zip(windows, starts, strict=True):
        assert window.ref.length == length
        assert window.ref.offset < batch_sizes[window.ref.batch_seq]
        np.testing.assert_array_equal(window.samples, stream[start : start + length])


def test_reset_never_joins_across_a_gap() -> None:
    windower = StreamWindower(4, 4)
    assert windower.push(0, np.zeros((3, 3), np.float32)) == []
    windower.reset()
    windows = windower.push(1, np.ones((4, 3), np.float32))
    assert len(windows) == 1
    assert windows[0].ref.batch_seq == 1
    assert windows[0].samples.min() == 1.0


def test_unconfigured_windower_emits_nothing_and_bad_hops_are_refused() -> None:
    assert StreamWindower().push(0, np.zeros((100, 3), np.float32)) == []
    with pytest.raises(ValueError, match="hop"):
        StreamWindower(10, 11)
    assert StreamWindower(10).push(0, np.zeros((15, 3), np.float32))[0].ref.length == 10


def test_windows_carry_the_majority_recorded_label() -> None:
    windower = StreamWindower(4, 2)
    windows = windower.push(0, np.zeros((6, 3), np.float32), ["A", "A", "A", "B", "B", "B"])
    assert [w.truth for w in windows] == ["A", "B"]
    assert windower.push(1, np.zeros((2, 3), np.float32))[0].truth == "B"  # B, B, None, None
