"""``har agent``: run the device agent; ``rollback`` (agent stopped) and ``forget``."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from shared.config import add_broker_flags, broker_overrides, load_settings
from shared.lifecycle import run_until_signalled


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = subparsers.add_parser(
        "agent",
        help="run the device agent: sensor -> batches, predictions, on-device learning",
        description=(
            "Reads the accelerometer, publishes msgpack sensor batches and JSON predictions, "
            "learns from confirmations and installs signed model updates. Settings: --config "
            "TOML < HAR_* environment variables < flags."
        ),
    )
    parser.add_argument("--config", type=Path, help="agent TOML file")
    parser.add_argument("--device-id", help="this device's id (a topic level)")
    parser.add_argument("--state-dir", type=Path, help="outbox, learned state, models")
    parser.add_argument("--public-key", type=Path, help="Ed25519 key models must be signed with")
    add_broker_flags(parser)
    parser.add_argument(
        "--sensor", choices=("iio", "replay", "synthetic", "stdin"), help="sensor source"
    )
    parser.add_argument("--replay-file", type=Path, help="WISDM-format file for --sensor replay")
    parser.add_argument("--replay-user", type=int, help="user to replay")
    parser.add_argument("--speed", type=float, help="replay/synthetic pace (1 real time, 0 max)")
    parser.add_argument(
        "action",
        nargs="?",
        default="run",
        choices=("run", "rollback", "forget", "show-config"),
        help="run (default); rollback: make the previous model current (agent stopped); "
        "forget: drop every confirmation and what was learned from them, so the device serves "
        "the global model (done here when the agent is stopped, else by the running agent, "
        "asked through a file in its state folder); show-config: print the effective settings",
    )
    parser.set_defaults(func=run)


def settings_from(args: argparse.Namespace) -> Any:
    from device_agent.settings import AgentSettings

    overrides = {
        "device_id": args.device_id,
        "state_dir": args.state_dir,
        "public_key": args.public_key,
        **broker_overrides(args),
        "sensor.kind": args.sensor,
        "sensor.replay_file": args.replay_file,
        "sensor.replay_user": args.replay_user,
        "sensor.speed": args.speed,
    }
    return load_settings(
        AgentSettings, config_file=args.config, environ=os.environ, overrides=overrides
    )


def run(args: argparse.Namespace) -> int:
    settings = settings_from(args)
    if args.action == "show-config":
        print(settings)
        return 0
    if args.action == "forget":
        return forget(settings)
    if args.action == "rollback":
        from device_agent.releases import ReleaseStore

        version = ReleaseStore(settings.models_dir, None).rollback()
        print(f"current model is now {version}; it is verified again when the agent starts")
        return 0

    from device_agent.agent import DeviceAgent
    from device_agent.sensors import open_sensor

    return run_until_signalled(DeviceAgent(settings, open_sensor(settings.sensor)))


def forget(settings: Any) -> int:
    """Forget every confirmation: locally if no agent runs on this state, else by asking it
    through a request file in its state folder (no broker connection: see local_requests)."""
    from device_agent.local_requests import clear_forget_request
    from device_agent.state_lock import StateLock
    from device_agent.store import AgentStore

    lock = StateLock(settings.state_dir)
    if lock.acquire():
        try:
            store = AgentStore(settings.store_path)
            try:
                forgotten = store.forget_confirmations()
            finally:
                store.close()
            for state in settings.learned_dir.glob("*.state"):
                state.unlink()
            clear_forget_request(settings.state_dir)
        finally:
            lock.release()
        print(f"forgot {forgotten} confirmations; the agent will serve the global model")
        return 0
    return _ask_running_agent(settings)


FORGET_WAIT_S = 30.0


def _ask_running_agent(settings: Any) -> int:
    import time
    import uuid

    from device_agent.local_requests import FORGET_REQUEST, request_forget
    from shared.messages import DeviceCommand

    command = DeviceCommand("forget", uuid.uuid4().hex[:16], time.time())
    if request_forget(settings.state_dir, command, FORGET_WAIT_S):
        print(
            f"the running agent forgot every confirmation ({command.request_id}); it serves "
            "the global model"
        )
        return 0
    print(
        f"the running agent has not handled the request within {FORGET_WAIT_S:.0f} s; it will "
        f"when it can (delete {settings.state_dir / FORGET_REQUEST} to cancel)"
    )
    return 1
