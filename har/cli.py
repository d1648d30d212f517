"""``har <subcommand>``: each package registers its own subcommands; heavy imports stay lazy."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from typing import Any

from dashboard.cli import register as register_dashboard
from device_agent.cli import register as register_agent
from har.data_cli import register as register_data
from har.demo import register as register_demo
from shared.errors import HarError
from simulator.cli import register as register_sim
from trainer_service.cli import register as register_trainer
from trainer_service.train_cli import register as register_train


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="har",
        description="Human activity recognition that learns in production.",
    )
    parser.add_argument(
        "--log-level",
        default="INFO",
        type=str.upper,
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="logging verbosity, any case (default: INFO; DEBUG adds TensorFlow's own lines)",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    register_agent(commands)
    register_trainer(commands)
    register_train(commands)
    register_data(commands)
    register_demo(commands)
    register_sim(commands)
    register_dashboard(commands)
    return parser


# Loggers whose INFO and WARNING lines say nothing a user can act on ("Function `predict`
# contains input name(s) ... renamed", "unsaved custom gradients"): shown with DEBUG only.
# activity_model.tensorflow_import quiets TensorFlow's native log to match the "tensorflow" logger.
QUIET_UNLESS_DEBUG = ("absl", "tensorflow")


def configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    for name in QUIET_UNLESS_DEBUG:
        logging.getLogger(name).setLevel(logging.NOTSET if level == "DEBUG" else logging.ERROR)


def _chosen_parser(parser: argparse.ArgumentParser, args: argparse.Namespace) -> Any:
    """The parser of the (sub)command that ``args`` chose: ``har agent`` for ``har agent ...``.

    argparse has no public way down its tree of subparsers: this walks its private one.
    """
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            name = getattr(args, action.dest, None)
            if isinstance(name, str) and name in action.choices:
                return _chosen_parser(action.choices[name], args)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        # parse_args would report them with the top-level usage; the subcommand's is the useful one.
        _chosen_parser(parser, args).error(f"unrecognized arguments: {' '.join(unknown)}")
    configure_logging(args.log_level)
    try:
        result: int = args.func(args)
    except HarError as exc:
        logging.getLogger("har").error("%s", exc)  # noqa: TRY400 - a clear message, no traceback
        return 2
    except KeyboardInterrupt:
        return 130
    return result


if __name__ == "__main__":
    raise SystemExit(main())
