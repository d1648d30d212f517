"""A fleet of N simulated devices through one Mosquitto with the trainer, for N = 10, 100, 1000.

For each N, on a fresh broker and trainer (real processes, loopback only):

- ``har sim`` runs N devices in one process (each on its own MQTT connection) at 20 Hz, real
  time, with a production-architecture model; their people confirm a share of predictions;
- this process subscribes to every device's status, and to the sensor batches and predictions of
  a sample of devices (``--latency-sample``, 50 by default, spread over the fleet), and measures
  **sensor-to-prediction latency**: from the arrival of the batch that completes a window to the
  arrival of that window's prediction (both seen here, so one clock). A device predicts
  when a batch completes a window, so the figure is the device's and the broker's processing
  time; the sensor's own batching adds up to one batch period on top;
- after a steady-state period, a second signed version is published, as the trainer does after a
  retrain, and the bench waits until **100 % of the devices report it** in their status;
- then the fleet stops, and the trainer's database is compared with what the fleet made:
  **messages lost** (sensor batches by sequence number, predictions, confirmations: must be 0),
  and **confirmation-to-stored latency** (the trainer's commit time minus the confirmation's
  timestamp);
- CPU (share of one core) and RSS of the simulator, the trainer and Mosquitto over the steady
  state. ``--sim-runtime tensorflow litert`` runs each fleet size on both model runtimes.

Prints one JSON document. Figures are medians over the run; compare N with N within one run.

    .venv/bin/python bench/fleet.py [--devices 10 100 1000] [--seconds 30]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from _common import (  # also puts the repository on sys.path
    BrokerWatcher,
    har_train,
    medians,
    percentiles,
    rss_mb,
)

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime + stime


def train_versions(workdir: Path) -> tuple[Path, Path]:
    """Two versions of the production architecture (different seeds), made by ``har train``."""
    from activity_model.wisdm import WISDM_ACTIVITIES
    from simulator.synthetic_data import write_dataset

    base = write_dataset(workdir / "base.txt", range(1, 5), WISDM_ACTIVITIES, 40.0)
    first, second = (
        har_train(base, workdir / "staging", version, seed=seed)
        for version, seed in (("v-bench-1", 1), ("v-bench-2", 2))
    )
    return first, second


@dataclass
class Observer:
    """What the dashboards would see: every batch, prediction and status, with arrival times."""

    topics: Any
    batch_arrivals: dict[str, dict[int, tuple[float, int]]] = field(
        default_factory=lambda: defaultdict(dict)
    )
    latencies: list[float] = field(default_factory=list)
    versions: dict[str, str | None] = field(default_factory=dict)
    online_at: dict[str, float] = field(default_factory=dict)  # ts of the last "online" status
    predictions: int = 0
    measuring: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)
    changed: threading.Condition = field(init=False)

    def __post_init__(self) -> None:
        self.changed = threading.Condition(self.lock)

    def take(self, topic: str, payload: bytes, now: float) -> None:
        from shared import codec

        device = self.topics.device_of(topic)
        kind = self.topics.kind_of(topic)
        if kind == "sensor":
            batch = codec.decode_sensor_batch(payload)
            self.batch_arrivals[device][batch.seq] = (now, batch.samples.shape[0])
        elif kind == "prediction":
            prediction = codec.decode_prediction(payload)
            self.predictions += 1
            completed = self._completing_batch(device, prediction.window)
            if completed is not None and self.measuring:
                self.latencies.append(now - completed)
        elif kind == "status":
            status = codec.decode_status(payload)
            with self.changed:
                self.versions[device] = status.model_version
                if status.state == "online":  # its own clock: a retained one is older
                    self.online_at[device] = status.ts
                self.changed.notify_all()

    def wait_online_since(self, devices: list[str], since: float, timeout: float) -> float | None:
        """Seconds from ``since`` (wall clock) until every device published an "online" status
        stamped after it, not the retained one from before (None: timeout)."""
        with self.changed:
            done = self.changed.wait_for(
                lambda: all(self.online_at.get(d, 0.0) > since for d in devices), timeout
            )
        return round(time.time() - since, 2) if done else None

    def _completing_batch(self, device: str, window: Any) -> float | None:
        """Arrival time of the batch holding the window's last sample."""
        arrivals = self.batch_arrivals[device]
        seq, remaining = window.batch_seq, window.offset + window.length
        while seq in arrivals:
            arrived, size = arrivals[seq]
            if remaining <= size:
                return arrived
            remaining -= size
            seq += 1
        return None

    def wait_all(
        self, devices: list[str], version: str, timeout: float, since: float | None = None
    ) -> float | None:
        """Seconds from ``since`` until every device's status names ``version`` (None: timeout)."""
        started = time.monotonic() if since is None else since
        with self.changed:
            done = self.changed.wait_for(
                lambda: all(self.versions.get(d) == version for d in devices), timeout
            )
        return round(time.monotonic() - started, 2) if done else None


def store_counts(db: Path, first_seqs: dict[str, tuple[int, int]]) -> dict[str, Any]:
    """What the trainer stored, against what the fleet made."""
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        stored = defaultdict(set)
        for device, seq in conn.execute("SELECT device_id, seq FROM batches"):
            stored[device].add(seq)
        # The fleet's devices only (a bench may run other devices beside it).
        fleet = sorted(first_seqs)
        marks = ", ".join("?" * len(fleet))
        predictions = conn.execute(
            f"SELECT COUNT(*) FROM predictions WHERE device_id IN ({marks})", fleet
        ).fetchone()[0]
        confirmation_rows = conn.execute(
            f"SELECT ts, received FROM confirmations WHERE device_id IN ({marks})", fleet
        ).fetchall()
    missing = 0
    for device, (first, after_last) in first_seqs.items():
        missing += sum(1 for seq in range(first, after_last) if seq not in stored[device])
    return {
        "batches_stored": sum(len(seqs) for seqs in stored.values()),
        "batches_missing": missing,
        "predictions_stored": predictions,
        "confirmations_stored": len(confirmation_rows),
        "confirmation_to_stored": percentiles(
            [received - ts for ts, received in confirmation_rows]
        ),
    }


def account(fleet: dict[str, Any], db: Path, timeout: float) -> dict[str, Any]:
    """What ``har sim``'s report says the fleet made, what the trainer's store holds of it
    (waiting up to ``timeout`` for the trainer to catch up), and what was lost."""
    seqs = {d: (row["first_seq"], row["next_seq"]) for d, row in fleet["per_device"].items()}
    totals = fleet["totals"]
    made = {
        "batches": sum(after - first_seq for first_seq, after in seqs.values()),
        "predictions": totals.get("predictions", 0),
        "confirmations": totals.get("confirmations_sent", 0),
    }
    # The trainer acknowledges only what it committed; wait until it has everything (or give up).
    deadline = time.monotonic() + timeout
    stored = store_counts(db, seqs)
    while time.monotonic() < deadline and (
        stored["batches_missing"]
        or stored["predictions_stored"] < made["predictions"]
        or stored["confirmations_stored"] < made["confirmations"]
    ):
        time.sleep(1.0)  # polling another process's database: there is no event to wait on
        stored = store_counts(db, seqs)
    return {
        "made_by_fleet": made,
        "unsent_at_fleet_exit": totals.get("unsent_at_exit", 0),
        # The people's app sends an answer again until its device relays it (docs/protocol.md).
        "app_confirmations_resent": fleet.get("app", {}).get("resends", 0),
        "stored_by_trainer": stored,
        "lost": {
            "batches": stored["batches_missing"],
            "predictions": made["predictions"] - stored["predictions_stored"],
            "confirmations": made["confirmations"] - stored["confirmations_stored"],
        },
    }


def run_fleet(
    n: int, runtime: str, args: argparse.Namespace, versions: tuple[Path, Path], root: Path
) -> dict:
    from har.local_broker import MosquittoProcess
    from shared.config import BrokerSettings
    from shared.mqtt_transport import MqttConnection
    from shared.signing import generate_keypair, load_private_key
    from shared.topics import Topics
    from trainer_service.distribution import current_release_messages, publish_all
    from trainer_service.registry import ModelRegistry

    workdir = root / f"fleet-{n}"
    (workdir / "broker").mkdir(parents=True)
    private, public = generate_keypair(workdir / "keys")
    key = load_private_key(private)
    registry = ModelRegistry(workdir / "registry")
    # The registry takes a version folder over (it moves it): give it copies, one per run.
    copies = [shutil.copytree(folder, workdir / "staging" / folder.name) for folder in versions]
    first = registry.add(copies[0], parent=None).version
    second = registry.add(copies[1], parent=first).version
    registry.promote(first, key, chunk_size=256 * 1024)

    broker = MosquittoProcess(workdir / "broker")
    broker.start()
    settings = BrokerSettings(host=broker.host, port=broker.port)
    topics = Topics(settings.topic_root)
    (workdir / "trainer.toml").write_text(
        f'instance = "bench"\ndata_dir = "{workdir / "trainer-data"}"\n'
        f'registry_dir = "{workdir / "registry"}"\nprivate_key = "{private}"\n'
        f'[broker]\nhost = "{broker.host}"\nport = {broker.port}\n'
        "[retrain]\nmin_new_confirmations = 1000000000\ninterval_s = 0\n"
        "[ingest]\nqueue_size = 5000\ncommit_batch = 500\n"
    )
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    logs = {name: (workdir / f"{name}.log").open("wb") for name in ("trainer", "sim")}
    trainer = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "har",
            "trainer",
            "serve",
            "--config",
            str(workdir / "trainer.toml"),
        ],
        stdout=logs["trainer"],
        stderr=subprocess.STDOUT,
        env=env,
    )
    observer = Observer(topics)
    devices = [f"sim-{i:04d}" for i in range(n)]
    sampled = devices[:: max(1, n // args.latency_sample)]
    watcher = BrokerWatcher(
        settings,
        "bench-observer",
        # Every device's status, but the batches and predictions of a sample of devices only:
        # decoding a thousand batches a second here would take the CPU the fleet is measured on.
        [
            (topics.all_status(), 1),
            *[(topics.sensor(d), 1) for d in sampled],
            *[(topics.prediction(d), 1) for d in sampled],
        ],
        lambda topic, payload: observer.take(topic, payload, time.monotonic()),
        queue_size=200_000,
    )
    watcher.start()
    report_path = workdir / "sim-report.json"
    sim = subprocess.Popen(
        [
            sys.executable, "-m", "har", "sim",
            "--devices", str(n),
            "--public-key", str(public),
            "--broker-port", str(broker.port),
            "--state-dir", str(workdir / "sim"),
            "--batch-seconds", str(args.batch_seconds),
            "--confirm-share", str(args.confirm_share),
            "--report", str(report_path),
        ],
        stdout=subprocess.DEVNULL,
        stderr=logs["sim"],
        env={**env, "HAR_RUNTIME": runtime},  # the sim's `runtime` setting
    )  # fmt: skip
    result: dict[str, Any] = {"devices": n, "sim_runtime": runtime}
    try:
        started = time.monotonic()
        ready = observer.wait_all(devices, first, timeout=300)
        result["seconds_until_all_run_first_version"] = ready
        if ready is None:
            raise RuntimeError(f"not every device installed {first}: see {workdir}")
        assert broker._process is not None
        pids = {"sim": sim.pid, "trainer": trainer.pid, "mosquitto": broker._process.pid}
        cpu_before = {name: cpu_seconds(pid) for name, pid in pids.items()}
        observer.measuring = True
        window_started = time.monotonic()
        time.sleep(args.seconds)  # the steady state being measured, not synchronisation
        observer.measuring = False
        elapsed = time.monotonic() - window_started
        result["steady_state_s"] = round(elapsed, 1)
        result["cpu_share_of_one_core"] = {
            name: round((cpu_seconds(pid) - cpu_before[name]) / elapsed, 3)
            for name, pid in pids.items()
        }
        result["rss_mb"] = {name: round(rss_mb(pid), 1) for name, pid in pids.items()}
        result["sensor_to_prediction"] = percentiles(observer.latencies, 1)
        result["latency_measured_on_devices"] = len(sampled)
        if args.broker_kill:
            # A broker crash under load: SIGKILL, back on the same port after a second; every
            # device reconnects (jittered backoff) and says "online" again.
            broker.kill()
            killed = time.time()  # the devices stamp their statuses with the wall clock
            threading.Event().wait(1.0)  # the outage under test, not synchronisation
            broker.start()
            back = observer.wait_online_since(devices, killed, timeout=120)
            result["broker_kill"] = {"all_online_again_s": back}
            if back is None:
                raise RuntimeError("not every device came back online after the broker kill")
            # Long enough for every device to send again what the crash lost (no receipt).
            threading.Event().wait(args.after_kill_s)  # the fleet running on, not a sync
            pids["mosquitto"] = broker._process.pid  # type: ignore[union-attr]

        registry.promote(second, key, chunk_size=256 * 1024)
        messages = current_release_messages(topics, registry, 256 * 1024)
        publisher = MqttConnection(settings, client_id="bench-publisher", persistent_session=False)
        publisher.start()
        publisher.wait_connected(10)
        published = time.monotonic()
        publish_all(publisher, messages, 30)
        result["publish_s"] = round(time.monotonic() - published, 3)
        result["model_bytes"] = len(registry.payload(second))
        # From the first model message sent to the last device's status naming the version.
        result["new_version_on_all_devices_s"] = observer.wait_all(
            devices, second, timeout=120, since=published
        )
        publisher.stop()
        result["run_s"] = round(time.monotonic() - started, 1)
    finally:
        sim.send_signal(signal.SIGTERM)
        sim.wait(timeout=120)
    fleet = json.loads(report_path.read_text())
    result.update(account(fleet, workdir / "trainer-data" / "trainer.sqlite3", timeout=120))
    result["sim_exit_code"] = sim.returncode
    watcher.stop()
    trainer.send_signal(signal.SIGTERM)
    result["trainer_exit_code"] = trainer.wait(timeout=120)
    broker.stop()
    for handle in logs.values():
        handle.close()
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--devices", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--seconds", type=float, default=30.0, help="steady state measured")
    parser.add_argument("--batch-seconds", type=float, default=1.0)
    parser.add_argument("--confirm-share", type=float, default=0.1)
    parser.add_argument(
        "--latency-sample", type=int, default=50, help="devices whose latency is measured"
    )
    parser.add_argument("--repeat", type=int, default=3, help="runs per fleet size (medians)")
    parser.add_argument(
        "--sim-runtime",
        nargs="+",
        default=["auto"],
        choices=["auto", "tensorflow", "litert"],
        help="the simulator's model runtime; several: side by side for each fleet size",
    )
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument(
        "--broker-kill",
        action="store_true",
        help="SIGKILL the broker after the steady state and restart it: time until every "
        "device is online again, and nothing lost",
    )
    parser.add_argument(
        "--after-kill-s", type=float, default=30.0, help="the fleet runs on after the restart"
    )
    args = parser.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    root = Path(tempfile.mkdtemp(prefix="har-bench-fleet-"))
    try:
        versions = train_versions(root)
        by_size = {
            (n, runtime): [
                run_fleet(n, runtime, args, versions, root / f"run-{n}-{runtime}-{i}")
                for i in range(args.repeat)
            ]
            for n in args.devices
            for runtime in args.sim_runtime
        }
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    failures = [
        f"{run['devices']} devices: {problem}"
        for runs in by_size.values()
        for run in runs
        for problem in (
            [f"{kind} lost: {count}" for kind, count in run["lost"].items() if count]
            + [
                f"{name} exited with {run[key]}"
                for name, key in (("har sim", "sim_exit_code"), ("trainer", "trainer_exit_code"))
                if run[key] != 0
            ]
        )
    ]
    print(
        json.dumps(
            {
                "bench": "fleet",
                "machine_cores": os.cpu_count(),
                "sample_rate_hz": 20.0,
                "batch_seconds": args.batch_seconds,
                "confirm_share": args.confirm_share,
                "repeat": args.repeat,
                # Medians over the repeats; "lost" sums every repeat (it must be 0 in each).
                "medians": [
                    {
                        **medians(runs),
                        "lost": {
                            kind: sum(run["lost"][kind] for run in runs) for kind in runs[0]["lost"]
                        },
                    }
                    for runs in by_size.values()
                ],
                "runs": [run for runs in by_size.values() for run in runs],
                "failures": failures,
            },
            indent=2,
        )
    )
    for failure in failures:
        print(f"FAILED: {failure}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
