"""``har agent``: run the device agent (and ``har agent rollback`` for a stopped agent)."""

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
        choices=("run", "rollback", "show-config"),
        help="run (default); rollback: make the previous model current (agent stopped); "
        "show-config: print the effective settings",
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
    if args.action == "rollback":
        from device_agent.releases import ReleaseStore

        version = ReleaseStore(settings.models_dir, None).rollback()
        print(f"current model is now {version}; it is verified again when the agent starts")
        return 0

    from device_agent.agent import DeviceAgent
    from device_agent.sensors import open_sensor

    return run_until_signalled(DeviceAgent(settings, open_sensor(settings.sensor)))
