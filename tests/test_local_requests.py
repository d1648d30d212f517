"""`har agent forget` while the agent runs: the request file, both sides, without an agent."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from device_agent.local_requests import FORGET_REQUEST, LocalRequests, request_forget
from shared import codec
from shared.messages import DeviceCommand

TOPIC = "har/v1/devices/wrist-0001/command"


def test_a_request_is_taken_once_as_a_forget_command_and_its_ack_deletes_it(
    tmp_path: Path,
) -> None:
    command = DeviceCommand("forget", "r-1", 1.0)
    # Nobody handles it: the command gives up, and the request stays for the agent.
    assert request_forget(tmp_path, command, timeout=0.2) is False
    path = tmp_path / FORGET_REQUEST
    assert [p.name for p in tmp_path.iterdir()] == [FORGET_REQUEST]  # nothing staged left

    requests = LocalRequests(tmp_path, TOPIC)
    message = requests.take()
    assert message is not None
    assert message.topic == TOPIC
    assert codec.decode_device_command(message.payload) == command
    assert requests.take() is None, "handed out twice while the worker has it"
    message.ack()
    assert not path.exists()
    assert requests.take() is None


def test_a_newer_request_outlives_the_ack_of_the_older(tmp_path: Path) -> None:
    requests = LocalRequests(tmp_path, TOPIC)
    request_forget(tmp_path, DeviceCommand("forget", "old", 1.0), timeout=0)
    older = requests.take()
    assert older is not None
    request_forget(tmp_path, DeviceCommand("forget", "new", 2.0), timeout=0)
    older.ack()
    newer = requests.take()
    assert newer is not None, "the newer request was deleted unhandled"
    assert codec.decode_device_command(newer.payload).request_id == "new"


def test_the_command_returns_once_the_agent_has_handled_it(tmp_path: Path) -> None:
    requests = LocalRequests(tmp_path, TOPIC)

    def agent() -> None:  # the dispatcher's polling and the worker's ack, in one
        while (message := requests.take()) is None:
            time.sleep(0.01)
        message.ack()

    thread = threading.Thread(target=agent)
    thread.start()
    try:
        assert request_forget(tmp_path, DeviceCommand("forget", "r", 1.0), timeout=10) is True
        assert not (tmp_path / FORGET_REQUEST).exists()
    finally:
        thread.join(10)
