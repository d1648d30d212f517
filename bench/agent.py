"""The device agent at 20 Hz for 60 s of sensor time: CPU share of one core, RSS, latencies.

Runs the real agent in this process (synthetic sensor paced in real time, a local Mosquitto, a
signed release of the production architecture), confirms a prediction every few seconds, and
prints one JSON document. CPU is measured over the run only (after start-up and the model
install), from this process's user + system time, so it is the agent's own cost on top of the
TensorFlow runtime. The broker runs in its own process and is not counted.

    .venv/bin/python bench/agent.py [--seconds 60] [--model VERSION_DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import resource
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from _common import har_train, percentiles, rss_mb  # also puts the repository on sys.path


def make_release(workdir: Path, model: Path | None) -> tuple[Path, Any]:
    """A registry with one promoted version. Without ``--model``, ``har train`` makes a small
    one of the production architecture in a child process, so this process's RSS is the agent's.
    """
    from har.synthetic_data import write_dataset
    from shared.signing import generate_keypair, load_private_key
    from trainer_service.registry import ModelRegistry

    private, public = generate_keypair(workdir / "keys")
    registry = ModelRegistry(workdir / "registry")
    if model is None:
        base = write_dataset(
            workdir / "base.txt", range(1, 5), ("Walking", "Jogging", "Sitting", "Standing"), 40.0
        )
        model = har_train(base, workdir / "staging", "bench")
    info = registry.add(model, parent=None)
    registry.promote(info.version, load_private_key(private), chunk_size=256 * 1024)
    return public, registry


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=60.0, help="sensor time (real time)")
    parser.add_argument("--confirm-every", type=float, default=5.0, help="seconds between")
    parser.add_argument("--model", type=Path, help="a version folder from `har train`")
    args = parser.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

    from device_agent.agent import DeviceAgent
    from device_agent.sensors import SensorSettings, open_sensor
    from device_agent.settings import AgentSettings, AgentTuning
    from har.local_broker import MosquittoProcess
    from shared import codec
    from shared.config import BrokerSettings
    from shared.messages import Confirmation
    from shared.mqtt_transport import InboundMessage, MqttConnection, Outbound
    from shared.topics import Topics
    from trainer_service.distribution import current_release_messages, publish_all

    rss_before_tf = rss_mb()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        (workdir / "broker").mkdir()
        broker = MosquittoProcess(workdir / "broker")
        broker.start()
        try:
            public, registry = make_release(workdir, args.model)
            settings = BrokerSettings(host=broker.host, port=broker.port)
            topics = Topics(settings.topic_root)
            inbox: queue.Queue[InboundMessage] = queue.Queue(maxsize=10_000)
            app = MqttConnection(
                settings,
                client_id="bench-app",
                subscriptions=[(topics.prediction("bench"), 1)],
                inbox=inbox,
                persistent_session=False,
            )
            app.start()
            app.wait_connected(10)
            app.wait_subscribed(10)
            publish_all(app, current_release_messages(topics, registry, 256 * 1024), 10)
            agent_settings = AgentSettings(
                device_id="bench",
                state_dir=workdir / "device",
                public_key=public,
                broker=settings,
                sensor=SensorSettings(kind="synthetic", speed=1.0),
                agent=AgentTuning(window_hop=40),
            )
            agent = DeviceAgent(agent_settings, open_sensor(agent_settings.sensor))
            rss_before_agent = rss_mb()
            agent.start()
            if not agent.model_changed.wait(120):
                raise SystemExit("the agent did not install the model")
            rss_after_load = rss_mb()

            stop = threading.Event()

            def confirm_some() -> None:
                next_at = time.monotonic() + args.confirm_every
                while not stop.is_set():
                    try:
                        message = inbox.get(timeout=0.5)
                    except queue.Empty:
                        continue
                    message.ack()
                    if time.monotonic() < next_at:
                        continue
                    next_at += args.confirm_every
                    prediction = codec.decode_prediction(message.payload)
                    confirmation = Confirmation(prediction.prediction_id, "Walking", "user", 1.0)
                    app.publish(
                        Outbound(
                            topics.confirmation("bench"), codec.encode_confirmation(confirmation)
                        )
                    )

            confirmer = threading.Thread(target=confirm_some, daemon=True)
            confirmer.start()
            batches_before = agent.counters.get("batches_queued")
            usage_before = resource.getrusage(resource.RUSAGE_SELF)
            wall_before = time.monotonic()
            stop.wait(args.seconds)
            usage_after = resource.getrusage(resource.RUSAGE_SELF)
            wall = time.monotonic() - wall_before
            stop.set()
            confirmer.join(5)
            cpu = (usage_after.ru_utime - usage_before.ru_utime) + (
                usage_after.ru_stime - usage_before.ru_stime
            )
            counters = agent.status_counters()
            result = {
                "benchmark": "agent",
                "sensor_rate_hz": 20.0,
                "seconds": round(wall, 1),
                "cpu_share_of_one_core": round(cpu / wall, 4),
                "goal_cpu_share": 0.05,
                "batches_published": agent.counters.get("batches_queued") - batches_before,
                "predictions": counters.get("predictions", 0),
                "confirmations_applied": counters.get("confirmations_applied", 0),
                "predict_latency": percentiles(agent.latencies.samples("predict")),
                "learn_and_persist_latency": percentiles(
                    agent.latencies.samples("learn_and_persist")
                ),
                "rss_mb": {
                    "python_and_imports_before_tensorflow": round(rss_before_tf, 1),
                    "before_agent_start": round(rss_before_agent, 1),
                    "after_model_load": round(rss_after_load, 1),
                    "end": round(rss_mb(), 1),
                    "peak": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                },
                "note": "RSS includes TensorFlow (about 0.5 GB by itself) and the user's app "
                "client; the model was trained in a child process",
            }
            agent.shutdown()
            app.stop()
        finally:
            broker.stop()
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
