"""What Mosquitto's autosave settings cost, and what each keeps across a ``kill -9``.

For each setting, on a fresh broker running deploy/mosquitto/mosquitto.conf (paths, listeners,
users and the autosave lines adapted; everything else as shipped) on free loopback ports:

1. the trainer connects with a persistent session (MQTT 5, clean start off, session expiry 7 days),
   subscribes at QoS 1 to every device's sensor topic, and disconnects: it is now an offline
   subscriber whose queue the broker must keep;
2. a device publishes a retained status, then ``--messages`` QoS 1 sensor messages of
   ``--payload-bytes`` each (paho, 100 in flight) into that queue, until all are acknowledged or
   ``--cap-seconds`` pass; measured: the broker's CPU seconds and the acknowledged messages per
   second of the stream, and how many times the persistence file was rewritten;
3. ``--kill-after`` seconds after the stream, the broker is killed with SIGKILL and restarted on
   the same files; measured: the persistence file's size at the kill, whether the trainer's
   session (its subscription) survived (session present, and a message published after the
   restart reaches it without subscribing again), whether the retained status survived, and how
   many queued messages were delivered.

Then, with no autosave in the way, the cost of one save (SIGUSR1) of a broker holding
``--save-sizes`` queued messages: the wall time until the new file is in place and the broker's
CPU seconds (mosquitto 2.0 rewrites the whole file each time, in its only thread).

Prints one JSON document and writes it to docs/evidence/broker_persistence.json (``--evidence``).

    .venv/bin/python bench/broker_persistence.py [--messages 20000] [--kill-after 2]
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import re
import shutil
import signal
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import _common  # also puts the repository on sys.path
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from har.local_broker import SHIPPED_ACL, SHIPPED_CONF, ShippedMosquitto

EVIDENCE = _common.REPO / "docs/evidence/broker_persistence.json"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PASSWORDS = {"trainer": "pw-trainer", "wrist-0001": "pw-wrist", "operator": "pw-operator"}
SENSOR = "har/v1/devices/wrist-0001/sensor"
STATUS = "har/v1/devices/wrist-0001/status"
SETTINGS: list[tuple[str, dict[str, str]]] = [
    ("interval 300 s", {"autosave_interval": "300"}),
    ("interval 60 s", {"autosave_interval": "60"}),
    ("interval 10 s", {"autosave_interval": "10"}),
    ("interval 1 s", {"autosave_interval": "1"}),
    ("on changes, 1000", {"autosave_interval": "1000", "autosave_on_changes": "true"}),
    ("on changes, 100", {"autosave_interval": "100", "autosave_on_changes": "true"}),
    ("on changes, 1", {"autosave_interval": "1", "autosave_on_changes": "true"}),
]


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime + stime


def with_autosave(text: str, options: dict[str, str]) -> str:
    """The shipped config with its autosave lines replaced by ``options``."""
    kept = [
        line
        for line in text.splitlines()
        if not re.match(r"autosave_(interval|on_changes)\b", line)
    ]
    return "\n".join(kept + [f"{name} {value}" for name, value in options.items()]) + "\n"


class Raw:
    """A bare paho MQTT 5 client: the session flag and subscriptions stay visible."""

    def __init__(self, broker: ShippedMosquitto, user: str, *, persistent: bool) -> None:
        self.client = paho.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=user,
            protocol=paho.MQTTv5,
        )
        self.client.username_pw_set(user, PASSWORDS[user])
        self.client.max_inflight_messages_set(100)
        self.connected: queue.Queue[bool] = queue.Queue()
        self.subscribed = threading.Event()
        self.messages: queue.Queue[paho.MQTTMessage] = queue.Queue()
        self.acked = 0
        self._lock = threading.Lock()
        self.all_acked = threading.Event()
        self.expected = -1
        self.client.on_connect = lambda _c, _u, flags, rc, _p: self.connected.put(
            bool(flags.session_present) if not rc.is_failure else False
        )
        self.client.on_subscribe = lambda *_: self.subscribed.set()
        self.client.on_message = lambda _c, _u, message: self.messages.put(message)
        self.client.on_publish = self._on_publish
        properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        if persistent:
            properties.SessionExpiryInterval = 7 * 24 * 3600
        self.client.connect(
            broker.host, broker.port, clean_start=not persistent, properties=properties
        )
        self.client.loop_start()
        self.session_present = self.connected.get(timeout=10)

    def _on_publish(self, *_: Any) -> None:
        with self._lock:
            self.acked += 1
            if self.acked == self.expected:
                self.all_acked.set()

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def count_saves(path: Path, stop: threading.Event, seen: list[int]) -> None:
    """Each save writes a new file and renames it over the old: count the inodes."""
    last = None
    while not stop.wait(0.02):
        try:
            inode = path.stat().st_ino
        except FileNotFoundError:
            continue
        if inode != last:
            seen.append(inode)
            last = inode


def drain(messages: queue.Queue[paho.MQTTMessage], quiet_s: float = 2.0) -> list[bytes]:
    """Every message until none arrives for ``quiet_s``."""
    received = []
    while True:
        try:
            received.append(messages.get(timeout=quiet_s).payload)
        except queue.Empty:
            return received


def offline_trainer_broker(options: dict[str, str], workdir: Path) -> ShippedMosquitto:
    """A started broker with ``options`` for autosave, and the trainer's persistent session
    subscribed to every device's sensor topic, offline."""
    config = workdir / "mosquitto.shipped.conf"
    config.parent.mkdir(parents=True)
    config.write_text(with_autosave(SHIPPED_CONF.read_text(), options))
    broker = ShippedMosquitto(workdir, config, PASSWORDS, SHIPPED_ACL)
    broker.start()
    trainer = Raw(broker, "trainer", persistent=True)
    trainer.client.subscribe("har/v1/devices/+/sensor", qos=1)
    assert trainer.subscribed.wait(10), "no SUBACK"
    trainer.close()
    return broker


def run_setting(
    name: str, options: dict[str, str], args: argparse.Namespace, workdir: Path
) -> dict[str, Any]:
    broker = offline_trainer_broker(options, workdir)
    try:
        device = Raw(broker, "wrist-0001", persistent=False)
        device.expected = args.messages + 1
        database = workdir / "mosquitto.db"
        saves: list[int] = []
        stop_counting = threading.Event()
        counter = threading.Thread(target=count_saves, args=(database, stop_counting, saves))
        counter.start()
        device.client.publish(STATUS, b'{"state":"online"}', qos=1, retain=True)
        payload = os.urandom(args.payload_bytes)
        cpu_before, started = cpu_seconds(broker.pid), time.perf_counter()
        for _ in range(args.messages):
            device.client.publish(SENSOR, payload, qos=1)
        finished = device.all_acked.wait(args.cap_seconds)
        elapsed = time.perf_counter() - started
        cpu_stream = cpu_seconds(broker.pid) - cpu_before
        acked = device.acked - 1  # the status
        device.close()
        # The crash comes --kill-after seconds after the stream, whatever was saved by then.
        stop_counting.wait(args.kill_after)
        cpu_total = cpu_seconds(broker.pid) - cpu_before
        stop_counting.set()
        counter.join()
        size = database.stat().st_size if database.exists() else 0
        broker.kill()  # SIGKILL
        broker.start()

        trainer = Raw(broker, "trainer", persistent=True)
        queued = drain(trainer.messages)
        fresh = Raw(broker, "wrist-0001", persistent=False)
        marker = b"after-restart-" + os.urandom(4).hex().encode()
        fresh.client.publish(SENSOR, marker, qos=1).wait_for_publish(10)
        subscription_survived = marker in drain(trainer.messages)
        operator = Raw(broker, "operator", persistent=False)
        operator.client.subscribe(STATUS, qos=1)
        retained = drain(operator.messages, quiet_s=1.0)
        for client in (trainer, fresh, operator):
            client.close()
        return {
            "setting": name,
            "options": options,
            "messages_acked": acked,
            "stream_finished": finished,
            "stream_seconds": round(elapsed, 2),
            "messages_per_s": round(acked / elapsed),
            "broker_cpu_s_stream": round(cpu_stream, 2),
            "broker_cpu_ms_per_1000_messages": round(1000 * cpu_stream / max(acked, 1) * 1000, 1),
            "broker_cpu_s_until_kill": round(cpu_total, 2),
            "file_rewrites_seen": len(saves),
            "file_bytes_at_kill": size,
            "after_kill_9": {
                "session_present": trainer.session_present,
                "subscription": subscription_survived,
                "retained_status": bool(retained),
                "queued_messages_delivered": len(queued),
            },
        }
    finally:
        broker.stop()


def measure_save(messages: int, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """One save (SIGUSR1) of a broker holding ``messages`` queued for the offline trainer."""
    broker = offline_trainer_broker({"autosave_interval": "3600"}, workdir)
    try:
        device = Raw(broker, "wrist-0001", persistent=False)
        device.expected = messages
        payload = os.urandom(args.payload_bytes)
        for _ in range(messages):
            device.client.publish(SENSOR, payload, qos=1)
        assert device.all_acked.wait(300), "the stream did not finish"
        device.close()
        database = workdir / "mosquitto.db"
        cpu_before, started = cpu_seconds(broker.pid), time.perf_counter()
        os.kill(broker.pid, signal.SIGUSR1)
        deadline = time.monotonic() + 120
        while not database.exists():  # written beside it, then renamed: whole when it appears
            assert time.monotonic() < deadline, "no save within 120 s"
            time.sleep(0.005)
        return {
            "queued_messages": messages,
            "file_bytes": database.stat().st_size,
            "save_wall_s": round(time.perf_counter() - started, 3),
            "save_broker_cpu_s": round(cpu_seconds(broker.pid) - cpu_before, 3),
        }
    finally:
        broker.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--payload-bytes", type=int, default=2_500)
    parser.add_argument("--cap-seconds", type=float, default=60.0, help="longest stream")
    parser.add_argument("--kill-after", type=float, default=2.0, help="s from stream to SIGKILL")
    parser.add_argument("--only", nargs="+", help="setting names to run (default: all)")
    parser.add_argument(
        "--save-sizes", type=int, nargs="*", default=[20_000, 60_000], help="queues saved once"
    )
    parser.add_argument("--evidence", type=Path, default=EVIDENCE, help="write the JSON here")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="har-bench-persistence-"))
    try:
        results = [
            run_setting(name, options, args, root / f"run-{i}")
            for i, (name, options) in enumerate(SETTINGS)
            if not args.only or name in args.only
        ]
        saves = [measure_save(n, args, root / f"save-{i}") for i, n in enumerate(args.save_sizes)]
    finally:
        shutil.rmtree(root, ignore_errors=True)
    text = json.dumps(
        {
            "bench": "broker_persistence",
            "machine_cores": os.cpu_count(),
            "messages": args.messages,
            "payload_bytes": args.payload_bytes,
            "kill_after_s": args.kill_after,
            "results": results,
            "one_save": saves,
        },
        indent=2,
    )
    print(text)
    if args.evidence:
        args.evidence.parent.mkdir(parents=True, exist_ok=True)
        args.evidence.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
