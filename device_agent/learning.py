"""On-device learning: what a wearer's confirmations teach the device, and the guard on it.

No MQTT here. The agent's worker thread calls :class:`DeviceLearner`; the updater personalises
a new version with :func:`personalise`; ``bench/personalize.py`` and the tests drive both
directly, through the same code.

The learned state is a function of the global model and the confirmations (docs/model.md):

1. **Alignment.** The rotation that best turns the gravity of each confirmed window onto the
   gravity of its class in the training data (Kabsch), pulled towards no rotation by
   ``alignment_prior`` pseudo-confirmations. It corrects how this wearer's device sits.
2. **Correction of the last layer**, fitted from zero by the model's ``learn`` on the most recent
   confirmed windows of each activity (seen through the alignment), beside the class-balanced
   memory of training data shipped in the model, pulled towards the global weights.
3. **The guard.** A fitted state is adopted only if no class of the memory loses more than
   ``memory_tolerance`` of its recall (the activities the wearer has not shown yet stay as the
   global model knows them). It is *served* only while, over the last ``guard_window``
   confirmations, it labelled more of them right before learning them than the global model
   did. Each confirmation is thus scored, before it is learned, by a state that never saw it:
   a held-out check, in time order. Otherwise the global model answers, unchanged.

A later correction of a prediction replaces its label and the state is fitted again; ``forget``
drops every confirmation and serves the global model.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import numpy.typing as npt

from device_agent.store import AgentStore, ReplayEntry
from shared.counters import Counters, LatencyRecorder
from shared.errors import ModelError
from shared.model.runtime import ActivityModel, PersonalState

log = logging.getLogger(__name__)

Record = tuple[bool | None, bool | None]  # (learned state right, global model right)


@dataclass(frozen=True, slots=True)
class LearningPolicy:
    """The device's side of on-device learning; the model carries the fit's own settings.

    Defaults chosen on validation users with ``bench/personalize.py`` (docs/model.md).
    """

    alignment_prior: float = 2.0  # pseudo-confirmations pulling the alignment to no rotation
    max_per_class: int = 50  # most recent confirmed windows of each activity a fit reads
    memory_tolerance: float = 0.05  # recall a memory class may lose before a state is refused
    guard_window: int = 50  # confirmations over which the learned state must beat the global
    # False adopts and serves every fit: only for comparing methods in bench/personalize.py.
    guard: bool = True
    align: bool = True  # False: no alignment (bench/personalize.py compares without it)

    def __post_init__(self) -> None:
        if self.alignment_prior < 0:
            raise ValueError("alignment_prior must be >= 0")
        if self.max_per_class < 1 or self.guard_window < 1:
            raise ValueError("max_per_class and guard_window must be >= 1")
        if not 0 <= self.memory_tolerance <= 1:
            raise ValueError("memory_tolerance must be within 0..1")


# ---------------------------------------------------------------------------------- pure steps
def alignment(
    windows: npt.NDArray[np.float32],
    labels: npt.NDArray[np.int64],
    class_gravity: npt.NDArray[np.float32],
    prior: float,
) -> npt.NDArray[np.float32]:
    """The rotation R (3x3) that best maps each window's mean acceleration onto its class's.

    Weighted Kabsch on unit vectors, with ``prior`` pseudo-pairs (e_i -> e_i) so that few or
    ambiguous windows leave R near the identity. Classes without a known gravity are skipped.
    """
    known = np.linalg.norm(class_gravity, axis=1) > 1e-3
    rows = known[labels] if labels.size else np.zeros(0, bool)
    if not rows.any():
        return np.eye(3, dtype=np.float32)
    seen = windows[rows].mean(axis=1).astype(np.float64)
    seen /= np.maximum(np.linalg.norm(seen, axis=1, keepdims=True), 1e-9)
    target = class_gravity[labels[rows]].astype(np.float64)
    target /= np.linalg.norm(target, axis=1, keepdims=True)
    cross = seen.T @ target + prior * np.eye(3)
    u, _, vt = np.linalg.svd(cross)
    d = np.sign(np.linalg.det(vt.T @ u.T)) or 1.0
    rotation: npt.NDArray[np.float32] = (vt.T @ np.diag([1.0, 1.0, d]) @ u.T).astype(np.float32)
    return rotation


def usable(
    model: ActivityModel, entries: Sequence[ReplayEntry], most_per_class: int | None = None
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
    """Confirmed windows this model can learn from (its window length, labels it knows), at
    most the ``most_per_class`` latest of each label."""
    index = {label: i for i, label in enumerate(model.labels)}
    length = model.input_spec.window
    kept = [e for e in entries if e.label in index and e.window.shape == (length, 3)]
    labels = np.array([index[e.label] for e in kept], np.int64)
    if most_per_class is not None:
        chosen = recent_per_class(labels, most_per_class)
        kept, labels = [kept[i] for i in chosen], labels[chosen]
    if not kept:
        return np.empty((0, length, 3), np.float32), labels
    return np.stack([e.window for e in kept]).astype(np.float32), labels


def recent_per_class(labels: npt.NDArray[np.int64], most: int) -> npt.NDArray[np.intp]:
    """Indices of the ``most`` latest entries of each label, in their original order."""
    keep = np.zeros(labels.size, bool)
    for label in np.unique(labels):
        keep[np.flatnonzero(labels == label)[-most:]] = True
    return np.flatnonzero(keep)


def fit(
    model: ActivityModel, entries: Sequence[ReplayEntry], policy: LearningPolicy
) -> PersonalState | None:
    """The personal state these confirmations teach (not served yet); None if none is usable."""
    windows, labels = usable(model, entries, policy.max_per_class)
    if labels.size == 0:
        return None
    align = (
        alignment(windows, labels, model.class_gravity, policy.alignment_prior)
        if policy.align
        else np.eye(3, dtype=np.float32)
    )
    state, _ = model.learn(
        windows, labels.astype(np.int32), np.ones(labels.size, np.float32), align
    )
    return state


def memory_refusal(
    model: ActivityModel,
    state: PersonalState,
    taught: Sequence[ReplayEntry],
    policy: LearningPolicy,
) -> str | None:
    """Why ``state`` must not be adopted, or None: an activity the wearer has not confirmed lost
    more than ``memory_tolerance`` of its recall on the memory. (For an activity they did
    confirm, their own windows say how it looks on them.)"""
    if not policy.guard:
        return None
    check = model.memory_check(state)
    shown = {e.label for e in taught}
    for label in np.unique(check.labels):
        if model.labels[int(label)] in shown:
            continue
        mine = check.labels == label
        lost = float(check.global_correct[mine].mean() - check.correct[mine].mean())
        if lost > policy.memory_tolerance:
            name = model.labels[int(label)]
            return f"{name} recall on the memory would fall by {lost:.0%}"
    return None


def score(model: ActivityModel, state: PersonalState, entry: ReplayEntry) -> Record:
    """Did ``state`` and the global model label ``entry`` right? (None: not scorable)."""
    windows, labels = usable(model, [entry])
    if labels.size == 0:
        return None, None
    personal, base = model.evaluate(windows, state)
    return bool(personal.argmax(1)[0] == labels[0]), bool(base.argmax(1)[0] == labels[0])


def _tally(records: Sequence[Record], window: int) -> tuple[int, int, int]:
    """(learned state right, global model right, scored) over the last ``window`` scored."""
    recent = [r for r in records if r[0] is not None and r[1] is not None][-window:]
    return sum(bool(p) for p, _ in recent), sum(bool(g) for _, g in recent), len(recent)


def serves(records: Sequence[Record], window: int) -> bool:
    """Serve the learned state only if it beat the global model over the last ``window``."""
    personal, base, _ = _tally(records, window)
    return personal > base


def served_accuracy(records: Sequence[Record], window: int) -> tuple[float | None, int]:
    """(accuracy the device got on the last ``window`` scored confirmations, how many): it
    serves whichever of the two did better."""
    personal, base, scored = _tally(records, window)
    return (max(personal, base) / scored if scored else None), scored


@dataclass
class Learned:
    """A model's learned state, whether it is served, and the guard's record per confirmation.

    ``covered`` maps each confirmation the state includes to the label it was learned with.
    """

    state: PersonalState
    records: dict[str, Record] = field(default_factory=dict)
    covered: dict[str, str] = field(default_factory=dict)

    def served(self, policy: LearningPolicy) -> PersonalState:
        if not policy.guard:
            return self.state.served(True)
        return self.state.served(serves(list(self.records.values()), policy.guard_window))

    def keep_recent_records(self, window: int) -> None:
        for key in list(self.records)[: max(0, len(self.records) - 4 * window)]:
            del self.records[key]


def step(
    model: ActivityModel,
    learned: Learned,
    entries: Sequence[ReplayEntry],
    new: ReplayEntry,
    policy: LearningPolicy,
    *,
    scored: bool = True,
) -> str | None:
    """Score ``new`` with the learned state (unless ``scored`` is False: a corrected label the
    state already saw), then fit on ``entries`` (``new`` among them) and adopt the fit unless
    the memory check refuses it. Returns the refusal, or None."""
    learned.records[new.prediction_id] = (
        score(model, learned.state, new) if scored else (None, None)
    )
    learned.covered[new.prediction_id] = new.label
    return _fit_and_adopt(model, learned, entries, policy)


def _fit_and_adopt(
    model: ActivityModel, learned: Learned, entries: Sequence[ReplayEntry], policy: LearningPolicy
) -> str | None:
    """Fit on ``entries``; adopt the fit unless the memory check refuses it (the refusal)."""
    candidate = fit(model, entries, policy)
    if candidate is None:
        return None
    refusal = memory_refusal(model, candidate, entries, policy)
    if refusal is None:
        learned.state = candidate
    return refusal


def personalise(
    model: ActivityModel, entries: Sequence[ReplayEntry], policy: LearningPolicy
) -> Learned:
    """The learned state a model gets from these confirmations, as the device would have
    learned them one by one (``step``), with the guard's record over the last ``guard_window``.

    The confirmations before those are fitted at once (one adoption check), so the cost is
    ``guard_window`` + 1 fits whatever the history.
    """
    learned = Learned(model.nothing_learned())
    start = max(0, len(entries) - policy.guard_window)
    if start:
        bulk = entries[:start]
        _fit_and_adopt(model, learned, bulk, policy)
        learned.covered = {e.prediction_id: e.label for e in bulk}
    for i in range(start, len(entries)):
        step(model, learned, entries[: i + 1], entries[i], policy)
    return learned


# ---------------------------------------------------------------------------------- the learner
@dataclass(frozen=True, slots=True)
class ConfirmOutcome:
    stored: Literal["new", "corrected", "duplicate"]
    refusal: str | None = None  # why the fitted state was not adopted


@dataclass
class _Serving:
    """The version the device serves, and what it learned on it (None: it cannot learn)."""

    version: str
    model: ActivityModel
    learned: Learned | None = None
    served: bool = False  # what ``predict`` uses now: the learned state, or the global model


class DeviceLearner:
    """Confirm, learn, guard, persist and forget for the model the device serves.

    Not thread-safe: the agent calls it from its worker thread only (``personalise`` of a new
    version runs elsewhere, on its own model).
    """

    def __init__(
        self,
        store: AgentStore,
        learned_dir: Path,
        policy: LearningPolicy,
        *,
        counters: Counters,
        latencies: LatencyRecorder,
        report: Callable[[str, str], None] = lambda code, message: None,
    ) -> None:
        self._store = store
        self._dir = learned_dir
        self._policy = policy
        self._counters = counters
        self._latencies = latencies
        self._report = report  # a handled problem worth an error event (the agent publishes)
        self._serving: _Serving | None = None

    @property
    def policy(self) -> LearningPolicy:
        return self._policy

    @property
    def serving(self) -> bool:
        """Whether the learned state answers predictions now (else the global model does).

        A flag the worker thread sets when it installs a state: the status, on another thread,
        reads it without touching the guard's records."""
        serving = self._serving
        return serving is not None and serving.served

    def state_path(self, version: str) -> Path:
        return self._dir / f"{version}.state"

    def attach(self, version: str, model: ActivityModel) -> None:
        """Serve ``version``: its persisted state if it is intact, else learned again."""
        serving = self._serving = _Serving(version, model)
        if not model.personalisable:
            log.warning("model %s cannot learn on the device: confirmations are kept", version)
            return
        entries = self._store.replay_entries()
        try:
            restored = model.restore_state(self.state_path(version))
        except ModelError as exc:
            self._counters.add("learned_state_unusable")
            self._report("state_unusable", f"{exc}; learning the confirmed windows again")
            restored = False
        if restored:
            installed = model.installed()
            serving.served = installed.serve
            applied = [e for e in entries if e.applied]
            serving.learned = Learned(
                installed.served(False),
                records={e.prediction_id: (e.personal_correct, e.global_correct) for e in applied},
                covered={e.prediction_id: e.label for e in applied},
            )
            self._learn_pending(serving, serving.learned)
        else:
            self._adopt(serving, personalise(model, entries, self._policy), entries)

    def adopt(self, version: str, model: ActivityModel, learned: Learned) -> None:
        """Serve a new version with the state :func:`personalise` gave it; confirmations that
        arrived meanwhile are learned on it now."""
        serving = self._serving = _Serving(version, model)
        if model.personalisable:
            self._adopt(serving, learned, self._store.replay_entries())

    def confirm(
        self, prediction_id: str, label: str, window: npt.NDArray[np.float32], ts: float
    ) -> ConfirmOutcome:
        """Keep a confirmation (a later correction replaces the label) and learn it."""
        stored = self._store.add_confirmation(prediction_id, label, window, ts)
        if stored == "duplicate":
            self._counters.add("confirmations_duplicate")  # a redelivery: learned already
            return ConfirmOutcome(stored)
        if stored == "corrected":
            self._counters.add("confirmations_corrected")
        serving = self._serving
        if serving is None or serving.learned is None:
            self._counters.add("confirmations_not_learned")
            return ConfirmOutcome(stored)
        refusal = self._learn_pending(
            serving, serving.learned, corrected=prediction_id if stored == "corrected" else None
        )
        return ConfirmOutcome(stored, refusal)

    def forget(self) -> int:
        """Drop every confirmation and what was learned from them: the global model answers."""
        forgotten = self._store.forget_confirmations()
        for path in self._dir.glob("*.state"):
            path.unlink(missing_ok=True)
        serving = self._serving
        if serving is not None and serving.learned is not None:
            serving.learned = Learned(serving.model.nothing_learned())
            self._persist(serving, serving.learned)
        self._counters.add("forgets")
        self._counters.add("confirmations_forgotten", forgotten)
        log.info("forgot %d confirmations: serving the global model", forgotten)
        return forgotten

    # ------------------------------------------------------------------------------ internals
    def _learn_pending(
        self, serving: _Serving, learned: Learned, corrected: str | None = None
    ) -> str | None:
        """Learn every stored confirmation not yet in the learned state, in order; persist."""
        entries = self._store.replay_entries()
        refusal = None
        for i, entry in enumerate(entries):
            if entry.applied:
                continue
            started = time.perf_counter()
            # Everything up to this one, and what was learned after it (a corrected label).
            known = [e for j, e in enumerate(entries) if j <= i or e.applied]
            reason = step(
                serving.model,
                learned,
                known,
                entry,
                self._policy,
                scored=entry.prediction_id != corrected,
            )
            if reason is not None:
                refusal = reason
                self._counters.add("learn_refused")
                log.info("learned state not adopted: %s", reason)
            else:
                self._counters.add("learn_adopted")
            self._persist(serving, learned)
            self._store.mark_learned({entry.prediction_id: learned.records[entry.prediction_id]})
            self._latencies.record("learn_and_persist", time.perf_counter() - started)
            self._counters.add("confirmations_applied")  # last: tests wait on it
        learned.keep_recent_records(self._policy.guard_window)
        return refusal

    def _adopt(self, serving: _Serving, learned: Learned, entries: Sequence[ReplayEntry]) -> None:
        """Serve ``learned``; confirmations it does not include (as they are now) are learned."""
        serving.learned = learned
        self._persist(serving, learned)
        self._store.mark_pending_all()
        self._store.mark_learned(
            {
                e.prediction_id: learned.records.get(e.prediction_id, (None, None))
                for e in entries
                if learned.covered.get(e.prediction_id) == e.label
            }
        )
        self._learn_pending(serving, learned)

    def _persist(self, serving: _Serving, learned: Learned) -> None:
        served = learned.served(self._policy)
        was_serving = serving.served
        serving.model.install(served)
        serving.model.save_state(self.state_path(serving.version))
        serving.served = served.serve
        if served.serve != was_serving:
            self._counters.add("learned_state_served" if served.serve else "global_model_served")
            log.info(
                "serving %s",
                "the learned state" if served.serve else "the global model (nothing learned)",
            )
