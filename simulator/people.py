"""The simulated people behind the devices: who answers, and how reliably."""

from __future__ import annotations

import random
from collections.abc import Sequence


class SimulatedPerson:
    """Answers a share of the predictions shown to them, naming the activity they were doing.

    With probability ``mistake_rate`` the answer is wrong (a random other activity): real users
    tap the wrong button, and the trainer must cope with it.
    """

    def __init__(self, confirm_share: float, mistake_rate: float, rng: random.Random) -> None:
        self._confirm_share = confirm_share
        self._mistake_rate = mistake_rate
        self._rng = rng

    def answer(self, truth: str | None, labels: Sequence[str]) -> str | None:
        """The label this person gives the prediction, or None when they ignore it."""
        if truth is None or truth not in labels or self._rng.random() >= self._confirm_share:
            return None
        if self._rng.random() < self._mistake_rate and len(labels) > 1:
            return self._rng.choice([label for label in labels if label != truth])
        return truth
