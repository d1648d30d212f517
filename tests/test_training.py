"""Training end to end on tiny data: ``har train`` writes a complete model version folder."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from activity_model.loading import load_model
from activity_model.windowing import make_windows
from activity_model.wisdm import load_wisdm
from shared.errors import ModelError
from simulator.tiny_model import synthetic_windows
from trainer_service.train_cli import register as register_train
from trainer_service.training import TrainConfig, class_weights, split_by_user

pytestmark = pytest.mark.slow

ACTIVITIES = ("Walking", "Sitting", "Laying")
PERIOD_NS = 50_000_000


def write_tiny_wisdm(path: Path, users: int = 6, samples: int = 96) -> Path:
    """A WISDM-format file: every user does every activity; quirks sprinkled in."""
    lines = []
    t = 10**12
    for user in range(1, users + 1):
        for activity_index, activity in enumerate(ACTIVITIES):
            rng = np.random.default_rng(user * 10 + activity_index)
            base = rng.normal(0, 0.3, (samples, 3))
            if activity_index == 0:
                base[:, 0] += 4 * np.sin(np.arange(samples) * 0.6)
                base[:, 1] += 9.8
            elif activity_index == 1:
                base[:, 1] += 9.8
            else:
                base[:, 2] += 9.8
            name = activity.upper() if user % 2 else activity.lower()  # mixed case
            for ax, ay, az in base:
                lines.append(f"{user},{name},{t},{ax:.5f},{ay:.5f},{az:.5f};")
                t += PERIOD_NS
            t += 10**10  # a gap between recordings
    lines.insert(5, "1,Walking,0,1,2,3;")  # zero timestamp
    lines.insert(9, "1,Walking,123,1,2,;")  # empty value
    path.write_text("\n".join(lines) + "\n")
    return path


def _train_args(*extra: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="har")
    register_train(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["train", *extra])


def test_har_train_writes_a_complete_version(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data_path = write_tiny_wisdm(tmp_path / "tiny.txt")
    args = _train_args(
        "--data", str(data_path), "--out", str(tmp_path / "models"), "--version", "v1",
        "--epochs", "3", "--window", "16", "--hop", "4", "--width", "8", "--no-progress",
        "--val-users", "5", "--test-users", "6",
    )  # fmt: skip
    assert args.func(args) == 0
    folder = tmp_path / "models" / "v1"
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["folder"] == str(folder)
    assert sorted(p.name for p in folder.iterdir()) == [
        "config.json",
        "confusion.png",
        "data_summary.json",
        "learning_curves.png",
        "metrics.json",
        "saved_model",
    ]
    assert (folder / "confusion.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (folder / "learning_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    metrics = json.loads((folder / "metrics.json").read_text())
    # The learning curves' data: one entry per epoch run, with loss and validation scores.
    assert [entry["epoch"] for entry in metrics["history"]] == list(range(metrics["epochs_run"]))
    for entry in metrics["history"]:
        assert entry["loss"] > 0
        assert 0.0 <= entry["val_accuracy"] <= 1.0
        assert 0.0 <= entry["val_macro_f1"] <= 1.0
    best = metrics["history"][metrics["best_epoch"]]
    assert best["val_macro_f1"] == pytest.approx(metrics["validation"]["macro_f1"])
    test = metrics["test"]
    assert set(test) >= {"accuracy", "macro_f1", "per_class", "confusion", "labels"}
    assert test["labels"] == list(ACTIVITIES)
    assert set(test["per_class"]["Sitting"]) == {"precision", "recall", "f1", "support"}
    assert np.asarray(test["confusion"]).sum() == test["n"]
    assert 0.0 <= test["accuracy"] <= 1.0
    assert metrics["best_epoch"] < metrics["epochs_run"] <= 3
    config = json.loads((folder / "config.json").read_text())
    assert config["arch"] == "cnn"
    assert config["window"] == 16
    summary = json.loads((folder / "data_summary.json").read_text())
    assert summary["users"] == {"train": [1, 2, 3, 4], "val": [5], "test": [6]}
    assert summary["source"]["skipped_by_reason"] == {"zero timestamp": 1, "empty value": 1}

    model = load_model(folder / "saved_model")
    assert model.labels == ACTIVITIES
    assert model.input_spec.window == 16
    assert model.global_step > 0
    # Versions are immutable: the same version cannot be written twice.
    with pytest.raises(ModelError, match="already exists"):
        args.func(args)


def test_train_model_says_each_epoch_as_it_starts(tmp_path: Path) -> None:
    from trainer_service.training import train_model

    data = load_wisdm(write_tiny_wisdm(tmp_path / "tiny.txt", users=3, samples=40))
    ws = make_windows(data, 16, 8)
    heard: list[tuple[int, int]] = []
    config = TrainConfig(window=16, width=8, epochs=3, patience=10)
    result = train_model(
        ws, ws, config, data.labels, progress=False, on_epoch=lambda *e: heard.append(e)
    )
    assert heard == [(1, 3), (2, 3), (3, 3)]
    assert len(result.history) == len(heard)


def test_split_never_puts_one_person_in_two_sets(tmp_path: Path) -> None:
    data = load_wisdm(write_tiny_wisdm(tmp_path / "tiny.txt", users=9, samples=40))
    for seed in range(5):
        split = split_by_user(data, TrainConfig(window=16, hop=4, eval_hop=8, seed=seed))
        sets = [set(np.unique(s.users).tolist()) for s in (split.train, split.val, split.test)]
        assert sets[0].isdisjoint(sets[1])
        assert sets[0].isdisjoint(sets[2])
        assert sets[1].isdisjoint(sets[2])
        assert set().union(*sets) == set(range(1, 10))
        assert sets == [set(split.users[name]) for name in ("train", "val", "test")]


def test_explicit_users_in_two_sets_are_refused(tmp_path: Path) -> None:
    data = load_wisdm(write_tiny_wisdm(tmp_path / "tiny.txt", users=4, samples=40))
    with pytest.raises(ModelError, match="validation and test"):
        split_by_user(data, TrainConfig(window=16, val_users=(1, 2), test_users=(2,)))


def test_class_weights_balance_the_classes() -> None:
    y = np.array([0] * 80 + [1] * 20, np.int32)
    weights = class_weights(y, 3)
    assert weights[1] == pytest.approx(4 * weights[0])
    assert weights[2] == 0.0
    assert weights[y].mean() == pytest.approx(1.0)
    assert (weights[y] * (y == 0)).sum() == pytest.approx((weights[y] * (y == 1)).sum())


def test_sample_weights_are_honoured_in_the_loss() -> None:
    from activity_model.tracker import ActivityTracker, TrackerSpec

    spec = TrackerSpec(arch="cnn", labels=ACTIVITIES, window=16, width=8, dropout=0.0)
    x, y = synthetic_windows(8, seed=1)
    a = ActivityTracker(spec, seed=4)
    b = ActivityTracker(spec, seed=4)
    weighted = float(a.train_step(x, y, np.array([1, 1, 1, 0, 0, 0, 0, 0], np.float32)))
    subset = float(b.train_step(x[:3], y[:3], np.ones(3, np.float32)))
    assert weighted == pytest.approx(subset, rel=1e-5)
    # Zero weight everywhere: nothing to learn, a fresh model's weights must not move.
    c = ActivityTracker(spec, seed=4)
    before = c.get_weights()
    c.train_step(x, y, np.zeros(8, np.float32))
    after = c.get_weights()
    assert all(np.array_equal(before[name], after[name]) for name in before)


def test_fine_tuning_from_a_model_with_other_labels_is_refused(tmp_path: Path) -> None:
    from activity_model.export import export_tracker
    from activity_model.tracker import ActivityTracker, TrackerSpec
    from trainer_service.training import train_model

    other = ActivityTracker(TrackerSpec(arch="cnn", labels=("a", "b"), window=16, width=8))
    export_tracker(other, tmp_path / "other")
    data = load_wisdm(write_tiny_wisdm(tmp_path / "tiny.txt", users=3, samples=40))
    ws = make_windows(data, 16, 8)
    config = TrainConfig(window=16, width=8, epochs=1)
    with pytest.raises(ModelError, match="same label set"):
        train_model(ws, ws, config, data.labels, init_from=tmp_path / "other", progress=False)


def test_fine_tuning_starts_from_the_given_model(tmp_path: Path) -> None:
    from activity_model.export import export_tracker
    from activity_model.tracker import ActivityTracker, TrackerSpec
    from trainer_service.training import build_tracker

    spec = TrackerSpec(arch="cnn", labels=ACTIVITIES, window=16, width=8)
    base = ActivityTracker(spec, mean=(1, 2, 3), std=(2, 2, 2), seed=9)
    export_tracker(base, tmp_path / "base")
    x, _ = synthetic_windows(8)
    data = load_wisdm(write_tiny_wisdm(tmp_path / "tiny.txt", users=3, samples=40))
    ws = make_windows(data, 16, 8)
    tuned: Any = build_tracker(
        TrainConfig(window=16, width=8), ACTIVITIES, ws, init_from=tmp_path / "base"
    )
    reference = load_model(tmp_path / "base").predict(x).probabilities
    np.testing.assert_allclose(tuned.predict(x)["probabilities"].numpy(), reference, atol=1e-6)
