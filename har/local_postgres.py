"""A throwaway PostgreSQL server for tests and benchmarks: ``initdb`` into a fresh folder, then
``postgres`` on a free loopback port, its socket in that folder; ``stop()`` ends it.

Debian keeps ``initdb`` and ``postgres`` in ``/usr/lib/postgresql/<version>/bin``, off PATH:
``find_postgres_bindir`` looks on PATH, then asks ``pg_config --bindir``, then tries the newest
versioned folder. initdb refuses to run as root, so as root both run as the ``postgres`` user
the Debian package creates (a folder of their own in /tmp, given to that user).
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

from har.local_broker import LOOPBACK, free_port
from shared.errors import HarError

SUPERUSER = "postgres"


class PostgresError(HarError):
    """The local PostgreSQL server could not be set up or started."""


def find_postgres_bindir() -> Path | None:
    """The folder holding ``initdb`` and ``postgres``; None when PostgreSQL is not installed."""
    on_path = shutil.which("initdb")
    if on_path and shutil.which("postgres"):
        return Path(os.path.realpath(on_path)).parent
    pg_config = shutil.which("pg_config")
    if pg_config:
        result = subprocess.run(
            [pg_config, "--bindir"], capture_output=True, text=True, check=False
        )
        folder = Path(result.stdout.strip())
        if result.returncode == 0 and (folder / "initdb").is_file():
            return folder
    versioned = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"),
        key=lambda path: int(Path(path).parent.parent.name.split(".")[0]),
    )
    return Path(versioned[-1]).parent if versioned else None


class PostgresProcess:
    """One postgres server with trust authentication on 127.0.0.1:``port`` only."""

    def __init__(self) -> None:
        bindir = find_postgres_bindir()
        if bindir is None:
            raise PostgresError(
                "PostgreSQL is not installed: scripts/setup.sh installs it with apt (postgresql)"
            )
        self.bindir = bindir
        self.host = LOOPBACK
        self.port = free_port()
        self.workdir = Path(tempfile.mkdtemp(prefix="har-postgres-"))
        self.datadir = self.workdir / "data"
        self.log_path = self.workdir / "postgres.log"
        self._as_user: dict[str, object] = {}
        if os.geteuid() == 0:
            owner = pwd.getpwnam(SUPERUSER)
            os.chown(self.workdir, owner.pw_uid, owner.pw_gid)
            self._as_user = {"user": owner.pw_uid, "group": owner.pw_gid, "extra_groups": []}
        self._process: subprocess.Popen[bytes] | None = None

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{SUPERUSER}@{self.host}:{self.port}/{database}"

    def start(self, timeout: float = 60.0) -> None:
        subprocess.run(
            [
                str(self.bindir / "initdb"),
                "-D",
                str(self.datadir),
                "-U",
                SUPERUSER,
                "--auth=trust",
                "--no-sync",
            ],
            check=True,
            capture_output=True,
            **self._as_user,  # type: ignore[call-overload]
        )
        with self.log_path.open("ab") as log:
            self._process = subprocess.Popen(
                [
                    str(self.bindir / "postgres"),
                    "-D",
                    str(self.datadir),
                    "-p",
                    str(self.port),
                    "-k",
                    str(self.workdir),
                    "-c",
                    f"listen_addresses={self.host}",
                    "-c",
                    "max_connections=200",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                **self._as_user,  # type: ignore[call-overload]
            )
        self._wait_ready(timeout)

    def _wait_ready(self, timeout: float) -> None:
        import psycopg

        deadline = time.monotonic() + timeout
        while True:
            try:
                psycopg.connect(self.url(), connect_timeout=2).close()
            except psycopg.OperationalError as exc:
                assert self._process is not None
                if self._process.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise PostgresError(
                        f"postgres did not start ({exc}); see {self.log_path}"
                    ) from exc
                time.sleep(0.05)  # a bounded poll: the server says nothing when it is ready
            else:
                return

    def create_database(self) -> str:
        """A new, empty database; its URL."""
        import psycopg

        name = f"t_{uuid.uuid4().hex[:16]}"
        with psycopg.connect(self.url(), autocommit=True) as connection:
            connection.execute(f"CREATE DATABASE {name}")
        return self.url(name)

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGINT)  # "fast" shutdown: ends sessions, no recovery
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        shutil.rmtree(self.workdir, ignore_errors=True)
