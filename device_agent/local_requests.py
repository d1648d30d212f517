"""`har agent forget` while the agent runs: a request file in its state folder, no broker.

The broker forces client id = username (``use_username_as_clientid``), so a second connection
with the device's login would take the running agent's place. Instead the command writes
``<state_dir>/forget.request`` (a DeviceCommand, whole or not at all: written beside it, then
renamed) and waits for the file to vanish. The running agent's dispatcher looks for it each time
it wakes (at least every 0.5 s) and routes it exactly as a forget command from the broker; the
worker deletes the file once it has forgotten. A request that an agent stopped before handling
is carried out when it next starts.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from shared import codec
from shared.messages import DeviceCommand
from shared.mqtt_transport import InboundMessage

log = logging.getLogger(__name__)

FORGET_REQUEST = "forget.request"
_POLL_S = 0.05


def request_forget(state_dir: Path, command: DeviceCommand, timeout: float) -> bool:
    """Ask the agent running on ``state_dir`` to forget; True once it has, False on timeout
    (the request stays, and the agent carries it out when it gets to it)."""
    path = state_dir / FORGET_REQUEST
    staged = path.with_name(f".{FORGET_REQUEST}.{os.getpid()}")
    staged.write_bytes(codec.encode_device_command(command))
    os.replace(staged, path)
    deadline = time.monotonic() + timeout
    while path.exists():
        if time.monotonic() >= deadline:
            return False
        time.sleep(_POLL_S)
    return True


def clear_forget_request(state_dir: Path) -> None:
    """Drop a request that a forget done without the agent has made moot."""
    (state_dir / FORGET_REQUEST).unlink(missing_ok=True)


class LocalRequests:
    """The agent's side: a pending request as an inbound command message, one at a time."""

    def __init__(self, state_dir: Path, command_topic: str) -> None:
        self._path = state_dir / FORGET_REQUEST
        self._topic = command_topic
        self._pending = False

    def take(self) -> InboundMessage | None:
        """The request, once: its ``ack()`` deletes the file (unless a newer request replaced it
        meanwhile, which then runs next)."""
        if self._pending:
            return None
        try:
            inode = self._path.stat().st_ino
            payload = self._path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            log.warning("cannot read %s: %s", self._path, exc)
            return None
        self._pending = True

        def done() -> None:
            try:
                if self._path.stat().st_ino == inode:
                    self._path.unlink()
            except FileNotFoundError:
                pass
            self._pending = False

        return InboundMessage(self._topic, payload, 1, False, codec.CONTENT_TYPE_JSON, done)
