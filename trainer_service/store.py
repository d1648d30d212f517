"""The trainer's durable store: every device's batches, predictions and confirmations, in SQLite.

One file in WAL mode with a versioned schema (``PRAGMA user_version``) and forward migrations.
Sensor batches are keyed by (device, sequence number), so a redelivered batch is stored once.
Confirmations are joined to the window they label: the prediction names the window's place in the
device's batch stream, and the window's samples are copied out of the stored batches, so a
confirmed window survives the retention policy that later deletes old batches.

A message counts as accepted once the transaction holding it is committed; the ingest loop
acknowledges it to the broker only after that, so a crash before the commit means a redelivery.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from shared.codec import samples_from_bytes, samples_to_bytes
from shared.errors import StorageError
from shared.messages import Confirmation, DeviceStatus, Prediction, SensorBatch

# Each migration takes the schema from version i to i + 1; never edit one that has shipped.
# (``meta`` is reserved for service-wide facts; nothing uses it yet.)
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
)
SCHEMA_VERSION = len(_MIGRATIONS)


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


class TrainerStore:
    """Thread-safe; every write method commits before it returns.

    Every ``sqlite3.Error``, of a read or of a write, comes out as ``StorageError``.
    """

    def __init__(self, path: Path, *, clock: Callable[[], float] = time.time) -> None:
        self._path = path
        self._clock = clock
        self._lock = threading.RLock()
        try:
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

    @property
    def schema_version(self) -> int:
        with self._reading():
            return int(self._db.execute("PRAGMA user_version").fetchone()[0])

    def _migrate(self) -> None:
        version = int(self._db.execute("PRAGMA user_version").fetchone()[0])
        if version > SCHEMA_VERSION:
            raise StorageError(
                f"{self._path} has schema {version}; this trainer knows up to {SCHEMA_VERSION}"
            )
        for target in range(version, SCHEMA_VERSION):
            # executescript commits by itself; run each migration and its version bump together.
            self._db.executescript(
                f"BEGIN; {_MIGRATIONS[target]}; PRAGMA user_version = {target + 1}; COMMIT;"
            )

    def close(self) -> None:
        with self._reading():
            self._db.close()

    @contextmanager
    def _reading(self) -> Iterator[None]:
        """Hold the store's lock; a failing read is a StorageError like a failing write."""
        with self._lock:
            try:
                yield
            except sqlite3.Error as exc:
                raise StorageError(f"cannot read {self._path}: {exc}") from exc

    @contextmanager
    def transaction(self) -> Iterator[Writer]:
        """One atomic unit of writes; committed when the block ends without an error."""
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as exc:
                raise StorageError(f"cannot write {self._path}: {exc}") from exc
            try:
                yield Writer(self._db, self._clock())
            except BaseException as exc:
                self._db.execute("ROLLBACK")
                if isinstance(exc, sqlite3.Error):
                    raise StorageError(f"cannot write {self._path}: {exc}") from exc
                raise
            try:
                self._db.execute("COMMIT")
            except sqlite3.Error as exc:
                raise StorageError(f"cannot commit to {self._path}: {exc}") from exc

    # ---------------------------------------------------------------------- reading
    def counts(self) -> StoreCounts:
        with self._reading():
            batches, samples = self._db.execute(
                "SELECT COUNT(*), COALESCE(SUM(n_samples), 0) FROM batches"
            ).fetchone()
            predictions = self._db.execute("SELECT COUNT(*) FROM predictions").fetchone()[0]
            confirmations, joined = self._db.execute(
                "SELECT COUNT(*), COUNT(joined) FROM confirmations"
            ).fetchone()
            devices = self._db.execute("SELECT COUNT(*) FROM devices").fetchone()[0]
        return StoreCounts(batches, samples, predictions, confirmations, joined, devices)

    def accuracy_by_version(self) -> dict[str, VersionAccuracy]:
        """Per model version: its confirmed predictions, and how many the user confirmed as is."""
        with self._reading():
            rows = self._db.execute(
                "SELECT p.model_version, COUNT(*), SUM(p.label = c.label) FROM predictions p"
                " JOIN confirmations c"
                " ON c.prediction_id = p.prediction_id AND c.device_id = p.device_id"
                " GROUP BY p.model_version ORDER BY p.model_version"
            ).fetchall()
        return {row[0]: VersionAccuracy(int(row[1]), int(row[2])) for row in rows}

    def devices_by_state(self) -> dict[str, int]:
        """Devices per last reported state ("online", "offline", ...; "unknown": no status yet)."""
        with self._reading():
            rows = self._db.execute(
                "SELECT COALESCE(state, 'unknown'), COUNT(*) FROM devices GROUP BY 1 ORDER BY 1"
            ).fetchall()
        return {row[0]: int(row[1]) for row in rows}

    def batch_seqs(self, device_id: str) -> list[int]:
        with self._reading():
            rows = self._db.execute(
                "SELECT seq FROM batches WHERE device_id = ? ORDER BY seq", (device_id,)
            ).fetchall()
        return [int(row[0]) for row in rows]

    def batch(self, device_id: str, seq: int) -> npt.NDArray[np.float32] | None:
        with self._reading():
            row = self._db.execute(
                "SELECT samples FROM batches WHERE device_id = ? AND seq = ?", (device_id, seq)
            ).fetchone()
        return None if row is None else samples_from_bytes(row[0])

    def confirmed_windows(self) -> list[ConfirmedWindow]:
        """Every confirmation joined to its window, oldest first."""
        with self._reading():
            rows = self._db.execute(
                "SELECT prediction_id, device_id, label, window, received FROM confirmations"
                " WHERE joined IS NOT NULL ORDER BY received, prediction_id"
            ).fetchall()
        return [
            ConfirmedWindow(row[0], row[1], row[2], samples_from_bytes(row[3]), float(row[4]))
            for row in rows
        ]

    # ---------------------------------------------------------------------- joining
    def join_pending(self, limit: int = 1000) -> int:
        """Join unjoined confirmations whose prediction and batches have arrived since."""
        with self._reading():
            pending = self._db.execute(
                "SELECT prediction_id FROM confirmations WHERE joined IS NULL"
                " ORDER BY received LIMIT ?",
                (limit,),
            ).fetchall()
            if not pending:
                return 0
            with self.transaction() as writer:
                return sum(writer.join(row[0]) for row in pending)

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
                "DELETE FROM predictions WHERE received < ? AND prediction_id NOT IN"
                " (SELECT prediction_id FROM confirmations WHERE joined IS NULL)",
                (cutoff,),
            )
            removed += writer.trim_batches(max_batches_per_device)
        return removed


class Writer:
    """The writes of one transaction (only valid inside ``TrainerStore.transaction``)."""

    def __init__(self, db: sqlite3.Connection, now: float) -> None:
        self._db = db
        self._now = now
        self._seen_devices: set[str] = set()  # one transaction has one "now": write it once

    def _exec(self, sql: str, args: tuple[object, ...] = ()) -> sqlite3.Cursor:
        try:
            return self._db.execute(sql, args)
        except sqlite3.Error as exc:
            raise StorageError(f"database write failed: {exc}") from exc

    def execute(self, sql: str, args: tuple[object, ...] = ()) -> int:
        return int(self._exec(sql, args).rowcount)

    def _seen(self, device_id: str) -> None:
        if device_id in self._seen_devices:
            return
        self._seen_devices.add(device_id)
        self._exec(
            "INSERT INTO devices (device_id, first_seen, last_seen) VALUES (?, ?, ?)"
            " ON CONFLICT(device_id) DO UPDATE SET last_seen = excluded.last_seen",
            (device_id, self._now, self._now),
        )

    def add_batch(self, batch: SensorBatch) -> bool:
        """Store a batch; False if (device, seq) is stored already (a redelivery)."""
        self._seen(batch.device_id)
        cursor = self._exec(
            "INSERT OR IGNORE INTO batches (device_id, seq, sample_rate_hz, t0_ns, n_samples,"
            " samples, offsets_us, received) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (
                batch.device_id,
                batch.seq,
                batch.sample_rate_hz,
                batch.t0_ns,
                batch.n_samples,
                samples_to_bytes(batch.samples),
                None if batch.offsets_us is None else batch.offsets_us.astype("<u4").tobytes(),
                self._now,
            ),
        )
        return cursor.rowcount == 1

    def add_prediction(self, prediction: Prediction) -> bool:
        self._seen(prediction.device_id)
        cursor = self._exec(
            "INSERT OR IGNORE INTO predictions (prediction_id, device_id, batch_seq, offset,"
            " length, label, model_version, ts, received) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                prediction.prediction_id,
                prediction.device_id,
                prediction.window.batch_seq,
                prediction.window.offset,
                prediction.window.length,
                prediction.label,
                prediction.model_version,
                prediction.ts,
                self._now,
            ),
        )
        return cursor.rowcount == 1

    def add_confirmation(self, device_id: str, confirmation: Confirmation) -> bool:
        """Store a confirmation (the first one for a prediction wins) and try to join it."""
        self._seen(device_id)
        cursor = self._exec(
            "INSERT OR IGNORE INTO confirmations (prediction_id, device_id, label, source, ts,"
            " received) VALUES (?, ?, ?, ?, ?, ?)",
            (
                confirmation.prediction_id,
                device_id,
                confirmation.label,
                confirmation.source,
                confirmation.ts,
                self._now,
            ),
        )
        if cursor.rowcount != 1:
            return False
        self.join(confirmation.prediction_id)
        return True

    def update_status(self, status: DeviceStatus) -> None:
        self._seen(status.device_id)
        self._exec(
            "UPDATE devices SET state = ?, model_version = ?, counters = ? WHERE device_id = ?",
            (
                status.state,
                status.model_version,
                json.dumps(dict(status.counters)),
                status.device_id,
            ),
        )

    def join(self, prediction_id: str) -> bool:
        """Copy the confirmed window's samples out of the stored batches, if all are here."""
        row = self._exec(
            "SELECT c.device_id, p.device_id, p.batch_seq, p.offset, p.length"
            " FROM confirmations c JOIN predictions p USING (prediction_id)"
            " WHERE c.prediction_id = ? AND c.joined IS NULL",
            (prediction_id,),
        ).fetchone()
        if row is None:
            return False
        confirmed_on, predicted_on, seq, offset, length = row
        if confirmed_on != predicted_on:
            return False  # a confirmation on another device's topic never labels this window
        pieces: list[npt.NDArray[np.float32]] = []
        have = -offset
        while have < length:
            stored = self._exec(
                "SELECT samples FROM batches WHERE device_id = ? AND seq = ?",
                (predicted_on, seq),
            ).fetchone()
            if stored is None:
                return False  # not arrived yet: ``join_pending`` tries again later
            samples = samples_from_bytes(stored[0])
            pieces.append(samples)
            have += samples.shape[0]
            seq += 1
        window = np.concatenate(pieces)[offset : offset + length]
        self._exec(
            "UPDATE confirmations SET window = ?, window_length = ?, joined = ?"
            " WHERE prediction_id = ?",
            (samples_to_bytes(window), length, self._now, prediction_id),
        )
        return True

    def trim_batches(self, max_per_device: int) -> int:
        removed = 0
        devices = [row[0] for row in self._exec("SELECT device_id FROM devices")]
        for device_id in devices:
            removed += self.execute(
                "DELETE FROM batches WHERE device_id = ? AND seq <= COALESCE((SELECT seq FROM"
                " batches WHERE device_id = ? ORDER BY seq DESC LIMIT 1 OFFSET ?), -1)",
                (device_id, device_id, max_per_device),
            )
        return removed
