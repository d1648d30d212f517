"""The trainer store on PostgreSQL (psycopg 3): several trainer replicas on one database.

The queries are ``Store``'s; this module adds the connection, the schema in PostgreSQL's types,
and what replicas need of each other:

- The schema version lives in ``schema_version``; replicas that start together migrate one at a
  time (a transaction-scoped advisory lock), and the second finds the work done.
- Every transaction records the devices it saw last, in sorted order, and only bumps
  ``last_seen`` on rows no other replica holds (``SKIP LOCKED``): two replicas ingesting the same
  devices never wait for each other's commits on the ``devices`` table.
- The leader lock is a session-level advisory lock on a connection of its own: PostgreSQL frees it
  when that session ends, i.e. when the replica's process dies (its socket closes at once) or its
  host goes silent (TCP keepalives set on that session, about 20 s).

A broken connection (the server restarted) is opened again at the next statement outside a
transaction; the transaction that saw it break failed with ``StorageError`` and is retried by the
caller, as with any storage error.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Sequence
from typing import Any

import psycopg

from shared.config import redact_url
from shared.errors import PayloadError, StorageError
from trainer_service.store import SCHEMA_VERSION, Cursor, Execute, LeaderLock, Store

# The same schema as ``store._MIGRATIONS``, one entry per version, in PostgreSQL's types:
# BIGINT for SQLite's 64-bit INTEGER, DOUBLE PRECISION for REAL, BYTEA for BLOB, and the
# reserved words "offset" and "window" quoted.
_MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE batches (
        device_id TEXT NOT NULL,
        seq BIGINT NOT NULL,
        sample_rate_hz DOUBLE PRECISION NOT NULL,
        t0_ns BIGINT NOT NULL,
        n_samples BIGINT NOT NULL,
        samples BYTEA NOT NULL,
        offsets_us BYTEA,
        received DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (device_id, seq)
    );
    CREATE INDEX batches_by_received ON batches (received);
    CREATE TABLE predictions (
        prediction_id TEXT PRIMARY KEY,
        device_id TEXT NOT NULL,
        batch_seq BIGINT NOT NULL,
        "offset" BIGINT NOT NULL,
        length BIGINT NOT NULL,
        label TEXT NOT NULL,
        model_version TEXT NOT NULL,
        ts DOUBLE PRECISION NOT NULL,
        received DOUBLE PRECISION NOT NULL
    );
    CREATE INDEX predictions_by_received ON predictions (received);
    CREATE TABLE confirmations (
        prediction_id TEXT PRIMARY KEY,
        device_id TEXT NOT NULL,
        label TEXT NOT NULL,
        source TEXT NOT NULL,
        ts DOUBLE PRECISION NOT NULL,
        received DOUBLE PRECISION NOT NULL,
        "window" BYTEA,
        window_length BIGINT,
        joined DOUBLE PRECISION
    );
    CREATE INDEX confirmations_unjoined ON confirmations (joined) WHERE joined IS NULL;
    CREATE TABLE devices (
        device_id TEXT PRIMARY KEY,
        first_seen DOUBLE PRECISION NOT NULL,
        last_seen DOUBLE PRECISION NOT NULL,
        state TEXT,
        model_version TEXT,
        counters TEXT
    );
    CREATE TABLE meta (
        name TEXT PRIMARY KEY,
        value TEXT NOT NULL
    );
    """,
    """
    ALTER TABLE devices ADD COLUMN forgotten_before DOUBLE PRECISION;
    """,
    """
    ALTER TABLE predictions DROP CONSTRAINT predictions_pkey,
        ADD PRIMARY KEY (device_id, prediction_id);
    CREATE INDEX predictions_by_id ON predictions (prediction_id);
    ALTER TABLE confirmations DROP CONSTRAINT confirmations_pkey,
        ADD PRIMARY KEY (device_id, prediction_id);
    """,
    """
    CREATE TABLE handled (
        key TEXT PRIMARY KEY,
        received DOUBLE PRECISION NOT NULL
    );
    CREATE INDEX handled_by_received ON handled (received);
    """,
)
if len(_MIGRATIONS) != SCHEMA_VERSION:  # pragma: no cover - a developer's mistake, caught at import
    raise ImportError("store_postgres._MIGRATIONS must have one entry per SQLite migration")


def _advisory_key(name: str) -> int:
    """A stable signed 64-bit advisory lock key for ``name``."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)


_MIGRATION_KEY = _advisory_key("har-trainer-migration")
_LEADER_KEY = _advisory_key("har-trainer-leader")
# The server drops a silent leader's session (and its lock) after about 10 + 3 * 3 s.
_KEEPALIVE_OPTIONS = (
    "-c tcp_keepalives_idle=10 -c tcp_keepalives_interval=3 -c tcp_keepalives_count=3"
)


def _connect(url: str, password: str | None, **extra: Any) -> psycopg.Connection[Any]:
    kwargs: dict[str, Any] = {"autocommit": True, "connect_timeout": 10, **extra}
    if password is not None:
        kwargs["password"] = password
    return psycopg.connect(url, **kwargs)


class PostgresStore(Store):
    def __init__(
        self,
        url: str,
        *,
        password: str | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__(redact_url(url), (psycopg.Error,), clock)
        self._url = url
        self._password = password
        self._closed = False
        try:
            self._db = _connect(url, password)
        except psycopg.Error as exc:
            raise StorageError(f"cannot open trainer store {self._where}: {exc}") from exc
        try:
            self._migrate()
        except (psycopg.Error, StorageError) as exc:
            self._db.close()
            if isinstance(exc, StorageError):
                raise
            raise StorageError(f"cannot migrate trainer store {self._where}: {exc}") from exc

    def _execute(self, sql: str, args: Sequence[object] = ()) -> Cursor:
        for arg in args:
            if isinstance(arg, str) and "\x00" in arg:
                # SQLite keeps NUL in TEXT, PostgreSQL refuses it: bad input, refused before it
                # can fail (and so abort) the transaction the message's group is in.
                raise PayloadError("a text field holds a NUL character (PostgreSQL cannot)")
        if self._db.closed and not self._closed:
            self._db = _connect(self._url, self._password)  # the server came back
        # Store's SQL uses "?" placeholders; psycopg's are "%s" (no "%" appears in it otherwise).
        return self._db.execute(sql.replace("?", "%s"), tuple(args) or None)

    def _read_schema_version(self) -> int:
        row = self._execute("SELECT MAX(version) FROM schema_version").fetchone()
        return int(row[0] or 0)

    def _migrate(self) -> None:
        with self._db.transaction():
            # Replicas starting together: one migrates, the others wait here and find it done.
            self._execute("SELECT pg_advisory_xact_lock(?)", (_MIGRATION_KEY,))
            self._execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            version = self._read_schema_version()
            if version > SCHEMA_VERSION:
                raise StorageError(
                    f"{self._where} has schema {version}; this trainer knows up to {SCHEMA_VERSION}"
                )
            for target in range(version, SCHEMA_VERSION):
                self._db.execute(_MIGRATIONS[target])
                self._execute("DELETE FROM schema_version")
                self._execute("INSERT INTO schema_version (version) VALUES (?)", (target + 1,))

    def _close(self) -> None:
        self._closed = True
        self._db.close()

    def _record_seen(self, execute: Execute, devices: list[str], now: float) -> None:
        if not devices:
            return
        execute(
            "INSERT INTO devices (device_id, first_seen, last_seen) SELECT d, ?, ?"
            " FROM unnest(?::text[]) AS d ORDER BY d ON CONFLICT DO NOTHING",
            (now, now, devices),
        )
        # A row another replica is writing gets a last_seen as fresh from that one: skip it.
        execute(
            "UPDATE devices SET last_seen = ? WHERE device_id IN (SELECT device_id FROM devices"
            " WHERE device_id = ANY(?) AND last_seen < ? ORDER BY device_id"
            " FOR UPDATE SKIP LOCKED)",
            (now, devices, now),
        )

    def leader_lock(self) -> LeaderLock:
        return AdvisoryLeaderLock(self._url, self._password)


class AdvisoryLeaderLock(LeaderLock):
    """``pg_try_advisory_lock`` on a session of its own, checked on every ``try_acquire``."""

    def __init__(self, url: str, password: str | None) -> None:
        self._url = url
        self._password = password
        self._db: psycopg.Connection[Any] | None = None
        self._held = False

    def try_acquire(self) -> bool:
        try:
            if self._db is None or self._db.closed:
                self._held = False
                self._db = _connect(self._url, self._password, options=_KEEPALIVE_OPTIONS)
            if self._held:
                self._db.execute("SELECT 1")  # still our session, so still our lock
            else:
                row = self._db.execute("SELECT pg_try_advisory_lock(%s)", (_LEADER_KEY,)).fetchone()
                self._held = bool(row and row[0])
        except psycopg.Error:
            # The session is gone, and the lock with it: another replica may hold it now.
            self.release()
            return False
        return self._held

    def release(self) -> None:
        self._held = False
        if self._db is not None:
            self._db.close()  # ending the session releases the lock
            self._db = None
