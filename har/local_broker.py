"""A Mosquitto broker as a child process on free loopback ports (for the demo and the tests).

``MosquittoProcess`` writes its own config (persistence on, queues raised, optional password file
and ACL). ``ShippedMosquitto`` runs one of the shipped files instead (``deploy/mosquitto/``), with
only its paths and listeners rewritten by ``adapt_config``, and the TLS certificates made by
``deploy/make-certs.sh``. Both wait until the port accepts connections, and can be stopped and
restarted on the same ports, keeping their persistence file, as a real broker restart would.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from shared.errors import BrokerError

LOOPBACK = "127.0.0.1"
DEPLOY_DIR = Path(__file__).resolve().parent.parent / "deploy"
SHIPPED_CONF = DEPLOY_DIR / "mosquitto" / "mosquitto.conf"
SHIPPED_ACL = DEPLOY_DIR / "mosquitto" / "acl"
SHIPPED_LOGINS = DEPLOY_DIR / "mosquitto" / "logins"

MAKE_CERTS = DEPLOY_DIR / "make-certs.sh"
# Where mosquitto.conf expects the TLS files (the compose file mounts them there).
CONTAINER_CERTS = "/mosquitto/config/certs/"


def shipped_logins() -> dict[str, str]:
    """The broker's own logins (not devices) and who logs in with each, in the order of
    ``deploy/mosquitto/logins``: one per integration, since one login is one connection."""
    logins = {}
    for line in SHIPPED_LOGINS.read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.startswith("#"):
            user, _, purpose = line.strip().partition(" ")
            logins[user] = purpose.strip()
    return logins


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

    passwords: Mapping[str, str] = field(repr=False)  # never in a log line or a traceback
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
            self._write_passwords(self.users.passwords)
            acl_file = self.workdir / "acl"
            acl_file.write_text(self.users.acl)
            lines += [
                "allow_anonymous false",
                f"password_file {self.password_file}",
                f"acl_file {acl_file}",
            ]
        self.config_path.write_text("\n".join(lines) + "\n")

    @property
    def password_file(self) -> Path:
        return self.workdir / "passwd"

    def _write_passwords(self, passwords: Mapping[str, str]) -> None:
        """A fresh ``password_file`` holding ``passwords``, made with mosquitto_passwd."""
        sibling = Path(self.binary).parent.parent / "bin" / "mosquitto_passwd"
        passwd_binary = shutil.which("mosquitto_passwd") or str(sibling)
        self.password_file.write_text("")
        for user, password in passwords.items():
            result = subprocess.run(
                [passwd_binary, "-b", str(self.password_file), user, password],
                check=False,
                capture_output=True,
                text=True,
            )
            if result.returncode != 0:
                # Not CalledProcessError: its message would quote the command line, password too.
                raise BrokerError(
                    f"mosquitto_passwd could not add user {user} ({result.returncode}): "
                    f"{result.stderr.strip()}"
                )

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
                stderr = ""
                if self._process.stderr is not None:
                    stderr = self._process.stderr.read().decode(errors="replace")
                    self._process.stderr.close()
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


def make_certs(out: Path, *names: str) -> Path:
    """deploy/make-certs.sh into ``out``: a CA and a server certificate for ``names``."""
    if not MAKE_CERTS.is_file():
        raise BrokerError(f"{MAKE_CERTS} is missing: run from a checkout of the repository")
    result = subprocess.run(
        ["bash", str(MAKE_CERTS), "--out", str(out), *names],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if result.returncode != 0:
        raise BrokerError(f"make-certs.sh failed ({result.returncode}): {result.stderr.strip()}")
    return out


def adapt_config(
    text: str,
    *,
    port: int,
    workdir: Path,
    acl_file: Path | None,
    tls_port: int | None = None,
    certs_dir: Path | None = None,
    bind_as_shipped: bool = False,
) -> str:
    """A shipped config with its listeners, absolute paths and log destination made local.

    Only those lines change; everything else (limits, persistence, anonymous access, TLS version)
    runs as shipped. 1883 becomes ``port``, the TLS listener 8883 ``tls_port``, and the
    certificate paths point into ``certs_dir``. Listeners bind to loopback, or with
    ``bind_as_shipped`` to the address the shipped line names (none: every interface). Any other
    absolute path is an error, so a new one cannot slip through unadapted.
    """
    local = {
        "password_file": f"password_file {workdir / 'passwd'}",
        "acl_file": f"acl_file {acl_file}",
        "persistence_location": f"persistence_location {workdir}/",
        "log_dest": f"log_dest file {workdir / 'mosquitto.log'}",
    }
    listeners = {"1883": port, "8883": tls_port}
    replaced: set[str] = set()
    lines = []
    for line in text.splitlines():
        option = line.split(maxsplit=1)[0] if line.strip() and not line.startswith("#") else ""
        value = line.split(maxsplit=1)[1].strip() if option and " " in line.strip() else ""
        if option == "listener":
            shipped_port, _, address = value.partition(" ")
            if listeners.get(shipped_port) is None:
                raise BrokerError(f"no local port for the config line {line!r}")
            bind = address.strip() if bind_as_shipped else LOOPBACK
            lines.append(f"listener {listeners[shipped_port]} {bind}".rstrip())
            replaced.add(f"listener {shipped_port}")
        elif option in ("cafile", "certfile", "keyfile"):
            if certs_dir is None or not value.startswith(CONTAINER_CERTS):
                raise BrokerError(f"no certs_dir, or a certificate outside it: {line}")
            lines.append(f"{option} {certs_dir / value.removeprefix(CONTAINER_CERTS)}")
            replaced.add(option)
        elif option in local:
            if option == "acl_file" and acl_file is None:
                raise BrokerError("the config names an acl_file: pass one")
            lines.append(local[option])
            replaced.add(option)
        elif option and "/" in line:
            raise BrokerError(f"config line with a path that is not adapted: {line!r}")
        else:
            lines.append(line)
    missing = {"listener 1883", "persistence_location", "log_dest"} - replaced
    if missing:
        raise BrokerError(f"the config lacks {sorted(missing)}")
    if os.geteuid() == 0:
        # As root, mosquitto drops to user "mosquitto", which cannot read our temp files.
        lines.append("user root")
    return "\n".join(lines) + "\n"


class ShippedMosquitto(MosquittoProcess):
    """A mosquitto process running one of the shipped config files, adapted by ``adapt_config``.

    ``passwords`` become users of a fresh password file (``workdir/passwd``, made with
    mosquitto_passwd; more can be added before ``start``). ``bind_as_shipped``: see
    ``adapt_config``. A config with the TLS listener gets it
    on ``tls_port``, with a CA and a server certificate for 127.0.0.1 and localhost made by
    deploy/make-certs.sh in ``workdir/certs``.
    """

    def __init__(
        self,
        workdir: Path,
        config: Path = SHIPPED_CONF,
        passwords: Mapping[str, str] | None = None,
        acl_file: Path | None = SHIPPED_ACL,
        *,
        bind_as_shipped: bool = False,
    ) -> None:
        self._shipped = config
        self._bind_as_shipped = bind_as_shipped
        self._passwords = dict(passwords or {})
        self._acl_file = acl_file
        self.tls_port = free_port()
        self.certs_dir = workdir / "certs"
        super().__init__(workdir)

    @property
    def ca_file(self) -> Path:
        return self.certs_dir / "ca.crt"

    @property
    def pid(self) -> int:
        if self._process is None:
            raise BrokerError("the broker is not running")
        return self._process.pid

    def _write_config(self) -> None:
        self._write_passwords(self._passwords)
        shipped = self._shipped.read_text()
        if "\nlistener 8883\n" in shipped:
            make_certs(self.certs_dir, LOOPBACK, "localhost")
        self.config_path.write_text(
            adapt_config(
                shipped,
                port=self.port,
                workdir=self.workdir,
                acl_file=self._acl_file,
                tls_port=self.tls_port,
                certs_dir=self.certs_dir,
                bind_as_shipped=self._bind_as_shipped,
            )
        )
