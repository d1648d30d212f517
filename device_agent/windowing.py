"""Cutting the device's live sample stream into model windows, remembering where each came from."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from shared.messages import WindowRef


@dataclass(frozen=True, slots=True)
class StreamWindow:
    """``length`` consecutive samples and their position in the batch stream."""

    ref: WindowRef
    samples: npt.NDArray[np.float32]  # (length, 3)
    truth: str | None = None  # majority recorded label, when the sensor replays labelled data


class StreamWindower:
    """Emits a window of ``length`` samples every ``hop`` samples of a contiguous stream.

    Windows may span batches; each carries the (batch, offset) of its first sample so that a
    receiver holding the batches can rebuild it. ``reset`` drops partial data after a gap, so a
    window never joins samples from either side of one. Thread-safe: the model worker may
    reconfigure it while the sensor thread pushes.
    """

    def __init__(self, length: int = 0, hop: int = 0) -> None:
        self._lock = threading.Lock()
        self._length = 0
        self._hop = 0
        self._samples = np.empty((0, 3), np.float32)
        self._seq = np.empty(0, np.int64)
        self._offset = np.empty(0, np.int64)
        self._labels: list[str | None] = []
        if length:
            self.configure(length, hop)

    @property
    def length(self) -> int:
        return self._length

    def configure(self, length: int, hop: int = 0) -> None:
        """Window ``length`` samples, ``hop`` apart (0: half a window). Drops buffered data."""
        hop = hop or max(1, length // 2)
        if length < 1 or not 1 <= hop <= length:
            raise ValueError(f"need 1 <= hop ({hop}) <= length ({length})")
        with self._lock:
            self._length, self._hop = length, hop
            self._clear()

    def reset(self) -> None:
        with self._lock:
            self._clear()

    def _clear(self) -> None:
        self._samples = self._samples[:0]
        self._seq = self._seq[:0]
        self._offset = self._offset[:0]
        self._labels = []

    def push(
        self,
        batch_seq: int,
        samples: npt.NDArray[np.float32],
        labels: Sequence[str | None] | None = None,
    ) -> list[StreamWindow]:
        """Add one batch (and its per-sample labels, if known); return the completed windows."""
        with self._lock:
            if self._length == 0:
                return []
            n = samples.shape[0]
            self._samples = np.concatenate([self._samples, samples.astype(np.float32)])
            self._seq = np.concatenate([self._seq, np.full(n, batch_seq, np.int64)])
            self._offset = np.concatenate([self._offset, np.arange(n, dtype=np.int64)])
            self._labels.extend(labels if labels is not None else [None] * n)
            windows = []
            while self._samples.shape[0] >= self._length:
                windows.append(
                    StreamWindow(
                        ref=WindowRef(
                            batch_seq=int(self._seq[0]),
                            offset=int(self._offset[0]),
                            length=self._length,
                        ),
                        samples=self._samples[: self._length].copy(),
                        truth=_majority(self._labels[: self._length]),
                    )
                )
                del self._labels[: self._hop]
                self._samples = self._samples[self._hop :]
                self._seq = self._seq[self._hop :]
                self._offset = self._offset[self._hop :]
            return windows


def _majority(labels: Sequence[str | None]) -> str | None:
    known = Counter(label for label in labels if label is not None)
    return known.most_common(1)[0][0] if known else None
