"""The exit codes deploy/README.md ("Exit codes") documents, from the real programs in processes
of their own: 0 after SIGTERM, 2 for settings that cannot work, 3 when the broker refuses the
login. (70, a thread that died, is tested beside each service: tests/test_agent_failures.py,
tests/test_trainer.py, tests/test_simulator.py; 128 + signal for `har demo` in tests/test_demo.py.)
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from shared.config import BrokerSettings
from shared.signing import generate_keypair
from shared.topics import Topics
from tests.mosquitto import BrokerUsers, MosquittoProcess
from tests.mqtt_helpers import connect, receive

pytestmark = pytest.mark.broker
REPO = Path(__file__).resolve().parent.parent
WAIT = 90.0
DOC = (REPO / "deploy" / "README.md").read_text(encoding="utf-8")


def har(tmp_path: Path, name: str, *args: str) -> subprocess.Popen[bytes]:
    """`python -m har ARGS`, its output in NAME.log, in an environment of its own."""
    env = {
        "PATH": os.environ.get("PATH", os.defpath),
        "PYTHONPATH": str(REPO),
        "TF_CPP_MIN_LOG_LEVEL": "3",
        "HOME": str(tmp_path),
    }
    with (tmp_path / f"{name}.log").open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "har", *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=tmp_path,
        )


def output(tmp_path: Path, name: str) -> str:
    return (tmp_path / f"{name}.log").read_text(errors="replace")[-4000:]


@pytest.fixture
def started() -> Iterator[list[subprocess.Popen[bytes]]]:
    processes: list[subprocess.Popen[bytes]] = []
    yield processes
    for process in processes:
        if process.poll() is None:
            process.kill()
            process.wait()


def broker_table(settings: BrokerSettings, user: str = "", password: str = "") -> str:
    login = f'username = "{user}"\npassword = "{password}"\n' if user else ""
    return (
        f'[broker]\nhost = "{settings.host}"\nport = {settings.port}\n'
        f'topic_root = "{settings.topic_root}"\nkeepalive_s = 5\n'
        f"reconnect_min_s = 0.1\nreconnect_max_s = 1.0\n{login}"
    )


def trainer_toml(tmp_path: Path, broker: str, extra: str = "") -> Path:
    private_key, _ = generate_keypair(tmp_path / "keys")
    config = tmp_path / "trainer.toml"
    config.write_text(
        f'instance = "t1"\ndata_dir = "{tmp_path / "data"}"\n'
        f'registry_dir = "{tmp_path / "registry"}"\nprivate_key = "{private_key}"\n'
        f"status_interval_s = 0.5\n{extra}\n{broker}"
    )
    return config


def agent_toml(tmp_path: Path, broker: str, extra: str = "") -> Path:
    config = tmp_path / "agent.toml"
    config.write_text(
        f'device_id = "wrist-1"\nstate_dir = "{tmp_path / "state"}"\n{extra}\n{broker}\n'
        '[sensor]\nkind = "synthetic"\nspeed = 5.0\n'
    )
    return config


def documented_codes(command: str) -> set[int]:
    """The codes the README's table gives for ``command`` (its first column)."""
    rows = re.findall(rf"^\| `{re.escape(command)}` \| ([\d /]+) \|", DOC, re.MULTILINE)
    return {int(code) for row in rows for code in row.split(" / ")}


def test_the_table_documents_every_code_tested_here() -> None:
    assert documented_codes("har agent") >= {0, 2, 3, 70}
    assert documented_codes("har trainer serve") >= {0, 2, 3, 70}
    assert documented_codes("har sim") >= {0, 2, 70}
    assert documented_codes("har agent forget") >= {0, 1}


@pytest.mark.parametrize("program", ["agent", "trainer", "sim"])
def test_settings_that_cannot_work_exit_2_saying_why(
    broker_settings: BrokerSettings, tmp_path: Path, started: list[subprocess.Popen[bytes]],
    program: str,
) -> None:  # fmt: skip
    broker = broker_table(broker_settings)
    if program == "agent":
        args = ["agent", "--config", str(agent_toml(tmp_path, broker, "colour = 1"))]
    elif program == "trainer":
        args = ["trainer", "serve", "--config", str(trainer_toml(tmp_path, broker, "colour = 1"))]
    else:
        config = tmp_path / "sim.toml"
        config.write_text(f"devices = 2\ncolour = 1\n{broker}")
        args = ["sim", "--config", str(config)]
    process = har(tmp_path, program, *args)
    started.append(process)
    assert process.wait(WAIT) == 2, output(tmp_path, program)
    assert "unknown setting 'colour'" in output(tmp_path, program)


@pytest.mark.parametrize("program", ["agent", "trainer"])
def test_a_login_the_broker_refuses_exits_3_saying_so(
    broker_factory: object, topic_root: str, tmp_path: Path,
    started: list[subprocess.Popen[bytes]], program: str,
) -> None:  # fmt: skip
    users = BrokerUsers({"wrist-1": "right", "t1": "right"}, "pattern readwrite #\n")
    broker: MosquittoProcess = broker_factory(users=users)  # type: ignore[operator]
    settings = BrokerSettings(host=broker.host, port=broker.port, topic_root=topic_root)
    login = broker_table(settings, "wrist-1" if program == "agent" else "t1", "wrong")
    if program == "agent":
        args = ["agent", "--config", str(agent_toml(tmp_path, login))]
    else:
        args = ["trainer", "serve", "--config", str(trainer_toml(tmp_path, login))]
    process = har(tmp_path, program, *args)
    started.append(process)
    assert process.wait(WAIT) == 3, output(tmp_path, program)
    assert "refused" in output(tmp_path, program)


def test_forget_exits_1_when_the_running_agent_does_not_answer_and_keeps_the_request(
    broker_settings: BrokerSettings, tmp_path: Path, started: list[subprocess.Popen[bytes]]
) -> None:
    """`har agent forget` while an agent holds the state folder but does not answer in time: the
    request stays for it; once no agent runs, forget is done on the spot and the request goes."""
    from device_agent.local_requests import FORGET_REQUEST
    from device_agent.state_lock import StateLock

    config = str(agent_toml(tmp_path, broker_table(broker_settings)))
    (tmp_path / "state").mkdir()
    busy_agent = StateLock(tmp_path / "state")
    assert busy_agent.acquire()
    try:
        process = har(tmp_path, "forget", "agent", "forget", "--config", config, "--wait-s", "0.5")
        started.append(process)
        assert process.wait(WAIT) == 1, output(tmp_path, "forget")
        assert "has not handled the request within 0.5 s" in output(tmp_path, "forget")
        assert (tmp_path / "state" / FORGET_REQUEST).exists()  # carried out when it can
    finally:
        busy_agent.release()
    process = har(tmp_path, "forget-stopped", "agent", "forget", "--config", config)
    started.append(process)
    assert process.wait(WAIT) == 0, output(tmp_path, "forget-stopped")
    assert not (tmp_path / "state" / FORGET_REQUEST).exists()


@pytest.mark.slow
def test_the_trainer_exits_0_on_sigterm_after_saying_offline(
    broker_settings: BrokerSettings, tmp_path: Path, started: list[subprocess.Popen[bytes]]
) -> None:
    topics = Topics(broker_settings.topic_root)
    watcher, statuses = connect(broker_settings, [(topics.trainer_status("t1"), 1)])
    try:
        config = trainer_toml(tmp_path, broker_table(broker_settings))
        process = har(tmp_path, "trainer", "trainer", "serve", "--config", str(config))
        started.append(process)
        while b'"online"' not in receive(statuses, WAIT).payload:
            pass
        process.send_signal(signal.SIGTERM)
        assert process.wait(WAIT) == 0, output(tmp_path, "trainer")
        while b'"offline"' not in receive(statuses, WAIT).payload:
            pass  # its last word, published before it disconnected
    finally:
        watcher.stop()
