"""``har trainer``, ``har models`` and ``har keys``: the central side's commands."""

from __future__ import annotations

import argparse
import json
import os
import time
import uuid
from pathlib import Path
from typing import Any

from shared.config import add_broker_flags, broker_overrides, load_settings
from shared.errors import ConfigError
from shared.lifecycle import run_until_signalled


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="trainer TOML file")
    parser.add_argument("--registry-dir", type=Path, help="model registry folder")
    add_broker_flags(parser)


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    trainer = subparsers.add_parser(
        "trainer", help="the trainer service: ingest, retrain, redistribute signed models"
    )
    actions = trainer.add_subparsers(dest="trainer_action", required=True, metavar="ACTION")
    serve = actions.add_parser(
        "serve",
        help="run the service",
        description="Consume every device's batches and confirmations, store them, retrain "
        "behind a quality gate and publish signed model versions. Settings: --config TOML < "
        "HAR_* environment < flags.",
    )
    _common(serve)
    serve.add_argument("--data-dir", type=Path, help="where the SQLite store lives")
    serve.add_argument("--private-key", type=Path, help="Ed25519 signing key")
    serve.add_argument("--base-data", type=Path, help="WISDM-format base training set")
    serve.add_argument("--instance", help="this trainer's name (default trainer-1)")
    serve.set_defaults(func=run_serve)
    retrain = actions.add_parser(
        "retrain", help="ask the running service to retrain now (an MQTT command)"
    )
    _common(retrain)
    retrain.set_defaults(func=run_retrain_command)

    models = subparsers.add_parser("models", help="the model registry")
    model_actions = models.add_subparsers(dest="models_action", required=True, metavar="ACTION")
    listing = model_actions.add_parser("list", help="every version, oldest first")
    _common(listing)
    listing.add_argument("--json", action="store_true", help="print JSON")
    listing.set_defaults(func=run_models_list)
    show = model_actions.add_parser("show", help="one version's record and metrics")
    _common(show)
    show.add_argument("version")
    show.set_defaults(func=run_models_show)
    plot = model_actions.add_parser(
        "plot",
        help="a PNG of every version's accuracy against the time it was made",
        description="Draw the test accuracy (held-out users of the base data) of every "
        "registered version, and for retrained versions the accuracy on held-out recent "
        "confirmations, against the time each was made; the current version is marked.",
    )
    _common(plot)
    plot.add_argument("--out", type=Path, required=True, help="the PNG file to write")
    plot.set_defaults(func=run_models_plot)
    imported = model_actions.add_parser(
        "import",
        help="register a copy of a version folder written by har train",
        description="Register a copy of FOLDER (a version folder written by har train; its "
        "name becomes the version) in the registry. FOLDER itself is left as it was.",
    )
    _common(imported)
    imported.add_argument("folder", type=Path)
    imported.add_argument("--parent", help="the version it derives from")
    imported.set_defaults(func=run_models_import)
    for name, helptext in (
        ("promote", "make VERSION current, sign it and publish it to the fleet"),
        ("rollback", "make the previous current version current again, and publish it"),
    ):
        action = model_actions.add_parser(name, help=helptext)
        _common(action)
        if name == "promote":
            action.add_argument("version")
        action.add_argument("--private-key", type=Path, help="Ed25519 signing key")
        action.add_argument(
            "--no-publish",
            action="store_true",
            help="only update the registry; a running trainer service publishes it within a "
            "second (use this while it runs: it holds the trainer's login)",
        )
        action.set_defaults(func=run_models_promote)

    keys = subparsers.add_parser("keys", help="model signing keys")
    key_actions = keys.add_subparsers(dest="keys_action", required=True, metavar="ACTION")
    generate = key_actions.add_parser(
        "generate", help="write a new Ed25519 key pair (private key mode 0600)"
    )
    generate.add_argument("--out", type=Path, required=True, help="folder for the two files")
    generate.set_defaults(func=run_keys_generate)


def settings_from(args: argparse.Namespace) -> Any:
    from trainer_service.settings import TrainerSettings

    overrides = {
        "registry_dir": getattr(args, "registry_dir", None),
        "data_dir": getattr(args, "data_dir", None),
        "private_key": getattr(args, "private_key", None),
        "base_data": getattr(args, "base_data", None),
        "instance": getattr(args, "instance", None),
        **broker_overrides(args),
    }
    return load_settings(
        TrainerSettings, config_file=args.config, environ=os.environ, overrides=overrides
    )


def run_serve(args: argparse.Namespace) -> int:
    from trainer_service.service import TrainerService

    return run_until_signalled(TrainerService(settings_from(args)))


def _connect(settings: Any) -> Any:
    from shared.mqtt_transport import short_connection

    return short_connection(settings.broker, f"har-cli-{uuid.uuid4().hex[:8]}")


def run_retrain_command(args: argparse.Namespace) -> int:
    from shared import codec
    from shared.messages import TrainerCommand
    from shared.mqtt_transport import Outbound
    from shared.topics import Topics

    settings = settings_from(args)
    command = TrainerCommand("retrain", uuid.uuid4().hex[:16], time.time())
    with _connect(settings) as connection:
        topic = Topics(settings.broker.topic_root).trainer_command()
        # Raises BrokerError when unacknowledged, PublishRefusedError when the ACL refused it.
        connection.publish(Outbound(topic, codec.encode_command(command))).wait_accepted(10.0)
    print(f"retrain requested ({command.request_id}); watch the trainer's status and errors")
    return 0


def _registry(args: argparse.Namespace, *, create: bool = False) -> Any:
    """The registry the settings name; only ``create`` makes one where there is none."""
    from trainer_service.registry import ModelRegistry

    return ModelRegistry(settings_from(args).registry_dir, create=create)


def run_models_list(args: argparse.Namespace) -> int:
    registry = _registry(args)
    current = registry.current()
    infos = registry.versions()
    if args.json:
        print(json.dumps([{**i.to_dict(), "current": i.version == current} for i in infos]))
        return 0
    print(f"{'':2}{'version':34} {'parent':34} {'created (UTC)':20} {'test acc':>8} {'test F1':>8}")
    for info in infos:
        created = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(info.created))
        accuracy = info.metrics.get("test_accuracy", float("nan"))
        f1 = info.metrics.get("test_macro_f1", float("nan"))
        marker = "* " if info.version == current else "  "
        print(
            f"{marker}{info.version:34} {info.parent or '-':34} {created:20} "
            f"{accuracy:8.4f} {f1:8.4f}"
        )
    return 0


def run_models_show(args: argparse.Namespace) -> int:
    registry = _registry(args)
    info = registry.get(args.version)
    metrics_path = info.path / "metrics.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.exists() else {}
    metrics.pop("history", None)
    print(
        json.dumps(
            {**info.to_dict(), "current": registry.current() == info.version, "metrics": metrics},
            indent=2,
        )
    )
    return 0


def run_models_plot(args: argparse.Namespace) -> int:
    from trainer_service.plots import plot_versions, version_points

    registry = _registry(args)
    points = version_points(registry.versions(), registry.current())
    if not points:
        raise ConfigError(f"no model versions in {registry.root} to plot")
    plot_versions(points, args.out)
    print(f"wrote {args.out} ({len(points)} versions)")
    return 0


def run_models_import(args: argparse.Namespace) -> int:
    info = _registry(args, create=True).add_copy(args.folder, parent=args.parent)
    print(f"registered {info.version} ({info.size} bytes, sha256 {info.sha256[:16]}...)")
    return 0


def run_models_promote(args: argparse.Namespace) -> int:
    from shared.signing import load_private_key
    from shared.topics import Topics
    from trainer_service.distribution import current_release_messages, publish_all
    from trainer_service.registry import ModelRegistry

    settings = settings_from(args)
    if settings.private_key is None:
        raise ConfigError("promoting signs a manifest: give --private-key or private_key")
    registry = ModelRegistry(settings.registry_dir, create=False)
    version = args.version if args.models_action == "promote" else registry.rollback_target()
    registry.promote(
        version, load_private_key(settings.private_key), chunk_size=settings.publish.chunk_bytes
    )
    print(f"current model is now {version}")
    if args.no_publish:
        return 0
    with _connect(settings) as connection:
        topics = Topics(settings.broker.topic_root)
        messages = current_release_messages(topics, registry, settings.publish.chunk_bytes)
        publish_all(connection, messages, settings.publish.ack_timeout_s)
    print(f"published {version} to {settings.broker.host}:{settings.broker.port}")
    return 0


def run_keys_generate(args: argparse.Namespace) -> int:
    from shared.signing import generate_keypair, key_id, load_public_key

    private_path, public_path = generate_keypair(args.out)
    print(f"private key: {private_path} (keep it on the trainer only)")
    print(f"public key:  {public_path} (install on every device as public_key)")
    print(f"key id:      {key_id(load_public_key(public_path))}")
    return 0
