"""deploy/add-device.sh for real: it writes the password file a real broker with the shipped
config and ACL then reads, and the provisioning folder the agent's settings then load."""

from __future__ import annotations

import dataclasses
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from device_agent.settings import AgentSettings
from har.local_broker import SHIPPED_ACL, SHIPPED_CONF, ShippedMosquitto, shipped_logins
from shared.config import BrokerSettings, load_settings
from shared.mqtt_transport import MqttConnection
from shared.topics import is_valid_id
from tests.deploy_helpers import (
    DEPLOY,
    PASSWORDS,
    ROOT,
    TOPICS,
    Clients,
    settings_for,
    unique,
)

pytestmark = pytest.mark.broker

ADD_DEVICE = DEPLOY / "add-device.sh"
# The broker's own logins: a device with one of these names would share that login's rights.
RESERVED = tuple(shipped_logins())


def add_device(
    device_id: str, passwd: Path, out: Path, *options: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            "bash",
            str(ADD_DEVICE),
            "--passwd",
            str(passwd),
            "--out",
            str(out),
            *options,
            "--",
            device_id,
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def users_in(passwd: Path) -> list[str]:
    return [line.split(":", 1)[0] for line in passwd.read_text().splitlines() if line]


@pytest.fixture
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ShippedMosquitto]:
    """The shipped config, with only the trainer as a user so far; not started yet."""
    process = ShippedMosquitto(
        tmp_path_factory.mktemp("broker"),
        SHIPPED_CONF,
        {"trainer": PASSWORDS["trainer"]},
        SHIPPED_ACL,
    )
    yield process
    process.stop()


@pytest.fixture
def connections(broker: ShippedMosquitto) -> Iterator[Clients]:
    opened = Clients(broker)
    yield opened
    opened.close()


def as_device(broker: ShippedMosquitto, device_id: str, folder: Path) -> BrokerSettings:
    """Log in as the agent would with the provisioning folder: the password from its file."""
    return dataclasses.replace(
        settings_for(broker, None), username=device_id, password_file=folder / "broker.password"
    )


def test_added_devices_log_in_and_publish_only_on_their_own_topics(
    broker: ShippedMosquitto, connections: Clients, tmp_path: Path
) -> None:
    passwd = broker.workdir / "passwd"
    shared_password = tmp_path / "sim-devices.password"
    shared_password.write_text("one-password-for-every-simulated-device\n")
    folders = {
        "wrist-new.1": tmp_path / "provision" / "wrist-new.1",
        "sim-0000": tmp_path / "provision" / "sim-0000",
        "wrist-late": tmp_path / "provision" / "wrist-late",
    }
    # Before the broker starts: one device with a random password, one with a shared one.
    first = add_device("wrist-new.1", passwd, folders["wrist-new.1"], "--broker-host", "broker.lan")
    assert first.returncode == 0, first.stderr
    sim = add_device(
        "sim-0000", passwd, folders["sim-0000"], "--password-file", str(shared_password)
    )
    assert sim.returncode == 0, sim.stderr
    broker.start()
    # While it runs: --reload-pid makes it re-read the password file (SIGHUP), no restart.
    late = add_device("wrist-late", passwd, folders["wrist-late"], "--reload-pid", str(broker.pid))
    assert late.returncode == 0, late.stderr
    assert "SIGHUP" in late.stdout
    assert users_in(passwd) == ["trainer", *folders]

    passwords = {name: (folder / "broker.password").read_text() for name, folder in folders.items()}
    assert passwords["sim-0000"] == shared_password.read_text().strip()
    assert len(passwords["wrist-new.1"]) == len(passwords["wrist-late"]) == 32
    assert passwords["wrist-new.1"] != passwords["wrist-late"]
    for folder in folders.values():
        assert stat.S_IMODE((folder / "broker.password").stat().st_mode) == 0o600
        # The agent's own settings class reads the folder's agent.toml.
        agent = load_settings(AgentSettings, config_file=folder / "agent.toml")
        assert agent.device_id == agent.broker.username == folder.name
        assert agent.broker.topic_root == ROOT
    agent = load_settings(AgentSettings, config_file=folders["wrist-new.1"] / "agent.toml")
    assert agent.broker.host == "broker.lan"

    trainer = connections.join("trainer", [f"{ROOT}/#"])
    for device_id, folder in folders.items():
        device = connections.join_as(as_device(broker, device_id, folder))
        forbidden = (TOPICS.sensor("wrist-0001"), unique("forbidden"))
        device.publish(*forbidden)
        own = (TOPICS.sensor(device_id), unique("own"))
        device.publish(*own)
        seen = trainer.until(*own)
        assert forbidden not in seen, f"{device_id} published on another device's topic"


def test_a_wrong_password_is_refused_for_an_added_device(
    broker: ShippedMosquitto, tmp_path: Path
) -> None:
    folder = tmp_path / "provision"
    result = add_device("wrist-0003", broker.workdir / "passwd", folder)
    assert result.returncode == 0, result.stderr
    (folder / "broker.password").write_text("not-the-password")
    broker.start()
    connection = MqttConnection(as_device(broker, "wrist-0003", folder), client_id="wrist-0003")
    connection.start()
    try:
        assert connection.wait_stopped(10.0), "the broker let a wrong password in"
        assert connection.fatal_error is not None
        assert not connection.connected
    finally:
        connection.stop()


@pytest.mark.parametrize(
    ("device_id", "message"),
    [
        ("trainer", "reserved user name"),
        ("Dashboard", "reserved user name"),
        ("operator", "reserved user name"),
        ("healthcheck", "reserved user name"),
        ("HomeAssistant", "reserved user name"),
        ("watch", "reserved user name"),
        ("wrist/0001", "invalid device id"),
        ("wrist+", "invalid device id"),
        ("#", "invalid device id"),
        (".hidden", "invalid device id"),
        ("w" * 65, "invalid device id"),
        ("wrist 1", "invalid device id"),
        ("", "give the DEVICE_ID"),
    ],
)
def test_a_bad_or_reserved_id_is_refused_with_a_clear_message(
    tmp_path: Path, device_id: str, message: str
) -> None:
    passwd = tmp_path / "passwd"
    passwd.write_text("")
    result = add_device(device_id, passwd, tmp_path / "out")
    assert result.returncode != 0
    assert message in result.stderr
    assert result.stderr.startswith("add-device.sh: ")
    assert passwd.read_text() == ""
    assert not (tmp_path / "out").exists()


def test_an_existing_device_a_used_folder_or_a_missing_password_file_is_refused(
    tmp_path: Path,
) -> None:
    passwd = tmp_path / "passwd"
    passwd.write_text("")
    assert add_device("wrist-0001", passwd, tmp_path / "a").returncode == 0
    before = passwd.read_text()
    again = add_device("wrist-0001", passwd, tmp_path / "b")
    assert again.returncode != 0
    assert "already in" in again.stderr
    used = add_device("wrist-0002", passwd, tmp_path / "a")
    assert used.returncode != 0
    assert "already exists" in used.stderr
    missing = add_device("wrist-0002", tmp_path / "nope", tmp_path / "c")
    assert missing.returncode != 0
    assert "does not exist" in missing.stderr
    assert passwd.read_text() == before
    assert not (tmp_path / "b").exists()
    assert not (tmp_path / "c").exists()


def test_help_says_a_device_needs_no_acl_line() -> None:
    result = subprocess.run(
        ["bash", str(ADD_DEVICE), "--help"], capture_output=True, text=True, check=True
    )
    assert "needs no line" in result.stdout
    for name in RESERVED:
        assert name in result.stdout


def _reserved_spellings() -> st.SearchStrategy[str]:
    return st.sampled_from(RESERVED).flatmap(
        lambda name: st.lists(st.booleans(), min_size=len(name), max_size=len(name)).map(
            lambda upper: "".join(c.upper() if u else c for c, u in zip(name, upper, strict=True))
        )
    )


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.one_of(
        st.text(alphabet=st.sampled_from("aZ09_.-/+# é:\t"), max_size=70),
        st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,70}", fullmatch=True),
        _reserved_spellings(),
    )
)
def test_accepts_exactly_the_device_id_alphabet_minus_reserved_names(device_id: str) -> None:
    """The script's bash checks agree with shared.topics.is_valid_id, whatever the id."""
    expected = is_valid_id(device_id) and device_id.lower() not in RESERVED
    with tempfile.TemporaryDirectory() as scratch:
        passwd = Path(scratch) / "passwd"
        passwd.write_text("")
        result = add_device(device_id, passwd, Path(scratch) / "out")
        assert (result.returncode == 0) == expected, result.stderr
        assert users_in(passwd) == ([device_id] if expected else [])
