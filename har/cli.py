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
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="logging verbosity (default: INFO)",
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
    logging.basicConfig(
        level=args.log_level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
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
