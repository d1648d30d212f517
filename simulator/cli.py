"""``har sim``: a fleet of simulated devices and their people against any broker."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from shared.config import add_broker_flags, broker_overrides, load_settings


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = subparsers.add_parser(
        "sim",
        help="simulate N devices (one process) whose people confirm and correct predictions",
        description=(
            "Runs N lightweight devices in one process. Each connects as itself, replays a "
            "WISDM-format user (or a synthetic person), publishes sensor batches, predictions and "
            "its status, and installs signed model versions; simulated people confirm a share of "
            "the predictions and sometimes get it wrong. Settings: --config TOML < HAR_* "
            "environment variables < flags. Stops on SIGINT/SIGTERM (or after --duration) and "
            "prints a JSON report; exits with 70 if its event loop died (the report's 'failed')."
        ),
    )
    parser.add_argument("--config", type=Path, help="sim TOML file")
    parser.add_argument("--devices", type=int, help="how many devices (default 10)")
    parser.add_argument("--device-prefix", help="device ids are <prefix>0000, <prefix>0001, ...")
    parser.add_argument("--first-index", type=int, help="index of the first device (default 0)")
    parser.add_argument("--data", type=Path, help="WISDM-format file to replay (else synthetic)")
    parser.add_argument("--public-key", type=Path, help="Ed25519 key models must be signed with")
    parser.add_argument("--confirm-share", type=float, help="share of predictions answered")
    parser.add_argument("--mistake-rate", type=float, help="share of answers that are wrong")
    parser.add_argument("--speed", type=float, help="1 = real time, 10 = ten times faster")
    parser.add_argument("--batch-seconds", type=float, help="sensor seconds per batch")
    parser.add_argument("--state-dir", type=Path, help="verified model releases")
    add_broker_flags(parser)
    parser.add_argument(
        "--homeassistant",
        action="store_true",
        default=None,
        help="publish retained Home Assistant discovery configs for every device",
    )
    parser.add_argument("--duration", type=float, help="stop after this many seconds")
    parser.add_argument("--report", type=Path, help="also write the JSON report here")
    parser.set_defaults(func=run)


def settings_from(args: argparse.Namespace) -> Any:
    from simulator.settings import SimSettings

    overrides = {
        "devices": args.devices,
        "device_prefix": args.device_prefix,
        "first_index": args.first_index,
        "data_file": args.data,
        "public_key": args.public_key,
        "confirm_share": args.confirm_share,
        "mistake_rate": args.mistake_rate,
        "speed": args.speed,
        "batch_seconds": args.batch_seconds,
        "state_dir": args.state_dir,
        **broker_overrides(args),
        "homeassistant_discovery": args.homeassistant,
    }
    return load_settings(
        SimSettings, config_file=args.config, environ=os.environ, overrides=overrides
    )


def run(args: argparse.Namespace) -> int:
    """Print the fleet's report; exit ``EXIT_THREAD_DIED`` if its event loop died (``failed``)."""
    from shared.supervision import EXIT_THREAD_DIED
    from simulator.runner import run_fleet

    report = run_fleet(settings_from(args), duration_s=args.duration)
    text = json.dumps(report, indent=2)
    if args.report is not None:
        args.report.write_text(text + "\n")
    print(text, flush=True)
    return EXIT_THREAD_DIED if "failed" in report else 0
