"""The device agent at 20 Hz on each model runtime, side by side in one run: CPU, RSS, latencies.

One signed release of the production architecture (``har train`` in a child process) is put on a
local Mosquitto. Then, one after the other, the real agent runs in a process of its own on each
runtime for ``--seconds`` of sensor time (synthetic sensor paced in real time), while a person's
app in this process confirms a prediction every few seconds:

- ``tensorflow``: the agent in this project's ``.venv`` (the SavedModel);
- ``litert``: the agent in ``.venv-lite``, which has no TensorFlow at all (``scripts/setup.sh``
  makes it with ``pip install '.[agent-lite]'``), running the bundle's LiteRT form.

CPU is measured over the run only (after start-up and the model install), from the agent
process's user + system time. RSS is the agent process's alone (the app confirming runs in this
process), with how much of it is file-backed (the libraries' pages). Predict latency
is the agent's own (a window every 2 s, caches cold in between); the same call back to back is
reported beside it. Installed sizes
are those of the two venvs as ``scripts/setup.sh`` makes them (pip and editable tooling included)
and of a device image of the light agent: a venv without pip, installed with ``--no-compile``.
Prints one JSON document and writes it to ``docs/evidence/agent.json``.

    .venv/bin/python bench/agent.py [--seconds 60] [--repeat 3] [--runtime tensorflow litert]
                                    [--no-image]
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from _common import (  # also puts the repository on sys.path
    REPO,
    har_train,
    medians,
    percentiles,
    rss_mb,
)

EVIDENCE = REPO / "docs" / "evidence" / "agent.json"
LITE_PYTHON = REPO / ".venv-lite" / "bin" / "python"
TARGETS = {
    "litert": {
        "rss_mb_max": 80.0,
        "rss_mb_goal": 60.0,
        "cpu_share_max": 0.02,
        "predict_p50_ms_max": 0.1,
        "learn_and_persist_p50_ms_max": 10.0,
    },
    "environment_mb_max": 150.0,
}


def make_release(workdir: Path, model: Path | None) -> tuple[Path, Any]:
    """A registry with one promoted version. Without ``--model``, ``har train`` makes a small
    one of the production architecture in a child process."""
    from shared.signing import generate_keypair, load_private_key
    from simulator.synthetic_data import write_dataset
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


def tree_mb(folder: Path, *, skip: tuple[str, ...] = ()) -> float:
    """Bytes of every file under ``folder`` (symlinks not followed, the ``skip`` subfolders
    left out), in MiB."""
    total = 0
    for root, folders, files in os.walk(folder):
        folders[:] = [
            name for name in folders if Path(root, name) not in {folder / s for s in skip}
        ]
        for name in files:
            total += os.lstat(os.path.join(root, name)).st_size
    return round(total / 2**20, 1)


def device_image_mb(workdir: Path) -> float:
    """The light agent as a device image holds it: no pip, no bytecode compiled at install."""
    image = workdir / "device-image"
    build = REPO / "build"  # what a non-editable install of the checkout leaves behind
    leftover = not build.exists()
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(image)], check=True)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(image / "bin" / "python"),
            "install",
            "--quiet",
            "--no-compile",
            f"{REPO}[agent-lite]",
        ],
        check=True,
        capture_output=True,
    )
    if leftover:
        shutil.rmtree(build, ignore_errors=True)
    return tree_mb(image)


# ----------------------------------------------------------------------------------- the agent
def run_agent(args: argparse.Namespace) -> dict[str, Any]:
    """In the child: the agent on ``args.child_runtime`` against the broker, measured. Only the
    agent runs here; the person's app confirming its predictions runs in the parent."""
    from device_agent.agent import DeviceAgent
    from device_agent.sensors import SensorSettings, open_sensor
    from device_agent.settings import AgentSettings, AgentTuning
    from shared.config import BrokerSettings

    rss_at_start = rss_mb()
    agent_settings = AgentSettings(
        device_id=args.device,
        state_dir=args.state_dir,
        public_key=args.public_key,
        broker=BrokerSettings(host="127.0.0.1", port=args.port),
        sensor=SensorSettings(kind="synthetic", speed=1.0),
        agent=AgentTuning(window_hop=40, runtime=args.child_runtime, await_receipts=False),
    )
    agent = DeviceAgent(agent_settings, open_sensor(agent_settings.sensor))
    rss_before_agent = rss_mb()
    agent.start()
    if not agent.model_changed.wait(120):
        raise SystemExit("the agent did not install the model")
    rss_after_load = rss_mb()
    batches_before = agent.counters.get("batches_queued")
    usage_before = resource.getrusage(resource.RUSAGE_SELF)
    wall_before = time.monotonic()
    time.sleep(args.seconds)  # the run being measured, not synchronisation
    usage_after = resource.getrusage(resource.RUSAGE_SELF)
    wall = time.monotonic() - wall_before
    cpu = (usage_after.ru_utime - usage_before.ru_utime) + (
        usage_after.ru_stime - usage_before.ru_stime
    )
    counters = agent.status_counters()
    end = {name: rss_mb(field=name) for name in ("VmRSS", "VmHWM", "RssAnon", "RssFile")}
    back_to_back = predict_back_to_back(agent.active_model)
    result = {
        "runtime": agent.runtime,
        "python": sys.executable,
        "tensorflow_imported": "tensorflow" in sys.modules,
        "seconds": round(wall, 1),
        "cpu_share_of_one_core": round(cpu / wall, 4),
        "batches_published": agent.counters.get("batches_queued") - batches_before,
        "predictions": counters.get("predictions", 0),
        "confirmations_applied": counters.get("confirmations_applied", 0),
        # As the agent predicts: one window every 2 s, with caches gone cold in between.
        "predict_latency": percentiles(agent.latencies.samples("predict"), 4),
        # The same call 1000 times in a row (warm caches): the runtime's own cost.
        "predict_back_to_back": percentiles(back_to_back, 4),
        "learn_and_persist_latency": percentiles(agent.latencies.samples("learn_and_persist")),
        "rss_mb": {
            "python_and_imports": round(rss_at_start, 1),
            "before_agent_start": round(rss_before_agent, 1),
            "after_model_load": round(rss_after_load, 1),
            "end": round(end["VmRSS"], 1),
            "peak": round(end["VmHWM"], 1),
            # Of the end figure: memory of its own, and pages of mapped files (the libraries),
            # which are clean and shared and which the kernel may drop under pressure.
            "end_anonymous": round(end["RssAnon"], 1),
            "end_file_backed": round(end["RssFile"], 1),
        },
    }
    agent.shutdown()
    return result


class PersonsApp:
    """In the parent: the person confirming one of the device's predictions every few seconds."""

    def __init__(self, port: int, device: str, every_s: float) -> None:
        from shared.config import BrokerSettings
        from shared.mqtt_transport import MqttConnection
        from shared.topics import Topics

        self._topics = Topics(BrokerSettings().topic_root)
        self._device = device
        self._every_s = every_s
        self._inbox: queue.Queue[Any] = queue.Queue(maxsize=10_000)
        self._connection = MqttConnection(
            BrokerSettings(host="127.0.0.1", port=port),
            client_id=f"bench-app-{device}",
            subscriptions=[(self._topics.prediction(device), 1)],
            inbox=self._inbox,
            persistent_session=False,
        )
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._confirm_some, name="bench-app", daemon=True)

    def __enter__(self) -> PersonsApp:
        self._connection.start()
        self._connection.wait_connected(10)
        self._connection.wait_subscribed(10)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
        self._connection.stop()

    def _confirm_some(self) -> None:
        from shared import codec
        from shared.messages import Confirmation
        from shared.mqtt_transport import Outbound

        next_at = time.monotonic() + self._every_s
        while not self._stop.is_set():
            try:
                message = self._inbox.get(timeout=0.5)
            except queue.Empty:
                continue
            message.ack()
            if time.monotonic() < next_at:
                continue
            next_at += self._every_s
            prediction = codec.decode_prediction(message.payload)
            confirmation = Confirmation(prediction.prediction_id, "Walking", "user", 1.0)
            topic = self._topics.confirmation(self._device)
            self._connection.publish(Outbound(topic, codec.encode_confirmation(confirmation)))


def predict_back_to_back(model: Any) -> list[float]:
    """One window predicted 1000 times in a row through ``ActivityModel.predict``."""
    import numpy as np

    window = np.zeros((1, model.input_spec.window, 3), np.float32)
    window[..., 1] = 9.8
    seconds = []
    for _ in range(1000):
        started = time.perf_counter()
        model.predict(window)
        seconds.append(time.perf_counter() - started)
    return seconds[100:]  # the first calls warm up


def agent_in_child(
    args: argparse.Namespace, runtime: str, name: str, public: Path, port: int
) -> Any:
    python = Path(sys.executable)
    if runtime == "litert":
        if not LITE_PYTHON.exists():
            raise SystemExit(f"{LITE_PYTHON} is missing: run scripts/setup.sh")
        python = LITE_PYTHON
    command = [
        str(python),
        __file__,
        "--child",
        "--child-runtime",
        runtime,
        "--device",
        f"bench-{name}",
        "--port",
        str(port),
        "--public-key",
        str(public),
        "--state-dir",
        str(args.workdir / name),
        "--seconds",
        str(args.seconds),
    ]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    with PersonsApp(port, f"bench-{name}", args.confirm_every):
        done = subprocess.run(
            command,
            capture_output=True,
            text=True,
            timeout=args.seconds + 300,
            env=env,
            check=False,
        )
    if done.returncode != 0:
        raise SystemExit(f"the {runtime} agent failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def verdict(lite: dict[str, Any], sizes: dict[str, float]) -> dict[str, bool]:
    targets = TARGETS["litert"]
    environment = sizes.get("device_image_lite", sizes.get("venv_lite"))
    return {
        "rss_at_most_80_mb": lite["rss_mb"]["peak"] <= targets["rss_mb_max"],
        "rss_goal_60_mb": lite["rss_mb"]["peak"] <= targets["rss_mb_goal"],
        "cpu_under_2_percent": lite["cpu_share_of_one_core"] < targets["cpu_share_max"],
        "predict_p50_at_most_0_1_ms": lite["predict_latency"]["p50_ms"]
        <= targets["predict_p50_ms_max"],
        "learn_and_persist_p50_at_most_10_ms": lite["learn_and_persist_latency"]["p50_ms"]
        <= targets["learn_and_persist_p50_ms_max"],
        "environment_at_most_150_mb": environment is not None
        and environment <= TARGETS["environment_mb_max"],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=60.0, help="sensor time (real time)")
    parser.add_argument("--confirm-every", type=float, default=5.0, help="seconds between")
    parser.add_argument("--model", type=Path, help="a version folder from `har train`")
    parser.add_argument(
        "--runtime", nargs="+", default=["tensorflow", "litert"], choices=["tensorflow", "litert"]
    )
    parser.add_argument("--repeat", type=int, default=3, help="runs per runtime (medians)")
    parser.add_argument("--no-image", action="store_true", help="skip building the device image")
    parser.add_argument("--evidence", type=Path, default=EVIDENCE)
    # The child's own arguments.
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--child-runtime", help=argparse.SUPPRESS)
    parser.add_argument("--device", default="bench", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--public-key", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--state-dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_agent(args)))
        return 0

    from har.local_broker import MosquittoProcess
    from shared.config import BrokerSettings
    from shared.mqtt_transport import MqttConnection
    from shared.topics import Topics
    from trainer_service.distribution import current_release_messages, publish_all

    with tempfile.TemporaryDirectory() as tmp:
        args.workdir = Path(tmp)
        (args.workdir / "broker").mkdir()
        broker = MosquittoProcess(args.workdir / "broker")
        broker.start()
        try:
            public, registry = make_release(args.workdir, args.model)
            settings = BrokerSettings(host=broker.host, port=broker.port)
            publisher = MqttConnection(settings, client_id="bench-release", subscriptions=[])
            publisher.start()
            publisher.wait_connected(10)
            publish_all(
                publisher,
                current_release_messages(Topics(settings.topic_root), registry, 2**18),
                10,
            )
            publisher.stop()
            # Alternately, so that both runtimes meet the machine's noise alike.
            each_run: dict[str, list[Any]] = {runtime: [] for runtime in args.runtime}
            for i in range(args.repeat):
                for runtime in args.runtime:
                    result = agent_in_child(args, runtime, f"{runtime}-{i}", public, broker.port)
                    each_run[runtime].append(result)
            runs = {runtime: medians(results) for runtime, results in each_run.items()}
        finally:
            broker.stop()
        # .venv/node-red is a test tool (scripts/install-node-red.sh), not part of the agent.
        sizes = {"venv_full": tree_mb(REPO / ".venv", skip=("node-red",))}
        if LITE_PYTHON.exists():
            sizes["venv_lite"] = tree_mb(REPO / ".venv-lite")
        if not args.no_image:
            sizes["device_image_lite"] = device_image_mb(args.workdir)
    report: dict[str, Any] = {
        "benchmark": "agent",
        "sensor_rate_hz": 20.0,
        "repeat": args.repeat,
        # Field by field, the median of the runs of each runtime; every run beneath.
        "runs": runs,
        "each_run": each_run,
        "installed_mb": sizes,
        "targets": TARGETS,
        "note": "each agent runs in a process of its own, one after the other, on the same "
        "release and broker; the model was trained in another child process. venv sizes are "
        "as scripts/setup.sh makes them (pip, setuptools and bytecode included); the device "
        "image is the light agent without pip, installed with --no-compile",
    }
    if "litert" in runs:
        report["litert_targets_met"] = verdict(runs["litert"], sizes)
    text = json.dumps(report, indent=2)
    args.evidence.parent.mkdir(parents=True, exist_ok=True)
    args.evidence.write_text(text + "\n", encoding="utf-8")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
