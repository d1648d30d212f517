"""The trainer's durable store: every device's batches, predictions and confirmations.

``Store`` is the contract and holds every query, written once in SQL that SQLite and PostgreSQL
both run (``?`` placeholders, ``INSERT ... ON CONFLICT``, the reserved words ``offset`` and
``window`` quoted). Two backends, chosen by ``[store] url``:

- ``SqliteStore`` (the default): one file in WAL mode, schema version in ``PRAGMA user_version``;
  one trainer process, or a few on one machine.
- ``trainer_service.store_postgres.PostgresStore``: several trainer replicas on one database.

Both have the same versioned schema with forward migrations (one list per dialect, of equal
length). Sensor batches are keyed by (device, sequence number), so a redelivered batch is stored
once, whichever replica receives it.
Confirmations are joined to the window they label: the prediction names the window's place in the
device's batch stream, and the window's samples are copied out of the stored batches, so a
confirmed window survives the retention policy that later deletes old batches.

A message counts as accepted once the transaction holding it is committed; the ingest loop
acknowledges it to the broker only after that, so a crash before the commit means a redelivery.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import numpy.typing as npt

from shared.codec import samples_from_bytes, samples_to_bytes
from shared.errors import StorageError
from shared.fileio import FileLock
from shared.messages import Confirmation, DeviceStatus, Prediction, SensorBatch

# Each migration takes the schema from version i to i + 1; never edit one that has shipped, and
# add each new one to ``store_postgres._MIGRATIONS`` too (a test holds the two to one schema).
# ``meta`` holds service-wide facts every replica sees (``META_*`` below).
_MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE batches (
        device_id TEXT NOT NULL,
        seq INTEGER NOT NULL,
        sample_rate_hz REAL NOT NULL,
        t0_ns INTEGER NOT NULL,
        n_samples INTEGER NOT NULL,
        samples BLOB NOT NULL,
        offsets_us BLOB,
        received REAL NOT NULL,
        PRIMARY KEY (device_id, seq)
    ) WITHOUT ROWID;
    CREATE INDEX batches_by_received ON batches (received);
    CREATE TABLE predictions (
        prediction_id TEXT PRIMARY KEY,
        device_id TEXT NOT NULL,
        batch_seq INTEGER NOT NULL,
        offset INTEGER NOT NULL,
        length INTEGER NOT NULL,
        label TEXT NOT NULL,
        model_version TEXT NOT NULL,
        ts REAL NOT NULL,
        received REAL NOT NULL
    );
    CREATE INDEX predictions_by_received ON predictions (received);
    CREATE TABLE confirmations (
        prediction_id TEXT PRIMARY KEY,
        device_id TEXT NOT NULL,
        label TEXT NOT NULL,
        source TEXT NOT NULL,
        ts REAL NOT NULL,
        received REAL NOT NULL,
        window BLOB,
        window_length INTEGER,
        joined REAL
    );
    CREATE INDEX confirmations_unjoined ON confirmations (joined) WHERE joined IS NULL;
    CREATE TABLE devices (
        device_id TEXT PRIMARY KEY,
        first_seen REAL NOT NULL,
        last_seen REAL NOT NULL,
        state TEXT,
        model_version TEXT,
        counters TEXT
    );
    CREATE TABLE meta (
        name TEXT PRIMARY KEY,
        value TEXT NOT NULL
    );
    """,
    # 2: a device's forget horizon: its confirmations up to this time were forgotten, and one
    # that arrives late with an older ts is not stored again.
    """
    ALTER TABLE devices ADD COLUMN forgotten_before REAL;
    """,
    # 3: predictions and confirmations keyed by (device, prediction id): one device's ids can
    # neither shadow nor label another's. SQLite changes a primary key by copying the table.
    """
    CREATE TABLE predictions_3 (
        device_id TEXT NOT NULL,
        prediction_id TEXT NOT NULL,
        batch_seq INTEGER NOT NULL,
        offset INTEGER NOT NULL,
        length INTEGER NOT NULL,
        label TEXT NOT NULL,
        model_version TEXT NOT NULL,
        ts REAL NOT NULL,
        received REAL NOT NULL,
        PRIMARY KEY (device_id, prediction_id)
    );
    INSERT INTO predictions_3 SELECT device_id, prediction_id, batch_seq, offset, length, label,
        model_version, ts, received FROM predictions;
    DROP TABLE predictions;
    ALTER TABLE predictions_3 RENAME TO predictions;
    CREATE INDEX predictions_by_received ON predictions (received);
    CREATE INDEX predictions_by_id ON predictions (prediction_id);
    CREATE TABLE confirmations_3 (
        device_id TEXT NOT NULL,
        prediction_id TEXT NOT NULL,
        label TEXT NOT NULL,
        source TEXT NOT NULL,
        ts REAL NOT NULL,
        received REAL NOT NULL,
        window BLOB,
        window_length INTEGER,
        joined REAL,
        PRIMARY KEY (device_id, prediction_id)
    );
    INSERT INTO confirmations_3 SELECT device_id, prediction_id, label, source, ts, received,
        window, window_length, joined FROM confirmations;
    DROP TABLE confirmations;
    ALTER TABLE confirmations_3 RENAME TO confirmations;
    CREATE INDEX confirmations_unjoined ON confirmations (joined) WHERE joined IS NULL;
    """,
    # 4: effects done once: the request ids of commands run, and the messages already reported
    # (a redelivery whose acknowledgement was lost is neither run nor reported again).
    """
    CREATE TABLE handled (
        key TEXT PRIMARY KEY,
        received REAL NOT NULL
    );
    CREATE INDEX handled_by_received ON handled (received);
    """,
)
# How long a handled key is kept: longer than the broker keeps a session's unacknowledged
# messages (ingest.session_expiry_s, 7 days by default), which are what comes again.
HANDLED_KEEP_S = 8 * 86400.0
SCHEMA_VERSION = len(_MIGRATIONS)

# meta rows: a retrain asked for by a command, whichever replica received it (the leader takes
# it), and the number of stored confirmations when the last retrain round started.
META_RETRAIN_REQUEST = "retrain_request"
META_RETRAIN_BASELINE = "retrain_baseline_confirmations"

ConfirmationStored = Literal["new", "corrected", "duplicate", "forgotten", "foreign"]


@dataclass(frozen=True, slots=True)
class ConfirmedWindow:
    prediction_id: str
    device_id: str
    label: str
    window: npt.NDArray[np.float32]
    received: float


@dataclass(frozen=True, slots=True)
class StoreCounts:
    batches: int
    samples: int
    predictions: int
    confirmations: int
    joined: int
    devices: int


@dataclass(frozen=True, slots=True)
class VersionAccuracy:
    confirmed: int  # predictions of this version that a user confirmed or corrected
    correct: int  # ... whose confirmed label is the predicted one

    @property
    def accuracy(self) -> float:
        return self.correct / self.confirmed if self.confirmed else 0.0


class Cursor(Protocol):
    """What both drivers' cursors offer and the store uses."""

    @property
    def rowcount(self) -> int: ...

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...


Execute = Callable[[str, Sequence[object]], Cursor]


class LeaderLock(ABC):
    """Who among the trainer processes on one store retrains and publishes: at most one holds it.

    The lock is tied to the holder's process (a file lock, a database session), so it is free
    again as soon as that process dies, however it dies.
    """

    @abstractmethod
    def try_acquire(self) -> bool:
        """Take the lock if it is free; True while this process holds it (never blocks long)."""

    @abstractmethod
    def release(self) -> None:
        """Let go (idempotent)."""


class FileLeaderLock(LeaderLock):
    """An exclusive ``flock`` on a file beside the SQLite database: processes on one machine."""

    def __init__(self, path: Path) -> None:
        self._lock = FileLock(path)

    def try_acquire(self) -> bool:
        return self._lock.acquire()

    def release(self) -> None:
        self._lock.release()


class Store(ABC):
    """The store contract, with every query; thread-safe, every write commits before it returns.

    A backend provides the connection (``_execute``), its schema bookkeeping and its leader lock.
    Every driver error, of a read or of a write, comes out as ``StorageError``.
    """

    _BEGIN = "BEGIN"

    def __init__(
        self, where: str, errors: tuple[type[Exception], ...], clock: Callable[[], float]
    ) -> None:
        self._where = where  # how messages name the store: never with a password
        self._errors = errors
        self._clock = clock
        self._lock = threading.RLock()

    # ---------------------------------------------------------------- the backend's part
    @abstractmethod
    def _execute(self, sql: str, args: Sequence[object] = ()) -> Cursor:
        """Run one statement on the store's connection (the caller holds ``_lock``)."""

    @abstractmethod
    def _read_schema_version(self) -> int: ...

    @abstractmethod
    def _close(self) -> None: ...

    @abstractmethod
    def leader_lock(self) -> LeaderLock:
        """A lock that at most one process using this store holds at a time."""

    def _record_seen(self, execute: Execute, devices: list[str], now: float) -> None:
        """Insert devices not seen before and move ``last_seen`` of the others to ``now``."""
        for device_id in devices:
            execute(
                "INSERT INTO devices (device_id, first_seen, last_seen) VALUES (?, ?, ?)"
                " ON CONFLICT(device_id) DO UPDATE SET last_seen = excluded.last_seen",
                (device_id, now, now),
            )

    # ---------------------------------------------------------------- lifecycle
    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._where})"

    @property
    def schema_version(self) -> int:
        with self._reading():
            return self._read_schema_version()

    def close(self) -> None:
        with self._reading():
            self._close()

    @contextmanager
    def _reading(self) -> Iterator[None]:
        """Hold the store's lock; a failing read is a StorageError like a failing write."""
        with self._lock:
            try:
                yield
            except self._errors as exc:
                raise StorageError(f"cannot read {self._where}: {exc}") from exc

    def _rows(self, sql: str, args: Sequence[object] = ()) -> list[Any]:
        with self._reading():
            return self._execute(sql, args).fetchall()

    def _checked_execute(self, sql: str, args: Sequence[object]) -> Cursor:
        try:
            return self._execute(sql, args)
        except self._errors as exc:
            raise StorageError(f"database write failed: {exc}") from exc

    @contextmanager
    def transaction(self) -> Iterator[Writer]:
        """One atomic unit of writes; committed when the block ends without an error."""
        with self._lock:
            try:
                self._execute(self._BEGIN)
            except self._errors as exc:
                raise StorageError(f"cannot write {self._where}: {exc}") from exc
            writer = Writer(self._checked_execute, self._clock())
            try:
                yield writer
                self._record_seen(self._checked_execute, writer.seen_devices(), writer.now)
            except BaseException as exc:
                self._rollback()
                if isinstance(exc, self._errors):
                    raise StorageError(f"cannot write {self._where}: {exc}") from exc
                raise
            try:
                self._execute("COMMIT")
            except self._errors as exc:
                self._rollback()
                raise StorageError(f"cannot commit to {self._where}: {exc}") from exc

    def _rollback(self) -> None:
        with contextlib.suppress(*self._errors):  # a connection gone took the transaction along
            self._execute("ROLLBACK")

    # ---------------------------------------------------------------------- reading
    def counts(self) -> StoreCounts:
        [(batches, samples, predictions, confirmations, joined, devices)] = self._rows(
            "SELECT (SELECT COUNT(*) FROM batches), (SELECT COALESCE(SUM(n_samples), 0)"
            " FROM batches), (SELECT COUNT(*) FROM predictions), (SELECT COUNT(*) FROM"
            " confirmations), (SELECT COUNT(joined) FROM confirmations),"
            " (SELECT COUNT(*) FROM devices)"
        )
        return StoreCounts(
            int(batches),
            int(samples),
            int(predictions),
            int(confirmations),
            int(joined),
            int(devices),
        )

    def confirmation_count(self) -> int:
        """Confirmations stored (never deleted): what retrain triggers count from."""
        return int(self._rows("SELECT COUNT(*) FROM confirmations")[0][0])

    def accuracy_by_version(self) -> dict[str, VersionAccuracy]:
        """Per model version: its confirmed predictions, and how many the user confirmed as is."""
        rows = self._rows(
            "SELECT p.model_version, COUNT(*), SUM(CASE WHEN p.label = c.label THEN 1 ELSE 0 END)"
            " FROM predictions p JOIN confirmations c"
            " ON c.prediction_id = p.prediction_id AND c.device_id = p.device_id"
            " GROUP BY p.model_version ORDER BY p.model_version"
        )
        return {row[0]: VersionAccuracy(int(row[1]), int(row[2])) for row in rows}

    def devices_by_state(self) -> dict[str, int]:
        """Devices per last reported state ("online", "offline", ...; "unknown": no status yet)."""
        rows = self._rows(
            "SELECT COALESCE(state, 'unknown'), COUNT(*) FROM devices GROUP BY 1 ORDER BY 1"
        )
        return {row[0]: int(row[1]) for row in rows}

    def batch_seqs(self, device_id: str) -> list[int]:
        rows = self._rows("SELECT seq FROM batches WHERE device_id = ? ORDER BY seq", (device_id,))
        return [int(row[0]) for row in rows]

    def batch(self, device_id: str, seq: int) -> npt.NDArray[np.float32] | None:
        rows = self._rows(
            "SELECT samples FROM batches WHERE device_id = ? AND seq = ?", (device_id, seq)
        )
        return samples_from_bytes(bytes(rows[0][0])) if rows else None

    def confirmed_windows(self) -> list[ConfirmedWindow]:
        """Every confirmation joined to its window, oldest first."""
        return [window for page in self.confirmed_window_pages() for window in page]

    def confirmed_window_pages(self, page_size: int = 1000) -> Iterator[list[ConfirmedWindow]]:
        """:meth:`confirmed_windows` a page at a time, so that a retrain round does not hold
        the fleet's windows in the service at once (they reach hundreds of MB, which the
        allocator then keeps), nor the store's lock while it writes them out.

        Keyset paging up to the latest confirmation stored when it starts: what is stored or
        corrected meanwhile (a correction moves its row to the end) waits for the next round,
        so no answer comes twice, with its old label and its new one."""
        latest = self._rows("SELECT MAX(received) FROM confirmations WHERE joined IS NOT NULL")
        if not latest or latest[0][0] is None:
            return
        first = (
            'SELECT prediction_id, device_id, label, "window", received FROM confirmations'
            " WHERE joined IS NOT NULL AND received <= ?"
            " ORDER BY received, device_id, prediction_id LIMIT ?"
        )
        following = (
            'SELECT prediction_id, device_id, label, "window", received FROM confirmations'
            " WHERE joined IS NOT NULL AND received <= ?"
            " AND (received, device_id, prediction_id) > (?, ?, ?)"
            " ORDER BY received, device_id, prediction_id LIMIT ?"
        )
        after: tuple[Any, ...] = ()
        while True:
            rows = self._rows(following if after else first, (latest[0][0], *after, page_size))
            if not rows:
                return
            yield [
                ConfirmedWindow(
                    row[0], row[1], row[2], samples_from_bytes(bytes(row[3])), float(row[4])
                )
                for row in rows
            ]
            last = rows[-1]
            after = (last[4], last[1], last[0])

    def meta(self, name: str) -> str | None:
        rows = self._rows("SELECT value FROM meta WHERE name = ?", (name,))
        return str(rows[0][0]) if rows else None

    def take_meta(self, name: str) -> str | None:
        """Delete a meta row and return its value (None: there was none); atomic. Without the
        row it writes nothing (the leader looks once a second)."""
        if self.meta(name) is None:
            return None
        with self.transaction() as writer:
            row = writer.fetchone("DELETE FROM meta WHERE name = ? RETURNING value", (name,))
        return None if row is None else str(row[0])

    # ---------------------------------------------------------------------- joining
    def join_pending(self, limit: int = 1000) -> int:
        """Join unjoined confirmations whose prediction and batches have arrived since."""
        with self._reading():
            pending = self._execute(
                "SELECT device_id, prediction_id FROM confirmations WHERE joined IS NULL"
                " ORDER BY received LIMIT ?",
                (limit,),
            ).fetchall()
            if not pending:
                return 0
            with self.transaction() as writer:
                return sum(writer.join(row[0], row[1]) for row in pending)

    # ---------------------------------------------------------------------- retention
    def apply_retention(self, *, max_age_s: float, max_batches_per_device: int) -> int:
        """Delete batches and predictions beyond the policy.

        Confirmed windows are kept: they hold their own copy of the samples, and they are the
        labelled data every retrain learns from. Predictions of unjoined confirmations are kept
        so that a late batch can still complete the join.
        """
        cutoff = self._clock() - max_age_s
        with self.transaction() as writer:
            removed = writer.execute("DELETE FROM batches WHERE received < ?", (cutoff,))
            writer.execute(
                "DELETE FROM predictions WHERE received < ? AND NOT EXISTS (SELECT 1 FROM"
                " confirmations c WHERE c.joined IS NULL AND c.device_id = predictions.device_id"
                " AND c.prediction_id = predictions.prediction_id)",
                (cutoff,),
            )
            removed += writer.trim_batches(max_batches_per_device)
            writer.execute(
                "DELETE FROM handled WHERE received < ?", (self._clock() - HANDLED_KEEP_S,)
            )
        return removed


class SqliteStore(Store):
    """One SQLite file in WAL mode (``:memory:`` for a throwaway store)."""

    _BEGIN = "BEGIN IMMEDIATE"

    def __init__(self, path: Path, *, clock: Callable[[], float] = time.time) -> None:
        super().__init__(str(path), (sqlite3.Error,), clock)
        self._path = path
        try:
            if str(path) != ":memory:":
                path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            # NORMAL in WAL mode survives a process kill (the WAL is in the OS's hands once
            # written); FULL adds an fsync per commit for power loss: take it, commits are batched.
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA busy_timeout=5000")
            self._migrate()
        except sqlite3.Error as exc:
            raise StorageError(f"cannot open trainer store {path}: {exc}") from exc

    def _execute(self, sql: str, args: Sequence[object] = ()) -> Cursor:
        return self._db.execute(sql, tuple(args))

    def _read_schema_version(self) -> int:
        return int(self._db.execute("PRAGMA user_version").fetchone()[0])

    def _migrate(self) -> None:
        version = self._read_schema_version()
        if version > SCHEMA_VERSION:
            raise StorageError(
                f"{self._path} has schema {version}; this trainer knows up to {SCHEMA_VERSION}"
            )
        for target in range(version, SCHEMA_VERSION):
            # executescript commits by itself; run each migration and its version bump together.
            self._db.executescript(
                f"BEGIN; {_MIGRATIONS[target]}; PRAGMA user_version = {target + 1}; COMMIT;"
            )

    def _close(self) -> None:
        self._db.close()

    def leader_lock(self) -> LeaderLock:
        if str(self._path) == ":memory:":
            raise StorageError("an in-memory store has no leader lock")
        return FileLeaderLock(self._path.with_name(self._path.name + ".leader"))


class Writer:
    """The writes of one transaction (only valid inside ``Store.transaction``)."""

    def __init__(self, execute: Execute, now: float) -> None:
        self._exec = execute
        self.now = now
        self._seen_devices: set[str] = set()  # recorded once, in order, before the commit

    def execute(self, sql: str, args: Sequence[object] = ()) -> int:
        return int(self._exec(sql, args).rowcount)

    def fetchone(self, sql: str, args: Sequence[object] = ()) -> Any:
        return self._exec(sql, args).fetchone()

    def fetchall(self, sql: str, args: Sequence[object] = ()) -> list[Any]:
        return self._exec(sql, args).fetchall()

    def seen_devices(self) -> list[str]:
        """The devices this transaction touched, sorted: every replica locks them in one order."""
        return sorted(self._seen_devices)

    def _insert(self, table: str, columns: Iterable[str], args: Sequence[object]) -> bool:
        """INSERT unless the key is there already; True if the row is new."""
        names = list(columns)
        cursor = self._exec(
            f"INSERT INTO {table} ({', '.join(names)}) VALUES"  # noqa: S608 - names are ours
            f" ({', '.join('?' * len(names))}) ON CONFLICT DO NOTHING",
            args,
        )
        return cursor.rowcount == 1

    def first_time(self, key: str) -> bool:
        """Remember ``key`` (with this transaction); False if it was remembered already."""
        return self._insert("handled", ("key", "received"), (key, self.now))

    def add_batch(self, batch: SensorBatch) -> bool:
        """Store a batch; False if (device, seq) is stored already (a redelivery)."""
        self._seen_devices.add(batch.device_id)
        return self._insert(
            "batches",
            (
                "device_id",
                "seq",
                "sample_rate_hz",
                "t0_ns",
                "n_samples",
                "samples",
                "offsets_us",
                "received",
            ),
            (
                batch.device_id,
                int(batch.seq),
                float(batch.sample_rate_hz),
                int(batch.t0_ns),
                int(batch.n_samples),
                samples_to_bytes(batch.samples),
                None if batch.offsets_us is None else batch.offsets_us.astype("<u4").tobytes(),
                self.now,
            ),
        )

    def add_prediction(self, prediction: Prediction) -> bool:
        self._seen_devices.add(prediction.device_id)
        return self._insert(
            "predictions",
            (
                "prediction_id",
                "device_id",
                "batch_seq",
                '"offset"',
                "length",
                "label",
                "model_version",
                "ts",
                "received",
            ),
            (
                prediction.prediction_id,
                prediction.device_id,
                int(prediction.window.batch_seq),
                int(prediction.window.offset),
                int(prediction.window.length),
                prediction.label,
                prediction.model_version,
                float(prediction.ts),
                self.now,
            ),
        )

    def add_confirmation(self, device_id: str, confirmation: Confirmation) -> ConfirmationStored:
        """Store a confirmation and try to join it: "new"; "corrected" (a later answer of the
        same device with another label replaces the label, as on the device); "duplicate" (a
        redelivery, or an older answer); "forgotten" (its device forgot its confirmations up to
        a time after this one's ``ts``: not stored); "foreign" (the prediction it names is
        another device's, not this one's: not stored)."""
        self._seen_devices.add(device_id)
        horizon = self._exec(
            "SELECT forgotten_before FROM devices WHERE device_id = ?", (device_id,)
        ).fetchone()
        if horizon is not None and horizon[0] is not None and confirmation.ts <= horizon[0]:
            return "forgotten"
        stored = self._exec(
            "SELECT label, ts FROM confirmations WHERE device_id = ? AND prediction_id = ?",
            (device_id, confirmation.prediction_id),
        ).fetchone()
        if stored is None and self._predicted_elsewhere(device_id, confirmation.prediction_id):
            return "foreign"
        if stored is None:
            new = self._insert(
                "confirmations",
                ("prediction_id", "device_id", "label", "source", "ts", "received"),
                (
                    confirmation.prediction_id,
                    device_id,
                    confirmation.label,
                    confirmation.source,
                    float(confirmation.ts),
                    self.now,
                ),
            )
            if not new:
                return "duplicate"
            self.join(device_id, confirmation.prediction_id)
            return "new"
        stored_label, stored_ts = stored
        if stored_label == confirmation.label or confirmation.ts < stored_ts:
            return "duplicate"
        corrected = self.execute(
            "UPDATE confirmations SET label = ?, source = ?, ts = ?, received = ?"
            " WHERE device_id = ? AND prediction_id = ? AND ts <= ?",
            (
                confirmation.label,
                confirmation.source,
                float(confirmation.ts),
                self.now,
                device_id,
                confirmation.prediction_id,
                float(confirmation.ts),
            ),
        )
        return "corrected" if corrected else "duplicate"

    def _predicted_elsewhere(self, device_id: str, prediction_id: str) -> bool:
        """True when only other devices made a prediction with this id."""
        rows = self._exec(
            "SELECT device_id FROM predictions WHERE prediction_id = ?", (prediction_id,)
        ).fetchall()
        return bool(rows) and all(row[0] != device_id for row in rows)

    def forget_confirmations(self, device_id: str, before: float) -> int:
        """Delete ``device_id``'s confirmations with ``ts <= before`` (their windows with them)
        and remember the horizon, so that none of them is stored again; how many went."""
        self._seen_devices.add(device_id)
        removed = self.execute(
            "DELETE FROM confirmations WHERE device_id = ? AND ts <= ?", (device_id, before)
        )
        row = self._exec(
            "SELECT forgotten_before FROM devices WHERE device_id = ?", (device_id,)
        ).fetchone()
        horizon = before if row is None or row[0] is None else max(before, float(row[0]))
        self._exec(
            "INSERT INTO devices (device_id, first_seen, last_seen, forgotten_before)"
            " VALUES (?, ?, ?, ?) ON CONFLICT(device_id) DO UPDATE SET"
            " forgotten_before = excluded.forgotten_before",
            (device_id, self.now, self.now, horizon),
        )
        return removed

    def update_status(self, status: DeviceStatus) -> None:
        self._seen_devices.add(status.device_id)
        self._exec(
            "INSERT INTO devices (device_id, first_seen, last_seen, state, model_version,"
            " counters) VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT(device_id) DO UPDATE SET"
            " state = excluded.state, model_version = excluded.model_version,"
            " counters = excluded.counters",
            (
                status.device_id,
                self.now,
                self.now,
                status.state,
                status.model_version,
                json.dumps(dict(status.counters)),
            ),
        )

    def set_meta(self, name: str, value: str) -> None:
        self._exec(
            "INSERT INTO meta (name, value) VALUES (?, ?)"
            " ON CONFLICT(name) DO UPDATE SET value = excluded.value",
            (name, value),
        )

    def join(self, device_id: str, prediction_id: str) -> bool:
        """Copy the confirmed window's samples out of the stored batches, if all are here."""
        row = self._exec(
            'SELECT p.batch_seq, p."offset", p.length'
            " FROM confirmations c JOIN predictions p USING (device_id, prediction_id)"
            " WHERE c.device_id = ? AND c.prediction_id = ? AND c.joined IS NULL",
            (device_id, prediction_id),
        ).fetchone()
        if row is None:
            return False
        seq, offset, length = row
        pieces: list[npt.NDArray[np.float32]] = []
        have = -offset
        while have < length:
            stored = self._exec(
                "SELECT samples FROM batches WHERE device_id = ? AND seq = ?",
                (device_id, seq),
            ).fetchone()
            if stored is None:
                return False  # not arrived yet: ``join_pending`` tries again later
            samples = samples_from_bytes(bytes(stored[0]))
            pieces.append(samples)
            have += samples.shape[0]
            seq += 1
        window = np.concatenate(pieces)[offset : offset + length]
        self._exec(
            'UPDATE confirmations SET "window" = ?, window_length = ?, joined = ?'
            " WHERE device_id = ? AND prediction_id = ?",
            (samples_to_bytes(window), length, self.now, device_id, prediction_id),
        )
        return True

    def trim_batches(self, max_per_device: int) -> int:
        removed = 0
        devices = [row[0] for row in self._exec("SELECT device_id FROM devices", ()).fetchall()]
        for device_id in devices:
            removed += self.execute(
                "DELETE FROM batches WHERE device_id = ? AND seq <= COALESCE((SELECT seq FROM"
                " batches WHERE device_id = ? ORDER BY seq DESC LIMIT 1 OFFSET ?), -1)",
                (device_id, device_id, max_per_device),
            )
        return removed
