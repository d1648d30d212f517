"""What the keys of ``har watch`` do, apart from curses: key -> action -> effect on the state.

``action_for_key`` is a pure function. ``Dashboard`` keeps the selection, the confirmations in
flight and the status line; it publishes through anything with a ``confirm`` method (the
``FleetClient`` in production), so it is tested against a real broker without a terminal.
"""

from __future__ import annotations

import curses
from dataclasses import dataclass
from typing import Protocol

from dashboard.fleet_view import FleetView
from shared.errors import HarError

QUIT_KEYS = frozenset({ord("q"), ord("Q")})
UP_KEYS = frozenset({curses.KEY_UP, ord("k")})
DOWN_KEYS = frozenset({curses.KEY_DOWN, ord("j")})
CONFIRM_KEYS = frozenset({ord("c"), ord("C")})
MAX_LABEL_KEYS = 9  # keys 1..9 pick the n-th label of the current model


@dataclass(frozen=True, slots=True)
class Move:
    delta: int  # -1 up, +1 down


@dataclass(frozen=True, slots=True)
class ConfirmAsPredicted:
    pass


@dataclass(frozen=True, slots=True)
class CorrectTo:
    label_number: int  # 1-based, as on the key


@dataclass(frozen=True, slots=True)
class Quit:
    pass


Action = Move | ConfirmAsPredicted | CorrectTo | Quit


def action_for_key(key: int) -> Action | None:
    """The action a key press asks for, or None for a key that does nothing."""
    if key in QUIT_KEYS:
        return Quit()
    if key in UP_KEYS:
        return Move(-1)
    if key in DOWN_KEYS:
        return Move(+1)
    if key in CONFIRM_KEYS:
        return ConfirmAsPredicted()
    if ord("1") <= key <= ord("0") + MAX_LABEL_KEYS:
        return CorrectTo(key - ord("0"))
    return None


class Outcome(Protocol):
    @property
    def accepted(self) -> bool: ...

    def describe(self) -> str: ...


class Pending(Protocol):
    def outcome(self) -> Outcome | None: ...


class Confirmer(Protocol):
    def confirm(self, device_id: str, prediction_id: str, label: str) -> Pending: ...


@dataclass(frozen=True, slots=True)
class _InFlight:
    what: str  # "wrist-1 9b1f0c2e as Walking", for the status line
    pending: Pending
    sent_at: float


class Dashboard:
    """Selection, confirmations in flight and the status line of ``har watch``."""

    def __init__(self, view: FleetView, confirmer: Confirmer, ack_timeout_s: float) -> None:
        self._view = view
        self._confirmer = confirmer
        self._ack_timeout_s = ack_timeout_s
        self._in_flight: list[_InFlight] = []
        self.selected: str | None = None
        self.status = "ready"

    def handle(self, action: Action, now: float) -> bool:
        """Carry out ``action``; False when the dashboard should quit."""
        if isinstance(action, Quit):
            return False
        if isinstance(action, Move):
            self._move(action.delta)
        elif isinstance(action, ConfirmAsPredicted):
            self._confirm(None, now)
        else:
            self._confirm(action.label_number, now)
        return True

    def poll(self, now: float) -> None:
        """Report confirmations the broker answered, or that waited too long for an answer."""
        still_waiting = []
        for sent in self._in_flight:
            outcome = sent.pending.outcome()
            if outcome is not None:
                verdict = "accepted" if outcome.accepted else "REFUSED"
                self.status = f"{sent.what}: {verdict} by the broker, {outcome.describe()}"
            elif now - sent.sent_at > self._ack_timeout_s:
                self.status = (
                    f"{sent.what}: no acknowledgement in {self._ack_timeout_s:g} s "
                    "(is the broker reachable?)"
                )
            else:
                still_waiting.append(sent)
        self._in_flight = still_waiting

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    def selected_device(self) -> str | None:
        """The selected device; the first one when nothing (or a vanished one) is selected."""
        device_ids = self._view.device_ids()
        if self.selected not in device_ids:
            self.selected = device_ids[0] if device_ids else None
        return self.selected

    def _move(self, delta: int) -> None:
        device_ids = self._view.device_ids()
        current = self.selected_device()
        if current is None:
            return
        index = min(max(device_ids.index(current) + delta, 0), len(device_ids) - 1)
        self.selected = device_ids[index]

    def _confirm(self, label_number: int | None, now: float) -> None:
        device_id = self.selected_device()
        row = self._view.row(device_id) if device_id is not None else None
        if row is None or row.latest is None:
            self.status = "no prediction to confirm on the selected device"
            return
        latest = row.latest
        if label_number is None:
            label = latest.label
        else:
            labels = self._view.labels
            if not labels:
                self.status = "no model manifest yet: the labels to correct to are unknown"
                return
            if label_number > len(labels):
                self.status = f"the model has {len(labels)} labels: no label {label_number}"
                return
            label = labels[label_number - 1]
        what = f"{row.device_id} {latest.prediction_id[:8]} as {label}"
        try:
            pending = self._confirmer.confirm(row.device_id, latest.prediction_id, label)
        except HarError as exc:
            self.status = f"{what}: not sent: {exc}"
            return
        self._in_flight.append(_InFlight(what, pending, now))
        self.status = f"{what}: sent, waiting for the broker"
