"""On-device learning without a broker: the learner, its guard, its persistence, its store."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from activity_model.loading import load_model
from device_agent.learning import (
    WAYS,
    DeviceLearner,
    LearningPolicy,
    Record,
    choose,
    gains,
    personalise,
    placement,
    recent_per_class,
    rotation_degrees,
    warm,
)
from device_agent.store import SCHEMA_VERSION, AgentStore
from shared.counters import Counters, LatencyRecorder
from simulator.tiny_model import LABELS, export_tiny_version, synthetic_windows

TURN_X = np.array([[1, 0, 0], [0, 0, -1], [0, 1, 0]], np.float32)  # 90 degrees about x


def rotation(angles: tuple[float, float, float]) -> np.ndarray:
    a, b, c = angles
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rz = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
    return rz @ ry @ rx


angles = st.tuples(*[st.floats(-np.pi, np.pi, allow_nan=False)] * 3)
GRAVITY = np.array([[0.0, 9.8, 0.0], [0.0, 0.0, 9.8], [9.8, 0.0, 0.0]], np.float32)


def worn(turn: np.ndarray, labels: list[int], gravity: np.ndarray = GRAVITY) -> np.ndarray:
    """Windows whose samples are each class's gravity as a device turned by ``turn`` reads it."""
    return (gravity[labels] @ turn.T)[:, None, :].repeat(4, axis=1).astype(np.float32)


# ------------------------------------------------------------------------------ placement
@settings(max_examples=60, deadline=None)
@given(angles)
def test_placement_recovers_how_the_device_is_turned(turn_angles: Any) -> None:
    """Two activities worn turned by R (at least two answers each): placement gives R^-1, or
    nothing when R is within how postures differ."""
    turn = rotation(turn_angles)
    labels = [0, 1, 0, 1, 0]
    found = placement(worn(turn, labels), np.array(labels), GRAVITY, min_rotation_deg=25.0)
    if rotation_degrees(turn) >= 25.5:
        np.testing.assert_allclose(found @ turn, np.eye(3), atol=1e-4)
    elif rotation_degrees(turn) < 24.5:
        np.testing.assert_array_equal(found, np.eye(3))


def test_two_postures_a_few_degrees_apart_give_the_turn_about_gravity() -> None:
    """Sitting and Standing differ by a tilt of a few degrees; a device turned about the axis
    gravity lies on keeps both gravities, yet their difference shows the turn (TRIAD)."""
    tilt = np.radians(8.0)
    gravity = np.array([[9.8, 0, 0], [9.8 * np.cos(tilt), 9.8 * np.sin(tilt), 0]], np.float32)
    turn = rotation((np.radians(90.0), 0.0, 0.0))  # about x, where gravity lies
    labels = [0, 0, 1, 1]
    found = placement(worn(turn, labels, gravity), np.array(labels), gravity, 25.0)
    np.testing.assert_allclose(found @ turn, np.eye(3), atol=1e-3)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 2), st.floats(-20, 20), st.floats(-20, 20)), max_size=30),
    st.floats(0, 180),
)
def test_placement_is_always_a_proper_rotation(rows: Any, min_degrees: float) -> None:
    labels = np.array([r[0] for r in rows], np.int64)
    windows = np.array([[[r[1], r[2], 1.0]] * 2 for r in rows], np.float32).reshape(-1, 2, 3)
    gravity = np.array([[0.0, 9.8, 0.0], [0.0, 0.0, 9.8], [0.0, 0.0, 0.0]], np.float32)
    found = placement(windows, labels, gravity, min_degrees)
    np.testing.assert_allclose(found @ found.T, np.eye(3), atol=1e-4)
    assert np.linalg.det(found) == pytest.approx(1.0, abs=1e-4)


def test_placement_stays_put_without_evidence() -> None:
    none = placement(np.zeros((0, 4, 3), np.float32), np.zeros(0, np.int64), GRAVITY, 25.0)
    np.testing.assert_array_equal(none, np.eye(3))
    once = placement(worn(TURN_X, [1]), np.array([1]), GRAVITY, 25.0)  # one answer is no class
    np.testing.assert_array_equal(once, np.eye(3))
    unknown = placement(np.ones((4, 4, 3), np.float32), np.array([0, 1, 0, 1]), GRAVITY * 0, 25.0)
    np.testing.assert_array_equal(unknown, np.eye(3))


def test_one_posture_corrects_only_a_tilt_larger_than_postures_differ() -> None:
    small = rotation((np.radians(15.0), 0.0, 0.0))
    assert np.array_equal(placement(worn(small, [0, 0]), np.array([0, 0]), GRAVITY, 25), np.eye(3))
    large = rotation((np.radians(70.0), 0.0, 0.0))
    found = placement(worn(large, [0, 0]), np.array([0, 0]), GRAVITY, 25.0)
    np.testing.assert_allclose(worn(large, [0]) @ found.T, worn(np.eye(3), [0]), atol=1e-3)
    upside_down = rotation((np.pi, 0.0, 0.0))
    found = placement(worn(upside_down, [0, 0]), np.array([0, 0]), GRAVITY, 25.0)
    np.testing.assert_allclose(worn(upside_down, [0]) @ found.T, worn(np.eye(3), [0]), atol=1e-3)


@given(st.lists(st.integers(0, 3), max_size=40), st.integers(1, 5))
def test_recent_per_class_keeps_the_latest_of_each_label(labels: list[int], most: int) -> None:
    array = np.array(labels, np.int64)
    kept = recent_per_class(array, most)
    assert list(kept) == sorted(kept)
    for label in set(labels):
        latest = np.flatnonzero(array == label)[-most:]
        assert set(latest.tolist()) == {int(i) for i in kept if array[i] == label}


# ------------------------------------------------------------------------------ the guard
def record(global_p: float, aligned_p: float, corrected_p: float) -> Record:
    """A record where a way answered right when it gave the activity more than half."""
    p = (global_p, aligned_p, corrected_p)
    return Record(p, (p[0] > 0.5, p[1] > 0.5, p[2] > 0.5))


def test_the_guard_serves_a_learned_way_only_once_it_earned_it() -> None:
    policy = LearningPolicy()
    assert choose([], policy) == "global"
    same = [("Sitting", record(0.9, 0.9, 0.9))] * 20
    assert choose(same, policy) == "global"  # as good is not better
    better = [("Sitting", record(0.2, 0.9, 0.95))] * 4
    assert choose(better, policy) == "corrected"  # the larger gain
    assert choose(better[:3], policy) == "global"  # under the margin: 1.9 answers' worth
    lost_one = [*better, ("Standing", record(0.9, 0.9, 0.3))]
    assert choose(lost_one, policy) == "aligned"  # corrected was wrong on a Standing answer
    only_last = [("Sitting", record(0.2, 0.9, 0.9))] * 3 + [("Sitting", record(0.9, 0.9, 0.9))]
    assert choose(only_last, LearningPolicy(guard_window=1)) == "global"
    assert choose(same, LearningPolicy(guard=False)) == "corrected"
    assert choose(better, LearningPolicy(ways=("aligned",))) == "aligned"


def test_a_device_shown_turned_needs_only_the_turned_margin() -> None:
    """Once the answered postures show the device worn turned, the global model was not made
    for it: a learned way answers on ``turned_margin`` answers' worth of gain."""
    better = [("Sitting", record(0.2, 0.9, 0.95))] * 2  # about 1.3 answers' worth
    policy = LearningPolicy(turned_margin=1.0)
    turned = rotation((np.radians(90.0), 0.0, 0.0)).astype(np.float32)
    slightly = rotation((np.radians(10.0), 0.0, 0.0)).astype(np.float32)
    assert choose(better, policy, turned) == "corrected"
    assert choose(better, policy, np.eye(3)) == "global"  # upright: the full margin
    assert choose(better, policy, slightly) == "global"  # under min_rotation_deg: upright
    assert choose(better, LearningPolicy(turned_margin=2.0), turned) == "global"


def test_cold_records_leave_out_each_activitys_first_answers_once_it_was_learned() -> None:
    """With ``cold_answers``, the first answer of an activity (read by ways that had not learned
    it) stops counting once later answers of it were learned; a lone first answer still counts."""
    cold_loss = ("Sitting", record(0.9, 0.1, 0.1))
    learned = [("Sitting", record(0.2, 0.9, 0.95))] * 4
    assert choose([cold_loss, *learned], LearningPolicy()) == "global"
    assert choose([cold_loss, *learned], LearningPolicy(cold_answers=1)) == "corrected"
    assert warm([cold_loss, *learned], 1) == learned
    lone = [*learned, *learned[:2], ("Standing", record(0.9, 0.9, 0.1))]
    assert warm(lone, 1) == lone[1:]  # Sitting's first goes; Standing's only answer stays
    assert choose(lone, LearningPolicy(cold_answers=1)) == "aligned"
    assert warm(lone, 0) == lone


def test_a_record_read_with_a_tilt_the_placement_left_behind_is_no_evidence() -> None:
    """An answer scored while the placement was a one-activity tilt says nothing about the
    placement two activities found later, once the two differ."""
    turned = rotation((np.radians(90.0), 0.0, 0.0)).astype(np.float32)
    tilt = tuple(float(v) for v in np.eye(3).ravel())
    early = Record((0.9, 0.1, 0.1), (True, False, False), tilt, placed_by=1)
    later = [("Standing", Record((0.1, 0.9, 0.95), (False, True, True), tuple(turned.ravel()), 2))]
    evidence = [("Sitting", early), *later * 3]
    policy = LearningPolicy()
    assert choose(evidence, policy) == "global"  # without the placement: Sitting was lost
    assert choose(evidence, policy, turned) == "corrected"  # the tilt's record is left out
    assert choose(evidence, policy, np.eye(3)) == "global"  # the tilt still holds: it counts
    full = Record((0.9, 0.1, 0.1), (True, False, False), tilt, placed_by=2)
    assert choose([("Sitting", full), *later * 3], policy, turned) == "global"  # only tilts


def test_the_gate_judges_a_new_version_by_the_way_the_device_answers() -> None:
    """Both versions answer the way the stored records chose (here corrected), on the same
    answers, each held out: the new one is refused only if worse that way by the margin."""
    from activity_model.runtime import PersonalState
    from device_agent.learning import Learned, Ways, gate

    blank = PersonalState.nothing_learned(4, 3)
    stored = {f"p{i}": ("Sitting", record(0.2, 0.3, 0.95)) for i in range(12)}
    policy = LearningPolicy()

    def new_version(corrected_p: float, global_p: float) -> Learned:
        records = {pid: ("Sitting", record(global_p, 0.3, corrected_p)) for pid in stored}
        return Learned(Ways(blank, blank), records)

    # Its global model reads these answers right (it may have learned them): that does not
    # matter, the device would not answer with it.
    verdict = gate(new_version(0.1, 0.99), stored, policy, accept_margin=0.05, min_scored=10)
    assert verdict.way == "corrected"
    assert (verdict.accuracy, verdict.current_accuracy, verdict.scored) == (0.0, 1.0, 12)
    assert verdict.refusal is not None
    assert "corrected way" in verdict.refusal
    kept = gate(new_version(0.9, 0.1), stored, policy, accept_margin=0.05, min_scored=10)
    assert kept.refusal is None
    few = gate(new_version(0.1, 0.99), stored, policy, accept_margin=0.05, min_scored=13)
    assert few.refusal is None  # too few answers to judge


scores = st.floats(0.0, 1.0, allow_nan=False)
activities = st.sampled_from(["Walking", "Sitting", "Standing"])


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(activities, scores, scores, scores), max_size=60))
def test_a_chosen_way_never_loses_an_activity_and_always_gains_the_margin(rows: Any) -> None:
    policy = LearningPolicy()
    evidence = [(activity, record(g, a, c)) for activity, g, a, c in rows]
    way = choose(evidence, policy)
    if way == "global":
        return
    index = WAYS.index(way)
    recent = evidence[-policy.guard_window :]
    for activity in {a for a, _ in recent}:
        mine = [r for a, r in recent if a == activity]
        assert sum(r.correct[index] and not r.correct[0] for r in mine) >= sum(
            r.correct[0] and not r.correct[index] for r in mine
        )
    assert (gains(recent, way, policy) or 0.0) >= policy.guard_margin


@given(st.tuples(scores, scores, scores), st.tuples(*[st.booleans()] * 3))
def test_a_record_survives_its_storage(probability: Any, correct: Any) -> None:
    kept = Record(probability, correct)
    assert Record.from_json(kept.to_json()) == kept


# ------------------------------------------------------------------------------ the learner
@pytest.fixture(scope="module")
def version(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = export_tiny_version(tmp_path_factory.mktemp("v") / "v1", seed=1, steps=60)
    return folder / "saved_model"


@pytest.fixture
def model(version: Path) -> Any:

    return load_model(version)


class Device:
    """A learner over a real store and a real model, as the agent's worker drives it."""

    def __init__(self, root: Path, model: Any, policy: LearningPolicy | None = None) -> None:
        self.root = root
        self.model = model
        self.counters = Counters()
        self.store = AgentStore(root / "agent.sqlite3")
        self.problems: list[str] = []
        self.learner = DeviceLearner(
            self.store,
            root / "learned",
            policy or LearningPolicy(),
            counters=self.counters,
            latencies=LatencyRecorder(),
            report=lambda code, message: self.problems.append(code),
        )
        self.learner.attach("v1", model)

    def close(self) -> None:
        self.store.close()


@pytest.fixture
def device(tmp_path: Path, model: Any) -> Iterator[Device]:
    device = Device(tmp_path, model)
    yield device
    device.close()


def test_a_confirmation_is_stored_learned_and_persisted_once(device: Device) -> None:
    x, y = synthetic_windows(4, seed=7)
    outcome = device.learner.confirm("p1", LABELS[y[0]], x[0], 1.0)
    assert outcome.stored == "new"
    [entry] = device.store.replay_entries()
    assert entry.applied
    assert entry.label == LABELS[y[0]]
    assert entry.record is not None  # scored before it was learned
    assert (device.root / "learned" / "v1.state").is_file()
    installed = device.model.installed()
    assert device.learner.confirm("p1", LABELS[y[0]], x[0], 1.0).stored == "duplicate"
    assert device.counters.get("confirmations_applied") == 1
    np.testing.assert_array_equal(device.model.installed().kernel_delta, installed.kernel_delta)


def test_a_later_correction_replaces_the_label_and_is_learned_again(device: Device) -> None:
    x, _ = synthetic_windows(4, seed=7)
    device.learner.confirm("p1", "Walking", x[0], 1.0)
    first = device.learner.ways()
    assert first is not None
    assert device.learner.confirm("p1", "Laying", x[0], 0.5).stored == "duplicate"  # older
    assert device.learner.confirm("p1", "Laying", x[0], 2.0).stored == "corrected"
    [entry] = device.store.replay_entries()
    assert entry.label == "Laying"
    assert entry.applied
    assert entry.record is None  # the ways had learned this window: not held out
    again = device.learner.ways()
    assert again is not None
    assert not np.allclose(again.corrected.kernel_delta, first.corrected.kernel_delta)
    assert device.counters.get("confirmations_corrected") == 1


def test_forget_drops_everything_and_serves_the_global_model(device: Device) -> None:
    x, y = synthetic_windows(12, seed=7)
    turned = np.einsum("ntc,dc->ntd", x, TURN_X).astype(np.float32)
    global_answers = device.model.predict(turned).probabilities
    for i in range(12):
        device.learner.confirm(f"p{i}", LABELS[y[i]], turned[i], float(i))
    assert device.learner.serving  # learned to read the turned device (next test)
    assert device.learner.forget(before=11.0) == 12
    assert device.store.replay_entries() == []
    assert not device.learner.serving
    installed = device.model.installed()
    np.testing.assert_array_equal(installed.kernel_delta, 0)
    np.testing.assert_array_equal(installed.align, np.eye(3))
    np.testing.assert_allclose(device.model.predict(turned).probabilities, global_answers)
    assert device.counters.get("confirmations_forgotten") == 12
    # A late copy of an answer given before the forget is not kept again; a later one is.
    assert device.learner.confirm("p3", LABELS[y[3]], turned[3], 3.0).stored == "forgotten"
    assert device.learner.confirm("p99", LABELS[y[3]], turned[3], 12.0).stored == "new"


def test_a_device_worn_turned_is_learned_and_served_once_it_is_better(device: Device) -> None:
    x, y = synthetic_windows(40, seed=11)
    turned = np.einsum("ntc,dc->ntd", x, TURN_X).astype(np.float32)
    before = float(np.mean(device.model.predict(turned).class_index == y))
    assert before < 0.8  # the global model misreads a device worn turned
    served_at = None
    for i in range(20):
        device.learner.confirm(f"p{i}", LABELS[y[i]], turned[i], float(i))
        if served_at is None and device.learner.serving:
            served_at = i
    assert served_at is not None
    evidence = device.learner.evidence()
    way = WAYS.index(device.learner.way)
    assert sum(r.correct[way] for _, r in evidence) > sum(r.correct[0] for _, r in evidence)
    after = float(np.mean(device.model.predict(turned[20:]).class_index == y[20:]))
    assert after >= 0.95
    assert after > before + 0.15


def test_a_device_the_global_model_reads_right_keeps_the_global_model(device: Device) -> None:
    x, y = synthetic_windows(30, seed=13)
    answers = device.model.predict(x).probabilities
    for i in range(30):
        device.learner.confirm(f"p{i}", LABELS[y[i]], x[i], float(i))
    assert not device.learner.serving  # never better than the global model: not served
    np.testing.assert_allclose(device.model.predict(x).probabilities, answers, atol=1e-6)


def test_a_state_that_costs_untaught_classes_their_recall_is_refused(device: Device) -> None:
    # Without the memory and the anchor in the fit, a run of one lie wrecks the other classes:
    # the memory check must then keep the state out.
    device.model.tune_learning(fit_memory_weight=0.0, fit_anchor=0.0)
    x, y = synthetic_windows(60, seed=17)
    walking = x[y == 0]
    for i, window in enumerate(walking[:15]):
        device.learner.confirm(f"p{i}", "Laying", window, float(i))  # always the same lie
    assert device.counters.get("learn_refused") > 0
    check = device.model.memory_check(device.model.installed())
    for label in (0, 1):  # what the wearer never confirmed keeps its memory recall
        mine = check.labels == label
        lost = check.global_correct[mine].mean() - check.correct[mine].mean()
        assert lost <= device.learner.policy.memory_tolerance


def test_a_restart_restores_the_state_without_learning_again(
    tmp_path: Path, model: Any, version: Path
) -> None:

    x, y = synthetic_windows(12, seed=11)
    turned = np.einsum("ntc,dc->ntd", x, TURN_X).astype(np.float32)
    first = Device(tmp_path, model)
    for i in range(12):
        first.learner.confirm(f"p{i}", LABELS[y[i]], turned[i], float(i))
    learned = model.installed()
    first.close()

    again = Device(tmp_path, load_model(version))
    try:
        restored = again.model.installed()
        np.testing.assert_array_equal(restored.kernel_delta, learned.kernel_delta)
        assert restored.serve == learned.serve
        assert again.counters.get("confirmations_applied") == 0
    finally:
        again.close()

    (tmp_path / "learned" / "v1.state").write_bytes(b"garbage")
    relearned = Device(tmp_path, load_model(version))
    try:
        assert relearned.counters.get("learned_state_unusable") == 1
        assert relearned.problems == ["state_unusable"]
        np.testing.assert_allclose(
            relearned.model.installed().kernel_delta, learned.kernel_delta, atol=1e-5
        )
    finally:
        relearned.close()


def test_a_new_version_is_personalised_by_the_same_code(
    device: Device, version: Path, tmp_path: Path
) -> None:
    """``personalise`` replays the confirmations through the same steps the device took."""

    x, y = synthetic_windows(16, seed=11)
    turned = np.einsum("ntc,dc->ntd", x, TURN_X).astype(np.float32)
    for i in range(16):
        device.learner.confirm(f"p{i}", LABELS[y[i]], turned[i], float(i))
    fresh = load_model(version)
    learned = personalise(fresh, device.store.replay_entries(), device.learner.policy)
    served = learned.ways.state(device.learner.way)
    installed = device.model.installed()
    np.testing.assert_allclose(served.kernel_delta, installed.kernel_delta, atol=1e-5)
    np.testing.assert_allclose(served.align, installed.align, atol=1e-6)
    # The replayed records are what the device recorded, answer by answer.
    for (_, replayed), (_, kept) in zip(
        learned.records.values(), device.learner.evidence(), strict=True
    ):
        assert replayed.correct == kept.correct
        np.testing.assert_allclose(replayed.probability, kept.probability, atol=1e-4)

    device.learner.confirm("late", LABELS[y[0]], turned[0], 99.0)  # arrives while it waits
    device.learner.adopt("v2", fresh, learned)
    entries = device.store.replay_entries()
    assert all(e.applied for e in entries)
    assert (tmp_path / "learned" / "v2.state").is_file()


# ------------------------------------------------------------------------------ the store
def test_a_version_1_store_is_migrated_with_its_confirmations(tmp_path: Path) -> None:
    path = tmp_path / "agent.sqlite3"
    window = np.zeros((16, 3), np.float32)
    db = sqlite3.connect(path)
    db.executescript(
        """
        CREATE TABLE replay (prediction_id TEXT PRIMARY KEY, label TEXT NOT NULL,
            window BLOB NOT NULL, applied INTEGER NOT NULL DEFAULT 0, created REAL NOT NULL);
        CREATE TABLE outbox (id INTEGER PRIMARY KEY AUTOINCREMENT, topic TEXT NOT NULL,
            payload BLOB NOT NULL, qos INTEGER NOT NULL, retain INTEGER NOT NULL,
            content_type TEXT NOT NULL, priority INTEGER NOT NULL, created REAL NOT NULL);
        CREATE TABLE counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
        CREATE TABLE recent_windows (prediction_id TEXT PRIMARY KEY,
            created_order INTEGER NOT NULL, model_version TEXT NOT NULL, window BLOB NOT NULL);
        PRAGMA user_version = 1;
        """
    )
    db.execute("INSERT INTO replay VALUES ('old', 'Walking', ?, 1, 1.0)", (window.tobytes(),))
    db.commit()
    db.close()
    store = AgentStore(path)
    try:
        [entry] = store.replay_entries()
        assert (entry.prediction_id, entry.label, entry.applied) == ("old", "Walking", True)
        assert entry.record is None
        assert store.add_confirmation("old", "Laying", window, 5.0) == "corrected"
        assert store.add_confirmation("new", "Sitting", window, 6.0) == "new"
        assert store.forget_confirmations(before=6.0) == 2
    finally:
        store.close()
    assert sqlite3.connect(path).execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
