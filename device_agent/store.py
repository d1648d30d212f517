"""The agent's durable state in one SQLite file: outbox, counters, recent windows, confirmations.

One file, one transaction per event: a sensor batch and the sequence number after it are committed
together, and so are a prediction and the window it was made on, so a crash never leaves a gap in
the sequence numbers or a prediction whose window is gone. WAL with ``synchronous=FULL`` makes a
commit survive power loss, not only a process crash; at about one commit a second that costs little.

Outbox policy when full (``outbox_max_messages`` or ``outbox_max_bytes``): the oldest message of
the lowest priority goes first. Sensor batches are BULK: the trainer sees the gap in their
sequence numbers. Predictions and error events are NORMAL and only go when no BULK message is left.

A sensor batch, a prediction and a kept confirmation stay in the outbox after the broker took them
(``sent_at`` set) until the trainer's receipt names them (end-to-end delivery, docs/protocol.md);
every other message goes once the broker took it.
"""

from __future__ import annotations

import enum
import sqlite3
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from shared.codec import samples_from_bytes, samples_to_bytes
from shared.errors import StorageError
from shared.mqtt_transport import Outbound

SCHEMA_VERSION = 5

_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    qos INTEGER NOT NULL,
    retain INTEGER NOT NULL,
    content_type TEXT NOT NULL,
    priority INTEGER NOT NULL,
    created REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS outbox_by_priority ON outbox (priority, id);
CREATE TABLE IF NOT EXISTS counters (
    name TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS recent_windows (
    prediction_id TEXT PRIMARY KEY,
    created_order INTEGER NOT NULL,
    model_version TEXT NOT NULL,
    window BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS recent_by_order ON recent_windows (created_order);
CREATE TABLE IF NOT EXISTS replay (
    prediction_id TEXT PRIMARY KEY,
    label TEXT NOT NULL,
    window BLOB NOT NULL,
    applied INTEGER NOT NULL DEFAULT 0,
    created REAL NOT NULL
);
"""

# Version 2: a confirmation keeps its time (a later correction replaces it) and how the learned
# state and the global model did on it before learning it (the guard's record).
_MIGRATE_TO_2 = """
ALTER TABLE replay ADD COLUMN ts REAL NOT NULL DEFAULT 0;
ALTER TABLE replay ADD COLUMN personal_correct INTEGER;
ALTER TABLE replay ADD COLUMN global_correct INTEGER;
"""

# Version 3: a message the trainer must receipt (sensor batch, prediction, kept confirmation)
# keeps its receipt key, when the broker took it and how often it was sent again, until a
# receipt names it.
_MIGRATE_TO_3 = """
ALTER TABLE outbox ADD COLUMN receipt_key TEXT;
ALTER TABLE outbox ADD COLUMN sent_at REAL;
ALTER TABLE outbox ADD COLUMN resends INTEGER NOT NULL DEFAULT 0;
CREATE INDEX IF NOT EXISTS outbox_by_receipt_key ON outbox (receipt_key)
    WHERE receipt_key IS NOT NULL;
"""

# Version 4: the guard's record of a confirmation is how each way of answering read it before it
# was learned (device_agent.learning.Record, as JSON). The version 2 columns personal_correct and
# global_correct are no longer read; a version 3 store's learned confirmations have no record
# and earn one again when the agent starts (device_agent.learning.DeviceLearner.attach).
_MIGRATE_TO_4 = """
ALTER TABLE replay ADD COLUMN record TEXT;
CREATE TABLE IF NOT EXISTS facts (
    name TEXT PRIMARY KEY,
    value REAL NOT NULL
);
"""
# facts: ``forgotten_before``, the ts up to which the wearer had the device forget its
# confirmations; a late copy of one of them is not kept again (the trainer keeps the same rule).

# Version 5: the request ids of the device commands carried out, so that a command delivered
# again (its acknowledgement was lost) is not carried out twice: a second ``confirm_latest``
# would confirm whatever prediction is the latest by then.
_MIGRATE_TO_5 = """
CREATE TABLE IF NOT EXISTS handled_commands (
    request_id TEXT PRIMARY KEY,
    handled REAL NOT NULL
);
"""
HANDLED_COMMANDS_KEPT = 1000  # the most recent request ids kept (redeliveries come soon)

Window = npt.NDArray[np.float32]
Stored = Literal["new", "corrected", "duplicate", "forgotten"]


class Priority(enum.IntEnum):
    BULK = 0  # sensor batches: large, and the first to go when the outbox is full
    NORMAL = 1  # predictions, error events


@dataclass(frozen=True, slots=True)
class OutboxEntry:
    id: int
    message: Outbound
    receipt_key: str | None = None  # kept until the trainer's receipt names it (ReceiptKey)
    resends: int = 0


@dataclass(frozen=True, slots=True)
class ReplayEntry:
    """A confirmed window. ``applied``: what the device learned includes it. ``record``: the
    guard's record of it, how each way of answering read it before it was learned (JSON of a
    ``device_agent.learning.Record``; None until then, or after a correction)."""

    prediction_id: str
    label: str
    window: Window
    applied: bool
    record: str | None = None


class AgentStore:
    """Thread-safe access to the agent's SQLite file. Every ``sqlite3.Error``, of a read or of a
    write, surfaces as ``StorageError``; a failed write leaves the file as it was."""

    def __init__(
        self,
        path: Path,
        *,
        outbox_max_messages: int = 100_000,
        outbox_max_bytes: int = 256 * 1024 * 1024,
        recent_max: int = 4096,
        replay_max: int = 2000,
    ) -> None:
        self._path = path
        self._outbox_max_messages = outbox_max_messages
        self._outbox_max_bytes = outbox_max_bytes
        self._recent_max = recent_max
        self._replay_max = replay_max
        self._lock = threading.Lock()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._migrate()
            row = self._db.execute(
                "SELECT COUNT(*), COALESCE(SUM(LENGTH(payload)), 0) FROM outbox"
            ).fetchone()
            recent = self._db.execute(
                "SELECT COALESCE(MAX(created_order), 0) FROM recent_windows"
            ).fetchone()
        except sqlite3.Error as exc:
            raise StorageError(f"cannot open agent store {path}: {exc}") from exc
        self._outbox_count, self._outbox_bytes = int(row[0]), int(row[1])
        self._recent_order = int(recent[0])

    def _migrate(self) -> None:
        version = int(self._db.execute("PRAGMA user_version").fetchone()[0])
        if version > SCHEMA_VERSION:
            raise StorageError(
                f"{self._path} has schema {version}, newer than this agent's {SCHEMA_VERSION}"
            )
        if version < 1:
            self._db.executescript(_SCHEMA)
        if version < 2:
            self._db.executescript(_MIGRATE_TO_2)
        if version < 3:
            self._db.executescript(_MIGRATE_TO_3)
        if version < 4:
            self._db.executescript(_MIGRATE_TO_4)
        if version < 5:
            self._db.executescript(_MIGRATE_TO_5)
        if version < SCHEMA_VERSION:
            self._db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def close(self) -> None:
        with self._lock, self._reading():
            self._db.close()

    def limit_pages(self, max_pages: int) -> int:
        """Cap the file at ``max_pages`` pages (SQLite's ``max_page_count``, which holds for this
        connection only); returns the cap in force. Beyond it every write fails with SQLite's
        own "database or disk is full" (SQLITE_FULL), exactly as on a full disk: the tests use
        it to fill the disk and, by raising it again, to free space."""
        with self._lock, self._reading():
            return int(self._db.execute(f"PRAGMA max_page_count = {int(max_pages)}").fetchone()[0])

    def page_count(self) -> int:
        """Pages the file uses now (see ``limit_pages``)."""
        with self._lock, self._reading():
            return int(self._db.execute("PRAGMA page_count").fetchone()[0])

    # --------------------------------------------------------------------------- outbox
    def enqueue(
        self,
        message: Outbound,
        priority: Priority,
        *,
        counters: Mapping[str, int] | None = None,
        recent: tuple[str, str, Window] | None = None,
        receipt_key: str | None = None,
    ) -> int:
        """Append ``message``; in the same transaction set ``counters`` and remember ``recent``
        (prediction id, model version, window). ``receipt_key`` keeps it until a receipt names
        it. Returns how many old messages were evicted."""
        with self._lock, self._transaction():
            self._insert_outbox(message, priority, receipt_key)
            if counters:
                self._set_counters(counters)
            if recent is not None:
                self._remember_window(*recent)
            return self._evict_if_full()

    def _insert_outbox(
        self, message: Outbound, priority: Priority, receipt_key: str | None
    ) -> None:
        self._db.execute(
            "INSERT INTO outbox (topic, payload, qos, retain, content_type, priority, created,"
            " receipt_key) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (
                message.topic,
                message.payload,
                message.qos,
                int(message.retain),
                message.content_type,
                int(priority),
                time.time(),
                receipt_key,
            ),
        )
        self._outbox_count += 1
        self._outbox_bytes += len(message.payload)

    def _evict_if_full(self) -> int:
        evicted = 0
        while self._outbox_count > 1 and (
            self._outbox_count > self._outbox_max_messages
            or self._outbox_bytes > self._outbox_max_bytes
        ):
            row = self._db.execute(
                "SELECT id, priority, LENGTH(payload) FROM outbox ORDER BY priority, id LIMIT 1"
            ).fetchone()
            self._db.execute("DELETE FROM outbox WHERE id = ?", (row[0],))
            self._outbox_count -= 1
            self._outbox_bytes -= int(row[2])
            name = f"outbox_evicted_{Priority(row[1]).name.lower()}"
            self._add_counter(name, 1)
            evicted += 1
        return evicted

    def outbox_after(self, after_id: int, limit: int) -> list[OutboxEntry]:
        """Up to ``limit`` messages not sent yet with an id above ``after_id``, oldest first."""
        with self._lock, self._reading():
            rows = self._db.execute(
                f"SELECT {_ENTRY_COLUMNS} FROM outbox"  # noqa: S608 - a constant
                " WHERE id > ? AND sent_at IS NULL ORDER BY id LIMIT ?",
                (after_id, limit),
            ).fetchall()
        return [_entry(row) for row in rows]

    def outbox_unreceipted(self, sent_before: float, limit: int) -> list[OutboxEntry]:
        """Messages the broker took before ``sent_before`` that no receipt named, though a
        receipt named one queued after them: lost on the way, send again."""
        with self._lock, self._reading():
            rows = self._db.execute(
                f"SELECT {_ENTRY_COLUMNS} FROM outbox"  # noqa: S608 - a constant
                " WHERE receipt_key IS NOT NULL AND sent_at < ? AND id < ("
                "   SELECT COALESCE(MAX(value), 0) FROM counters WHERE name = 'receipted_id_max'"
                " ) ORDER BY id LIMIT ?",
                (sent_before, limit),
            ).fetchall()
        return [_entry(row) for row in rows]

    def outbox_mark_sent(self, entries: Iterable[OutboxEntry], now: float) -> None:
        """The broker took these: keep them until a receipt names them."""
        rows = [(now, entry.resends, entry.id) for entry in entries]
        if rows:
            with self._lock, self._transaction():
                self._db.executemany(
                    "UPDATE outbox SET sent_at = ?, resends = ? WHERE id = ?", rows
                )

    def outbox_receipted(self, keys: Iterable[str]) -> int:
        """Delete the messages a receipt names; how many were still here."""
        key_list = list(keys)
        removed: list[tuple[int, int]] = []
        with self._lock, self._transaction():
            for start in range(0, len(key_list), 500):
                chunk = key_list[start : start + 500]
                marks = ",".join("?" * len(chunk))
                removed += self._db.execute(
                    f"SELECT id, LENGTH(payload) FROM outbox"  # noqa: S608 - only placeholders
                    f" WHERE receipt_key IN ({marks})",
                    chunk,
                ).fetchall()
                self._db.execute(
                    f"DELETE FROM outbox WHERE receipt_key IN ({marks})",  # noqa: S608
                    chunk,
                )
            if removed:
                self._outbox_count -= len(removed)
                self._outbox_bytes -= sum(int(size) for _, size in removed)
                self._db.execute(
                    "INSERT INTO counters (name, value) VALUES ('receipted_id_max', ?)"
                    " ON CONFLICT(name) DO UPDATE SET value = MAX(value, excluded.value)",
                    (max(int(entry_id) for entry_id, _ in removed),),
                )
        return len(removed)

    def outbox_awaiting_receipt(self) -> int:
        with self._lock, self._reading():
            row = self._db.execute("SELECT COUNT(*) FROM outbox WHERE sent_at IS NOT NULL")
            return int(row.fetchone()[0])

    def outbox_remove(self, ids: Iterable[int]) -> None:
        id_list = list(ids)
        if not id_list:
            return
        with self._lock, self._transaction():
            for chunk_start in range(0, len(id_list), 500):
                chunk = id_list[chunk_start : chunk_start + 500]
                marks = ",".join("?" * len(chunk))
                sizes = self._db.execute(
                    f"SELECT COUNT(*), COALESCE(SUM(LENGTH(payload)), 0) FROM outbox"  # noqa: S608
                    f" WHERE id IN ({marks})",
                    chunk,
                ).fetchone()
                self._db.execute(f"DELETE FROM outbox WHERE id IN ({marks})", chunk)  # noqa: S608
                self._outbox_count -= int(sizes[0])
                self._outbox_bytes -= int(sizes[1])

    def outbox_size(self) -> tuple[int, int]:
        """(messages, payload bytes) waiting to be sent."""
        with self._lock:
            return self._outbox_count, self._outbox_bytes

    # --------------------------------------------------------------------------- counters
    def counter(self, name: str, default: int = 0) -> int:
        with self._lock, self._reading():
            row = self._db.execute("SELECT value FROM counters WHERE name = ?", (name,)).fetchone()
        return default if row is None else int(row[0])

    def counters(self) -> dict[str, int]:
        with self._lock, self._reading():
            rows = self._db.execute("SELECT name, value FROM counters").fetchall()
        return {name: int(value) for name, value in rows}

    def set_counters(self, values: Mapping[str, int]) -> None:
        with self._lock, self._transaction():
            self._set_counters(values)

    def _set_counters(self, values: Mapping[str, int]) -> None:
        self._db.executemany(
            "INSERT INTO counters (name, value) VALUES (?, ?)"
            " ON CONFLICT(name) DO UPDATE SET value = excluded.value",
            list(values.items()),
        )

    def _add_counter(self, name: str, amount: int) -> None:
        self._db.execute(
            "INSERT INTO counters (name, value) VALUES (?, ?)"
            " ON CONFLICT(name) DO UPDATE SET value = value + excluded.value",
            (name, amount),
        )

    # --------------------------------------------------------------------------- windows
    def _remember_window(self, prediction_id: str, model_version: str, window: Window) -> None:
        self._recent_order += 1
        self._db.execute(
            "INSERT OR REPLACE INTO recent_windows (prediction_id, created_order, model_version,"
            " window) VALUES (?, ?, ?, ?)",
            (prediction_id, self._recent_order, model_version, samples_to_bytes(window)),
        )
        self._db.execute(
            "DELETE FROM recent_windows WHERE created_order <= ?",
            (self._recent_order - self._recent_max,),
        )

    def recent_window(self, prediction_id: str) -> Window | None:
        """The window a recent prediction was made on, or None if unknown or expired."""
        with self._lock, self._reading():
            row = self._db.execute(
                "SELECT window FROM recent_windows WHERE prediction_id = ?", (prediction_id,)
            ).fetchone()
        return None if row is None else samples_from_bytes(row[0])

    # --------------------------------------------------------------------------- confirmations
    def add_confirmation(self, prediction_id: str, label: str, window: Window, ts: float) -> Stored:
        """Keep a confirmed window: "new", "corrected" (a later answer with another label
        replaces the earlier one, to be learned again), "duplicate" (nothing changes) or
        "forgotten" (given before the wearer's last forget: not kept).

        When the set is full, the oldest window of the most represented label goes, so a
        user who confirms mostly one activity does not crowd the others out.
        """
        with self._lock, self._transaction():
            horizon = self._db.execute(
                "SELECT value FROM facts WHERE name = 'forgotten_before'"
            ).fetchone()
            if horizon is not None and ts <= horizon[0]:
                return "forgotten"
            row = self._db.execute(
                "SELECT label, ts FROM replay WHERE prediction_id = ?", (prediction_id,)
            ).fetchone()
            if row is not None:
                if row[0] == label or ts < row[1]:
                    return "duplicate"
                self._db.execute(
                    "UPDATE replay SET label = ?, ts = ?, applied = 0, record = NULL"
                    " WHERE prediction_id = ?",
                    (label, ts, prediction_id),
                )
                return "corrected"
            self._db.execute(
                "INSERT INTO replay (prediction_id, label, window, applied, created, ts)"
                " VALUES (?, ?, ?, 0, ?, ?)",
                (prediction_id, label, samples_to_bytes(window), time.time(), ts),
            )
            while int(self._db.execute("SELECT COUNT(*) FROM replay").fetchone()[0]) > (
                self._replay_max
            ):
                self._db.execute(
                    "DELETE FROM replay WHERE rowid = (SELECT rowid FROM replay WHERE label ="
                    " (SELECT label FROM replay GROUP BY label ORDER BY COUNT(*) DESC, label"
                    " LIMIT 1) ORDER BY created, rowid LIMIT 1)"
                )
            return "new"

    def mark_learned(self, records: Mapping[str, str | None]) -> None:
        """These confirmations are learned, with the guard's record of each (None: none)."""
        rows = [(record, pid) for pid, record in records.items()]
        with self._lock, self._transaction():
            self._db.executemany(
                "UPDATE replay SET applied = 1, record = ? WHERE prediction_id = ?", rows
            )

    def mark_pending_except(self, learned: Iterable[str]) -> None:
        """Every confirmation but ``learned`` is to be learned again (a new version's ways were
        fitted before it arrived, or with another label)."""
        keep = set(learned)
        with self._lock, self._transaction():
            every = [row[0] for row in self._db.execute("SELECT prediction_id FROM replay")]
            self._db.executemany(
                "UPDATE replay SET applied = 0 WHERE prediction_id = ?",
                [(pid,) for pid in every if pid not in keep],
            )

    def forget_confirmations(self, before: float, tell: tuple[Outbound, str] | None = None) -> int:
        """Delete every confirmed window (the wearer asked at ``before``, the forget's ts) and
        keep confirmations given until then out; returns how many there were. ``tell``: the
        message (and its receipt key) that tells the trainer, queued in the same transaction,
        so that the two never part."""
        with self._lock, self._transaction():
            forgotten = int(self._db.execute("DELETE FROM replay").rowcount)
            self._db.execute(
                "INSERT INTO facts (name, value) VALUES ('forgotten_before', ?)"
                " ON CONFLICT(name) DO UPDATE SET value = MAX(value, excluded.value)",
                (before,),
            )
            if tell is not None:
                self._insert_outbox(tell[0], Priority.NORMAL, tell[1])
                self._evict_if_full()
            return forgotten

    def command_handled(self, request_id: str) -> bool:
        """True if a device command with this request id was carried out already."""
        with self._lock, self._reading():
            row = self._db.execute(
                "SELECT 1 FROM handled_commands WHERE request_id = ?", (request_id,)
            ).fetchone()
            return row is not None

    def mark_command_handled(self, request_id: str) -> None:
        """Remember that the command ``request_id`` was carried out (the newest few only)."""
        with self._lock, self._transaction():
            self._db.execute(
                "INSERT OR IGNORE INTO handled_commands (request_id, handled) VALUES (?, ?)",
                (request_id, time.time()),
            )
            self._db.execute(
                "DELETE FROM handled_commands WHERE rowid <= (SELECT MAX(rowid) FROM"
                " handled_commands) - ?",
                (HANDLED_COMMANDS_KEPT,),
            )

    def replay_entries(self) -> list[ReplayEntry]:
        """Confirmed windows, oldest first."""
        with self._lock, self._reading():
            rows = self._db.execute(
                "SELECT prediction_id, label, window, applied, record"
                " FROM replay ORDER BY created, rowid"
            ).fetchall()
        return [
            ReplayEntry(
                row[0],
                row[1],
                samples_from_bytes(row[2]),
                bool(row[3]),
                None if row[4] is None else str(row[4]),
            )
            for row in rows
        ]

    def replay_count(self) -> int:
        with self._lock, self._reading():
            return int(self._db.execute("SELECT COUNT(*) FROM replay").fetchone()[0])

    # --------------------------------------------------------------------------- plumbing
    def _transaction(self) -> _Transaction:
        return _Transaction(self._db, self._path)

    def _reading(self) -> _Reading:
        return _Reading(self._path)


class _Reading:
    """Turns an ``sqlite3.Error`` of a read into ``StorageError``, like ``_Transaction`` does."""

    def __init__(self, path: Path) -> None:
        self._path = path

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: object, exc: BaseException | None, traceback: object) -> None:
        if isinstance(exc, sqlite3.Error):
            raise StorageError(f"cannot read {self._path}: {exc}") from exc


class _Transaction:
    """BEGIN IMMEDIATE ... COMMIT, rolled back on any error, errors as ``StorageError``."""

    def __init__(self, db: sqlite3.Connection, path: Path) -> None:
        self._db = db
        self._path = path

    def __enter__(self) -> None:
        try:
            self._db.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            raise StorageError(f"cannot write {self._path}: {exc}") from exc

    def __exit__(self, exc_type: object, exc: BaseException | None, traceback: object) -> None:
        try:
            if exc is None:
                self._db.execute("COMMIT")
            elif self._db.in_transaction:  # SQLITE_FULL, for one, has rolled it back already
                self._db.execute("ROLLBACK")
        except sqlite3.Error as error:
            if self._db.in_transaction:  # a failed COMMIT leaves it open
                self._db.execute("ROLLBACK")
            raise StorageError(f"cannot commit to {self._path}: {error}") from error
        if isinstance(exc, sqlite3.Error):
            raise StorageError(f"cannot write {self._path}: {exc}") from exc


_ENTRY_COLUMNS = "id, topic, payload, qos, retain, content_type, receipt_key, resends"


def _entry(row: tuple[Any, ...]) -> OutboxEntry:
    return OutboxEntry(
        id=int(row[0]),
        message=Outbound(
            topic=str(row[1]),
            payload=bytes(row[2]),
            qos=int(row[3]),
            retain=bool(row[4]),
            content_type=str(row[5]),
        ),
        receipt_key=None if row[6] is None else str(row[6]),
        resends=int(row[7]),
    )
