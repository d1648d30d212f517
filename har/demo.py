"""``har demo``: the whole loop on this machine, with nothing but this repository.

1. A Mosquitto broker on a free loopback port, a signing key pair.
2. Base data: synthetic WISDM-format recordings of six people (or ``--data FILE``).
3. A first model trained on them, registered, signed and promoted.
4. ``har trainer serve`` and ``har agent`` as real processes. The device's wearer carries the
   device rotated by 90 degrees: the global model has never seen that, and gets postures wrong.
5. This process plays the user's app: it reads the device's predictions and confirms some of
   them with the true activity (the replayed recording knows it).
6. The agent learns from each confirmation on the device; the trainer joins the confirmed
   windows, retrains, passes the quality gate and publishes a signed version; the agent verifies
   it, re-applies the user's confirmations to it and swaps it in.
7. Accuracy on the device is reported per phase; both processes stop with SIGTERM.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import queue
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shared.errors import HarError

log = logging.getLogger(__name__)

ACTIVITIES = ("Walking", "Jogging", "Upstairs", "Downstairs", "Sitting", "Standing")
DEVICE_ID = "demo-wrist"
DEVICE_USER = 99
# Scored phases span one full cycle of the device's recording (6 activities x 60 s, a window
# every 2 s), so each phase sees every activity once and the phases compare like with like.
CYCLE_WINDOWS = 180


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = subparsers.add_parser(
        "demo",
        help="run the full loop locally: broker, trainer, device agent, confirmations, retrain",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--workdir", type=Path, default=Path("var/demo"), help="wiped and reused each run"
    )
    parser.add_argument(
        "--data", type=Path, help="WISDM-format base data instead of the synthetic default"
    )
    parser.add_argument(
        "--device-user", type=int, help="with --data: the user the device replays (held out)"
    )
    parser.add_argument("--confirm-every", type=int, default=3, help="confirm every Nth window")
    parser.add_argument("--confirmations", type=int, default=60, help="retrain after this many")
    parser.add_argument("--speed", type=float, default=10.0, help="replay speed (x real time)")
    parser.add_argument("--epochs", type=int, default=8, help="epochs of the first model")
    parser.add_argument("--timeout", type=float, default=900.0, help="give up after (seconds)")
    parser.set_defaults(func=run)


@dataclass
class Phase:
    name: str
    total: int = 0
    correct: int = 0
    versions: set[str] = field(default_factory=set)

    def add(self, correct: bool, version: str) -> None:
        self.total += 1
        self.correct += int(correct)
        self.versions.add(version)

    def to_dict(self) -> dict[str, Any]:
        accuracy = self.correct / self.total if self.total else None
        return {
            "windows": self.total,
            "accuracy": None if accuracy is None else round(accuracy, 4),
            "model_versions": sorted(self.versions),
        }


def _say(text: str) -> None:
    print(f"[demo] {text}", flush=True)


def _prepare_data(args: argparse.Namespace, workdir: Path) -> tuple[Path, Path, int]:
    """(base data, device recording, device user)."""
    from har.synthetic_data import rotation_about_x, write_dataset
    from shared.wisdm import load_wisdm

    if args.data is None:
        base = write_dataset(workdir / "base.txt", range(1, 7), ACTIVITIES, 90.0, seed=10)
        device = write_dataset(
            workdir / "device.txt",
            [DEVICE_USER],
            ACTIVITIES,
            60.0,
            seed=500,
            rotation=rotation_about_x(90.0),  # worn differently from everyone in the base data
        )
        _say("base data: 6 synthetic people x 6 activities x 90 s (embedded default)")
        _say("device: a new person wearing the device rotated by 90 degrees")
        return base, device, DEVICE_USER
    data = load_wisdm(args.data)
    users = sorted(set(data.users.tolist()))
    device_user = args.device_user if args.device_user is not None else users[-1]
    if device_user not in users:
        raise HarError(f"--device-user {device_user} is not in {args.data} (users: {users})")
    base = workdir / "base.txt"
    with args.data.open() as source, base.open("w") as target:
        for line in source:
            if not line.startswith(f"{device_user},"):
                target.write(line)
    _say(f"base data: {args.data} without user {device_user}; the device replays that user")
    return base, args.data, device_user


def _train_first_model(base: Path, workdir: Path, epochs: int, key: Path) -> str:
    from shared.signing import load_private_key
    from shared.wisdm import load_wisdm
    from trainer_service.registry import ModelRegistry
    from trainer_service.training import TrainConfig, train_and_export

    _say(f"training the first model ({epochs} epochs, held-out users for the test) ...")
    registry = ModelRegistry(workdir / "registry")
    config = TrainConfig(epochs=epochs, patience=4)
    name = registry.new_version_name(config.arch)
    folder, metrics = train_and_export(
        load_wisdm(base), config, workdir / "registry" / "staging" / name, progress=False
    )
    info = registry.add(folder, parent=None)
    registry.promote(info.version, load_private_key(key), chunk_size=256 * 1024)
    test = metrics["test"]
    _say(
        f"model {info.version}: held-out-user accuracy {test['accuracy']:.3f}, "
        f"macro-F1 {test['macro_f1']:.3f}"
    )
    return info.version


def _write_configs(
    workdir: Path, broker: Any, data: tuple[Path, Path, int], args: argparse.Namespace
) -> tuple[Path, Path]:
    base, device, user = data
    broker_table = (
        f'[broker]\nhost = "{broker.host}"\nport = {broker.port}\n'
        "keepalive_s = 10\nreconnect_min_s = 0.2\nreconnect_max_s = 2.0\n"
    )
    trainer = workdir / "trainer.toml"
    trainer.write_text(
        f'instance = "demo-trainer"\n'
        f'data_dir = "{workdir / "trainer-data"}"\n'
        f'registry_dir = "{workdir / "registry"}"\n'
        f'private_key = "{workdir / "keys" / "model-signing.key"}"\n'
        f'base_data = "{base}"\n'
        f"status_interval_s = 5.0\n\n{broker_table}\n"
        "[retrain]\n"
        f"min_new_confirmations = {args.confirmations}\n"
        "interval_s = 0\nepochs = 4\npatience = 2\ngate_margin = 0.02\n"
    )
    agent = workdir / "agent.toml"
    agent.write_text(
        f'device_id = "{DEVICE_ID}"\n'
        f'state_dir = "{workdir / "device"}"\n'
        f'public_key = "{workdir / "keys" / "model-signing.pub"}"\n\n{broker_table}\n'
        "[sensor]\n"
        f'kind = "replay"\nreplay_file = "{device}"\nreplay_user = {user}\n'
        f"speed = {args.speed}\nloop = true\n\n"
        "[agent]\nstatus_interval_s = 5.0\nwindow_hop = 40\n"
    )
    return trainer, agent


def _start(name: str, config: Path, workdir: Path, *role: str) -> subprocess.Popen[bytes]:
    log_path = workdir / f"{name}.log"
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    _say(f"starting {name}: har {' '.join(role)} --config {config} (log: {log_path})")
    with log_path.open("wb") as log_file:
        return subprocess.Popen(
            [sys.executable, "-m", "har", *role, "--config", str(config)],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=env,
        )


def _stop(name: str, process: subprocess.Popen[bytes]) -> int:
    process.send_signal(signal.SIGTERM)
    try:
        code = process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        code = process.wait()
    _say(f"{name} stopped with exit code {code}")
    return code


class SimulatedUser:
    """The user's app: confirms every Nth prediction with the truth, scores every phase."""

    def __init__(self, topics: Any, first_version: str, confirm_every: int, wanted: int) -> None:
        self._topics = topics
        self._first = first_version
        self._confirm_every = confirm_every
        self._wanted = wanted
        self.phases = {
            "global_model": Phase("the global model as shipped, no confirmation yet"),
            "on_device_learning": Phase(
                "while the user confirms: global model + on-device learning"
            ),
            "on_device_learning_last_cycle": Phase(
                "the last cycle of windows before the new version arrived"
            ),
            "new_global_model": Phase("retrained global model, confirmations re-applied"),
        }
        self._recent: list[bool] = []
        self.confirmed = 0
        self.seen = 0
        self.new_version: str | None = None
        self.errors: list[str] = []

    def handle(self, message: Any) -> tuple[bool, Any]:
        """(loop finished?, a confirmation to send or None) for one inbound message."""
        from shared import codec

        if message.topic == self._topics.model_manifest():
            version = codec.decode_manifest(message.payload).version
            if version != self._first and self.new_version is None:
                self.new_version = version
                _say(f"trainer published a new signed model: {version}")
        elif message.topic != self._topics.prediction(DEVICE_ID):
            event = json.loads(message.payload)
            self.errors.append(f"{event['code']}: {event['message']}")
            _say(f"error event: {event['code']}: {event['message'][:200]}")
        else:
            prediction = codec.decode_prediction(message.payload)
            if prediction.truth is not None:
                return self._on_prediction(prediction)
        return False, None

    def _on_prediction(self, prediction: Any) -> tuple[bool, Any]:
        from shared.messages import Confirmation

        self.seen += 1
        correct = prediction.label == prediction.truth
        if prediction.model_version != self._first:
            phase = self.phases["new_global_model"]
            phase.add(correct, prediction.model_version)
            if phase.total >= CYCLE_WINDOWS:
                self._close_learning_phase()
                return True, None
            return False, None
        if self.seen <= CYCLE_WINDOWS:
            self.phases["global_model"].add(correct, prediction.model_version)
            return False, None
        self.phases["on_device_learning"].add(correct, prediction.model_version)
        self._recent = [*self._recent[-(CYCLE_WINDOWS - 1) :], correct]
        if self.confirmed >= self._wanted or self.seen % self._confirm_every:
            return False, None
        self.confirmed += 1
        if self.confirmed % 20 == 0:
            _say(f"{self.confirmed} predictions confirmed by the user so far")
        return False, Confirmation(prediction.prediction_id, prediction.truth, "app", time.time())

    def _close_learning_phase(self) -> None:
        last = self.phases["on_device_learning_last_cycle"]
        for correct in self._recent:
            last.add(correct, self._first)

    def report(self) -> dict[str, Any]:
        return {
            "phases": {key: phase.to_dict() for key, phase in self.phases.items()},
            "confirmations_sent": self.confirmed,
            "first_model": self._first,
            "new_model": self.new_version,
            "error_events": self.errors,
        }


def _play_user(
    args: argparse.Namespace,
    broker_settings: Any,
    first_version: str,
    processes: dict[str, subprocess.Popen[bytes]],
) -> dict[str, Any]:
    """Run the simulated user until the new model has served enough windows."""
    from shared import codec
    from shared.mqtt_transport import InboundMessage, MqttConnection, Outbound
    from shared.topics import Topics

    topics = Topics(broker_settings.topic_root)
    inbox: queue.Queue[InboundMessage] = queue.Queue(maxsize=1000)
    app = MqttConnection(
        broker_settings,
        client_id="demo-user-app",
        subscriptions=[
            (topics.prediction(DEVICE_ID), 1),
            (topics.error(DEVICE_ID), 1),
            (topics.trainer_error(), 1),
            (topics.model_manifest(), 1),
        ],
        inbox=inbox,
        persistent_session=False,
    )
    user = SimulatedUser(topics, first_version, args.confirm_every, args.confirmations)
    app.start()
    deadline = time.monotonic() + args.timeout
    try:
        while time.monotonic() < deadline:
            if any(process.poll() is not None for process in processes.values()):
                raise HarError("the agent or the trainer exited early: see their logs")
            try:
                message = inbox.get(timeout=1.0)
            except queue.Empty:
                continue
            message.ack()
            finished, confirmation = user.handle(message)
            if confirmation is not None:
                topic = topics.confirmation(DEVICE_ID)
                app.publish(Outbound(topic, codec.encode_confirmation(confirmation)))
            if finished:
                return user.report()
        raise HarError(f"the loop did not complete within {args.timeout} s")
    finally:
        app.stop()


def run(args: argparse.Namespace) -> int:
    from har.local_broker import MosquittoProcess
    from shared.config import BrokerSettings
    from shared.signing import generate_keypair

    started = time.monotonic()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TensorFlow is first imported
    for noisy in ("absl", "tensorflow"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    workdir: Path = args.workdir.resolve()
    if workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    (workdir / "broker").mkdir()
    broker = MosquittoProcess(workdir / "broker")
    broker.start()
    _say(f"mosquitto listening on {broker.host}:{broker.port}")
    processes: dict[str, subprocess.Popen[bytes]] = {}
    try:
        private_key, _ = generate_keypair(workdir / "keys")
        data = _prepare_data(args, workdir)
        first = _train_first_model(data[0], workdir, args.epochs, private_key)
        trainer_config, agent_config = _write_configs(workdir, broker, data, args)
        processes["trainer"] = _start("trainer", trainer_config, workdir, "trainer", "serve")
        processes["agent"] = _start("agent", agent_config, workdir, "agent")
        settings = BrokerSettings(host=broker.host, port=broker.port)
        report = _play_user(args, settings, first, processes)
        codes = {name: _stop(name, process) for name, process in processes.items()}
        processes.clear()
        report["exit_codes"] = codes
        report["seconds"] = round(time.monotonic() - started, 1)
        (workdir / "summary.json").write_text(json.dumps(report, indent=2))
        _say("summary (also in " + str(workdir / "summary.json") + "):")
        print(json.dumps(report, indent=2), flush=True)
        return 0 if all(code == 0 for code in codes.values()) and report["new_model"] else 1
    finally:
        for name, process in processes.items():
            _stop(name, process)
        broker.stop()
