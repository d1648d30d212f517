"""``har train``: train an ActivityTracker on a WISDM-format file and export a model version."""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING

from shared.errors import ConfigError

if TYPE_CHECKING:
    from trainer_service.training import TrainConfig

logger = logging.getLogger(__name__)

ARCH_CHOICES = ("cnn", "cnn-gru", "seed-lstm")


def _user_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated user ids, got {text!r}"
        ) from exc


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = subparsers.add_parser(
        "train",
        help="train an activity model and export a model version folder",
        description=(
            "Train on a WISDM-format file (plain, .gz or the official .tar.gz), split by user "
            "into train/validation/test, and write OUT/VERSION/ with saved_model/, "
            "metrics.json (with the per-epoch history), confusion.png, learning_curves.png, "
            "config.json and data_summary.json."
        ),
    )
    parser.add_argument("--data", type=Path, required=True, help="WISDM-format data file")
    parser.add_argument("--out", type=Path, required=True, help="folder that receives versions")
    parser.add_argument("--version", help="version name (default: <arch>-<UTC time>)")
    parser.add_argument("--arch", choices=ARCH_CHOICES, default="cnn", help="model (default: cnn)")
    # The defaults named here are TrainConfig's (tests/test_cli.py checks that they agree).
    parser.add_argument("--epochs", type=int, help="maximum epochs (default: 40)")
    parser.add_argument(
        "--seed", type=int, default=0, help="seed for split, init and order (default: 0)"
    )
    parser.add_argument(
        "--window", type=int, help="samples per window (default: 80; seed-lstm: 32)"
    )
    parser.add_argument(
        "--hop",
        type=int,
        help="samples between training windows (default: 10, or window/8 with --window; "
        "seed-lstm: 32)",
    )
    parser.add_argument("--batch-size", type=int, help="windows per step (default: 64)")
    parser.add_argument(
        "--learning-rate", type=float, help="training step size (default: 0.001; seed-lstm: 0.0001)"
    )
    parser.add_argument(
        "--device-anchor",
        type=float,
        help="on-device learning: pull towards the global model (default: 0.1)",
    )
    parser.add_argument(
        "--patience", type=int, help="epochs without improvement before stop (default: 8)"
    )
    parser.add_argument("--width", type=int, help="channels of the first convolution (default: 32)")
    parser.add_argument("--val-users", type=_user_list, help="e.g. 3,7 (default: by fraction)")
    parser.add_argument("--test-users", type=_user_list, help="e.g. 5,11 (default: by fraction)")
    parser.add_argument(
        "--class-weighting",
        choices=("balanced", "none"),
        help="loss weights per class (default: balanced)",
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.set_defaults(func=run)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    from trainer_service.training import TrainConfig

    overrides = {
        "seed": args.seed,
        "epochs": args.epochs,
        "window": args.window,
        "hop": args.hop,
        "batch_size": args.batch_size,
        "learning_rate": args.learning_rate,
        "device_anchor": args.device_anchor,
        "patience": args.patience,
        "width": args.width,
        "val_users": args.val_users,
        "test_users": args.test_users,
        "class_weighting": args.class_weighting,
    }
    given = {key: value for key, value in overrides.items() if value is not None}
    if args.arch == "seed-lstm":
        return TrainConfig.seed_lstm(**given)
    if args.window is not None and args.hop is None:
        given["hop"] = max(1, args.window // 8)
    return TrainConfig(arch=args.arch, **given)


def run(args: argparse.Namespace) -> int:
    from activity_model.wisdm import load_wisdm
    from shared.topics import is_valid_id
    from trainer_service.training import train_and_export

    version = args.version or f"{args.arch}-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}"
    if not is_valid_id(version):
        raise ConfigError(f"version {version!r}: use 1-64 characters from A-Z a-z 0-9 _ . -")
    config = config_from_args(args)
    data = load_wisdm(args.data)
    logger.info(
        "loaded %d samples of %d users, labels %s",
        len(data),
        len(set(data.users.tolist())),
        ", ".join(data.labels),
    )
    folder, metrics = train_and_export(
        data,
        config,
        args.out / version,
        progress=not args.no_progress,
    )
    test = metrics["test"]
    print(
        json.dumps(
            {
                "version": version,
                "folder": str(folder),
                "test_accuracy": round(test["accuracy"], 4),
                "test_macro_f1": round(test["macro_f1"], 4),
                "best_epoch": metrics["best_epoch"],
                "train_seconds": metrics["train_seconds"],
            }
        )
    )
    return 0
