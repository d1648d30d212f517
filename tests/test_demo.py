"""``har demo``: its pieces (data choice, the people's app, the summary, signal handling) and, as
a real process, that Ctrl-C stops every process it started."""

from __future__ import annotations

import json
import os
import queue
import shlex
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from activity_model.wisdm import load_wisdm
from har.demo.data import DOWNLOADED, WISDM_ENV, find_data_file, prepare
from har.demo.people import PeopleApp
from har.demo.processes import Interrupted, StopSignals
from har.demo.summary import PHASES, build, lost_learning, render
from har.local_broker import shipped_logins
from shared import codec
from shared.errors import HarError
from shared.messages import (
    DeviceState,
    DeviceStatus,
    Prediction,
    WindowRef,
)
from shared.topics import Topics
from simulator.synthetic_data import write_dataset
from tests.dashboard_helpers import manifest as a_manifest

REPO = Path(__file__).resolve().parent.parent
TOPICS = Topics()
LABELS = ("Walking", "Sitting")
FIRST, NEW = "v-first", "v-new"


# ------------------------------------------------------------------------------ data


def test_data_file_precedence_flag_then_environment_then_download_then_synthetic(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    flag, named = tmp_path / "flag.txt", tmp_path / "named.txt"
    flag.write_text("x")
    named.write_text("x")
    assert find_data_file(None, {}) is None
    DOWNLOADED.write_text("x")  # where `har data download` saves by default
    assert find_data_file(None, {}) == (tmp_path / DOWNLOADED).resolve()
    assert find_data_file(None, {WISDM_ENV: str(named)}) == named
    assert find_data_file(flag, {WISDM_ENV: str(named)}) == flag
    with pytest.raises(HarError, match="no such file"):
        find_data_file(tmp_path / "missing.txt", {})
    with pytest.raises(HarError, match=WISDM_ENV):
        find_data_file(None, {WISDM_ENV: str(tmp_path / "missing.txt")})


def test_real_data_holds_the_device_users_out_and_is_bounded(tmp_path: Path) -> None:
    source = write_dataset(tmp_path / "source.txt", range(1, 7), LABELS, 30.0, seed=3)
    data = prepare(
        tmp_path / "work", ["d-1", "d-2", "d-3"], source, base_seconds=10.0, device_users=()
    )
    base = load_wisdm(data.base)
    assert set(base.users.tolist()) == {1, 2, 3}, "the last three users are the devices'"
    # At most base_seconds (10 s = 200 samples) of each activity per base user.
    assert len(base) == 3 * len(LABELS) * 200
    assert [w.user for w in data.wearers] == [4, 5, 6]
    for wearer in data.wearers:
        recording = load_wisdm(wearer.recording)
        assert set(recording.users.tolist()) == {wearer.user}
        assert len(recording) == wearer.samples == len(LABELS) * 30 * 20
        assert wearer.windows_per_pass(40) == wearer.samples // 40
    with pytest.raises(HarError, match="not in"):
        prepare(tmp_path / "w2", ["a", "b", "c"], source, base_seconds=10, device_users=(1, 2, 9))
    with pytest.raises(HarError, match="different device users"):
        prepare(tmp_path / "w3", ["a", "b", "c"], source, base_seconds=10, device_users=(1, 1, 2))


def test_synthetic_wearers_differ_from_each_other(tmp_path: Path) -> None:
    data = prepare(tmp_path / "work", ["d-1", "d-2"], None, base_seconds=2.0)
    first, second = (load_wisdm(w.recording) for w in data.wearers)
    assert data.wearers[0].description != data.wearers[1].description
    assert len(first) == len(second) == data.wearers[0].samples
    assert not (first.xyz == second.xyz).all()


# ------------------------------------------------------------------------------ people's app


def prediction(device: str, n: int, version: str, label: str, truth: str) -> tuple[str, bytes]:
    message = Prediction(
        prediction_id=f"{device}-{n}",
        device_id=device,
        window=WindowRef(batch_seq=n, offset=0, length=80),
        label=label,
        class_index=LABELS.index(label),
        probabilities=(0.5, 0.5),
        model_version=version,
        ts=1_700_000_000.0 + n,
        truth=truth,
    )
    return TOPICS.prediction(device), codec.encode_prediction(message)


def status(device: str, version: str, state: DeviceState = "online") -> tuple[str, bytes]:
    message = DeviceStatus(device, state, version, 1_700_000_000.0, {"predictions": 7})
    return TOPICS.status(device), codec.encode_status(message)


def manifest(version: str) -> tuple[str, bytes]:
    return TOPICS.model_manifest(), codec.encode_manifest(a_manifest(version, LABELS))


def make_app(confirmations: int, share: float = 1.0, mistakes: float = 0.0) -> PeopleApp:
    return PeopleApp(
        TOPICS,
        "demo-trainer",
        [("d-1", 4), ("d-2", 4)],
        FIRST,
        LABELS,
        confirmations=confirmations,
        confirm_share=share,
        mistake_rate=mistakes,
    )


def test_people_score_a_pass_first_then_confirm_up_to_their_share_of_the_total() -> None:
    app = make_app(confirmations=5)
    sent = []
    for n in range(20):
        truth = "Walking"
        label = "Walking" if n % 2 else "Sitting"
        for device in ("d-1", "d-2"):
            sent += app.handle(*prediction(device, n, FIRST, label, truth))
    one = app.devices["d-1"]
    assert one.before.windows == 4
    assert one.before.accuracy == 0.5
    assert one.while_confirming.windows == 3  # one prediction per confirmation (share 1.0)
    assert one.learned.windows == 4  # then one pass with what the device learned
    # 5 in all, split 3 + 2, none during the first pass; always the truth with no mistakes.
    assert [d.confirmations_sent for d in app.devices.values()] == [3, 2]
    assert len(sent) == 5
    assert {topic for topic, _ in sent} == {TOPICS.confirmation("d-1"), TOPICS.confirmation("d-2")}
    assert all(confirmation.label == "Walking" for _, confirmation in sent)
    assert app.received["predictions"] == 40


def test_wrong_answers_are_counted_and_the_new_version_is_scored_after() -> None:
    app = make_app(confirmations=4, mistakes=1.0)
    for n in range(8):
        app.handle(*prediction("d-1", n, FIRST, "Walking", "Walking"))
    assert app.devices["d-1"].wrong_answers == app.devices["d-1"].confirmations_sent == 2
    app.handle(*manifest(FIRST))
    assert app.new_version is None
    app.handle(*manifest(NEW))
    assert app.new_version == NEW
    for n in range(8, 14):
        app.handle(*prediction("d-1", n, NEW, "Walking", "Walking"))
    one = app.devices["d-1"]
    assert one.after.windows == 4, "one pass is scored"
    assert one.after.accuracy == 1.0
    assert not one.finished(NEW), "its status does not report the new version yet"
    app.handle(*status("d-1", NEW))
    assert one.finished(NEW)
    assert not app.all_finished(), "d-2 has not"
    app.handle(TOPICS.prediction("d-2"), b"{not json")
    assert app.received["malformed"] == 1


def test_progress_says_where_the_run_is_in_every_phase() -> None:
    app = make_app(confirmations=2)
    assert app.progress() == "first model: 0/8 windows of the first pass scored"
    for n in range(4):
        for device in ("d-1", "d-2"):
            app.handle(*prediction(device, n, FIRST, "Walking", "Walking"))
    assert app.progress() == "people confirming: 0/2 confirmations sent"
    for device in ("d-1", "d-2"):
        app.handle(*prediction(device, 4, FIRST, "Walking", "Walking"))
    assert app.progress().startswith("waiting for the retrained model; meanwhile 0/8 windows")
    # The trainer's status says which epoch of the retrain it is at.
    retraining = DeviceStatus(
        "demo-trainer", "online", FIRST, 1.0, {"retrain_epoch": 2, "retrain_epochs_max": 4}
    )
    app.handle(TOPICS.trainer_status("demo-trainer"), codec.encode_status(retraining))
    assert app.progress() == (
        "the trainer is retraining: epoch 2 of at most 4 (early stopping may end it sooner); "
        "meanwhile 0/8 windows scored with what the devices learned"
    )
    between_rounds = DeviceStatus(
        "demo-trainer", "online", FIRST, 2.0, {"retrain_epoch": 0, "retrain_epochs_max": 0}
    )
    app.handle(TOPICS.trainer_status("demo-trainer"), codec.encode_status(between_rounds))
    assert app.progress().startswith("waiting for the retrained model")
    app.handle(*manifest(NEW))
    app.handle(*status("d-1", NEW))
    app.handle(*prediction("d-1", 5, NEW, "Walking", "Walking"))
    assert app.progress() == f"devices running {NEW}: 1/2; windows predicted with it: 1/8"


def test_summary_counts_and_text(tmp_path: Path) -> None:
    app = make_app(confirmations=2)
    for n in range(6):
        app.handle(*prediction("d-1", n, FIRST, "Sitting", "Walking"))
    app.handle(*status("d-1", FIRST))
    summary = build(
        app,
        data="synthetic",
        wearers={"d-1": "person 1"},
        first_model={"version": FIRST, "test_accuracy": 0.9},
        seconds=12.34,
        exit_codes={"d-1": 0},
        outcome="ok",
    )
    assert summary["devices"]["d-1"]["accuracy"]["before"]["accuracy"] == 0.0
    assert summary["devices"]["d-1"]["model_version"] == FIRST
    assert summary["messages"]["predictions"]["made_by_devices"] == 7
    assert summary["messages"]["predictions"]["received_by_people_app"] == 6
    assert summary["messages"]["confirmations"]["sent_by_people_app"] == 1, "its share of 2"
    assert summary["overall"]["before"]["windows"] == 4
    json.dumps(summary)  # it is written as JSON
    text = render(summary)
    assert "d-1" in text
    assert "0.0%" in text
    assert "overall" in text
    assert "time: 12.3 s" in text


def test_the_summary_flags_a_device_that_lost_what_it_learned_with_the_new_model() -> None:
    def row(learned: float, after: float) -> dict[str, object]:
        scores = {"before": 0.5, "while_confirming": 0.6, "learned": learned, "after": after}
        return {
            "wearer": "",
            "accuracy": {p: {"accuracy": a, "windows": 10} for p, a in scores.items()},
            "model_version": NEW,
            "confirmations_sent": 3,
            "wrong_answers": 0,
            "learned_state_served": True,
        }

    summary = {
        "outcome": "ok",
        "data": "synthetic",
        "first_model": {"version": FIRST},
        "new_model": NEW,
        "devices": {"kept": row(0.95, 0.94), "lost": row(0.95, 0.90), "gained": row(0.9, 1.0)},
        "overall": {p: {"accuracy": 0.9, "windows": 30} for p in PHASES},
        "messages": {},
        "seconds": 1.0,
        "exit_codes": {},
        "error_events": [],
    }
    assert lost_learning(summary) == ["lost"]  # 5 points down; "kept" lost 1
    assert "lost more than 2 points of what they learned with the new model: lost" in render(
        summary
    )
    summary["devices"].pop("lost")  # type: ignore[attr-defined]
    assert "every device kept what it learned across the new model" in render(summary)


# ------------------------------------------------------------------------------ signals


def signal_self(signum: int) -> None:
    os.kill(os.getpid(), signum)
    time.sleep(5)  # the handler interrupts this at once when it raises


def signal_inside_a_start(signals: StopSignals, finished: list[bool]) -> None:
    with signals.deferred():
        os.kill(os.getpid(), signal.SIGINT)
        finished.append(True)


@pytest.fixture
def python_sigint() -> Iterator[None]:
    """Python's own SIGINT handler, whatever this process inherited: a shell starts a background
    job with SIGINT ignored, and the test must not depend on how it was started."""
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, inherited)


@pytest.mark.usefixtures("python_sigint")
def test_stop_signals_raise_once_defer_inside_a_start_and_only_record_during_clean_up() -> None:
    with StopSignals():
        with pytest.raises(Interrupted) as raised:
            signal_self(signal.SIGTERM)
        assert raised.value.signum == signal.SIGTERM
        os.kill(os.getpid(), signal.SIGINT)  # a second signal while stopping: ignored
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler

    with StopSignals() as signals:
        finished: list[bool] = []
        with pytest.raises(Interrupted):
            signal_inside_a_start(signals, finished)
        assert finished == [True], "the signal waited until the block was done"

    with StopSignals() as signals:
        signals.hold()
        os.kill(os.getpid(), signal.SIGTERM)
        assert signals.taken == signal.SIGTERM


# ------------------------------------------------------------------------------ the real thing


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.slow
@pytest.mark.broker
def test_ctrl_c_stops_every_process_the_demo_started(tmp_path: Path) -> None:
    workdir = tmp_path / "demo"
    process = subprocess.Popen(
        [
            *[sys.executable, "-m", "har", "demo", "--workdir", str(workdir)],
            *["--epochs", "1", "--base-seconds", "8", "--timeout", "120"],
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", WISDM_ENV: ""},
        start_new_session=True,  # its own process group: the test can see what is left in it
    )
    lines: queue.Queue[str] = queue.Queue()
    output: list[str] = []

    def read() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            lines.put(line)

    reader = threading.Thread(target=read, name="demo-output", daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 50
        while not any("devices online" in line for line in output):
            remaining = deadline - time.monotonic()
            assert remaining > 0, "the devices never came online:\n" + "".join(output)
            try:
                output.append(lines.get(timeout=remaining))
            except queue.Empty:
                continue
        assert any("agents started" in line for line in output)
        # A login per integration, each said whose it is, its password in a file only.
        for user, purpose in shipped_logins().items():
            said = f"] {user:<14} {purpose}\n"  # "[demo 12:00:00]   watch   har watch, ..."
            assert any(line.replace("]   ", "] ", 1).endswith(said) for line in output), user
            password_file = workdir / "secrets" / f"{user}.password"
            assert stat.S_IMODE(password_file.stat().st_mode) == 0o600
            assert password_file.read_text() not in "".join(output)
        pids = json.loads((workdir / "pids.json").read_text())
        assert set(pids) == {"mosquitto", "trainer", "demo-wrist-1", "demo-wrist-2", "demo-wrist-3"}
        assert all(_alive(pid) for pid in pids.values()), "every child runs before Ctrl-C"
        # One of the three runs the light agent: LiteRT, from .venv-lite (no TensorFlow).
        assert any("demo-wrist-3 runs the light agent: LiteRT" in line for line in output)
        assert "models run on litert" in (workdir / "demo-wrist-3.log").read_text()
        assert "models run on tensorflow" in (workdir / "demo-wrist-1.log").read_text()

        process.send_signal(signal.SIGINT)  # to the demo process only, not its group
        code = process.wait(timeout=45)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        reader.join(timeout=10)
        if process.stdout is not None:
            process.stdout.close()
    while not lines.empty():
        output.append(lines.get())
    text = "".join(output)
    assert code == 128 + signal.SIGINT, text
    assert "stopped by SIGINT" in text
    left = [name for name, pid in pids.items() if _alive(pid)]
    assert not left, f"still running after Ctrl-C: {left}\n{text}"
    with pytest.raises(ProcessLookupError):
        os.killpg(process.pid, 0)  # nothing at all is left in the demo's process group


@pytest.mark.broker
def test_printed_watch_command_logs_in_with_its_own_login_beside_the_peoples_app(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The demo's broker (shipped config and ACL) with the app logged in as dashboard: the
    printed `har watch` command, as typed, logs in as watch, sees the fleet, and leaves the
    app's session alone (client id = username would end it for a second dashboard login)."""
    from har.cli import main
    from har.demo.run import WATCH_USER, watch_command
    from har.local_broker import ShippedMosquitto
    from shared.config import BrokerSettings
    from shared.mqtt_transport import MqttConnection, Outbound

    for name in [name for name in os.environ if name.startswith("HAR_")]:
        monkeypatch.delenv(name)
    passwords = {"dashboard": "app-secret", WATCH_USER: "watch-secret", "demo-wrist-1": "dev"}
    (tmp_path / "broker").mkdir()
    broker = ShippedMosquitto(tmp_path / "broker", passwords=passwords)
    password_file = tmp_path / "watch.password"
    password_file.write_text(passwords[WATCH_USER])
    command = watch_command(["har"], broker.port, password_file)
    assert passwords[WATCH_USER] not in command
    har, *argv = shlex.split(command)
    assert har == "har"
    assert argv[argv.index("--username") + 1] == WATCH_USER

    topics = Topics()  # the shipped ACL's root

    def login(user: str, client_id: str, **extra: object) -> MqttConnection:
        settings = BrokerSettings(
            host=broker.host, port=broker.port, username=user, password=passwords[user]
        )
        connection = MqttConnection(settings, client_id=client_id, **extra)  # type: ignore[arg-type]
        connection.start()
        assert connection.wait_connected(10.0), f"{user} could not log in"
        return connection

    changes: list[bool] = []
    broker.start()
    app = device = None
    try:
        app = login(
            "dashboard",
            "demo-people-app",
            persistent_session=False,
            on_connection_change=changes.append,
        )
        device = login("demo-wrist-1", "demo-wrist-1", persistent_session=False)
        status = DeviceStatus("demo-wrist-1", "online", "v1", time.time(), {})
        device.publish(
            Outbound(topics.status("demo-wrist-1"), codec.encode_status(status), retain=True)
        ).wait_accepted(10.0)

        assert main([*argv, "--once", "--json", "--wait", "1"]) == 0
        snapshot = json.loads(capsys.readouterr().out)
        assert [(d["device_id"], d["presence"]) for d in snapshot["devices"]] == [
            ("demo-wrist-1", "online")
        ]

        # The app was never disconnected: connected once, still connected, and the broker did
        # not close an older connection of the same client id.
        assert changes == [True]
        assert app.connected
        assert "already connected" not in broker.log_text()
    finally:
        for connection in (app, device):
            if connection is not None:
                connection.stop()
        broker.stop()
