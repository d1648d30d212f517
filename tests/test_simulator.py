"""``har sim``: simulated people, recordings and devices, and a small fleet on a real broker."""

from __future__ import annotations

import json
import logging
import os
import queue
import random
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from device_agent.releases import ReleaseStore
from shared import codec, homeassistant
from shared.config import BrokerSettings
from shared.errors import ConfigError, ModelError
from shared.messages import ReceiptKey
from shared.mqtt_transport import InboundMessage, Outbound, PropertiesCache
from shared.signing import generate_keypair, load_private_key, load_public_key, sign_manifest
from shared.topics import Topics
from simulator.device import SimDevice
from simulator.event_loop import EventLoop
from simulator.fleet import FleetSimulator
from simulator.link import Entry, Link
from simulator.people import SimulatedPerson
from simulator.recordings import Cursor, Recording, cursor_for, synthetic_recordings
from simulator.settings import SimSettings
from simulator.tiny_model import CHUNK_SIZE, Release, Releases, make_releases
from tests.mqtt_helpers import connect, receive
from trainer_service.distribution import publish_all, release_messages

LABELS = ("Walking", "Sitting", "Laying")
WAIT_S = 30.0


# ---------------------------------------------------------------------------------- people
@given(
    truth=st.one_of(st.none(), st.sampled_from([*LABELS, "Flying"])),
    share=st.floats(0, 1),
    mistakes=st.floats(0, 1),
    seed=st.integers(0, 2**32),
)
def test_a_person_answers_only_known_truths_with_a_label(
    truth: str | None, share: float, mistakes: float, seed: int
) -> None:
    answer = SimulatedPerson(share, mistakes, random.Random(seed)).answer(truth, LABELS)
    if truth is None or truth not in LABELS:
        assert answer is None
    else:
        assert answer is None or answer in LABELS


@given(seed=st.integers(0, 2**32), truth=st.sampled_from(LABELS))
def test_mistakes_name_another_activity_and_no_mistakes_name_the_truth(
    seed: int, truth: str
) -> None:
    assert SimulatedPerson(1.0, 1.0, random.Random(seed)).answer(truth, LABELS) != truth
    assert SimulatedPerson(1.0, 0.0, random.Random(seed)).answer(truth, LABELS) == truth


def test_shares_of_answers_and_mistakes_follow_the_settings() -> None:
    person = SimulatedPerson(0.3, 0.1, random.Random(7))
    answers = [person.answer("Walking", LABELS) for _ in range(20_000)]
    given_answers = [a for a in answers if a is not None]
    assert 0.28 < len(given_answers) / len(answers) < 0.32
    wrong = sum(a != "Walking" for a in given_answers)
    assert 0.08 < wrong / len(given_answers) < 0.12


# ------------------------------------------------------------------------------ recordings
def _recording(n: int) -> Recording:
    xyz = np.arange(n * 3, dtype=np.float32).reshape(n, 3)
    return Recording("p", xyz, tuple(LABELS[i % 3] for i in range(n)))


@given(n=st.integers(1, 50), start=st.integers(0, 200), takes=st.lists(st.integers(1, 40)))
def test_a_cursor_replays_the_recording_in_a_loop(n: int, start: int, takes: list[int]) -> None:
    recording = _recording(n)
    cursor = Cursor(recording, start)
    got = [cursor.take(k) for k in takes]
    total = sum(takes)
    expected = (start + np.arange(total)) % n
    if total:
        assert np.array_equal(np.concatenate([xyz for xyz, _ in got]), recording.xyz[expected])
        assert [label for _, labels in got for label in labels] == [
            recording.labels[i] for i in expected
        ]


def test_devices_sharing_a_person_start_at_different_moments() -> None:
    recordings = [_recording(1000), _recording(1000)]
    starts = {cursor_for(recordings, i).take(1)[0][0, 0] for i in range(0, 40, 2)}
    assert len(starts) == 20


def test_synthetic_people_do_every_activity_and_differ() -> None:
    people = synthetic_recordings(2, seed=0)
    assert set(people[0].labels) == {
        "Walking",
        "Jogging",
        "Upstairs",
        "Downstairs",
        "Sitting",
        "Standing",
    }
    assert not np.array_equal(people[0].xyz, people[1].xyz)


@pytest.mark.parametrize(
    "changes",
    [
        {"devices": 0},
        {"device_prefix": "bad/prefix-"},
        {"confirm_share": 1.5},
        {"mistake_rate": -0.1},
        {"speed": 0},
        {"users": ("seven",)},
    ],
)
def test_bad_settings_are_refused(changes: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        SimSettings(**changes)


# ---------------------------------------------------------------------------------- device
def test_a_device_numbers_batches_and_windows_them_once_it_has_a_model(
    session_releases: Releases,
) -> None:
    clock = iter(range(1_800_000_000, 1_900_000_000)).__next__
    device = SimDevice(
        "sim-0001",
        Cursor(_recording(500)),
        Topics(),
        sample_rate_hz=20.0,
        batch_samples=20,
        window_hop=0,
        clock=lambda: float(clock()),
    )
    message, windows = device.next_batch()
    assert windows == []  # no model yet: nothing to window for
    first = codec.decode_sensor_batch(message.payload)
    assert first.seq == device.first_seq
    assert first.samples.shape == (20, 3)
    manifest = session_releases.first.manifest
    device.install(manifest)
    seqs, count = [], 0
    for _ in range(5):
        message, windows = device.next_batch()
        seqs.append(codec.decode_sensor_batch(message.payload).seq)
        count += len(windows)
        assert all(w.samples.shape == (manifest.input.window, 3) for w in windows)
    assert seqs == list(range(first.seq + 1, first.seq + 6))
    assert count == (5 * 20 - manifest.input.window) // (manifest.input.window // 2) + 1
    older = session_releases.first.manifest
    newer = session_releases.second.manifest
    device.install(newer)
    with pytest.raises(ModelError, match="older"):
        device.wants(older)
    assert not device.wants(older)  # refused once, not retried


# ---------------------------------------------------------------------------- on a broker
@pytest.fixture(scope="session")
def session_releases(tmp_path_factory: pytest.TempPathFactory) -> Releases:
    return make_releases(tmp_path_factory.mktemp("sim-releases"))


class RunningFleet:
    """A FleetSimulator on a thread of its own, stopped (and checked) at the end."""

    def __init__(self, settings: SimSettings) -> None:
        assert settings.public_key is not None
        releases = ReleaseStore(settings.state_dir / "models", load_public_key(settings.public_key))
        self.fleet = FleetSimulator(settings, synthetic_recordings(3, 0), releases)
        self.report: dict[str, Any] = {}
        self._thread = threading.Thread(target=self._run, name="sim-test-fleet")

    def _run(self) -> None:
        self.report = self.fleet.run()

    def __enter__(self) -> RunningFleet:
        self._thread.start()
        return self

    def stop(self) -> dict[str, Any]:
        self.fleet.request_stop()
        self._thread.join(timeout=WAIT_S)
        assert not self._thread.is_alive(), "the fleet did not stop"
        return self.report

    def __exit__(self, *exc: object) -> None:
        if self._thread.is_alive():
            self.stop()


def publish_release(settings: BrokerSettings, release: Release) -> None:
    connection, _ = connect(settings)
    try:
        messages = release_messages(
            Topics(settings.topic_root), release.manifest, release.payload, CHUNK_SIZE
        )
        publish_all(connection, messages, 10.0)
    finally:
        connection.stop()


class Observer:
    """Everything the fleet publishes, sorted by kind and device."""

    def __init__(self, settings: BrokerSettings) -> None:
        topics = Topics(settings.topic_root)
        self.topics = topics
        self.connection, self.inbox = connect(
            settings,
            [
                (topics.all_sensor(), 1),
                (topics.all_prediction(), 1),
                (topics.all_status(), 1),
                (topics.all_confirmation(), 1),
                (topics.all_error(), 1),
            ],
        )
        self.batches: dict[str, list[int]] = defaultdict(list)
        self.predictions: dict[str, list[Any]] = defaultdict(list)
        self.confirmations: dict[str, list[Any]] = defaultdict(list)
        self.statuses: dict[str, list[Any]] = defaultdict(list)
        self.errors: dict[str, list[Any]] = defaultdict(list)

    def take(self, message: InboundMessage) -> None:
        device = self.topics.device_of(message.topic)
        kind = self.topics.kind_of(message.topic)
        assert device is not None
        if kind == "sensor":
            self.batches[device].append(codec.decode_sensor_batch(message.payload).seq)
        elif kind == "prediction":
            self.predictions[device].append(codec.decode_prediction(message.payload))
        elif kind == "confirmation":
            self.confirmations[device].append(codec.decode_confirmation(message.payload))
        elif kind == "status":
            self.statuses[device].append(codec.decode_status(message.payload))
        elif kind == "error":
            self.errors[device].append(codec.decode_error(message.payload))

    def until(self, done: Any, what: str) -> None:
        while not done():
            try:
                self.take(self.inbox.get(timeout=WAIT_S))
            except queue.Empty:
                pytest.fail(f"timed out waiting for {what}")

    def drain(self) -> None:
        while True:
            try:
                self.take(self.inbox.get(timeout=1.0))
            except queue.Empty:
                return

    def latest_version(self, device: str) -> str | None:
        statuses = self.statuses.get(device)
        return statuses[-1].model_version if statuses else None

    def stop(self) -> None:
        self.connection.stop()


def sim_settings(
    tmp_path: Path, broker_settings: BrokerSettings, public_key: Path, **changes: Any
) -> SimSettings:
    values: dict[str, Any] = {
        "devices": 3,
        "public_key": public_key,
        "state_dir": tmp_path / "sim",
        "speed": 20.0,
        "confirm_share": 1.0,
        "mistake_rate": 0.0,
        "broker": broker_settings,
        **changes,
    }
    return SimSettings(**values)


@pytest.mark.broker
@pytest.mark.slow
def test_a_fleet_streams_predicts_confirms_installs_updates_and_says_goodbye(
    tmp_path: Path, broker_settings: BrokerSettings, session_releases: Releases
) -> None:
    settings = sim_settings(tmp_path, broker_settings, session_releases.public_key_path)
    devices = settings.device_ids
    publish_release(broker_settings, session_releases.first)
    observer = Observer(broker_settings)
    try:
        with RunningFleet(settings) as running:
            first = session_releases.first.manifest.version
            observer.until(
                lambda: (
                    all(observer.latest_version(d) == first for d in devices)
                    and all(len(observer.confirmations[d]) >= 3 for d in devices)
                ),
                "every device to run the first version and its person to confirm",
            )
            publish_release(broker_settings, session_releases.second)
            second = session_releases.second.manifest.version
            observer.until(
                lambda: (
                    all(observer.latest_version(d) == second for d in devices)
                    and all(p[-1].model_version == second for p in observer.predictions.values())
                ),
                "every device to install and predict with the second version",
            )
            report = running.stop()
        observer.until(
            lambda: all(observer.statuses[d][-1].state == "offline" for d in devices),
            "an offline status from every device",
        )
        observer.drain()
    finally:
        observer.stop()
    for device in devices:
        seqs = observer.batches[device]
        row = report["per_device"][device]
        # Every batch made was acknowledged, arrived, in order, with no gap.
        assert seqs == list(range(row["first_seq"], row["next_seq"]))
        assert row["batches_sent"] == len(seqs)
        predicted = {p.prediction_id: p for p in observer.predictions[device]}
        assert len(predicted) == row["predictions"]
        for confirmation in observer.confirmations[device]:
            # mistake_rate 0: each answer is the truth of the prediction it confirms.
            assert confirmation.label == predicted[confirmation.prediction_id].truth
        assert row["model_version"] == second
        # One process holds many devices: it runs them on LiteRT when it is installed.
        assert row["model_runtime"] == "litert"
        assert not observer.errors[device]
    assert report["totals"]["unsent_at_exit"] == 0
    assert report["totals"]["confirmations_sent"] == sum(
        len(c) for c in observer.confirmations.values()
    )
    # The app keeps each answer until the device's relay: every one was relayed, or was still
    # awaited when the fleet stopped (its device closed first).
    app = report["app"]
    assert app["receipted"] > 0
    assert app["receipted"] + app.get("unreceipted_at_exit", 0) == app["confirmations_sent"]


@pytest.mark.broker
@pytest.mark.slow
def test_a_manifest_signed_by_another_key_is_refused_and_streaming_goes_on(
    tmp_path: Path, broker_settings: BrokerSettings, session_releases: Releases
) -> None:
    settings = sim_settings(tmp_path, broker_settings, session_releases.public_key_path, devices=1)
    device = settings.device_ids[0]
    foreign_key = load_private_key(generate_keypair(tmp_path / "foreign")[0])
    forged = Release(
        sign_manifest(session_releases.first.manifest, foreign_key),
        session_releases.first.payload,
    )
    publish_release(broker_settings, forged)
    observer = Observer(broker_settings)
    try:
        with RunningFleet(settings) as running:
            observer.until(lambda: bool(observer.errors[device]), "an error event")
            seen = len(observer.batches[device])
            observer.until(
                lambda: len(observer.batches[device]) > seen + 2, "batches after the refusal"
            )
            report = running.stop()
    finally:
        observer.stop()
    assert observer.errors[device][0].code == "model_rejected"
    assert "signed by key" in observer.errors[device][0].message
    assert report["per_device"][device]["model_version"] is None
    assert report["per_device"][device]["model_rejections"] == 1
    assert not observer.predictions[device]


@pytest.mark.broker
@pytest.mark.slow
def test_har_sim_runs_for_a_duration_and_prints_its_report(
    tmp_path: Path, broker_settings: BrokerSettings, session_releases: Releases
) -> None:
    publish_release(broker_settings, session_releases.first)
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "HAR_DEVICES": "2"}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "har",
            "sim",
            "--public-key",
            str(session_releases.public_key_path),
            "--broker-port",
            str(broker_settings.port),
            "--topic-root",
            broker_settings.topic_root,
            "--state-dir",
            str(tmp_path / "sim"),
            "--speed",
            "10",
            "--duration",
            "8",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)
    assert report["devices"] == 2
    assert set(report["per_device"]) == {"sim-0000", "sim-0001"}
    assert report["totals"]["batches_sent"] > 0
    assert report["totals"]["unsent_at_exit"] == 0


def test_the_fleet_needs_a_public_key(tmp_path: Path) -> None:
    from simulator.runner import run_fleet

    with pytest.raises(ConfigError, match="public_key"):
        run_fleet(SimSettings(state_dir=tmp_path))


@pytest.mark.broker
@pytest.mark.slow
def test_the_fleet_announces_its_devices_to_home_assistant_and_again_with_their_labels(
    tmp_path: Path, broker_settings: BrokerSettings, session_releases: Releases
) -> None:
    prefix = f"ha{uuid.uuid4().hex[:8]}"
    settings = sim_settings(
        tmp_path,
        broker_settings,
        session_releases.public_key_path,
        devices=2,
        homeassistant_discovery=True,
        homeassistant_prefix=prefix,
    )
    topics = Topics(broker_settings.topic_root)
    labels = session_releases.first.manifest.labels
    # Before their model: no labels (the model comes after the connect). Then its labels.
    expected = {
        device: [
            *homeassistant.discovery_messages(topics, device, prefix=prefix, controls=False),
            *homeassistant.discovery_messages(
                topics, device, labels, prefix=prefix, controls=False
            ),
        ]
        for device in settings.device_ids
    }
    publish_release(broker_settings, session_releases.first)
    configs, inbox = connect(broker_settings, [(f"{prefix}/#", 1)])
    seen: dict[str, list[Any]] = defaultdict(list)
    try:
        with RunningFleet(settings) as running:
            while any(len(seen[d]) < len(messages) for d, messages in expected.items()):
                message = inbox.get(timeout=WAIT_S)
                seen[message.topic.split("/")[2]].append(message)
            running.stop()
    finally:
        configs.stop()
    for device, messages in expected.items():
        assert [(m.topic, json.loads(m.payload)) for m in seen[device]] == [
            (m.topic, json.loads(m.payload)) for m in messages
        ]
        # Simulated devices take no commands: no select, no button.
        assert all(m.topic.split("/")[1] == "sensor" for m in seen[device])


@pytest.mark.broker
@pytest.mark.slow
def test_simulated_devices_refresh_their_status_with_their_counters(
    tmp_path: Path, broker_settings: BrokerSettings, session_releases: Releases
) -> None:
    settings = sim_settings(
        tmp_path, broker_settings, session_releases.public_key_path, status_interval_s=0.5
    )
    publish_release(broker_settings, session_releases.first)
    observer = Observer(broker_settings)
    try:
        with RunningFleet(settings):
            # Periodic, not only at connect and install: the counters move between statuses.
            observer.until(
                lambda: all(
                    len({s.counters["batches_sent"] for s in observer.statuses[d]}) >= 4
                    and observer.statuses[d][-1].counters["predictions"] > 0
                    for d in settings.device_ids
                ),
                "statuses with growing counters from every device",
            )
    finally:
        observer.stop()
    for device in settings.device_ids:
        online = [s for s in observer.statuses[device] if s.state == "online"]
        sent = [s.counters["batches_sent"] for s in online]
        assert sent == sorted(sent)


def test_the_status_interval_must_be_sensible() -> None:
    with pytest.raises(ConfigError, match="status_interval_s"):
        SimSettings(status_interval_s=0)


def test_home_assistant_discovery_needs_ids_it_accepts() -> None:
    with pytest.raises(ConfigError, match="Home Assistant"):
        SimSettings(device_prefix="sim.", homeassistant_discovery=True)


# ---------------------------------------------------------------------------- failures
@pytest.mark.broker
def test_a_failing_tick_is_reported_on_the_devices_error_topic_and_the_device_streams_on(
    tmp_path: Path,
    broker_settings: BrokerSettings,
    monkeypatch: pytest.MonkeyPatch,
    logged_exceptions: list[logging.LogRecord],
) -> None:
    _, public_key = generate_keypair(tmp_path / "keys")
    settings = sim_settings(tmp_path, broker_settings, public_key, devices=1)
    [device_id] = settings.device_ids
    next_batch = SimDevice.next_batch
    calls = [0]

    def fails_the_third_time(device: SimDevice) -> Any:
        calls[0] += 1
        if calls[0] == 3:
            raise RuntimeError("a sensor bug")
        return next_batch(device)

    monkeypatch.setattr(SimDevice, "next_batch", fails_the_third_time)
    observer = Observer(broker_settings)
    try:
        with RunningFleet(settings) as running:
            observer.until(
                lambda: bool(observer.errors[device_id]) and len(observer.batches[device_id]) >= 5,
                "an error event, and batches after it",
            )
            report = running.stop()
    finally:
        observer.stop()
    [event] = observer.errors[device_id]
    assert event.code == "internal_error"
    assert "sensor tick: RuntimeError: a sensor bug" in event.message
    assert report["per_device"][device_id]["internal_errors"] == 1
    assert "failed" not in report
    seqs = observer.batches[device_id]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))  # the failed tick made no batch
    assert [record.getMessage() for record in logged_exceptions] == [
        f"{device_id}: sensor tick failed"
    ]


@pytest.mark.broker
def test_a_dying_event_loop_makes_har_sim_report_it_and_exit_70(
    tmp_path: Path,
    broker_settings: BrokerSettings,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    logged_exceptions: list[logging.LogRecord],
) -> None:
    from har.cli import main

    _, public_key = generate_keypair(tmp_path / "keys")
    topics = Topics(broker_settings.topic_root)
    finished = FleetSimulator._finished
    rounds = [0]

    def dies_once_streaming(fleet: FleetSimulator) -> bool:
        # Outside every job: the loop's own stop check. It fails once batches flow.
        if sum(device.counters["batches_sent"] for device in fleet.devices) >= 4:
            raise RuntimeError("a bug in the event loop itself")
        rounds[0] += 1
        return finished(fleet)

    monkeypatch.setattr(FleetSimulator, "_finished", dies_once_streaming)
    statuses, inbox = connect(broker_settings, [(topics.all_status(), 1)])
    try:
        code = main(
            [
                *("sim", "--devices", "2", "--speed", "20", "--public-key", str(public_key)),
                *("--broker-port", str(broker_settings.port)),
                *("--topic-root", broker_settings.topic_root, "--state-dir", str(tmp_path / "s")),
                *("--duration", str(WAIT_S)),
            ]
        )
        # The dropped connections make the broker publish each device's last will.
        offline: set[str] = set()
        while len(offline) < 2:
            status = codec.decode_status(inbox.get(timeout=WAIT_S).payload)
            if status.state == "offline":
                offline.add(status.device_id)
    finally:
        statuses.stop()
    assert code == 70
    report = json.loads(capsys.readouterr().out)
    assert report["failed"] == {
        "thread": "sim-loop",
        "error": "RuntimeError: a bug in the event loop itself",
    }
    assert report["totals"]["batches_sent"] >= 4
    assert rounds[0] > 0
    assert [record.threadName for record in logged_exceptions] == ["sim-loop"]


@pytest.mark.broker
def test_a_simulated_device_sends_again_what_no_receipt_named(
    broker_settings: BrokerSettings,
) -> None:
    """As a real agent's outbox: a batch the broker acknowledged is kept until the trainer's
    receipt names it, and sent again when none did in time (a broker that crashed after its
    acknowledgement lost it)."""
    topics = Topics(broker_settings.topic_root)
    watcher, inbox = connect(broker_settings, [(topics.sensor("sim-0000"), 1)])
    loop = EventLoop()
    counters: Counter[str] = Counter()
    acked: list[Entry] = []
    link = Link(
        loop, broker_settings, PropertiesCache(), client_id="sim-0000", username="",
        password="", counters=counters, on_acked=acked.append,
    )  # fmt: skip
    done = threading.Event()
    runner = threading.Thread(target=lambda: loop.run(until=done.is_set), daemon=True)
    runner.start()

    def on_loop(action: Callable[[], object]) -> None:
        finished = threading.Event()
        loop.call_soon_threadsafe(lambda: (action(), finished.set()))
        assert finished.wait(10)

    def arrived(count: int) -> list[bytes]:
        return [receive(inbox, 10).payload for _ in range(count)]

    try:
        on_loop(link.start)
        for seq in range(5):
            message = Outbound(topics.sensor("sim-0000"), b"batch-%d" % seq)
            on_loop(lambda m=message, s=seq: link.publish(m, ReceiptKey.batch(s)))
        assert arrived(5) == [b"batch-%d" % seq for seq in range(5)]
        deadline = time.monotonic() + 10
        while link.unreceipted < 5:  # the broker's acknowledgements come on the loop's thread
            assert time.monotonic() < deadline, "the broker acknowledged not all five"
            on_loop(lambda: None)
        resent: list[int] = []
        on_loop(lambda: resent.append(link.resend_unreceipted(0.0)))  # no receipt at all yet
        on_loop(lambda: link.receipted([ReceiptKey.batch(1), ReceiptKey.batch(3)]))
        on_loop(lambda: resent.append(link.resend_unreceipted(0.0)))
        # Nothing while the trainer sends no receipts (no resend storm in an outage); then what
        # came before the latest receipted one, in order (batch 4 may still be on its way).
        assert resent == [0, 2]
        assert arrived(2) == [b"batch-0", b"batch-2"]
        assert counters["receipted"] == 2
        assert counters["resends"] == 2
        deadline = time.monotonic() + 10
        while len(acked) < 7:
            assert time.monotonic() < deadline, "the broker acknowledged not both resends"
            on_loop(lambda: None)
        # Receivers of the acknowledgement tell a resend from a first send (the app counts an
        # answer once).
        assert [entry.resent for entry in acked] == [False] * 5 + [True] * 2
    finally:
        loop.call_soon_threadsafe(link.abort)
        loop.call_soon_threadsafe(done.set)
        runner.join(10)
        loop.close()
        watcher.stop()
