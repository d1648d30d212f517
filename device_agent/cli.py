"""``har agent [run]``: run the device agent; ``rollback`` (agent stopped), ``forget`` and
``show-config``, each with its own help."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from shared.config import add_broker_flags, broker_overrides, load_settings
from shared.lifecycle import run_until_signalled

RUN_DESCRIPTION = (
    "Reads the accelerometer, publishes msgpack sensor batches and JSON predictions, learns "
    "from confirmations and installs signed model updates. Settings: --config TOML < HAR_* "
    "environment variables < flags."
)


FORGET_WAIT_S = 30.0  # `har agent forget` waits this long for a running agent


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = subparsers.add_parser(
        "agent",
        help="run the device agent: sensor -> batches, predictions, on-device learning",
        description=f"{RUN_DESCRIPTION} Each action has its own help: har agent ACTION --help.",
    )
    _add_state_flags(parser)
    _add_run_flags(parser)
    parser.set_defaults(func=run)
    # The flags work before the action and after it: the action's own parser leaves a flag it
    # was not given unset (SUPPRESS), so it cannot overwrite one given before the action.
    actions = parser.add_subparsers(dest="action", metavar="[ACTION]")
    runner = actions.add_parser(
        "run",
        help="run the agent (the default)",
        description=RUN_DESCRIPTION,
        argument_default=argparse.SUPPRESS,
    )
    _add_state_flags(runner)
    _add_run_flags(runner)
    rollback = actions.add_parser(
        "rollback",
        help="make the previous model current (agent stopped)",
        description="Make the previously installed model version current again. Run it while "
        "the agent is stopped; the agent verifies the model again when it starts. Settings: "
        "--config TOML < HAR_* environment variables < flags.",
        argument_default=argparse.SUPPRESS,
    )
    _add_state_flags(rollback)
    forget = actions.add_parser(
        "forget",
        help="drop every confirmation and what was learned from them",
        description="Drop every confirmation and what was learned from them, so the device "
        "serves the global model. Done here when the agent is stopped; a running agent is "
        "asked through a file in its state folder (no broker needed). Settings: --config TOML "
        "< HAR_* environment variables < flags.",
        argument_default=argparse.SUPPRESS,
    )
    _add_state_flags(forget)
    forget.add_argument(
        "--wait-s",
        type=_positive_seconds,
        help=f"how long to wait for a running agent to answer (default {FORGET_WAIT_S:g}); "
        "exit code 1 if it did not: it carries the request out when it can",
    )
    show = actions.add_parser(
        "show-config",
        help="print the effective settings (passwords redacted)",
        description="Print the settings the agent would run with, from --config TOML, HAR_* "
        "environment variables and flags. A broker password shows as <redacted>.",
        argument_default=argparse.SUPPRESS,
    )
    _add_state_flags(show)
    _add_run_flags(show)


def _add_state_flags(parser: argparse.ArgumentParser) -> None:
    """What every action needs: which device, and where its state is."""
    parser.add_argument("--config", type=Path, help="agent TOML file")
    parser.add_argument("--device-id", help="this device's id (a topic level)")
    parser.add_argument("--state-dir", type=Path, help="outbox, learned state, models")


def _add_run_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--public-key", type=Path, help="Ed25519 key models must be signed with")
    add_broker_flags(parser)
    parser.add_argument(
        "--sensor", choices=("iio", "replay", "synthetic", "stdin"), help="sensor source"
    )
    parser.add_argument("--replay-file", type=Path, help="WISDM-format file for --sensor replay")
    parser.add_argument("--replay-user", type=int, help="user to replay")
    parser.add_argument("--speed", type=float, help="replay/synthetic pace (1 real time, 0 max)")


def _positive_seconds(text: str) -> float:
    value = float(text)
    if not 0 < value <= 86_400:
        raise argparse.ArgumentTypeError(f"{text} is not within 0..86400 s")
    return value


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
        return forget(settings, getattr(args, "wait_s", FORGET_WAIT_S))
    if args.action == "rollback":
        from device_agent.releases import ReleaseStore

        version = ReleaseStore(settings.models_dir, None).rollback()
        print(f"current model is now {version}; it is verified again when the agent starts")
        return 0

    from device_agent.agent import DeviceAgent
    from device_agent.sensors import open_sensor

    return run_until_signalled(DeviceAgent(settings, open_sensor(settings.sensor)))


def forget(settings: Any, wait_s: float = FORGET_WAIT_S) -> int:
    """Forget every confirmation: locally if no agent runs on this state, else by asking it
    through a request file in its state folder (no broker connection: see local_requests)."""
    import time
    import uuid

    from device_agent.local_requests import clear_forget_request
    from device_agent.outbox import forget_relay
    from device_agent.state_lock import StateLock
    from device_agent.store import AgentStore
    from shared.messages import DeviceCommand
    from shared.topics import Topics

    lock = StateLock(settings.state_dir)
    if lock.acquire():
        try:
            store = AgentStore(settings.store_path)
            command = DeviceCommand("forget", uuid.uuid4().hex[:16], time.time())
            topics = Topics(settings.broker.topic_root)
            try:
                # The trainer is told when the agent next runs (its outbox).
                forgotten = store.forget_confirmations(
                    command.ts, forget_relay(topics, settings.device_id, command)
                )
            finally:
                store.close()
            for state in settings.learned_dir.glob("*.state"):
                state.unlink()
            clear_forget_request(settings.state_dir)
        finally:
            lock.release()
        print(
            f"forgot {forgotten} confirmations; the agent will serve the global model and tell "
            "the trainer to forget them too when it next runs"
        )
        return 0
    return _ask_running_agent(settings, wait_s)


def _ask_running_agent(settings: Any, wait_s: float) -> int:
    import time
    import uuid

    from device_agent.local_requests import FORGET_REQUEST, request_forget
    from shared.messages import DeviceCommand

    command = DeviceCommand("forget", uuid.uuid4().hex[:16], time.time())
    if request_forget(settings.state_dir, command, wait_s):
        print(
            f"the running agent forgot every confirmation ({command.request_id}); it serves "
            "the global model"
        )
        return 0
    print(
        f"the running agent has not handled the request within {wait_s:g} s; it will "
        f"when it can (delete {settings.state_dir / FORGET_REQUEST} to cancel)"
    )
    return 1
