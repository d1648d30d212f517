"""On-device learning: what a wearer's answers teach the device, and the guard on it.

No MQTT here. The agent's worker thread calls :class:`DeviceLearner`; the updater personalises
and gates a new version with :func:`personalise` and :func:`gate`; ``bench/personalize.py`` and
the tests drive them directly, through the same code.

Three ways of answering, each a function of the global model and the answers (docs/model.md):

1. **global**: the model as the trainer made it.
2. **aligned**: the global model reading the device through its placement: the rotation that
   turns the mean gravity of each confirmed activity, and the differences between them, onto
   those of the training data (TRIAD, a closed form). A rotation under ``min_rotation_deg`` is
   how people's postures differ, not a device worn turned: then there is none. With one
   activity confirmed, only a larger tilt than that is corrected (rotation about gravity is
   invisible in one posture).
3. **corrected**: aligned, plus a correction of the last layer fitted from zero by the model's
   ``learn`` on the latest answers of each activity, beside the memory of training data the
   model ships, pulled towards the global weights. A fit that costs an activity the wearer has
   not confirmed more than ``memory_tolerance`` of its recall on the memory is refused: the
   corrected way is then the aligned one.

**The guard.** Each answer is scored before it is learned by the three ways as they were then
(a held-out record, in time order): the probability each gave the confirmed activity. Over the
last ``guard_window`` records, a learned way may answer only if, for every activity the wearer
confirmed, it was not wrong on more of its answers than the global model and did not lose more
than ``activity_tolerance`` of score there, and if its total gain over the global model is at
least ``guard_margin`` answers' worth (score ``1 - (1 - p)^2``; ``turned_margin`` once the
answered postures show the device worn turned, a placement the global model was not made
for). Of the ways that may, the one that gained most answers; otherwise the global model does,
unchanged. A record read with a tilt
found from one activity, which the placement has since left by more than
``placement_change_deg``, is left out: it judged a placement the device no longer has.

The records stay with the answers (the agent's store), so a new model version is served the
way the same evidence chose before it; the updater's gate compares that way on the new version
with the same way on the current one, each scored on answers it had not learned.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import numpy.typing as npt

from activity_model.runtime import ActivityModel, PersonalState
from device_agent.store import AgentStore, ReplayEntry
from shared.counters import Counters, LatencyRecorder
from shared.errors import ModelError
from shared.mqtt_transport import Outbound

log = logging.getLogger(__name__)

Way = Literal["global", "aligned", "corrected"]
WAYS: tuple[Way, ...] = ("global", "aligned", "corrected")
LEARNED_WAYS: tuple[Way, ...] = ("aligned", "corrected")
IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)


@dataclass(frozen=True, slots=True)
class LearningPolicy:
    """The device's side of on-device learning; the model carries the fit's own settings.

    Defaults chosen on validation users with ``bench/personalize.py`` (docs/model.md).
    """

    min_rotation_deg: float = 25.0  # smaller placements are how postures differ: not corrected
    max_per_class: int = 50  # most recent confirmed windows of each activity a fit reads
    memory_tolerance: float = 0.05  # recall a memory class may lose before a fit is refused
    guard_window: int = 50  # the latest answers the guard weighs
    guard_margin: float = 2.0  # answers' worth a learned way must gain over the global model
    # The margin once the answered postures show the device worn turned (a placement of at
    # least ``min_rotation_deg``): the global model was not made for it.
    turned_margin: float = 1.25
    # A record read with a one-activity tilt this far from the current placement says nothing
    # about it.
    placement_change_deg: float = 20.0
    activity_tolerance: float = 0.05  # mean score a confirmed activity may lose
    ways: tuple[Way, ...] = LEARNED_WAYS  # the learned ways the guard may choose
    # "quadratic": an answer scores 1 - (1 - p)^2, p the probability given the confirmed
    # activity; "right": 1 when it was the answer, else 0 (bench/personalize.py compares them).
    guard_score: Literal["quadratic", "right"] = "quadratic"
    # The records of each activity's first answers this many, read by ways that had not yet
    # learned that activity, are left out once it has been learned (0: every record counts).
    cold_answers: int = 0
    # False serves the corrected way whatever the records say: only for comparing methods in
    # bench/personalize.py.
    guard: bool = True

    def __post_init__(self) -> None:
        if not 0 <= self.min_rotation_deg <= 180 or not 0 <= self.placement_change_deg <= 180:
            raise ValueError("min_rotation_deg and placement_change_deg must be within 0..180")
        if self.max_per_class < 1 or self.guard_window < 1:
            raise ValueError("max_per_class and guard_window must be >= 1")
        if not 0 <= self.memory_tolerance <= 1 or not 0 <= self.activity_tolerance <= 1:
            raise ValueError("memory_tolerance and activity_tolerance must be within 0..1")
        if min(self.guard_margin, self.turned_margin, self.cold_answers) < 0:
            raise ValueError("guard_margin, turned_margin and cold_answers must be >= 0")
        if not self.ways or any(way not in LEARNED_WAYS for way in self.ways):
            raise ValueError(f"ways must be some of {', '.join(LEARNED_WAYS)}")
        if self.guard_score not in ("quadratic", "right"):
            raise ValueError("guard_score must be quadratic or right")


# ---------------------------------------------------------------------------------- placement
def _unit(vectors: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    norms = np.linalg.norm(vectors, axis=-1, keepdims=True)
    unit: npt.NDArray[np.float64] = vectors / np.maximum(norms, 1e-9)
    return unit


def _kabsch(
    source: npt.NDArray[np.float64],
    target: npt.NDArray[np.float64],
    weights: npt.NDArray[np.float64],
) -> npt.NDArray[np.float64]:
    """The rotation R minimising sum w |R s - t|^2 over rows s, t."""
    u, _, vt = np.linalg.svd((source * weights[:, None]).T @ target)
    d = np.sign(np.linalg.det(vt.T @ u.T)) or 1.0
    rotation: npt.NDArray[np.float64] = vt.T @ np.diag([1.0, 1.0, d]) @ u.T
    return rotation


def _shortest_rotation(
    source: npt.NDArray[np.float64], target: npt.NDArray[np.float64]
) -> npt.NDArray[np.float64]:
    """The smallest rotation turning the direction ``source`` onto ``target``."""
    a, b = _unit(source), _unit(target)
    axis, cos = np.cross(a, b), float(a @ b)
    if np.linalg.norm(axis) < 1e-9:
        if cos > 0:
            return np.eye(3)
        # Opposite directions: half a turn about any axis across them.
        across = _unit(np.cross(a, np.eye(3)[int(np.argmin(np.abs(a)))]))
        half_turn: npt.NDArray[np.float64] = 2.0 * np.outer(across, across) - np.eye(3)
        return half_turn
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    rotation: npt.NDArray[np.float64] = np.eye(3) + k + k @ k / (1.0 + cos)
    return rotation


def rotation_degrees(rotation: npt.NDArray[np.floating]) -> float:
    """The angle of a rotation matrix, in degrees."""
    cos = (float(np.trace(rotation)) - 1.0) / 2.0
    return math.degrees(math.acos(min(1.0, max(-1.0, cos))))


DIFFERENCE_WEIGHT = 4.0  # how much the differences between activities' gravity count (TRIAD)


def placement(
    windows: npt.NDArray[np.float32],
    labels: npt.NDArray[np.int64],
    class_gravity: npt.NDArray[np.float32],
    min_rotation_deg: float,
) -> npt.NDArray[np.float32]:
    """The rotation R (3x3) that turns this device's readings (a -> R a) into the training
    data's frame, found from each confirmed activity's mean acceleration (its gravity).

    With two or more activities (at least two answers each): the weighted Kabsch fit of their
    mean directions onto the training data's, together with the directions of their
    differences (TRIAD): two postures whose gravity differs by a few degrees still give the
    rotation about gravity. With one: the smallest rotation of its gravity onto the training
    data's. A result under ``min_rotation_deg`` (or no usable activity) is the identity.
    """
    known = np.linalg.norm(class_gravity, axis=1) > 1e-3
    counts = np.bincount(labels, minlength=len(class_gravity))
    classes = [c for c in range(len(class_gravity)) if known[c] and counts[c] >= 2]
    if not classes:
        return np.eye(3, dtype=np.float32)
    seen = np.stack([windows[labels == c].mean(axis=(0, 1)) for c in classes]).astype(np.float64)
    target = class_gravity[classes].astype(np.float64)
    if len(classes) == 1:
        rotation = _shortest_rotation(seen[0], target[0])
    else:
        sources, targets = [_unit(seen)], [_unit(target)]
        weights = [np.ones(len(classes))]
        seen_diff, target_diff = seen - seen.mean(0), target - target.mean(0)
        usable_diff = (np.linalg.norm(seen_diff, axis=1) > 1e-6) & (
            np.linalg.norm(target_diff, axis=1) > 1e-6
        )
        sources.append(_unit(seen_diff[usable_diff]))
        targets.append(_unit(target_diff[usable_diff]))
        weights.append(np.full(int(usable_diff.sum()), DIFFERENCE_WEIGHT))
        rotation = _kabsch(
            np.concatenate(sources), np.concatenate(targets), np.concatenate(weights)
        )
    if rotation_degrees(rotation) < min_rotation_deg:
        return np.eye(3, dtype=np.float32)
    return rotation.astype(np.float32)


# ---------------------------------------------------------------------------------- fitting
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


@dataclass(frozen=True, slots=True)
class Ways:
    """The two learned ways of answering (neither served yet), and why a correction was
    refused (then ``corrected`` is ``aligned``)."""

    aligned: PersonalState
    corrected: PersonalState
    refusal: str | None = None
    placed_by: int = 0  # activities the placement was found from (0: none applied)

    @classmethod
    def nothing_learned(cls, model: ActivityModel) -> Ways:
        blank = model.nothing_learned()
        return cls(blank, blank)

    def state(self, way: Way) -> PersonalState:
        """The personal state to install for ``way``: the global model keeps what was learned
        beside it, unserved."""
        if way == "global":
            return self.corrected.served(False)
        return (self.aligned if way == "aligned" else self.corrected).served(True)


def fit(model: ActivityModel, entries: Sequence[ReplayEntry], policy: LearningPolicy) -> Ways:
    """The learned ways these answers teach: a function of the model and the answers."""
    windows, labels = usable(model, entries, policy.max_per_class)
    if labels.size == 0:
        return Ways.nothing_learned(model)
    blank = model.nothing_learned()
    align = placement(windows, labels, model.class_gravity, policy.min_rotation_deg)
    aligned = PersonalState(align, blank.kernel_delta, blank.bias_delta)
    corrected, _ = model.learn(
        windows, labels.astype(np.int32), np.ones(labels.size, np.float32), align
    )
    refusal = memory_refusal(model, corrected, {model.labels[int(c)] for c in labels}, policy)
    placed_by = 0 if np.array_equal(align, np.eye(3)) else placing_activities(labels)
    return Ways(aligned, aligned if refusal else corrected, refusal, placed_by)


def placing_activities(labels: npt.NDArray[np.int64]) -> int:
    """How many activities have the two answers :func:`placement` needs of each."""
    return int((np.bincount(labels) >= 2).sum()) if labels.size else 0


def memory_refusal(
    model: ActivityModel, state: PersonalState, shown: set[str], policy: LearningPolicy
) -> str | None:
    """Why ``state`` must not be adopted, or None: an activity the wearer has not confirmed lost
    more than ``memory_tolerance`` of its recall on the memory. (For an activity they did
    confirm, their own answers say how it looks on them.)"""
    check = model.memory_check(state)
    for label in np.unique(check.labels):
        name = model.labels[int(label)]
        if name in shown:
            continue
        mine = check.labels == label
        lost = float(check.global_correct[mine].mean() - check.correct[mine].mean())
        if lost > policy.memory_tolerance:
            return f"{name} recall on the memory would fall by {lost:.0%}"
    return None


# ---------------------------------------------------------------------------------- the guard
@dataclass(frozen=True, slots=True)
class Record:
    """How each way read one answer before it was learned: the probability it gave the
    confirmed activity, and whether that activity was its answer (global, aligned, corrected);
    and the placement (the aligned way's rotation, row by row) the learned ways read it with,
    found from ``placed_by`` activities (0: none applied)."""

    probability: tuple[float, float, float]
    correct: tuple[bool, bool, bool]
    placement: tuple[float, ...] = IDENTITY
    placed_by: int = 0

    def to_json(self) -> str:
        placement = [round(v, 5) for v in self.placement]
        return json.dumps([list(self.probability), list(self.correct), placement, self.placed_by])

    @classmethod
    def from_json(cls, text: str) -> Record:
        probability, correct, *rest = json.loads(text)
        p = tuple(float(v) for v in probability)
        c = tuple(bool(v) for v in correct)
        placement = tuple(float(v) for v in rest[0]) if rest else IDENTITY
        placed_by = int(rest[1]) if len(rest) > 1 else 0
        if len(p) != len(WAYS) or len(c) != len(WAYS) or len(placement) != 9:
            raise ValueError(f"a record has {len(WAYS)} ways and a 3x3 placement")
        return cls((p[0], p[1], p[2]), (c[0], c[1], c[2]), placement, placed_by)

    def read_with_a_tilt_since_moved(
        self, placement: npt.NDArray[np.floating], degrees: float
    ) -> bool:
        """Whether this record was made with a placement found from one activity (a tilt, the
        turn about gravity unknown) that the current ``placement`` has moved away from by more
        than ``degrees``: then it says nothing about the current one."""
        return self.placed_by == 1 and self.placement_moved(placement) > degrees

    def placement_moved(self, placement: npt.NDArray[np.floating]) -> float:
        """Degrees between the placement this record was made with and ``placement``."""
        mine = np.asarray(self.placement, np.float64).reshape(3, 3)
        return rotation_degrees(mine.T @ np.asarray(placement, np.float64))

    def score(self, way: Way, kind: str = "quadratic") -> float:
        """How well ``way`` read the answer: the quadratic score of the probability it gave
        the confirmed activity (1: certain and right), or 1/0 for right/wrong (``right``)."""
        index = WAYS.index(way)
        if kind == "right":
            return float(self.correct[index])
        return 1.0 - (1.0 - self.probability[index]) ** 2


def score(model: ActivityModel, ways: Ways, entry: ReplayEntry) -> Record | None:
    """How the three ways read ``entry`` (None: this model cannot read it)."""
    windows, labels = usable(model, [entry])
    if labels.size == 0:
        return None
    aligned, global_ = model.evaluate(windows, ways.aligned)
    corrected, _ = model.evaluate(windows, ways.corrected)
    rows = (global_[0], aligned[0], corrected[0])
    label = int(labels[0])
    return Record(
        (float(rows[0][label]), float(rows[1][label]), float(rows[2][label])),
        (
            bool(rows[0].argmax() == label),
            bool(rows[1].argmax() == label),
            bool(rows[2].argmax() == label),
        ),
        tuple(float(v) for v in ways.aligned.align.ravel()),
        ways.placed_by,
    )


Evidence = Sequence[tuple[str, Record]]  # (the confirmed activity, its record), oldest first


def gains(evidence: Evidence, way: Way, policy: LearningPolicy) -> float | None:
    """``way``'s total gain in score over the global model on ``evidence``, or None if on
    some confirmed activity it was wrong more often than the global model, or lost more than
    ``activity_tolerance`` of mean score."""
    by_activity: dict[str, list[Record]] = {}
    for activity, record in evidence:
        by_activity.setdefault(activity, []).append(record)
    index = WAYS.index(way)
    total = 0.0
    for records in by_activity.values():
        won = sum(r.correct[index] and not r.correct[0] for r in records)
        lost = sum(r.correct[0] and not r.correct[index] for r in records)
        kind = policy.guard_score
        gain = sum(r.score(way, kind) - r.score("global", kind) for r in records)
        if lost > won or gain / len(records) < -policy.activity_tolerance:
            return None
        total += gain
    return total


def warm(evidence: Evidence, cold_answers: int) -> list[tuple[str, Record]]:
    """The records without those of each activity's first ``cold_answers`` answers (read by
    ways that had not learned it yet), once later answers of it have been learned."""
    if cold_answers == 0:
        return list(evidence)
    counts: dict[str, int] = {}
    for activity, _ in evidence:
        counts[activity] = counts.get(activity, 0) + 1
    seen: dict[str, int] = {}
    kept = []
    for activity, record in evidence:
        seen[activity] = seen.get(activity, 0) + 1
        if seen[activity] > cold_answers or counts[activity] <= cold_answers:
            kept.append((activity, record))
    return kept


def choose(
    evidence: Evidence, policy: LearningPolicy, placement: npt.NDArray[np.floating] | None = None
) -> Way:
    """The way that answers, from the records of the last ``guard_window`` answers; with the
    current ``placement``, leaving out those read with a tilt found from one activity that the
    placement has since moved away from by more than ``placement_change_deg``."""
    if not policy.guard:
        return "corrected"
    recent = warm(evidence, policy.cold_answers)[-policy.guard_window :]
    if placement is not None:
        recent = [
            (activity, record)
            for activity, record in recent
            if not record.read_with_a_tilt_since_moved(placement, policy.placement_change_deg)
        ]
    margin = policy.guard_margin
    if placement is not None and rotation_degrees(placement) >= max(policy.min_rotation_deg, 1.0):
        margin = policy.turned_margin
    best: Way = "global"
    best_gain = 0.0
    for way in policy.ways:
        gain = gains(recent, way, policy)
        if gain is not None and gain >= margin and gain > best_gain:
            best, best_gain = way, gain
    return best


@dataclass
class Learned:
    """A model's learned ways, the guard's records, and which answers they include.

    ``covered`` maps each answer the ways include to the label it was learned with.
    """

    ways: Ways
    records: dict[str, tuple[str, Record]] = field(default_factory=dict)
    covered: dict[str, str] = field(default_factory=dict)

    def way(self, policy: LearningPolicy) -> Way:
        return choose(list(self.records.values()), policy, self.ways.aligned.align)

    def keep_recent_records(self, window: int) -> None:
        for key in list(self.records)[: max(0, len(self.records) - 4 * window)]:
            del self.records[key]


def evidence_of(entries: Sequence[ReplayEntry]) -> dict[str, tuple[str, Record]]:
    """The stored records of learned answers, oldest first (unreadable ones left out)."""
    evidence = {}
    for entry in entries:
        if entry.applied and entry.record:
            try:
                evidence[entry.prediction_id] = (entry.label, Record.from_json(entry.record))
            except (ValueError, TypeError):
                continue
    return evidence


def personalise(
    model: ActivityModel, entries: Sequence[ReplayEntry], policy: LearningPolicy
) -> Learned:
    """The ways ``model`` learns from these answers, and the records it earns on the last
    ``guard_window`` of them, each scored by the ways fitted on the answers before it (the
    device's own steps, replayed): the held-out evidence of a new version, or of answers whose
    records were lost."""
    start = max(0, len(entries) - policy.guard_window)
    records: dict[str, tuple[str, Record]] = {}
    ways = fit(model, entries[:start], policy)
    for i in range(start, len(entries)):
        record = score(model, ways, entries[i])
        if record is not None:
            records[entries[i].prediction_id] = (entries[i].label, record)
        ways = fit(model, entries[: i + 1], policy)
    return Learned(ways, records, {e.prediction_id: e.label for e in entries})


@dataclass(frozen=True, slots=True)
class GateVerdict:
    """A new version judged on the device: the way it would answer (chosen by the stored
    records), its accuracy that way on the latest answers, each held out, beside the version in
    use's on the same answers, and why it is refused (None: accepted)."""

    way: Way
    accuracy: float | None
    current_accuracy: float | None
    scored: int
    refusal: str | None = None


def gate(
    learned: Learned,
    evidence: dict[str, tuple[str, Record]],
    policy: LearningPolicy,
    *,
    accept_margin: float,
    min_scored: int,
) -> GateVerdict:
    """Judge a new version personalised as ``learned`` (:func:`personalise`) against the
    stored ``evidence`` of the version in use: both answering the way the evidence chooses,
    on the same latest answers. Refused when worse by more than ``accept_margin`` over at least
    ``min_scored`` answers."""
    way = choose(list(evidence.values()), policy, learned.ways.aligned.align)
    index = WAYS.index(way)
    common = [pid for pid in learned.records if pid in evidence][-policy.guard_window :]
    if not common:
        return GateVerdict(way, None, None, 0)
    after = sum(learned.records[pid][1].correct[index] for pid in common) / len(common)
    before = sum(evidence[pid][1].correct[index] for pid in common) / len(common)
    refusal = None
    if len(common) >= min_scored and after < before - accept_margin:
        refusal = (
            f"scores {after:.3f} on this device's {len(common)} held-out confirmations, "
            f"answering the {way} way, against {before:.3f} for the version in use: worse by "
            f"more than the margin {accept_margin}"
        )
    return GateVerdict(way, after, before, len(common), refusal)


# ---------------------------------------------------------------------------------- the learner
@dataclass(frozen=True, slots=True)
class ConfirmOutcome:
    stored: Literal["new", "corrected", "duplicate", "forgotten"]
    refusal: str | None = None  # why the last fitted correction was refused


@dataclass
class _Serving:
    """The version the device serves, and what it learned on it (None: it cannot learn)."""

    version: str
    model: ActivityModel
    learned: Learned | None = None
    way: Way = "global"  # what ``predict`` answers with now


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
    def way(self) -> Way:
        """How the device answers now. The worker thread sets it when it installs a state: the
        status, on another thread, reads it without touching the records."""
        serving = self._serving
        return "global" if serving is None else serving.way

    @property
    def serving(self) -> bool:
        """Whether a learned way answers predictions now (else the global model does)."""
        return self.way != "global"

    def ways(self) -> Ways | None:
        """What the device learned on the version it serves (served or not); None if it cannot
        learn on it."""
        serving = self._serving
        return None if serving is None or serving.learned is None else serving.learned.ways

    def state_path(self, version: str) -> Path:
        return self._dir / f"{version}.state"

    def evidence(self) -> list[tuple[str, Record]]:
        """The guard's stored records, oldest first (what chooses the way on any version)."""
        return list(evidence_of(self._store.replay_entries()).values())

    def attach(self, version: str, model: ActivityModel) -> None:
        """Serve ``version``: its persisted state at once if it is intact, then the ways its
        answers teach, chosen by their stored records (answers whose records are missing, e.g.
        after an upgrade, earn them again as on the device, in order)."""
        serving = self._serving = _Serving(version, model)
        if not model.personalisable:
            log.warning("model %s cannot learn on the device: confirmations are kept", version)
            return
        try:
            # What it served before the restart answers at once; the ways are fitted below.
            if model.restore_state(self.state_path(version)) and model.installed().serve:
                serving.way = "corrected"
        except ModelError as exc:
            self._counters.add("learned_state_unusable")
            self._report("state_unusable", f"{exc}; learning the confirmed windows again")
        entries = self._store.replay_entries()
        applied = [e for e in entries if e.applied]
        recent = applied[-self._policy.guard_window :]
        evidence = evidence_of(applied)
        if any(e.prediction_id not in evidence for e in recent):
            replayed = personalise(model, applied, self._policy)
            self._store.mark_learned(
                {pid: record.to_json() for pid, (_, record) in replayed.records.items()}
            )
            evidence = evidence_of(self._store.replay_entries())
            ways = replayed.ways
        else:
            ways = fit(model, applied, self._policy)
        covered = {e.prediction_id: e.label for e in applied}
        serving.learned = Learned(ways, evidence, covered)
        self._persist(serving, serving.learned)
        self._learn_pending(serving, serving.learned)

    def adopt(self, version: str, model: ActivityModel, learned: Learned) -> None:
        """Serve a new version with the ways :func:`personalise` fitted on it, chosen by the
        stored records (the evidence before it); answers that arrived meanwhile are learned."""
        serving = self._serving = _Serving(version, model)
        if not model.personalisable:
            return
        entries = self._store.replay_entries()
        current = {e.prediction_id: e for e in entries}
        evidence = evidence_of(entries)
        still = {
            pid: label
            for pid, label in learned.covered.items()
            if pid in current and current[pid].label == label and current[pid].applied
        }
        serving.learned = Learned(
            learned.ways, {p: r for p, r in evidence.items() if p in still}, still
        )
        self._store.mark_pending_except(set(still))
        self._persist(serving, serving.learned)
        self._learn_pending(serving, serving.learned)

    def confirm(
        self, prediction_id: str, label: str, window: npt.NDArray[np.float32], ts: float
    ) -> ConfirmOutcome:
        """Keep a confirmation (a later correction replaces the label) and learn it."""
        stored = self._store.add_confirmation(prediction_id, label, window, ts)
        if stored == "duplicate":
            self._counters.add("confirmations_duplicate")  # a redelivery: learned already
            return ConfirmOutcome(stored)
        if stored == "forgotten":
            self._counters.add("confirmations_after_forget")  # a late copy: not kept
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

    def forget(self, before: float, tell: tuple[Outbound, str] | None = None) -> int:
        """Drop every confirmation and what was learned from them (and keep confirmations given
        until ``before`` out): the global model answers. ``tell`` (a message and its receipt
        key) is queued for the trainer in the same transaction as the confirmations go."""
        forgotten = self._store.forget_confirmations(before, tell)
        for path in self._dir.glob("*.state"):
            path.unlink(missing_ok=True)
        serving = self._serving
        if serving is not None and serving.learned is not None:
            serving.learned = Learned(Ways.nothing_learned(serving.model))
            self._persist(serving, serving.learned)
        self._counters.add("forgets")
        self._counters.add("confirmations_forgotten", forgotten)
        log.info("forgot %d confirmations: serving the global model", forgotten)
        return forgotten

    # ------------------------------------------------------------------------------ internals
    def _learn_pending(
        self, serving: _Serving, learned: Learned, corrected: str | None = None
    ) -> str | None:
        """Learn every stored answer not yet learned, in order: score it with the ways as they
        are (unless it corrects an answer they learned: not held out), fit again, persist."""
        entries = self._store.replay_entries()
        refusal = None
        for i, entry in enumerate(entries):
            if entry.applied:
                continue
            started = time.perf_counter()
            pid = entry.prediction_id
            record = score(serving.model, learned.ways, entry) if pid != corrected else None
            learned.records.pop(pid, None)  # a correction's old record was for another label
            if record is not None:
                learned.records[pid] = (entry.label, record)
            # Everything up to this one, and what was learned after it (a corrected label).
            known = [e for j, e in enumerate(entries) if j <= i or e.applied]
            learned.ways = fit(serving.model, known, self._policy)
            learned.covered[pid] = entry.label
            if learned.ways.refusal is not None:
                refusal = learned.ways.refusal
                self._counters.add("learn_refused")
                log.info("correction not adopted: %s", refusal)
            else:
                self._counters.add("learn_adopted")
            self._persist(serving, learned)
            self._store.mark_learned({pid: None if record is None else record.to_json()})
            self._latencies.record("learn_and_persist", time.perf_counter() - started)
            self._counters.add("confirmations_applied")  # last: tests wait on it
        learned.keep_recent_records(self._policy.guard_window)
        return refusal

    def _persist(self, serving: _Serving, learned: Learned) -> None:
        way = learned.way(self._policy)
        serving.model.install(learned.ways.state(way))
        serving.model.save_state(self.state_path(serving.version))
        if way != serving.way:
            if (way == "global") != (serving.way == "global"):
                self._counters.add(
                    "global_model_served" if way == "global" else "learned_state_served"
                )
            log.info("answering with the %s", _DESCRIBED[way])
        serving.way = way


_DESCRIBED: dict[Way, str] = {
    "global": "global model",
    "aligned": "global model read through the device's placement",
    "corrected": "learned state (placement and correction)",
}
