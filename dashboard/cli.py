"""``har watch`` (the live fleet dashboard) and ``har confirm`` (one confirmation, for scripts)."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from shared.config import load_settings
from shared.errors import ConfigError


def _broker_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="TOML file with a [broker] table")
    parser.add_argument("--host", help="MQTT broker host (default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="MQTT broker port (default 1883)")
    parser.add_argument("--username", help="broker login (the shipped ACL has 'dashboard')")
    parser.add_argument("--password-file", type=Path, help="file holding the broker password")
    parser.add_argument(
        "--tls", action="store_true", default=None, help="connect with TLS (see --ca-file)"
    )
    parser.add_argument("--ca-file", type=Path, help="CA certificate to verify the broker with")
    parser.add_argument("--topic-root", help="topic root (default har/v1)")
    parser.add_argument(
        "--ack-timeout", type=float, help="seconds to wait for the broker's acknowledgement"
    )


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Register the dashboard's subcommands."""
    watch = subparsers.add_parser(
        "watch",
        help="live terminal dashboard of the fleet; confirm or correct predictions with a key",
        description=(
            "Shows every device (online or offline, current activity and confidence, model "
            "version, age of the last prediction) and the accuracy of confirmed predictions per "
            "model version. Keys: up/down select a device, c confirms its latest prediction, "
            "1-9 correct it to the n-th label of the current model, q quits. Settings: --config "
            "TOML < HAR_* environment variables < flags."
        ),
    )
    _broker_flags(watch)
    watch.add_argument(
        "--once", action="store_true", help="print one snapshot after --wait seconds and exit"
    )
    watch.add_argument(
        "--wait", type=float, default=3.0, help="with --once: seconds to listen (default 3)"
    )
    watch.add_argument("--json", action="store_true", help="with --once: print JSON")
    watch.add_argument("--width", type=int, help="with --once: line width (default: terminal)")
    watch.set_defaults(func=run_watch)

    confirm = subparsers.add_parser(
        "confirm",
        help="confirm or correct one prediction (publishes a confirmation, waits for the ack)",
        description=(
            "Publishes a confirmation that PREDICTION_ID of DEVICE really was LABEL and waits for "
            "the broker to accept it. Exits 0 on success, 2 with a message when the broker cannot "
            "be reached or refuses it, or when LABEL is not a label of the current model (read "
            "from the retained manifest; --any-label skips that check)."
        ),
    )
    confirm.add_argument("device", help="the device id")
    confirm.add_argument("prediction_id", help="the prediction's id")
    confirm.add_argument("label", help="the true activity")
    confirm.add_argument("--source", choices=("user", "app"), default="user", help="who says so")
    confirm.add_argument(
        "--any-label", action="store_true", help="do not check LABEL against the current model"
    )
    confirm.add_argument(
        "--manifest-wait", type=float, help="seconds to wait for the retained manifest (default 3)"
    )
    _broker_flags(confirm)
    confirm.set_defaults(func=run_confirm)


def settings_from(args: argparse.Namespace) -> Any:
    from dashboard.settings import DashboardSettings

    overrides = {
        "broker.host": args.host,
        "broker.port": args.port,
        "broker.username": args.username,
        "broker.password_file": args.password_file,
        "broker.tls": args.tls,
        "broker.ca_file": args.ca_file,
        "broker.topic_root": args.topic_root,
        "ack_timeout_s": args.ack_timeout,
        "manifest_wait_s": getattr(args, "manifest_wait", None),
    }
    return load_settings(
        DashboardSettings, config_file=args.config, environ=os.environ, overrides=overrides
    )


def run_watch(args: argparse.Namespace) -> int:
    from dashboard.client import FleetClient
    from dashboard.fleet_view import FleetView, Limits

    settings = settings_from(args)
    if not args.once and not sys.stdout.isatty():
        raise ConfigError("har watch needs a terminal; use --once for a snapshot")
    view = FleetView(Limits(predictions_per_device=settings.predictions_per_device))
    client = FleetClient(settings.broker)
    client.start(settings.connect_timeout_s)
    try:
        if not args.once:
            from dashboard.tui import run_tui

            return run_tui(client, view, settings.ack_timeout_s)
        deadline = time.monotonic() + args.wait
        while (remaining := deadline - time.monotonic()) > 0:
            client.pump(view, remaining)
    finally:
        client.stop()
    print(_snapshot(args, settings, view))
    return 0


def _snapshot(args: argparse.Namespace, settings: Any, view: Any) -> str:
    if args.json:
        return json.dumps(view.snapshot(), indent=2)
    from dashboard.render import Frame, render

    broker = settings.broker
    frame = Frame(
        topic_root=broker.topic_root,
        connection=f"snapshot of {broker.host}:{broker.port} after {args.wait:g} s",
        selected=None,
        status="",
        interactive=False,
    )
    width = args.width or shutil.get_terminal_size(fallback=(120, 40)).columns
    return "\n".join(render(view, frame, width=width, height=None, now=time.time()))


def run_confirm(args: argparse.Namespace) -> int:
    from dashboard.client import send_confirmation
    from shared.messages import Confirmation

    settings = settings_from(args)
    try:
        confirmation = Confirmation(args.prediction_id, args.label, args.source, ts=time.time())
    except ValueError as exc:
        raise ConfigError(f"invalid confirmation: {exc}") from exc
    outcome = send_confirmation(
        settings.broker,
        args.device,
        confirmation,
        check_labels=not args.any_label,
        connect_timeout_s=settings.connect_timeout_s,
        manifest_wait_s=settings.manifest_wait_s,
        ack_timeout_s=settings.ack_timeout_s,
    )
    print(
        f"confirmed {args.prediction_id} on {args.device} as {args.label}: "
        f"the broker accepted it ({outcome.describe()})"
    )
    return 0
