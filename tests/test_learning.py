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

from device_agent.learning import (
    DeviceLearner,
    LearningPolicy,
    alignment,
    personalise,
    recent_per_class,
    served_accuracy,
    serves,
)
from device_agent.store import SCHEMA_VERSION, AgentStore
from shared.counters import Counters, LatencyRecorder
from tests.model_helpers import LABELS, synthetic_windows
from tests.release_helpers import export_tiny_version

TURN_X = np.array([[1, 0, 0], [0, 0, -1], [0, 1, 0]], np.float32)  # 90 degrees about x


def rotation(angles: tuple[float, float, float]) -> np.ndarray:
    a, b, c = angles
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rz = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
    return rz @ ry @ rx


angles = st.tuples(*[st.floats(-np.pi, np.pi, allow_nan=False)] * 3)


# ------------------------------------------------------------------------------ pure parts
@settings(max_examples=60, deadline=None)
@given(angles)
def test_alignment_recovers_how_the_device_is_turned(turn_angles: Any) -> None:
    """Windows of two classes with distinct gravity, worn turned by R: alignment gives R^-1."""
    turn = rotation(turn_angles)
    gravity = np.array([[0.0, 9.8, 0.0], [0.0, 0.0, 9.8], [9.8, 0.0, 0.0]], np.float32)
    labels = np.array([0, 1, 2, 0, 1], np.int64)
    worn = (gravity[labels] @ turn.T)[:, None, :].repeat(4, axis=1).astype(np.float32)
    found = alignment(worn, labels, gravity, prior=0.0)
    np.testing.assert_allclose(found @ turn, np.eye(3), atol=1e-4)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 2), st.floats(-20, 20), st.floats(-20, 20)), max_size=30),
    st.floats(0, 10),
)
def test_alignment_is_always_a_proper_rotation(rows: Any, prior: float) -> None:
    labels = np.array([r[0] for r in rows], np.int64)
    windows = np.array([[[r[1], r[2], 1.0]] * 2 for r in rows], np.float32).reshape(-1, 2, 3)
    gravity = np.array([[0.0, 9.8, 0.0], [0.0, 0.0, 9.8], [0.0, 0.0, 0.0]], np.float32)
    found = alignment(windows, labels, gravity, prior)
    np.testing.assert_allclose(found @ found.T, np.eye(3), atol=1e-4)
    assert np.linalg.det(found) == pytest.approx(1.0, abs=1e-4)


def test_alignment_stays_put_without_evidence() -> None:
    gravity = np.array([[0.0, 9.8, 0.0], [0.0, 0.0, 9.8]], np.float32)
    none = alignment(np.zeros((0, 4, 3), np.float32), np.zeros(0, np.int64), gravity, 2.0)
    np.testing.assert_array_equal(none, np.eye(3))
    unknown = alignment(np.ones((2, 4, 3), np.float32), np.array([0, 1]), np.zeros((2, 3)), 2.0)
    np.testing.assert_array_equal(unknown, np.eye(3))


@given(st.lists(st.integers(0, 3), max_size=40), st.integers(1, 5))
def test_recent_per_class_keeps_the_latest_of_each_label(labels: list[int], most: int) -> None:
    array = np.array(labels, np.int64)
    kept = recent_per_class(array, most)
    assert list(kept) == sorted(kept)
    for label in set(labels):
        latest = np.flatnonzero(array == label)[-most:]
        assert set(latest.tolist()) == {int(i) for i in kept if array[i] == label}


def test_the_learned_state_serves_only_once_it_beat_the_global_model() -> None:
    assert not serves([], 50)
    assert not serves([(True, True)] * 10, 50)  # as good is not better
    assert serves([(True, False), (True, True)], 50)
    assert not serves([(True, False)] + [(False, True)] * 2, 50)
    assert not serves([(True, False)] * 5 + [(False, True)] * 3, 3)  # only the last 3 count
    assert serves([(None, None), (True, False)], 50)  # unscored records do not count
    assert served_accuracy([(True, False), (False, False)], 50) == (0.5, 2)
    assert served_accuracy([(None, None)], 50) == (None, 0)


# ------------------------------------------------------------------------------ the learner
@pytest.fixture(scope="module")
def version(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = export_tiny_version(tmp_path_factory.mktemp("v") / "v1", seed=1, steps=60)
    return folder / "saved_model"


@pytest.fixture
def model(version: Path) -> Any:
    from shared.model.runtime import ActivityModel

    return ActivityModel.load(version)


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
    assert entry.global_correct is not None  # scored before it was learned
    assert (device.root / "learned" / "v1.state").is_file()
    installed = device.model.installed()
    assert device.learner.confirm("p1", LABELS[y[0]], x[0], 1.0).stored == "duplicate"
    assert device.counters.get("confirmations_applied") == 1
    np.testing.assert_array_equal(device.model.installed().kernel_delta, installed.kernel_delta)


def test_a_later_correction_replaces_the_label_and_is_learned_again(device: Device) -> None:
    x, _ = synthetic_windows(4, seed=7)
    device.learner.confirm("p1", "Walking", x[0], 1.0)
    first = device.model.installed()
    assert device.learner.confirm("p1", "Laying", x[0], 0.5).stored == "duplicate"  # older
    assert device.learner.confirm("p1", "Laying", x[0], 2.0).stored == "corrected"
    [entry] = device.store.replay_entries()
    assert entry.label == "Laying"
    assert entry.applied
    assert entry.personal_correct is None  # the state had seen this window: not held out
    assert not np.allclose(device.model.installed().kernel_delta, first.kernel_delta)
    assert device.counters.get("confirmations_corrected") == 1


def test_forget_drops_everything_and_serves_the_global_model(device: Device) -> None:
    x, y = synthetic_windows(12, seed=7)
    turned = np.einsum("ntc,dc->ntd", x, TURN_X).astype(np.float32)
    global_answers = device.model.predict(turned).probabilities
    for i in range(12):
        device.learner.confirm(f"p{i}", LABELS[y[i]], turned[i], float(i))
    assert device.learner.serving  # learned to read the turned device (next test)
    assert device.learner.forget() == 12
    assert device.store.replay_entries() == []
    assert not device.learner.serving
    installed = device.model.installed()
    np.testing.assert_array_equal(installed.kernel_delta, 0)
    np.testing.assert_array_equal(installed.align, np.eye(3))
    np.testing.assert_allclose(device.model.predict(turned).probabilities, global_answers)
    assert device.counters.get("confirmations_forgotten") == 12


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
    records = [(e.personal_correct, e.global_correct) for e in device.store.replay_entries()]
    assert sum(bool(p) for p, _ in records) > sum(bool(g) for _, g in records)
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
    from shared.model.runtime import ActivityModel

    x, y = synthetic_windows(12, seed=11)
    turned = np.einsum("ntc,dc->ntd", x, TURN_X).astype(np.float32)
    first = Device(tmp_path, model)
    for i in range(12):
        first.learner.confirm(f"p{i}", LABELS[y[i]], turned[i], float(i))
    learned = model.installed()
    first.close()

    again = Device(tmp_path, ActivityModel.load(version))
    try:
        restored = again.model.installed()
        np.testing.assert_array_equal(restored.kernel_delta, learned.kernel_delta)
        assert restored.serve == learned.serve
        assert again.counters.get("confirmations_applied") == 0
    finally:
        again.close()

    (tmp_path / "learned" / "v1.state").write_bytes(b"garbage")
    relearned = Device(tmp_path, ActivityModel.load(version))
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
    from shared.model.runtime import ActivityModel

    x, y = synthetic_windows(16, seed=11)
    turned = np.einsum("ntc,dc->ntd", x, TURN_X).astype(np.float32)
    for i in range(16):
        device.learner.confirm(f"p{i}", LABELS[y[i]], turned[i], float(i))
    fresh = ActivityModel.load(version)
    learned = personalise(fresh, device.store.replay_entries(), device.learner.policy)
    np.testing.assert_allclose(
        learned.state.kernel_delta, device.model.installed().kernel_delta, atol=1e-5
    )
    assert learned.served(device.learner.policy).serve == device.learner.serving

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
        assert entry.personal_correct is None
        assert store.add_confirmation("old", "Laying", window, 5.0) == "corrected"
        assert store.add_confirmation("new", "Sitting", window, 6.0) == "new"
        assert store.forget_confirmations() == 2
    finally:
        store.close()
    assert sqlite3.connect(path).execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
