"""Trainer ingest: sensor batches stored per second, publish-to-stored latency, messages lost, for
SQLite vs PostgreSQL and 1 vs 2 trainer replicas, side by side in one run; and a replica killed
with SIGKILL in the middle of a stream.

Real processes on loopback: one Mosquitto (``har.local_broker``), one PostgreSQL server
(``har.local_postgres``), and 1 or 2 ``har trainer serve`` processes per configuration on one
``$share`` group and one store (a SQLite file, or a fresh PostgreSQL database). This process
plays N devices, each on its own MQTT connection (one event loop, ``simulator.link``), sending
1 s batches (20 samples at 20 Hz, QoS 1):

- **steady**: each device one batch a second, spread over the second, for ``--seconds``;
- **burst**: each of ``--burst-devices`` devices hands over ``--burst-batches`` batches at once,
  while the trainers are paused (SIGSTOP), so the whole burst waits in the broker for them, as
  after an outage of the trainers; then they resume (SIGCONT). The rate is the batches stored
  per second from the resume to the last one stored: the trainers' own pace, not this process's
  (which shares the machine's two cores with them when it publishes live).

Stored = the ``received`` time the trainer writes in the row (its transaction's clock, the same
host clock as the publish time); the burst's latency is from the resume. Lost = batches
published and never stored. CPU is each process's share of one core over the load: the
trainers, Mosquitto and this process (the devices).

The kill run: two replicas on PostgreSQL with ``session_expiry_s`` short, ``--kill-devices``
devices streaming; the leader gets SIGKILL mid-stream. Devices resend what no receipt named after
``--resend-after`` seconds (as the agent does), so the batches the broker had queued for the dead
replica's session come again. Measured: lost, duplicates stored, the time until the survivor
holds the leader lock (it alone retrains and publishes), and what was resent.

    .venv/bin/python bench/trainer_ingest.py [--devices 10 100 1000] [--seconds 20] \\
        [--configs sqlite:1 sqlite:2 postgresql:1 postgresql:2] [--evidence PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from _common import REPO, percentiles  # also puts the repository on sys.path

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
SAMPLES = 20  # one second at 20 Hz
NOTE = (
    "Figures from a 2-core machine that may be shared with other work: compare configurations "
    "within one run. The devices run in this process on the same cores; in burst mode the "
    "trainers are paused while the burst is queued, so the rate is theirs."
)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


class Devices:
    """N device connections on one event loop thread; every publish is timed."""

    def __init__(self, broker: Any, topics: Any, n: int, *, resend_after: float = 0.0) -> None:
        from shared.mqtt_transport import PropertiesCache
        from simulator.event_loop import EventLoop
        from simulator.link import Link

        self.topics = topics
        self.loop = EventLoop()
        self.sent_at: dict[tuple[str, int], float] = {}
        self.next_seq: Counter[str] = Counter()
        self.receipted: set[tuple[str, int]] = set()
        self.resent = 0
        self.resend_after = resend_after
        self.counters: Counter[str] = Counter()
        self.ids = [f"bench-{uuid.uuid4().hex[:6]}-{i:04d}" for i in range(n)]
        properties = PropertiesCache()
        self.links = {
            device: Link(
                self.loop,
                broker,
                properties,
                client_id=device,
                username="",
                password="",
                counters=self.counters,
                on_connected=self._subscribe if resend_after else lambda link: None,
                on_message=self._receipt,
                outbox_max=1_000_000,
            )
            for device in self.ids
        }
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="bench-devices", daemon=True)

    def _run(self) -> None:
        for link in self.links.values():
            link.start()
        self.loop.run(self._stop.is_set)

    def _subscribe(self, link: Any) -> None:
        link.subscribe(self.topics.receipt(link._client_id), 1)

    def _receipt(self, topic: str, payload: bytes) -> None:
        from shared import codec

        receipt = codec.decode_receipt(payload)
        for first, last in receipt.ranges:
            self.receipted.update((receipt.device_id, seq) for seq in range(first, last + 1))

    def start(self, timeout: float = 60.0) -> None:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while self.counters["connects"] < len(self.ids):
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {self.counters['connects']} devices connected")
            time.sleep(0.05)
        if self.resend_after:
            time.sleep(1.0)  # the receipt subscriptions' SUBACKs: nothing tells the loop

    def publish(self, device: str, seq: int | None = None) -> None:
        """On the loop's thread: one batch (the next, or ``seq`` again)."""
        from shared import codec
        from shared.messages import SensorBatch
        from shared.mqtt_transport import Outbound

        if seq is None:
            seq = self.next_seq[device]
            self.next_seq[device] += 1
        samples = np.full((SAMPLES, 3), seq % 97, np.float32)
        payload = codec.encode_sensor_batch(SensorBatch(device, seq, 20.0, seq, samples))
        self.sent_at.setdefault((device, seq), time.time())
        self.links[device].publish(
            Outbound(self.topics.sensor(device), payload, content_type=codec.CONTENT_TYPE_MSGPACK)
        )

    def steady(self, seconds: float) -> None:
        """Every device a batch a second, device i at offset i/N of each second."""
        n = len(self.ids)
        for second in range(int(seconds)):
            for i, device in enumerate(self.ids):
                self.loop.call_later(second + i / n, lambda device=device: self.publish(device))
        self.loop.wake()

    def burst(self, batches: int, timeout: float = 300.0) -> None:
        """Every device hands over ``batches`` at once; returns when the broker has them all."""

        def everything() -> None:
            for _ in range(batches):
                for device in self.ids:
                    self.publish(device)

        self.loop.call_soon_threadsafe(everything)
        deadline = time.monotonic() + timeout
        while len(self.sent_at) < batches * len(self.ids) or any(
            link.unsent for link in self.links.values()
        ):
            if time.monotonic() > deadline:
                raise RuntimeError("the broker did not take the burst")
            time.sleep(0.05)  # another thread's progress: a bounded poll

    def resend_unreceipted(self) -> int:
        """Publish again what no receipt named within ``resend_after`` s; how many are missing."""
        now = time.time()
        missing = [key for key in self.sent_at if key not in self.receipted]
        due = [key for key in missing if now - self.sent_at[key] > self.resend_after]
        for device, seq in due:
            self.sent_at[(device, seq)] = now
            self.loop.call_soon_threadsafe(lambda d=device, s=seq: self.publish(d, s))
        self.resent += len(due)
        return len(missing)

    def stop(self) -> None:
        self._stop.set()
        self.loop.wake()
        self.thread.join(30)
        for link in self.links.values():
            link.abort()
        self.loop.close()


class Trainers:
    """``replicas`` trainer processes on one store, and a watch on their statuses."""

    def __init__(
        self, workdir: Path, broker: Any, store_url: str, replicas: int, session_expiry_s: int
    ) -> None:
        from shared.mqtt_transport import InboundMessage, MqttConnection

        self.names = [f"r{i + 1}" for i in range(replicas)]
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self.status: dict[str, Any] = {}
        self.changed = threading.Condition()
        inbox: queue.Queue[InboundMessage] = queue.Queue(maxsize=100_000)
        self.watcher = MqttConnection(
            broker,
            client_id=f"bench-watch-{uuid.uuid4().hex[:6]}",
            subscriptions=[(f"{broker.topic_root}/trainer/+/status", 1)],
            inbox=inbox,
            persistent_session=False,
        )
        self.watcher.start()
        self._reader = threading.Thread(target=self._read, args=(inbox,), daemon=True)
        self._reader.start()
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": str(REPO)}
        for name in self.names:
            config = workdir / f"{name}.toml"
            config.write_text(
                f'instance = "{name}"\ndata_dir = "{workdir / name}"\n'
                f'registry_dir = "{workdir / "registry"}"\nstatus_interval_s = 0.5\n'
                f'[broker]\nhost = "{broker.host}"\nport = {broker.port}\n'
                f'topic_root = "{broker.topic_root}"\n'
                f'[store]\nurl = "{store_url}"\n'
                "[retrain]\nmin_new_confirmations = 1000000000\ninterval_s = 0\n"
                f"[ingest]\nqueue_size = 5000\ncommit_batch = 500\n"
                f"session_expiry_s = {session_expiry_s}\n"
            )
            with (workdir / f"{name}.log").open("ab") as log:
                self.processes[name] = subprocess.Popen(
                    [sys.executable, "-m", "har", "trainer", "serve", "--config", str(config)],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=env,
                )
        self.wait_for(lambda: all(self._online(name) for name in self.names), 120)
        self.wait_for(lambda: self.leaders() == 1, 30)

    def _read(self, inbox: queue.Queue[Any]) -> None:
        from shared import codec

        while True:
            message = inbox.get()
            message.ack()
            if message.payload:
                status = codec.decode_status(message.payload)
                with self.changed:
                    self.status[status.device_id] = status
                    self.changed.notify_all()

    def _online(self, name: str) -> bool:
        status = self.status.get(name)
        return status is not None and status.state == "online"

    def leaders(self) -> int:
        return sum(
            bool(s.counters.get("leader")) for s in self.status.values() if s.state == "online"
        )

    def leader(self) -> str:
        return next(n for n in self.names if self.status[n].counters.get("leader"))

    def wait_for(self, condition: Any, timeout: float) -> bool:
        with self.changed:
            if not self.changed.wait_for(condition, timeout):
                raise RuntimeError(f"trainers: timed out; statuses {self.status}")
        return True

    def cpu(self) -> dict[str, float]:
        return {name: cpu_seconds(p.pid) for name, p in self.processes.items() if p.poll() is None}

    def signal(self, sig: int) -> None:
        for process in self.processes.values():
            process.send_signal(sig)

    def stop(self) -> dict[str, int | None]:
        codes: dict[str, int | None] = {}
        for process in self.processes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for name, process in self.processes.items():
            try:
                codes[name] = process.wait(60)
            except subprocess.TimeoutExpired:
                process.kill()
                codes[name] = None
        self.watcher.stop()
        return codes


def stored_rows(store_url: str) -> list[tuple[str, int, float]]:
    from trainer_service.stores import open_store

    store = open_store(store_url)
    try:
        with store.transaction() as reader:
            rows = reader.fetchall("SELECT device_id, seq, received FROM batches")
    finally:
        store.close()
    return [(str(d), int(s), float(r)) for d, s, r in rows]


def stored_count(store_url: str) -> int:
    from trainer_service.stores import open_store

    store = open_store(store_url)
    try:
        return store.counts().batches
    finally:
        store.close()


def wait_stored(store_url: str, expected: int, *, idle_s: float = 30.0) -> int:
    """Poll the store (another process's) until it holds ``expected`` batches or stops moving."""
    last, since = -1, time.monotonic()
    while True:
        count = stored_count(store_url)
        if count >= expected:
            return count
        if count != last:
            last, since = count, time.monotonic()
        elif time.monotonic() - since > idle_s:
            return count
        time.sleep(0.25)  # no event to wait on in another process's database


def new_store(kind: str, workdir: Path, postgres: Any) -> str:
    if kind == "sqlite":
        return f"sqlite://{workdir / 'store' / 'trainer.sqlite3'}"
    return str(postgres.create_database())


def run_load(
    kind: str, replicas: int, mode: str, n: int, args: argparse.Namespace, broker: Any, pg: Any
) -> dict[str, Any]:
    import dataclasses

    from shared.topics import Topics

    workdir = Path(tempfile.mkdtemp(prefix=f"ingest-{kind}{replicas}-{mode}{n}-", dir=args.root))
    settings = dataclasses.replace(broker, topic_root=f"bench/{uuid.uuid4().hex[:8]}/har/v1")
    store_url = new_store(kind, workdir, pg)
    trainers = Trainers(workdir, settings, store_url, replicas, session_expiry_s=10)
    devices = Devices(settings, Topics(settings.topic_root), n)
    result: dict[str, Any] = {"store": kind, "replicas": replicas, "mode": mode, "devices": n}
    others = {"mosquitto": args.broker_pid, "devices": os.getpid()}
    resumed = 0.0
    try:
        devices.start()
        if mode == "steady":
            cpu_before, started = trainers.cpu(), time.monotonic()
            before = {name: cpu_seconds(pid) for name, pid in others.items()}
            devices.steady(args.seconds)
            time.sleep(args.seconds)  # the load being measured runs on the devices' loop
        else:
            trainers.signal(signal.SIGSTOP)
            try:
                devices.burst(args.burst_batches)
            finally:
                cpu_before, started = trainers.cpu(), time.monotonic()
                before = {name: cpu_seconds(pid) for name, pid in others.items()}
                resumed = time.time()
                trainers.signal(signal.SIGCONT)
        sent = n * (int(args.seconds) if mode == "steady" else args.burst_batches)
        count = wait_stored(store_url, sent)
        elapsed = time.monotonic() - started
        cpu = {**trainers.cpu(), **{name: cpu_seconds(pid) for name, pid in others.items()}}
        before.update(cpu_before)
        result["cpu_share_of_one_core"] = {
            name: round((cpu[name] - before[name]) / elapsed, 3) for name in cpu
        }
    finally:
        devices.stop()
        result["exit_codes"] = trainers.stop()
    rows = stored_rows(store_url)
    received = [r for _, _, r in rows]
    if mode == "steady":
        latencies = [r - devices.sent_at[(d, s)] for d, s, r in rows]
        span = max(received) - min(received)
    else:
        latencies = [r - resumed for r in received]  # from the resume: the burst was waiting
        span = max(received) - resumed
    result.update(
        {
            "batches_sent": len(devices.sent_at),
            "batches_stored": count,
            "lost": len(devices.sent_at) - len({(d, s) for d, s, _ in rows}),
            "duplicates_stored": len(rows) - len({(d, s) for d, s, _ in rows}),
            "stored_per_s": round(len(rows) / span, 1) if span > 0 else None,
            "publish_to_stored": percentiles(latencies, 1),
        }
    )
    return result


def run_kill(args: argparse.Namespace, broker: Any, pg: Any) -> dict[str, Any]:
    import dataclasses

    from shared.topics import Topics

    workdir = Path(tempfile.mkdtemp(prefix="ingest-kill-", dir=args.root))
    settings = dataclasses.replace(broker, topic_root=f"bench/{uuid.uuid4().hex[:8]}/har/v1")
    store_url = new_store("postgresql", workdir, pg)
    expiry = args.session_expiry
    trainers = Trainers(workdir, settings, store_url, 2, session_expiry_s=expiry)
    devices = Devices(
        settings, Topics(settings.topic_root), args.kill_devices, resend_after=args.resend_after
    )
    result: dict[str, Any] = {
        "store": "postgresql",
        "replicas": 2,
        "devices": args.kill_devices,
        "session_expiry_s": expiry,
        "resend_after_s": args.resend_after,
    }
    try:
        devices.start()
        devices.steady(args.kill_seconds)
        time.sleep(args.kill_seconds / 2)
        victim = trainers.leader()
        survivor = next(n for n in trainers.names if n != victim)
        result["killed"] = victim
        trainers.processes[victim].kill()
        killed = time.monotonic()
        trainers.processes[victim].wait(10)
        result["stored_at_kill"] = stored_count(store_url)
        trainers.wait_for(lambda: bool(trainers.status[survivor].counters.get("leader")), 30)
        result["survivor_leads_after_s"] = round(time.monotonic() - killed, 2)
        time.sleep(max(0.0, args.kill_seconds / 2 - (time.monotonic() - killed)))
        deadline = time.monotonic() + 120
        while devices.resend_unreceipted() and time.monotonic() < deadline:
            time.sleep(0.5)  # devices look at their receipts every half second here
        result["all_receipted_after_kill_s"] = round(time.monotonic() - killed, 1)
        result["stored_by_survivor"] = trainers.status[survivor].counters.get("batches", 0)
    finally:
        devices.stop()
        result["exit_codes"] = trainers.stop()
    rows = stored_rows(store_url)
    keys = {(d, s) for d, s, _ in rows}
    result.update(
        {
            "batches_sent": len(devices.sent_at),
            "lost": len(set(devices.sent_at) - keys),
            "duplicates_stored": len(rows) - len(keys),
            "resent_by_devices": devices.resent,
        }
    )
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--devices", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--seconds", type=float, default=20.0, help="steady load per run")
    parser.add_argument("--burst-devices", type=int, default=1000)
    parser.add_argument("--burst-batches", type=int, default=10, help="per device")
    parser.add_argument(
        "--configs", nargs="+", default=["sqlite:1", "sqlite:2", "postgresql:1", "postgresql:2"]
    )
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--kill-devices", type=int, default=100)
    parser.add_argument("--kill-seconds", type=float, default=20.0)
    parser.add_argument("--session-expiry", type=int, default=5)
    parser.add_argument("--resend-after", type=float, default=5.0)
    parser.add_argument("--no-kill", action="store_true")
    parser.add_argument("--evidence", type=Path, help="also write the JSON here")
    args = parser.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

    from har.local_broker import MosquittoProcess
    from har.local_postgres import PostgresProcess
    from shared.config import BrokerSettings

    args.root = Path(tempfile.mkdtemp(prefix="har-bench-ingest-"))
    (args.root / "broker").mkdir()
    mosquitto = MosquittoProcess(args.root / "broker")
    mosquitto.start()
    assert mosquitto._process is not None
    args.broker_pid = mosquitto._process.pid
    # SIGTERM ends this process through the finally below (stopping what it started).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    postgres = PostgresProcess()
    postgres.start()
    broker = BrokerSettings(host=mosquitto.host, port=mosquitto.port, max_inflight=100)
    runs: list[dict[str, Any]] = []
    kill: dict[str, Any] | None = None
    try:
        for _ in range(args.repeat):
            for config in args.configs:
                kind, replicas = config.split(":")
                for n in args.devices:
                    runs.append(run_load(kind, int(replicas), "steady", n, args, broker, postgres))
                    print(json.dumps(runs[-1]), file=sys.stderr, flush=True)
                runs.append(
                    run_load(
                        kind, int(replicas), "burst", args.burst_devices, args, broker, postgres
                    )
                )
                print(json.dumps(runs[-1]), file=sys.stderr, flush=True)
        if not args.no_kill:
            kill = run_kill(args, broker, postgres)
    finally:
        postgres.stop()
        mosquitto.stop()
        shutil.rmtree(args.root, ignore_errors=True)

    def median_of(config: str, mode: str, n: int) -> dict[str, Any]:
        kind, replicas = config.split(":")
        same = [
            r
            for r in runs
            if (r["store"], r["replicas"], r["mode"], r["devices"])
            == (kind, int(replicas), mode, n)
        ]
        return {
            "config": config,
            "mode": mode,
            "devices": n,
            "stored_per_s": float(np.median([r["stored_per_s"] for r in same])),
            "p50_ms": float(np.median([r["publish_to_stored"]["p50_ms"] for r in same])),
            "p99_ms": float(np.median([r["publish_to_stored"]["p99_ms"] for r in same])),
            "lost": sum(r["lost"] for r in same),
            "duplicates_stored": sum(r["duplicates_stored"] for r in same),
            "trainer_cpu": [r["cpu_share_of_one_core"] for r in same],
        }

    table = [median_of(config, "steady", n) for config in args.configs for n in args.devices] + [
        median_of(config, "burst", args.burst_devices) for config in args.configs
    ]
    burst = {row["config"]: row["stored_per_s"] for row in table if row["mode"] == "burst"}
    doc = {
        "bench": "trainer_ingest",
        "machine_cores": os.cpu_count(),
        "batch": f"{SAMPLES} samples (1 s at 20 Hz), QoS 1",
        "seconds_steady": args.seconds,
        "burst": {"devices": args.burst_devices, "batches_per_device": args.burst_batches},
        "repeat": args.repeat,
        "note": NOTE,
        "table": table,
        "burst_ratio_2_vs_1_replica": {
            kind: round(burst[f"{kind}:2"] / burst[f"{kind}:1"], 2)
            for kind in ("sqlite", "postgresql")
            if f"{kind}:2" in burst and f"{kind}:1" in burst
        },
        "kill": kill,
        "runs": runs,
    }
    failures = unaccounted(runs, kill)
    doc["failures"] = failures
    text = json.dumps(doc, indent=2)
    print(text)
    if args.evidence:
        args.evidence.write_text(text + "\n")
    for failure in failures:
        print(f"FAILED: {failure}", file=sys.stderr)
    return 1 if failures else 0


def unaccounted(runs: list[dict[str, Any]], kill: dict[str, Any] | None) -> list[str]:
    """What makes the run a failure: a trainer that did not exit 0 when asked to stop (the
    replica the kill run killed excepted), or a batch sent and never stored."""
    failures = []
    for run in [*runs, *([kill] if kill else [])]:
        name = f"{run['store']}:{run['replicas']} {run.get('mode', 'kill')} {run['devices']}"
        killed = run.get("killed")
        for replica, code in run["exit_codes"].items():
            if code != 0 and replica != killed:
                failures.append(f"{name}: trainer {replica} exited with {code}")
        if run["lost"]:
            failures.append(f"{name}: {run['lost']} of {run['batches_sent']} batches never stored")
    return failures


if __name__ == "__main__":
    raise SystemExit(main())
