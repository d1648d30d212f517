"""Chaos and fuzz suite (issue 11): nothing accepted is lost, under kills, bursts and hostile input.

Real processes on loopback: Mosquitto with the shipped config and ACL (``ShippedMosquitto``; the
harness's own users appended to the shipped ACL), ``har trainer serve`` and ``--agents`` x
``har agent`` (synthetic 20 Hz sensor, a tiny signed model so they predict). Phases:

1. **kills**: with the stream running, ``--broker-kills``, ``--trainer-kills`` and
   ``--agent-kills`` SIGKILLs in a seeded random order at random moments (each process restarted
   after a random downtime, and awaited online before the next interval). The harness plays the
   user: it confirms a share of the predictions it sees (QoS 1) and records each PUBACK. After the
   last kill, a bounded drain; then reconciliation, message by message: each agent's batches by
   sequence number (the agent's store starts at a known ``next_seq``: produced = [first, next_seq)
   at the drain's start) against the trainer's ``batches`` rows; each prediction in an agent's
   store against the trainer's ``predictions``; each accepted confirmation against the trainer's
   ``confirmations`` and the agent's ``replay`` table.
2. **bursts**: ``--burst`` valid confirmations of unknown predictions at one agent (each must be
   counted ``confirmations_received`` and reported ``unknown_prediction``, and stored by the
   trainer), and ``--burst`` valid sensor batches at the trainer (each must be stored).
3. **fuzz**: ``--fuzz-payloads`` hostile payloads (bench/_chaos_fuzz.py) over every subscribed
   topic. Trainer topics first, with the agents paused (SIGSTOP) so that the trainer's
   ``messages_ingested`` counter can be compared exactly with what was delivered; then the agents'
   topics (confirmation, command, model manifest, chunks of an announced version), compared with
   their counters. Then every process must be alive, and a valid batch and confirmation must still
   go end to end. Each trainer payload must be handled once: ingested exactly as often as the
   broker delivered it, no report repeated, no reconnect of the trainer.

Between bursts and fuzz, **stall**: the trainer's store refuses writes (another process holds
SQLite's write lock) for ``--stall-s`` (more than three of the trainer's keepalives) while
``--stall-batches`` batches come; all must be stored once the lock goes, without a reconnect.
After the cluster stops, **backlog**: ``--backlog`` batches from 1,000 devices queued while the
trainers are paused, drained by one replica on SQLite and by two on PostgreSQL
(bench/trainer_ingest.py's burst, run as it is): stored whole, no process dies, the rates.
``--phases`` chooses; the exit code is 1 when any target of the phases run is not met.

Prints one JSON document (``payloads``, ``lost``, ``duplicates``, ``dead_threads``, per-phase
detail, durations, targets met or not) and writes it to ``--evidence``.

    .venv/bin/python bench/chaos.py [--quick] [--seed N] [--evidence docs/evidence/chaos.json]
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import random
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict, deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from _chaos_fuzz import Fuzzer
from _common import REPO  # also puts the repository on sys.path

from har.local_broker import SHIPPED_ACL, SHIPPED_CONF, ShippedMosquitto
from shared import codec
from shared.config import BrokerSettings
from shared.messages import Confirmation, SensorBatch
from shared.mqtt_transport import InboundMessage, MqttConnection, Outbound, PublishHandle
from shared.topics import Topics

TRAINER = "chaos-trainer"
HARNESS_USERS = ("chaos-observer", "chaos-fuzzer", "chaos-burst")
FUZZ_DEVICES = ("fuzz-0", "fuzz-1", "fuzz-2", "fuzz-3")
FIRST_SEQ = 1_000_000_000  # agent i starts at (i + 1) * FIRST_SEQ: produced = [first, next_seq)
EXIT_THREAD_DIED = 70
POLL_S = 0.2


def now() -> float:
    return time.monotonic()


def wait_for(condition: Callable[[], bool], timeout: float) -> float | None:
    """Poll ``condition`` until true; seconds it took, or None at the deadline."""
    started = now()
    while not condition():
        if now() - started > timeout:
            return None
        time.sleep(POLL_S)  # polling other processes' state: there is no event to wait on
    return round(now() - started, 2)


# ============================================================================ processes
class Child:
    """``python -m har ...`` as a child process, killed and restarted by the harness."""

    def __init__(self, name: str, workdir: Path, args: list[str]) -> None:
        self.name = name
        self.args = args
        self.log = workdir / f"{name}.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.kills = 0
        self.unexpected_exits: list[int] = []
        self.exit_codes: list[int] = []

    def start(self) -> None:
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": str(REPO)}
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "har", *self.args],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
            )
        self.starts += 1

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def check(self) -> None:
        """Record an exit the harness did not cause."""
        if self.process is not None and self.process.poll() is not None:
            code = self.process.returncode
            self.unexpected_exits.append(code)
            self.exit_codes.append(code)
            self.process = None

    def kill(self) -> None:
        self.check()
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.kills += 1
            self.process = None

    def signal(self, sig: int) -> None:
        if self.alive:
            assert self.process is not None
            self.process.send_signal(sig)

    def stop(self, timeout: float = 60.0) -> int | None:
        self.check()
        if self.process is None:
            return None
        self.process.send_signal(signal.SIGCONT)
        self.process.send_signal(signal.SIGTERM)
        try:
            code = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            code = self.process.wait()
        self.exit_codes.append(code)
        self.process = None
        return code


# ============================================================================ observer
class Observer:
    """The harness's dashboard: statuses, errors, predictions; confirms a share of predictions."""

    def __init__(self, topics: Topics, agents: list[str], rng: random.Random, share: float):
        self.topics = topics
        self.agents = set(agents)
        self.rng = rng
        self.share = share
        self.lock = threading.Lock()
        self.status: dict[str, Any] = {}  # source -> last DeviceStatus
        self.status_seen: dict[str, float] = {}
        self.online_since: dict[str, float] = {}
        self.errors: Counter[tuple[str, str]] = Counter()
        self.thread_died: list[str] = []
        self.predictions: dict[str, list[tuple[str, str]]] = defaultdict(list)
        self.confirming = False
        self.confirmations: list[tuple[str, str, PublishHandle]] = []
        self.connection: MqttConnection | None = None
        self.malformed = 0

    def take(self, message: InboundMessage) -> None:
        topic, payload = message.topic, message.payload
        try:
            if topic.endswith("/status") and payload:
                status = codec.decode_status(payload)
                source = status.device_id
                with self.lock:
                    self.status[source] = status
                    self.status_seen[source] = now()
                    if status.state == "online":
                        self.online_since[source] = now()
            elif topic.endswith("/error"):
                event = codec.decode_error(payload)
                with self.lock:
                    self.errors[(event.source, event.code)] += 1
                    if event.code == "thread_died":
                        self.thread_died.append(f"{event.source}: {event.message[:200]}")
            elif topic.endswith("/prediction"):
                prediction = codec.decode_prediction(payload)
                device = prediction.device_id
                if device not in self.agents:
                    return
                label = prediction.truth or prediction.label
                with self.lock:
                    self.predictions[device].append((prediction.prediction_id, label))
                if self.confirming and self.rng.random() < self.share:
                    self.confirm(device, prediction.prediction_id, label)
        except Exception:
            self.malformed += 1

    def confirm(self, device: str, prediction_id: str, label: str) -> PublishHandle | None:
        if label not in ("Walking", "Sitting", "Laying"):
            label = "Sitting"
        confirmation = Confirmation(prediction_id, label, "user", time.time())
        assert self.connection is not None
        handle = self.connection.publish(
            Outbound(self.topics.confirmation(device), codec.encode_confirmation(confirmation))
        )
        with self.lock:
            self.confirmations.append((device, prediction_id, handle))
        return handle

    def counters(self, source: str) -> dict[str, int]:
        with self.lock:
            status = self.status.get(source)
        return dict(status.counters) if status is not None else {}

    def fresh_status(self, source: str, after: float) -> bool:
        with self.lock:
            return self.status_seen.get(source, 0.0) > after

    def online_after(self, source: str, after: float) -> bool:
        """An online status (birth or periodic) arrived after ``after``: connected since."""
        with self.lock:
            return self.online_since.get(source, 0.0) > after


# ============================================================================ the cluster
class Cluster:
    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        self.workdir = workdir
        self.topics = Topics()
        self.rng = random.Random(args.seed)
        self.agents = [f"chaos-a{i}" for i in range(args.agents)]
        self.passwords = {
            name: f"pw-{name}-{random.Random(args.seed + i).getrandbits(48):012x}"
            for i, name in enumerate(["trainer", *self.agents, *HARNESS_USERS])
        }
        secrets = workdir / "secrets"
        secrets.mkdir()
        for name, password in self.passwords.items():
            (secrets / name).write_text(password)
        acl = workdir / "acl"
        acl.write_text(
            SHIPPED_ACL.read_text()
            + "\n# bench/chaos.py: the harness's users (observer, fuzzer, burst) see everything\n"
            + "".join(f"user {user}\ntopic readwrite har/v1/#\n" for user in HARNESS_USERS)
        )
        (workdir / "broker").mkdir()
        self.broker = ShippedMosquitto(workdir / "broker", SHIPPED_CONF, self.passwords, acl)
        self.model = self._make_model()
        self.trainer = Child("trainer", workdir, ["trainer", "serve", "--config",
                                                  str(self._trainer_toml())])  # fmt: skip
        self.children = {
            name: Child(name, workdir, ["agent", "--config", str(self._agent_toml(i, name))])
            for i, name in enumerate(self.agents)
        }
        self.children[TRAINER] = self.trainer
        self.inbox: queue.Queue[InboundMessage] = queue.Queue(maxsize=100_000)
        self.observer = Observer(self.topics, self.agents, self.rng, args.confirm_share)
        self._stop_reading = threading.Event()
        self._reader = threading.Thread(target=self._read, name="chaos-observer", daemon=True)

    # ------------------------------------------------------------------ setup
    def _make_model(self) -> dict[str, Any]:
        out = self.workdir / "model"
        out.mkdir()
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": str(REPO)}
        done = subprocess.run(
            [sys.executable, str(REPO / "bench" / "_chaos_model.py"), str(out)],
            capture_output=True, text=True, check=True, env=env,
        )  # fmt: skip
        info: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
        info["dir"] = out
        return info

    def settings(self, user: str, **extra: Any) -> BrokerSettings:
        return BrokerSettings(
            host=self.broker.host, port=self.broker.port, username=user,
            password=self.passwords[user], keepalive_s=10, reconnect_min_s=0.1,
            reconnect_max_s=1.0, **extra,
        )  # fmt: skip

    def _broker_table(self, user: str, keepalive: int) -> str:
        return (
            f'[broker]\nhost = "{self.broker.host}"\nport = {self.broker.port}\n'
            f'username = "{user}"\npassword_file = "{self.workdir / "secrets" / user}"\n'
            f"keepalive_s = {keepalive}\nreconnect_min_s = 0.1\nreconnect_max_s = 1.0\n"
        )

    def _trainer_toml(self) -> Path:
        path = self.workdir / "trainer.toml"
        # No private key: a valid (fuzzed) retrain command fails fast instead of training.
        path.write_text(
            f'instance = "{TRAINER}"\ndata_dir = "{self.workdir / "trainer-data"}"\n'
            f'registry_dir = "{self.workdir / "trainer-registry"}"\nstatus_interval_s = 1.0\n\n'
            + self._broker_table("trainer", 10)
            + "\n[retrain]\nmin_new_confirmations = 1000000000\ninterval_s = 0\n"
        )
        return path

    def _agent_toml(self, index: int, device: str) -> Path:
        from device_agent.store import AgentStore

        state = self.workdir / "agents" / device
        store = AgentStore(state / "agent.sqlite3")
        store.set_counters({"next_seq": (index + 1) * FIRST_SEQ})
        store.close()
        path = self.workdir / f"{device}.toml"
        # keepalive 120 s: the fuzz phase pauses the agents (SIGSTOP) for up to a minute.
        path.write_text(
            f'device_id = "{device}"\nstate_dir = "{state}"\n'
            f'public_key = "{self.model["public_key"]}"\n\n'
            + self._broker_table(device, 120)
            + f'\n[sensor]\nkind = "synthetic"\nspeed = 1.0\nseed = {index}\n'
            'synthetic_activities = "Walking,Sitting"\n\n'
            f"[agent]\nstatus_interval_s = 1.0\nbatch_seconds = {self.args.batch_seconds}\n"
            "shutdown_flush_s = 30\n"
        )
        return path

    def release_messages(self, version: str, *, manifest_only: bool = False) -> list[Outbound]:
        from trainer_service.distribution import release_messages

        manifest = codec.decode_manifest((self.model["dir"] / f"{version}.manifest").read_bytes())
        payload = (self.model["dir"] / f"{version}.payload").read_bytes()
        messages = release_messages(self.topics, manifest, payload, 64 * 1024)
        return messages[-1:] if manifest_only else messages

    def start(self) -> None:
        self.broker.start()
        self.connection = MqttConnection(
            self.settings("chaos-observer"),
            client_id="chaos-observer",
            subscriptions=[
                (self.topics.all_prediction(), 1),
                (self.topics.all_status(), 1),
                (self.topics.all_error(), 1),
                (f"{self.topics.root}/trainer/+/status", 1),
                (self.topics.trainer_error(), 1),
            ],
            inbox=self.inbox,
            persistent_session=False,
        )
        self.observer.connection = self.connection
        self.connection.start()
        self.connection.wait_connected_or_raise(30)
        self._reader.start()
        for message in self.release_messages(self.model["versions"][0]):
            self.connection.publish(message).wait_accepted(30)
        started = now()
        self.trainer.start()
        for device in self.agents:
            self.children[device].start()
        for name in [TRAINER, *self.agents]:
            if wait_for(lambda name=name: self.observer.online_after(name, started), 180) is None:
                raise RuntimeError(f"{name} did not come online: see {self.children[name].log}")
        if wait_for(lambda: all(self.observer.predictions[d] for d in self.agents), 120) is None:
            raise RuntimeError("the agents do not predict")

    def _read(self) -> None:
        while not self._stop_reading.is_set():
            try:
                message = self.inbox.get(timeout=0.2)
            except queue.Empty:
                continue
            self.observer.take(message)
            message.ack()

    def close(self) -> dict[str, int | None]:
        codes = {name: child.stop() for name, child in self.children.items()}
        self._stop_reading.set()
        if self._reader.ident is not None:
            self._reader.join(10)
        if getattr(self, "connection", None) is not None:
            self.connection.stop()
        self.broker.stop()
        return codes

    # ------------------------------------------------------------------ stores (read-only)
    def trainer_db(self) -> sqlite3.Connection:
        path = self.workdir / "trainer-data" / "trainer.sqlite3"
        return sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)

    def batches_stored(self, device: str) -> int:
        """How many of ``device``'s batches the trainer's store holds (each once)."""
        with self.trainer_db() as db:
            return int(db.execute("SELECT COUNT(DISTINCT seq) FROM batches WHERE device_id=?",
                                  (device,)).fetchone()[0])  # fmt: skip

    def agent_db(self, device: str) -> sqlite3.Connection:
        path = self.workdir / "agents" / device / "agent.sqlite3"
        return sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)

    def next_seq(self, device: str) -> int:
        with self.agent_db(device) as db:
            return int(db.execute("SELECT value FROM counters WHERE name='next_seq'").fetchone()[0])

    def check_children(self) -> None:
        for child in self.children.values():
            child.check()


# ============================================================================ phase 1: kills
def phase_kills(cluster: Cluster, args: argparse.Namespace) -> dict[str, Any]:
    rng = cluster.rng
    events = (
        ["broker"] * args.broker_kills
        + ["trainer"] * args.trainer_kills
        + [f"agent:{rng.choice(cluster.agents)}" for _ in range(args.agent_kills)]
    )
    rng.shuffle(events)
    observer = cluster.observer
    observer.confirming = True
    started = now()
    log: list[dict[str, Any]] = []
    for event in events:
        wait = rng.uniform(args.kill_min_s, args.kill_max_s)
        time.sleep(wait)  # the stream runs until a random moment: pacing, not synchronisation
        cluster.check_children()
        down = rng.uniform(0.1, 2.0)
        if event == "broker":
            cluster.broker.kill()
            time.sleep(down)  # the outage being simulated
            cluster.broker.start()
            names = [TRAINER, *cluster.agents]
        else:
            name = TRAINER if event == "trainer" else event.split(":", 1)[1]
            child = cluster.children[name]
            child.kill()
            time.sleep(down)  # the outage being simulated
            child.start()
            names = [name]
        restarted_at = now()
        # Back online (a status from the restarted process, or from each process reconnected to
        # the restarted broker) before the next random interval.
        back = wait_for(
            lambda names=names, at=restarted_at: all(observer.online_after(n, at) for n in names),
            180,
        )
        log.append({"after_s": round(wait, 2), "kill": event, "down_s": round(down, 2),
                    "back_online_s": back})  # fmt: skip
    observer.confirming = False
    kills_s = now() - started
    # The drain: everything produced so far must reach the trainer (and each confirmation its
    # agent) within --drain-timeout.
    snapshot = {device: cluster.next_seq(device) for device in cluster.agents}
    drain_started = now()
    state: dict[str, Any] = {}

    def drained() -> bool:
        state.update(reconcile(cluster, snapshot))
        return not any(state["lost"].values())

    drain_s = wait_for(drained, args.drain_timeout)
    return {
        "kills": log,
        "kills_s": round(kills_s, 1),
        "drain_s": drain_s if drain_s is not None else f"> {args.drain_timeout} (timed out)",
        "drain_wall_s": round(now() - drain_started, 1),
        **state,
        "restarts": {name: child.starts - 1 for name, child in cluster.children.items()},
        "unexpected_exits": {n: c.unexpected_exits for n, c in cluster.children.items()},
    }


def reconcile(cluster: Cluster, snapshot: dict[str, int]) -> dict[str, Any]:
    """Sent against stored, message by message (batches below ``snapshot``'s next_seq)."""
    produced: dict[str, range] = {}
    in_outbox: dict[str, set[int]] = {}
    predicted: dict[str, set[str]] = {}
    replay: dict[str, set[str]] = {}
    sensor_topics = {cluster.topics.sensor(d): d for d in cluster.agents}
    for index, device in enumerate(cluster.agents):
        produced[device] = range((index + 1) * FIRST_SEQ, snapshot[device])
        with cluster.agent_db(device) as db:
            in_outbox[device] = {
                codec.decode_sensor_batch(payload).seq
                for topic, payload in db.execute("SELECT topic, payload FROM outbox")
                if topic in sensor_topics
            }
            predicted[device] = {
                row[0] for row in db.execute("SELECT prediction_id FROM recent_windows")
            }
            replay[device] = {row[0] for row in db.execute("SELECT prediction_id FROM replay")}
    stored: dict[str, Counter[int]] = defaultdict(Counter)
    with cluster.trainer_db() as db:
        for device, seq, count in db.execute(
            "SELECT device_id, seq, COUNT(*) FROM batches GROUP BY device_id, seq"
        ):
            stored[device][seq] += count
        stored_predictions = {row[0] for row in db.execute("SELECT prediction_id FROM predictions")}
        stored_confirmations = Counter(
            row[0] for row in db.execute("SELECT prediction_id FROM confirmations")
        )
    lost_batches = {
        d: [s for s in produced[d] if s not in stored[d] and s not in in_outbox[d]]
        for d in cluster.agents
    }
    pending = {d: sum(1 for s in produced[d] if s not in stored[d] and s in in_outbox[d])
               for d in cluster.agents}  # fmt: skip
    phantom = {
        d: sum(1 for s in stored[d] if s not in produced[d] and s < snapshot[d])
        for d in cluster.agents
    }
    dup_rows = sum(c - 1 for d in cluster.agents for c in stored[d].values() if c > 1)
    accepted, unanswered, refused, no_subscribers = [], 0, 0, 0
    with cluster.observer.lock:
        confirmations = list(cluster.observer.confirmations)
    for device, prediction_id, handle in confirmations:
        outcome = handle.outcome()
        if outcome is None:
            unanswered += 1
        elif not outcome.accepted:
            refused += 1
        else:
            no_subscribers += outcome.code == 0x10
            accepted.append((device, prediction_id))
    lost_predictions = sum(len(predicted[d] - stored_predictions) for d in cluster.agents)
    return {
        "batches": {
            "produced": sum(len(r) for r in produced.values()),
            "stored": sum(len(set(stored[d]) & set(produced[d])) for d in cluster.agents),
            "pending_in_agent_outbox": sum(pending.values()),
            "lost_by_device": {d: len(v) for d, v in lost_batches.items()},
            "lost_first_seqs": {d: v[:10] for d, v in lost_batches.items() if v},
        },
        "predictions": {
            "in_agent_stores": sum(len(p) for p in predicted.values()),
            "lost": lost_predictions,
        },
        "confirmations": {
            "sent": len(confirmations),
            "accepted_by_broker": len(accepted),
            "accepted_no_matching_subscribers": no_subscribers,
            "unanswered": unanswered,
            "refused": refused,
            "lost_at_trainer": sum(1 for _, p in accepted if p not in stored_confirmations),
            "lost_at_agent": sum(1 for d, p in accepted if p not in replay[d]),
        },
        "lost": {
            "batches": sum(len(v) for v in lost_batches.values()),
            "predictions": lost_predictions,
            "confirmations_trainer": sum(1 for _, p in accepted if p not in stored_confirmations),
            "confirmations_agent": sum(1 for d, p in accepted if p not in replay[d]),
        },
        "duplicates": {
            "batch_rows": dup_rows,
            "batches_never_produced": sum(phantom.values()),
            "confirmation_rows": sum(c - 1 for c in stored_confirmations.values() if c > 1),
        },
    }


# ============================================================================ publishing
class Pipeline:
    """QoS 1 publishes with at most ``window`` unanswered, at most ``rate`` a second."""

    def __init__(self, connection: MqttConnection, window: int, rate: float) -> None:
        self.connection = connection
        self.window = window
        self.rate = rate
        self.pending: deque[tuple[str, PublishHandle]] = deque()
        self.outcomes: Counter[str] = Counter()
        self.by_tag: dict[str, Counter[str]] = defaultdict(Counter)
        self.sent = 0
        self.started = now()

    def publish(self, tag: str, message: Outbound) -> None:
        while len(self.pending) >= self.window:
            self._settle_one()
        ahead = self.sent / self.rate - (now() - self.started)
        if ahead > 0:
            time.sleep(ahead)  # rate limit
        self.pending.append((tag, self.connection.publish(message)))
        self.sent += 1

    def _settle_one(self, timeout: float = 60.0) -> None:
        tag, handle = self.pending.popleft()
        if not handle.wait(timeout):
            result = "unanswered"
        else:
            outcome = handle.outcome()
            assert outcome is not None
            result = "accepted" if outcome.code == 0 else outcome.describe()
        self.outcomes[result] += 1
        self.by_tag[tag][result] += 1

    def flush(self) -> None:
        while self.pending:
            self._settle_one()

    def delivered(self, tag_prefix: str = "") -> int:
        return sum(c["accepted"] for t, c in self.by_tag.items() if t.startswith(tag_prefix))


def publisher(cluster: Cluster, user: str, inflight: int) -> MqttConnection:
    connection = MqttConnection(cluster.settings(user, max_inflight=inflight), client_id=user,
                                persistent_session=False)  # fmt: skip
    connection.start()
    connection.wait_connected_or_raise(30)
    return connection


# ============================================================================ phase 2: bursts
def phase_bursts(cluster: Cluster, args: argparse.Namespace) -> dict[str, Any]:
    observer = cluster.observer
    target = cluster.agents[0]
    connection = publisher(cluster, "chaos-burst", 1000)
    result: dict[str, Any] = {}
    try:
        # --- at one agent: valid confirmations of unknown predictions
        since = now()
        wait_for(lambda: observer.fresh_status(target, since), 30)
        before = observer.counters(target)
        pipe = Pipeline(connection, 1000, 1e9)
        started = now()
        for i in range(args.burst):
            confirmation = Confirmation(f"burst-{args.seed}-{i}", "Sitting", "user", time.time())
            topic = cluster.topics.confirmation(target)
            pipe.publish("confirmation", Outbound(topic, codec.encode_confirmation(confirmation)))
        pipe.flush()
        sent_s = now() - started

        def counted(key: str) -> int:
            return observer.counters(target).get(key, 0) - before.get(key, 0)

        settled = wait_for(
            lambda: counted("error_unknown_prediction") >= args.burst, args.drain_timeout
        )

        def trainer_burst_confirmations() -> int:
            with cluster.trainer_db() as db:
                return int(db.execute(
                    "SELECT COUNT(*) FROM confirmations WHERE prediction_id LIKE ?",
                    (f"burst-{args.seed}-%",),
                ).fetchone()[0])  # fmt: skip

        wait_for(lambda: trainer_burst_confirmations() >= args.burst, args.drain_timeout)
        result["agent_confirmations"] = {
            "sent": args.burst,
            "puback": dict(pipe.outcomes),
            "publish_s": round(sent_s, 2),
            "agent_confirmations_received": counted("confirmations_received"),
            "agent_reported_unknown_prediction": counted("error_unknown_prediction"),
            "trainer_stored": trainer_burst_confirmations(),
            "settled_s": settled,
        }
        result["agent_confirmations"]["dropped"] = args.burst - min(
            result["agent_confirmations"]["agent_reported_unknown_prediction"],
            result["agent_confirmations"]["trainer_stored"],
        )
        # --- at the trainer: valid sensor batches of one device
        import numpy as np

        device = f"burst-{args.seed}"
        pipe = Pipeline(connection, 1000, 1e9)
        started = now()
        for seq in range(args.burst):
            batch = SensorBatch(
                device, seq, 20.0, seq * 10**9, np.full((20, 3), seq % 7, np.float32)
            )
            pipe.publish("sensor", Outbound(cluster.topics.sensor(device),
                                            codec.encode_sensor_batch(batch),
                                            content_type=codec.CONTENT_TYPE_MSGPACK))  # fmt: skip
        pipe.flush()
        sent_s = now() - started

        def stored() -> int:
            return cluster.batches_stored(device)

        settled = wait_for(lambda: stored() >= args.burst, args.drain_timeout)
        result["trainer_batches"] = {
            "sent": args.burst,
            "puback": dict(pipe.outcomes),
            "publish_s": round(sent_s, 2),
            "trainer_stored": stored(),
            "dropped": args.burst - stored(),
            "settled_s": settled,
        }
    finally:
        connection.stop()
    return result


# ============================================================================ phase: stall
def phase_stall(cluster: Cluster, args: argparse.Namespace) -> dict[str, Any]:
    """The trainer's store stops taking writes (another process holds SQLite's write lock) for
    ``--stall-s`` (longer than three of its keepalives) while batches keep coming: its ingest
    waits and retries, its network thread keeps the connection alive; then everything is stored,
    with no reconnect."""
    import numpy as np

    observer = cluster.observer
    device = f"stall-{args.seed}"
    since = now()
    wait_for(lambda: observer.fresh_status(TRAINER, since), 30)
    before = observer.counters(TRAINER)
    connection = publisher(cluster, "chaos-burst", 1000)
    path = cluster.workdir / "trainer-data" / "trainer.sqlite3"
    blocker = sqlite3.connect(path, timeout=60, isolation_level=None)
    result: dict[str, Any] = {"stall_s": args.stall_s, "batches": args.stall_batches}
    try:
        blocker.execute("BEGIN IMMEDIATE")  # the write lock: the trainer's commits wait
        stalled = now()
        pipe = Pipeline(connection, 1000, args.stall_batches / (args.stall_s / 2))
        for seq in range(args.stall_batches):
            batch = SensorBatch(device, seq, 20.0, seq * 10**9, np.full((20, 3), 1, np.float32))
            pipe.publish("sensor", Outbound(cluster.topics.sensor(device),
                                            codec.encode_sensor_batch(batch),
                                            content_type=codec.CONTENT_TYPE_MSGPACK))  # fmt: skip
        pipe.flush()
        threading.Event().wait(max(0.0, args.stall_s - (now() - stalled)))  # the stall itself
        blocker.execute("ROLLBACK")
        released = now()

        def stored() -> int:
            return cluster.batches_stored(device)

        result["stored_after_release_s"] = wait_for(
            lambda: stored() >= args.stall_batches, args.drain_timeout
        )
        result["puback"] = dict(pipe.outcomes)
        result["stored"] = stored()
        result["lost"] = args.stall_batches - stored()
        since = now()
        wait_for(lambda: observer.fresh_status(TRAINER, since), 30)
        after = observer.counters(TRAINER)
        result["trainer_reconnects"] = after.get("broker_connects", 0) - before.get(
            "broker_connects", 0
        )
        result["trainer_storage_errors"] = after.get("storage_errors", 0) - before.get(
            "storage_errors", 0
        )
        result["drained_s"] = round(now() - released, 1)
    finally:
        blocker.close()
        connection.stop()
    return result


# ============================================================================ phase: backlog
def phase_backlog(cluster: Cluster, args: argparse.Namespace) -> dict[str, Any]:
    """A ``--backlog``-batch backlog (1,000 devices, queued while the trainers are paused), on
    one replica on SQLite and two on PostgreSQL: bench/trainer_ingest.py's burst, whose own
    harness (a PostgreSQL server, replicas on one $share group) this runs as it is."""
    devices = 1000
    done = subprocess.run(
        [
            sys.executable, str(REPO / "bench" / "trainer_ingest.py"),
            "--devices", "10", "--seconds", "3", "--configs", "sqlite:1", "postgresql:2",
            "--burst-devices", str(devices), "--burst-batches", str(args.backlog // devices),
            "--no-kill",
        ],
        capture_output=True, text=True, check=False, timeout=3600,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
    )  # fmt: skip
    try:
        report = json.loads(done.stdout)
    except json.JSONDecodeError:
        return {"exit_code": done.returncode, "failures": [done.stderr[-2000:]]}
    bursts = [row for row in report["table"] if row["mode"] == "burst"]
    return {
        "exit_code": done.returncode,
        "batches": devices * (args.backlog // devices),
        "drained_per_s": {row["config"]: row["stored_per_s"] for row in bursts},
        "lost": sum(row["lost"] for row in bursts),
        "trainer_exit_codes": {
            f"{run['store']}:{run['replicas']}": run["exit_codes"]
            for run in report["runs"]
            if run["mode"] == "burst"
        },
        "failures": report.get("failures", []),
    }


# ============================================================================ phase 3: fuzz
TRAINER_KINDS = ("sensor", "prediction", "confirmation", "confirmed", "status", "command")
AGENT_KINDS = ("confirmation", "device_command", "manifest", "chunk")


def phase_fuzz(cluster: Cluster, args: argparse.Namespace) -> dict[str, Any]:
    observer = cluster.observer
    topics = cluster.topics
    fuzzer = Fuzzer(args.seed)
    version = cluster.model["versions"][1]
    fuzzer.version = version
    n_trainer = args.fuzz_payloads * len(TRAINER_KINDS) // (len(TRAINER_KINDS) + len(AGENT_KINDS))
    n_agent = args.fuzz_payloads - n_trainer
    categories: Counter[str] = Counter()
    connection = publisher(cluster, "chaos-fuzzer", args.fuzz_window)
    result: dict[str, Any] = {}
    try:
        # --- A: the trainer's topics, agents paused so that nothing else reaches the trainer
        for device in cluster.agents:
            cluster.children[device].signal(signal.SIGSTOP)
        quiet = _trainer_quiet(cluster, 60)
        before = observer.counters(TRAINER)
        pipe = Pipeline(connection, args.fuzz_window, args.fuzz_rate)
        started = now()
        for i in range(n_trainer):
            kind = TRAINER_KINDS[i % len(TRAINER_KINDS)]
            device = FUZZ_DEVICES[i % len(FUZZ_DEVICES)]
            # "confirmed" (a confirmation an agent relays) carries a confirmation.
            category, payload = fuzzer.payload(
                "confirmation" if kind == "confirmed" else kind, device
            )
            categories[category] += 1
            topic = (
                topics.trainer_command() if kind == "command" else f"{topics.device(device)}/{kind}"
            )
            pipe.publish(f"trainer/{kind}/{category}", Outbound(topic, payload))
        pipe.flush()
        sent_s = now() - started
        delivered = pipe.delivered("trainer/")

        def ingested() -> int:
            return observer.counters(TRAINER).get("messages_ingested", 0) - before.get(
                "messages_ingested", 0
            )

        settled = wait_for(lambda: ingested() >= delivered, args.drain_timeout)
        after = observer.counters(TRAINER)
        result["trainer"] = {
            "reconnects": after.get("broker_connects", 0) - before.get("broker_connects", 0),
            "reports_not_repeated": after.get("reports_not_repeated", 0)
            - before.get("reports_not_repeated", 0),
            "quiet_before_s": quiet,
            "sent": n_trainer,
            "delivered": delivered,
            "puback": dict(pipe.outcomes),
            "publish_s": round(sent_s, 2),
            "ingested": ingested(),
            "unaccounted": delivered - ingested(),
            "settled_s": settled,
            "counter_deltas": _deltas(before, after),
            "per_topic": {tag.split("/")[1]: 0 for tag in pipe.by_tag},
        }
        for tag, outcomes in pipe.by_tag.items():
            result["trainer"]["per_topic"][tag.split("/")[1]] += sum(outcomes.values())
        for device in cluster.agents:
            cluster.children[device].signal(signal.SIGCONT)

        # --- B: the agents' topics; a valid manifest of the second version first, so the
        # agents subscribe to its chunks (never sent: only hostile ones come)
        announce = cluster.release_messages(version, manifest_only=True)[0]
        announce = Outbound(announce.topic, announce.payload, qos=1, retain=False)
        since = now()
        wait_for(lambda: all(observer.fresh_status(d, since) for d in cluster.agents), 60)
        before_agents = {d: observer.counters(d) for d in cluster.agents}
        connection.publish(announce).wait(30)
        pipe = Pipeline(connection, args.fuzz_window, args.fuzz_rate)
        started = now()
        per_agent: dict[str, Counter[str]] = defaultdict(Counter)
        for i in range(n_agent):
            kind = AGENT_KINDS[i % len(AGENT_KINDS)]
            device = cluster.agents[(i // len(AGENT_KINDS)) % len(cluster.agents)]
            category, payload = fuzzer.payload(kind, device)
            categories[category] += 1
            if kind == "confirmation":
                topic = topics.confirmation(device)
                per_agent[device]["confirmation"] += 1
            elif kind == "device_command":
                topic = topics.command(device)
                per_agent[device]["command"] += 1
            elif kind == "manifest":
                topic = topics.model_manifest()
            else:
                topic = topics.model_chunk(version, fuzzer.rng.randrange(4))
            pipe.publish(f"agent/{kind}/{category}", Outbound(topic, payload))
            if i % 1000 == 999:  # keep a download of the announced version open
                pipe.publish("control/manifest", announce)
        pipe.flush()
        sent_s = now() - started

        def received(device: str, key: str) -> int:
            return observer.counters(device).get(key, 0) - before_agents[device].get(key, 0)

        # A manifest reaches every agent (the announce before the loop counts too); a chunk
        # the broker answered with Success reached at least one agent downloading.
        manifests = pipe.delivered("agent/manifest") + pipe.delivered("control/manifest") + 1
        chunks = pipe.delivered("agent/chunk")

        def chunks_received() -> int:
            return sum(received(d, "chunk_messages") for d in cluster.agents)

        def all_counted() -> bool:
            return chunks_received() >= chunks and all(
                received(d, "confirmations_received") >= per_agent[d]["confirmation"]
                and received(d, "commands_received") >= per_agent[d]["command"]
                and received(d, "manifest_messages") >= manifests
                for d in cluster.agents
            )

        settled = wait_for(all_counted, args.drain_timeout)
        result["agents"] = {
            "sent": n_agent,
            "puback": dict(pipe.outcomes),
            "publish_s": round(sent_s, 2),
            "settled_s": settled,
            "per_agent": {
                d: {
                    "confirmations_sent": per_agent[d]["confirmation"],
                    "confirmations_received": received(d, "confirmations_received"),
                    "commands_sent": per_agent[d]["command"],
                    "commands_received": received(d, "commands_received"),
                    "manifests_delivered": manifests,
                    "manifests_received": received(d, "manifest_messages"),
                    "chunk_messages_received": received(d, "chunk_messages"),
                    "model_rejections_reported": received(d, "error_model_rejected"),
                    "counter_deltas": _deltas(before_agents[d], observer.counters(d)),
                }
                for d in cluster.agents
            },
            "per_topic": dict(Counter(t.split("/")[1] for t in pipe.by_tag for _ in [0])),
        }
        result["agents"]["per_topic"] = {}
        for tag, outcomes in pipe.by_tag.items():
            key = tag.split("/")[1]
            result["agents"]["per_topic"][key] = result["agents"]["per_topic"].get(key, 0) + sum(
                outcomes.values()
            )
        result["agents"]["chunks_delivered"] = chunks
        result["agents"]["unaccounted"] = max(0, chunks - chunks_received()) + sum(
            max(0, v["confirmations_sent"] - v["confirmations_received"])
            + max(0, v["commands_sent"] - v["commands_received"])
            + max(0, v["manifests_delivered"] - v["manifests_received"])
            for v in result["agents"]["per_agent"].values()
        )
        result["categories"] = dict(categories)
        result["payloads"] = n_trainer + n_agent
        result["end_to_end_after"] = _end_to_end(cluster, connection, args)
    finally:
        for device in cluster.agents:
            cluster.children[device].signal(signal.SIGCONT)
        connection.stop()
    return result


def _deltas(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {
        k: after.get(k, 0) - before.get(k, 0)
        for k in sorted(set(before) | set(after))
        if after.get(k, 0) != before.get(k, 0) and (k.startswith(("error_", "payload")) or k in (
            "messages_ingested", "batches", "predictions", "confirmations", "commands",
            "confirmations_received", "commands_received", "model_rejections"))
    }  # fmt: skip


def _trainer_quiet(cluster: Cluster, timeout: float) -> float | None:
    """Until two consecutive trainer statuses show the same messages_ingested and an empty inbox."""
    observer = cluster.observer
    last: list[int] = []

    def quiet() -> bool:
        since = now()
        if wait_for(lambda: observer.fresh_status(TRAINER, since), 10) is None:
            return False
        counters = observer.counters(TRAINER)
        last.append(counters.get("messages_ingested", -1))
        return counters.get("inbox_depth", 1) == 0 and len(last) >= 2 and last[-1] == last[-2]

    return wait_for(quiet, timeout)


def _end_to_end(
    cluster: Cluster, connection: MqttConnection, args: argparse.Namespace
) -> dict[str, Any]:
    """A valid batch reaches the trainer's store; a valid confirmation of a fresh prediction
    reaches the agent's replay table and the trainer's confirmations."""
    import numpy as np

    observer = cluster.observer
    device = FUZZ_DEVICES[0]
    seq = 10**12 + args.seed
    batch = SensorBatch(device, seq, 20.0, 1, np.zeros((20, 3), np.float32))
    connection.publish(Outbound(cluster.topics.sensor(device), codec.encode_sensor_batch(batch),
                                content_type=codec.CONTENT_TYPE_MSGPACK)).wait(30)  # fmt: skip

    def batch_stored() -> bool:
        with cluster.trainer_db() as db:
            return db.execute("SELECT 1 FROM batches WHERE device_id=? AND seq=?",
                              (device, seq)).fetchone() is not None  # fmt: skip

    agent = cluster.agents[-1]
    seen = len(observer.predictions[agent])
    fresh = wait_for(lambda: len(observer.predictions[agent]) > seen, 60)
    result: dict[str, Any] = {"batch_stored_s": wait_for(batch_stored, 60),
                              "fresh_prediction_s": fresh}  # fmt: skip
    if fresh is None:
        result["ok"] = False
        return result
    prediction_id, label = observer.predictions[agent][-1]
    handle = observer.confirm(agent, prediction_id, label)
    assert handle is not None

    def confirmed() -> bool:
        with cluster.trainer_db() as db:
            at_trainer = db.execute("SELECT 1 FROM confirmations WHERE prediction_id=?",
                                    (prediction_id,)).fetchone()  # fmt: skip
        with cluster.agent_db(agent) as db:
            at_agent = db.execute("SELECT 1 FROM replay WHERE prediction_id=?",
                                  (prediction_id,)).fetchone()  # fmt: skip
        return at_trainer is not None and at_agent is not None

    result["confirmation_stored_s"] = wait_for(confirmed, 60)
    result["ok"] = None not in (result["batch_stored_s"], result["confirmation_stored_s"])
    return result


# ============================================================================ main
def run(args: argparse.Namespace) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="har-chaos-"))
    began = now()
    cluster = Cluster(args, workdir)
    phases: dict[str, Any] = {}
    durations: dict[str, float] = {}
    exit_codes: dict[str, int | None] = {}
    failure = None
    try:
        mark = now()
        cluster.start()
        durations["start"] = round(now() - mark, 1)
        chosen = [
            (name, phase)
            for name, phase in (
                ("kills", phase_kills),
                ("bursts", phase_bursts),
                ("stall", phase_stall),
                ("fuzz", phase_fuzz),
            )
            if name in args.phases
        ]
        for name, phase in chosen:
            mark = now()
            phases[name] = phase(cluster, args)
            durations[name] = round(now() - mark, 1)
            cluster.check_children()
    except Exception as exc:
        failure = f"{type(exc).__name__}: {exc}"
    finally:
        cluster.check_children()
        down = {n: c.unexpected_exits for n, c in cluster.children.items() if c.unexpected_exits}
        alive_before_stop = {n: c.alive for n, c in cluster.children.items()}
        exit_codes = cluster.close()
    if "backlog" in args.phases:  # its own processes: after the cluster is gone
        mark = now()
        phases["backlog"] = phase_backlog(cluster, args)
        durations["backlog"] = round(now() - mark, 1)
    durations["total"] = round(now() - began, 1)
    return summarise(
        args, cluster, phases, durations, exit_codes, down, alive_before_stop, failure, workdir
    )


def summarise(args, cluster, phases, durations, exit_codes, down, alive, failure, workdir):
    kills = phases.get("kills", {})
    bursts = phases.get("bursts", {})
    fuzz = phases.get("fuzz", {})
    thread_deaths = (
        list(cluster.observer.thread_died)
        + [
            f"{name}: exit {code}"
            for name, codes in down.items()
            for code in codes
            if code == EXIT_THREAD_DIED
        ]
        + [f"{name}: exit {code}" for name, code in exit_codes.items() if code == EXIT_THREAD_DIED]
    )
    lost = kills.get("lost", {})
    duplicates = kills.get("duplicates", {})
    fuzz_unaccounted = (
        fuzz.get("trainer", {}).get("unaccounted"),
        fuzz.get("agents", {}).get("unaccounted"),
    )
    stall = phases.get("stall", {})
    backlog = phases.get("backlog", {})
    trainer_fuzz = fuzz.get("trainer", {})
    targets = {
        "kill_cycles_lost_batches_0": lost.get("batches") == 0,
        "kill_cycles_lost_confirmations_0": (
            lost.get("confirmations_trainer") == 0 and lost.get("confirmations_agent") == 0
        ),
        "kill_cycles_duplicates_stored_0": bool(duplicates) and not any(duplicates.values()),
        "fuzz_payloads_at_least_100000": fuzz.get("payloads", 0) >= 100_000,
        "fuzz_0_dead_threads_0_processes_down": not thread_deaths
        and not down
        and all(alive.values()),
        "fuzz_every_payload_accounted": fuzz_unaccounted == (0, 0),
        "fuzz_valid_message_end_to_end_after": fuzz.get("end_to_end_after", {}).get("ok") is True,
        "burst_agent_drops_nothing": bursts.get("agent_confirmations", {}).get("dropped") == 0,
        "burst_trainer_drops_nothing": bursts.get("trainer_batches", {}).get("dropped") == 0,
        # Each payload handled (stored or reported) once: no redelivery, no reconnect.
        "fuzz_each_trainer_payload_handled_once": trainer_fuzz.get("ingested") is not None
        and trainer_fuzz.get("ingested") == trainer_fuzz.get("delivered")
        and trainer_fuzz.get("reports_not_repeated") == 0,
        "fuzz_0_trainer_reconnects": trainer_fuzz.get("reconnects") == 0,
        "stall_0_lost_0_reconnects": stall.get("lost") == 0
        and stall.get("trainer_reconnects") == 0,
        "backlog_stored_whole_no_process_died": backlog.get("exit_code") == 0
        and backlog.get("lost") == 0,
        "backlog_sqlite_at_least_2000_per_s": (backlog.get("drained_per_s") or {}).get(
            "sqlite:1", 0
        )
        >= 2000,
        "backlog_two_postgresql_replicas_faster": (backlog.get("drained_per_s") or {}).get(
            "postgresql:2", 0
        )
        > (backlog.get("drained_per_s") or {}).get("sqlite:1", float("inf")),
    }
    if args.quick:  # the sizes of the targets are the full run's
        del targets["fuzz_payloads_at_least_100000"]
    # A phase not run has nothing to say: only the targets of the phases that ran count.
    ran = {
        "kill_cycles": "kills", "fuzz": "fuzz", "burst": "bursts", "stall": "stall",
        "backlog": "backlog",
    }  # fmt: skip
    targets = {
        name: met
        for name, met in targets.items()
        if ran[next(p for p in ran if name.startswith(p))] in args.phases
    }
    return {
        "bench": "chaos",
        "seed": args.seed,
        "quick": args.quick,
        "machine_cores": os.cpu_count(),
        "config": {k: v for k, v in vars(args).items() if k not in ("evidence",)},
        "payloads": fuzz.get("payloads", 0),
        "lost": lost,
        "duplicates": duplicates,
        "dead_threads": len(thread_deaths),
        "dead_thread_details": thread_deaths,
        "processes_down": down,
        "exit_codes_at_stop": exit_codes,
        "failure": failure,
        "targets_met": targets,
        "durations_s": durations,
        "phases": phases,
        "workdir": str(workdir),
    }


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--agents", type=int, default=3)
    parser.add_argument("--broker-kills", type=int, default=10)
    parser.add_argument("--trainer-kills", type=int, default=10)
    parser.add_argument("--agent-kills", type=int, default=3)
    parser.add_argument("--fuzz-payloads", type=int, default=100_000)
    parser.add_argument("--burst", type=int, default=10_000)
    parser.add_argument("--quick", action="store_true",
                        help="small version: 2 broker, 2 trainer, 1 agent kills; 3,000 payloads; "
                        "bursts of 1,000")  # fmt: skip
    parser.add_argument("--batch-seconds", type=float, default=1.0)
    parser.add_argument("--confirm-share", type=float, default=0.3)
    parser.add_argument("--kill-min-s", type=float, default=1.0)
    parser.add_argument("--kill-max-s", type=float, default=5.0)
    parser.add_argument("--drain-timeout", type=float, default=120.0)
    parser.add_argument("--fuzz-rate", type=float, default=3000.0, help="payloads a second at most")
    parser.add_argument("--fuzz-window", type=int, default=500, help="unanswered publishes at most")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs)")
    parser.add_argument(
        "--phases",
        nargs="+",
        default=["kills", "bursts", "stall", "fuzz", "backlog"],
        choices=["kills", "bursts", "stall", "fuzz", "backlog"],
    )
    parser.add_argument("--stall-s", type=float, default=35.0, help="> 3 trainer keepalives")
    parser.add_argument("--stall-batches", type=int, default=2000)
    parser.add_argument("--backlog", type=int, default=100_000, help="batches (1,000 devices)")
    parser.add_argument("--evidence", type=Path, default=REPO / "docs" / "evidence" / "chaos.json")
    args = parser.parse_args(argv)
    if args.quick:
        given = set(argv if argv is not None else sys.argv[1:])
        quick = {"--broker-kills": 2, "--trainer-kills": 2, "--agent-kills": 1,
                 "--fuzz-payloads": 3000, "--burst": 1000, "--drain-timeout": 60.0,
                 "--kill-max-s": 3.0, "--backlog": 10_000, "--stall-s": 35.0,
                 "--stall-batches": 500}  # fmt: skip
        for flag, value in quick.items():
            if not any(g.startswith(flag) for g in given):
                setattr(args, flag[2:].replace("-", "_"), value)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    result = run(args)
    if not args.keep and result["failure"] is None:
        import shutil

        shutil.rmtree(result["workdir"], ignore_errors=True)
    text = json.dumps(result, indent=2, default=str)
    print(text)
    if args.evidence:
        args.evidence.parent.mkdir(parents=True, exist_ok=True)
        args.evidence.write_text(text + "\n")
    unmet = [name for name, met in result["targets_met"].items() if not met]
    for name in unmet:
        print(f"FAILED: target {name} not met", file=sys.stderr)
    if result["failure"] is not None:
        print(f"FAILED: {result['failure']}", file=sys.stderr)
    return 0 if result["failure"] is None and not unmet else 1


if __name__ == "__main__":
    raise SystemExit(main())
