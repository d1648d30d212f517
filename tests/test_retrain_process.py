"""The retrain child process: its data file, its failures, and stopping it.

A whole round through the child (train, gate, register, then signed and published by the
service) runs in tests/test_trainer.py.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

from trainer_service.retrain_process import (
    SAMPLES_FILE,
    RetrainProcess,
    RetrainProcessError,
    read_confirmed,
    write_confirmed,
)
from trainer_service.settings import RetrainSettings
from trainer_service.store import ConfirmedWindow


def _window(length: int, value: float) -> np.ndarray:
    return np.full((length, 3), value, np.float32)


def test_confirmed_windows_go_to_the_child_unchanged_without_pickle(tmp_path: Path) -> None:
    confirmed = [
        ConfirmedWindow("p-1", "wrist-1", "Walking", _window(80, 1.5), 1000.25),
        ConfirmedWindow("p-2", "wrist-2", "Sitting", _window(40, -2.0), 1001.5),  # another model
        ConfirmedWindow("p-\u00e9", "wrist-1", "Laying", _window(80, 9.81), 1002.0),
    ]
    write_confirmed(tmp_path, [confirmed[:2], confirmed[2:]])  # two pages
    back = read_confirmed(tmp_path)  # raw float32 and JSON lines: nothing to unpickle
    assert [(c.prediction_id, c.device_id, c.label, c.received) for c in back] == [
        (c.prediction_id, c.device_id, c.label, c.received) for c in confirmed
    ]
    for original, copy in zip(confirmed, back, strict=True):
        np.testing.assert_array_equal(copy.window, original.window)


def test_samples_that_do_not_match_the_windows_are_refused(tmp_path: Path) -> None:
    window = ConfirmedWindow("p-1", "wrist-1", "Walking", _window(80, 1.0), 1.0)
    write_confirmed(tmp_path, [[window]])
    samples = tmp_path / SAMPLES_FILE
    whole = samples.read_bytes()
    samples.write_bytes(whole[:-12])  # a sample short
    with pytest.raises(RetrainProcessError, match="ends before window p-1"):
        read_confirmed(tmp_path)
    samples.write_bytes(whole + whole[:12])  # a sample more
    with pytest.raises(RetrainProcessError, match="1 samples more"):
        read_confirmed(tmp_path)


def test_no_confirmed_windows_is_a_valid_file(tmp_path: Path) -> None:
    write_confirmed(tmp_path, [])
    assert read_confirmed(tmp_path) == []


def test_a_failing_round_says_why(tmp_path: Path) -> None:
    process = RetrainProcess(
        registry_dir=tmp_path, base_data=tmp_path / "missing.txt", settings=RetrainSettings()
    )
    with pytest.raises(RetrainProcessError, match=r"exited with code 1: base_data .* does not"):
        process.run([], now=0.0)
    assert [p.name for p in tmp_path.iterdir()] == []  # its folder is gone


def test_stop_ends_a_running_round_and_starts_no_other(tmp_path: Path) -> None:
    # A stand-in child: says its first epoch started, then trains for ever.
    child = tmp_path / "child.sh"
    child.write_text('#!/bin/sh\necho \'{"epoch": 1, "epochs": 8}\'\nexec sleep 600\n')
    child.chmod(0o755)
    process = RetrainProcess(
        registry_dir=tmp_path, base_data=None, settings=RetrainSettings(), python=str(child)
    )
    started = threading.Event()
    errors: list[BaseException] = []

    def run() -> None:
        try:
            process.run([], now=0.0, on_epoch=lambda epoch, epochs: started.set())
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    assert started.wait(60), "the child never said its epoch started"
    process.stop()
    thread.join(60)
    assert not thread.is_alive()
    assert len(errors) == 1
    assert isinstance(errors[0], RetrainProcessError)
    assert "stopped by signal 15" in str(errors[0])
    with pytest.raises(RetrainProcessError, match="stopping"):
        process.run([], now=0.0)


def test_nice_is_a_valid_priority() -> None:
    with pytest.raises(Exception, match="nice"):
        RetrainSettings(nice=20)
