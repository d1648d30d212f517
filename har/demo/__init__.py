"""``har demo``: the whole loop on this machine, with nothing but this repository.

``DESCRIPTION`` below says what it does; it is what ``har demo --help`` prints, so it is plain
text, not reStructuredText.
"""

from __future__ import annotations

import argparse
from pathlib import Path

DESCRIPTION = """\
Run the whole loop on this machine, with nothing but this repository.

1. Mosquitto runs the production config (deploy/mosquitto/mosquitto.conf and acl: passwords,
   ACL, persistence, a TLS listener) on free loopback ports, with certificates for 127.0.0.1 from
   deploy/make-certs.sh, a login per integration (deploy/mosquitto/logins: "trainer",
   "dashboard" for the people's app it plays, "homeassistant", "nodered", "watch", ...; each
   password in a file under secrets/, never printed), and three devices added by
   deploy/add-device.sh. It prints which login is whose, and a ready "har watch" command.
2. Data: --data FILE, else $HAR_WISDM_FILE, else ./WISDM_ar_latest.tar.gz (where "har data
   download" puts it), else synthetic people (the embedded default). Each device replays a user
   held out of the base data; synthetic wearers wear their device turned by 75, 90 or 105
   degrees, which no one in the base data does.
3. A first model is trained on the base data, registered, signed and promoted.
4. "har trainer serve" (plain listener, user trainer) and three "har agent" processes (TLS,
   each logged in as its device id) run as real processes. The third runs the light agent: the
   model's LiteRT form, from .venv-lite (no TensorFlow) when scripts/setup.sh made it.
5. This process plays the people's app (one connection, user dashboard): each person confirms a
   share of their device's predictions and sometimes answers wrongly on purpose.
6. The agents learn each confirmation at once; after --confirmations of them the trainer retrains
   once, passes its quality gate and publishes one new signed version, which each agent verifies,
   personalises with its person's confirmations and swaps in.
7. When every device reports the new version and has predicted a full pass with it, everything
   stops (SIGTERM) and a summary is printed and written to <workdir>/summary.json: accuracy per
   device before and after, the model on each device, messages per kind, time, exit codes.

Ctrl-C (or SIGTERM) stops every process the demo started and exits non-zero; their pids are in
<workdir>/pids.json, their logs beside it.
"""


def _users(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of users: {text}") from None


def _share(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be within 0..1, got {text}")
    return value


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = subparsers.add_parser(
        "demo",
        help="run the full loop locally: broker, trainer, three devices, people, a retrain",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--workdir",
        type=Path,
        default=Path("var/demo"),
        help="wiped and reused each run (default: %(default)s)",
    )
    parser.add_argument(
        "--data",
        type=Path,
        help="a WISDM-format file (default: $HAR_WISDM_FILE, ./WISDM_ar_latest.tar.gz or "
        "synthetic people; see 2. above)",
    )
    parser.add_argument(
        "--device-users",
        type=_users,
        default=(),
        help="with real data only: the three users the devices replay, e.g. 22,23,24 (default: "
        "the last three of the file)",
    )
    parser.add_argument(
        "--base-seconds",
        type=float,
        default=90.0,
        help="seconds of each activity per base user (default: %(default)g)",
    )
    parser.add_argument(
        "--confirmations",
        type=int,
        default=90,
        help="confirmations in all (split evenly between the people); the trainer retrains "
        "once when it has them (default: %(default)d)",
    )
    parser.add_argument(
        "--confirm-share",
        type=_share,
        default=0.3,
        help="share of predictions a person answers (default: %(default)g)",
    )
    parser.add_argument(
        "--mistake-rate",
        type=_share,
        default=0.05,
        help="share of answers that are wrong on purpose (default: %(default)g)",
    )
    parser.add_argument(
        "--speed",
        type=float,
        default=10.0,
        help="replay speed, times real time (default: %(default)g)",
    )
    parser.add_argument(
        "--epochs", type=int, default=8, help="epochs of the first model (default: %(default)d)"
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the simulated people (default: %(default)d)"
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=600.0,
        help="give up after this many seconds (default: %(default)g)",
    )
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from har.demo.run import run

    return run(args)
