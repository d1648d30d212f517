"""deploy/add-login.sh for real: the logins it adds log in to a running broker with the shipped
config and ACL (re-read on SIGHUP), each with its own password file, and get their own rights."""

from __future__ import annotations

import dataclasses
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from har.local_broker import (
    SHIPPED_ACL,
    SHIPPED_CONF,
    SHIPPED_LOGINS,
    ShippedMosquitto,
    shipped_logins,
)
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

ADD_LOGIN = DEPLOY / "add-login.sh"


def add_login(
    user: str, passwd: Path, out: Path, *options: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(ADD_LOGIN), "--passwd", str(passwd), "--out", str(out), *options, "--", user],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


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


def test_added_logins_log_in_with_their_password_file_and_their_own_rights(
    broker: ShippedMosquitto, tmp_path: Path
) -> None:
    passwd = broker.workdir / "passwd"
    before = add_login("homeassistant", passwd, tmp_path / "secrets" / "homeassistant.password")
    assert before.returncode == 0, before.stderr
    assert "Home Assistant" in before.stdout  # says whose login it is
    broker.start()
    # While the broker runs: --reload-pid makes it re-read the password file, no restart.
    while_running = add_login(
        "watch", passwd, tmp_path / "secrets" / "watch.password", "--reload-pid", str(broker.pid)
    )
    assert while_running.returncode == 0, while_running.stderr
    assert "SIGHUP" in while_running.stdout

    files = {user: tmp_path / "secrets" / f"{user}.password" for user in ("homeassistant", "watch")}
    passwords = {user: file.read_text() for user, file in files.items()}
    assert all(len(password) == 32 for password in passwords.values())
    assert passwords["homeassistant"] != passwords["watch"]
    for user, file in files.items():
        assert stat.S_IMODE(file.stat().st_mode) == 0o600
        assert passwords[user] not in before.stdout + while_running.stdout  # never printed

    clients = Clients(broker)
    try:
        device_command = (TOPICS.command("wrist-0001"), unique("command"))
        confirmation = (TOPICS.confirmation("wrist-0001"), unique("confirmation"))
        trainer = clients.join("trainer", [f"{ROOT}/#"])
        logged_in = {
            user: clients.join_as(
                dataclasses.replace(settings_for(broker, None), username=user, password_file=file)
            )
            for user, file in files.items()
        }
        # Each with its own rights: Home Assistant commands devices, har watch confirms; not
        # the other way round (the refused one is sent first, on the same connection).
        logged_in["homeassistant"].publish(confirmation[0], confirmation[1] + b"-refused")
        logged_in["homeassistant"].publish(*device_command)
        logged_in["watch"].publish(device_command[0], device_command[1] + b"-refused")
        logged_in["watch"].publish(*confirmation)
        trainer.until(*device_command)
        seen = trainer.until(*confirmation)
    finally:
        clients.close()
    assert (confirmation[0], confirmation[1] + b"-refused") not in seen
    assert (device_command[0], device_command[1] + b"-refused") not in seen


@pytest.mark.parametrize(
    ("user", "message"),
    [
        ("wrist-0001", "not one of the logins"),
        ("Watch", "not one of the logins"),  # the logins are exact
        ("", "give the USER"),
    ],
)
def test_an_unknown_user_is_refused_and_nothing_changes(
    tmp_path: Path, user: str, message: str
) -> None:
    passwd = tmp_path / "passwd"
    passwd.write_text("")
    result = add_login(user, passwd, tmp_path / "out")
    assert result.returncode == 2
    assert result.stderr.startswith("add-login.sh: ")
    assert message in result.stderr
    assert passwd.read_text() == ""
    assert not (tmp_path / "out").exists()


def test_an_existing_login_a_used_out_file_or_a_missing_password_file_is_refused(
    tmp_path: Path,
) -> None:
    passwd = tmp_path / "passwd"
    passwd.write_text("")
    assert add_login("nodered", passwd, tmp_path / "a").returncode == 0
    before = passwd.read_text()
    again = add_login("nodered", passwd, tmp_path / "b")
    assert again.returncode != 0
    assert "already in" in again.stderr
    used = add_login("scripts", passwd, tmp_path / "a")
    assert used.returncode != 0
    assert "already exists" in used.stderr
    missing = add_login("scripts", tmp_path / "nope", tmp_path / "c")
    assert missing.returncode != 0
    assert "does not exist" in missing.stderr
    assert passwd.read_text() == before
    assert not (tmp_path / "b").exists()
    assert not (tmp_path / "c").exists()


def test_help_lists_every_login_and_whose_it_is() -> None:
    result = subprocess.run(
        ["bash", str(ADD_LOGIN), "--help"], capture_output=True, text=True, check=True
    )
    for user, purpose in shipped_logins().items():
        assert any(line.split(None, 1) == [user, purpose] for line in result.stdout.splitlines()), (
            f"{user} is not listed with its purpose"
        )
    assert str(SHIPPED_LOGINS.relative_to(DEPLOY.parent)) in result.stdout
