"""A Mosquitto broker as a child process on a free loopback port (for the demo and the tests).

It writes its own config (persistence on, queues raised, optional password file and ACL), waits
until the port accepts connections, and can be stopped and restarted on the same port, keeping
its persistence file, as a real broker restart would. Production brokers use
``deploy/mosquitto/mosquitto.conf`` instead.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from shared.errors import BrokerError

LOOPBACK = "127.0.0.1"


def find_mosquitto() -> str | None:
    """The mosquitto binary: on PATH, or where Debian puts it (/usr/sbin is not always on PATH)."""
    found = shutil.which("mosquitto")
    if found:
        return found
    for candidate in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto"):
        if Path(candidate).exists():
            return candidate
    return None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def accepts_connections(host: str, port: int, timeout: float = 0.2) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


@dataclass
class BrokerUsers:
    """Credentials and ACL lines for an authenticated broker."""

    passwords: Mapping[str, str]
    acl: str


class MosquittoProcess:
    """One mosquitto process with a config file this class writes."""

    def __init__(self, workdir: Path, users: BrokerUsers | None = None) -> None:
        binary = find_mosquitto()
        if binary is None:
            raise BrokerError(
                "mosquitto is not installed: run scripts/setup.sh (it installs it with apt)"
            )
        self.binary = binary
        self.workdir = workdir
        self.host = LOOPBACK
        self.port = free_port()
        self.users = users
        self.log_path = workdir / "mosquitto.log"
        self.config_path = workdir / "mosquitto.conf"
        self._process: subprocess.Popen[bytes] | None = None
        self._write_config()

    def _write_config(self) -> None:
        lines = [
            f"listener {self.port} {LOOPBACK}",
            "persistence true",
            f"persistence_location {self.workdir}/",
            "persistence_file mosquitto.db",
            "autosave_interval 1",
            # The default (1000) silently drops bursts to slow or offline persistent sessions.
            "max_queued_messages 100000",
            "max_inflight_messages 100",
            f"log_dest file {self.log_path}",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",
            "connection_messages true",
        ]
        if os.geteuid() == 0:
            # As root, mosquitto drops to user "mosquitto", which cannot write our temp dir.
            lines.append("user root")
        if self.users is None:
            lines.append("allow_anonymous true")
        else:
            password_file = self.workdir / "passwd"
            password_file.write_text("")
            for user, password in self.users.passwords.items():
                subprocess.run(
                    [self._passwd_binary(), "-b", str(password_file), user, password],
                    check=True,
                    capture_output=True,
                )
            acl_file = self.workdir / "acl"
            acl_file.write_text(self.users.acl)
            lines += [
                "allow_anonymous false",
                f"password_file {password_file}",
                f"acl_file {acl_file}",
            ]
        self.config_path.write_text("\n".join(lines) + "\n")

    def _passwd_binary(self) -> str:
        sibling = Path(self.binary).parent.parent / "bin" / "mosquitto_passwd"
        return shutil.which("mosquitto_passwd") or str(sibling)

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self, timeout: float = 10.0) -> None:
        if self.running:
            return
        self._process = subprocess.Popen(
            [self.binary, "-c", str(self.config_path)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + timeout
        while not accepts_connections(self.host, self.port):
            try:
                # Waiting on the process both paces the probe and notices a broker that died.
                code = self._process.wait(timeout=0.02)
            except subprocess.TimeoutExpired:
                code = None
            if code is not None:
                stderr = self._process.stderr.read().decode() if self._process.stderr else ""
                raise BrokerError(f"mosquitto exited with {code}: {stderr}\n{self.log_text()}")
            if time.monotonic() > deadline:
                self.stop()
                raise BrokerError(f"mosquitto did not listen on port {self.port} in {timeout}s")

    def stop(self, timeout: float = 10.0) -> None:
        """Stop gracefully (SIGTERM): mosquitto writes its persistence file on the way out."""
        process = self._process
        if process is None:
            return
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if process.stderr is not None:
            process.stderr.close()
        self._process = None

    def kill(self) -> None:
        """Stop abruptly (SIGKILL), as a crash or power loss would."""
        if self._process is not None and self._process.poll() is None:
            self._process.kill()
            self._process.wait()
        self.stop()

    def restart(self) -> None:
        self.stop()
        self.start()

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""
