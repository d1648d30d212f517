"""The store contract, run against both backends (SQLite file, PostgreSQL database), and what is
particular to each: schema bookkeeping, the leader lock, a lost PostgreSQL connection."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from shared.config import redact_url
from shared.errors import PayloadError, StorageError
from shared.messages import Confirmation, DeviceStatus, Prediction, SensorBatch, WindowRef
from trainer_service.settings import StoreSettings
from trainer_service.store import (
    HANDLED_KEEP_S,
    SCHEMA_VERSION,
    SqliteStore,
    Store,
    VersionAccuracy,
)
from trainer_service.stores import open_store

REPO = Path(__file__).resolve().parent.parent
MakeStore = Callable[..., Store]


def batch(device: str, seq: int, n: int = 20) -> SensorBatch:
    samples = (np.arange(n * 3, dtype=np.float32).reshape(n, 3) + seq * 1000) / 100
    return SensorBatch(device, seq, 20.0, 1_700_000_000_000_000_000 + seq, samples)


def prediction(device: str, pid: str, seq: int, offset: int, length: int) -> Prediction:
    return Prediction(pid, device, WindowRef(seq, offset, length), "Walking", 0, (1.0,), "v1", 1.0)


# ------------------------------------------------------------------------------ the contract


def test_batches_are_stored_once_per_device_and_sequence_number(make_store: MakeStore) -> None:
    store = make_store()
    with store.transaction() as writer:
        assert writer.add_batch(batch("d1", 0))
        assert writer.add_batch(batch("d2", 0))
        assert not writer.add_batch(batch("d1", 0))  # a redelivery
    second = make_store()  # another replica on the same store
    with second.transaction() as writer:
        assert not writer.add_batch(batch("d2", 0))
        assert writer.add_batch(batch("d2", 1))
    assert store.counts().batches == 3
    assert store.counts().devices == 2
    np.testing.assert_array_equal(store.batch("d1", 0), batch("d1", 0).samples)
    assert store.batch("d1", 7) is None


def test_confirmation_joins_a_window_that_spans_batches_even_when_they_arrive_late(
    make_store: MakeStore,
) -> None:
    store = make_store()
    with store.transaction() as writer:
        writer.add_batch(batch("d1", 5))
        writer.add_prediction(prediction("d1", "p1", 5, 15, 16))  # samples 15..19 + 0..10 of 6
        assert writer.add_confirmation("d1", Confirmation("p1", "Sitting", "user", 2.0)) == "new"
        assert writer.add_confirmation("d1", Confirmation("p1", "Sitting", "user", 2.0)) == (
            "duplicate"
        )
    assert store.confirmed_windows() == []  # batch 6 is still missing
    assert store.confirmation_count() == 1
    with store.transaction() as writer:
        writer.add_batch(batch("d1", 6))
    assert store.join_pending() == 1
    [window] = store.confirmed_windows()
    expected = np.concatenate([batch("d1", 5).samples, batch("d1", 6).samples])[15:31]
    np.testing.assert_array_equal(window.window, expected)
    assert (window.label, window.device_id) == ("Sitting", "d1")


def test_a_later_answer_replaces_the_label_and_the_next_retrain_reads_it(
    make_store: MakeStore,
) -> None:
    """As on the device: the answer with the larger ts wins; an older one changes nothing."""
    store = make_store()
    with store.transaction() as writer:
        writer.add_batch(batch("d1", 0))
        writer.add_prediction(prediction("d1", "p1", 0, 0, 10))
        assert writer.add_confirmation("d1", Confirmation("p1", "Sitting", "user", 2.0)) == "new"
        assert writer.add_confirmation("d1", Confirmation("p1", "Walking", "app", 5.0)) == (
            "corrected"
        )
    [window] = store.confirmed_windows()  # what a retrain learns from
    assert window.label == "Walking"
    second = make_store()  # another replica
    with second.transaction() as writer:
        older = Confirmation("p1", "Laying", "user", 3.0)  # a late redelivery of an older answer
        assert writer.add_confirmation("d1", older) == "duplicate"
        assert writer.add_confirmation("d2", Confirmation("p1", "Laying", "user", 9.0)) == (
            "foreign"  # another device's word never relabels d1's window
        )
        assert writer.add_confirmation("d1", Confirmation("p1", "Standing", "user", 5.0)) == (
            "corrected"  # as late as the stored one, and another label: the later word
        )
    assert [w.label for w in store.confirmed_windows()] == ["Standing"]
    assert store.confirmation_count() == 1


def test_forget_deletes_a_devices_answers_and_keeps_them_out(make_store: MakeStore) -> None:
    store = make_store()
    with store.transaction() as writer:
        writer.add_batch(batch("d1", 0))
        writer.add_batch(batch("d2", 0))
        for device, pid, ts in (("d1", "a", 1.0), ("d1", "b", 2.0), ("d2", "c", 1.5)):
            writer.add_prediction(prediction(device, pid, 0, 0, 10))
            assert writer.add_confirmation(device, Confirmation(pid, "Sitting", "user", ts))
    with store.transaction() as writer:
        assert writer.forget_confirmations("d1", 2.0) == 2
        assert writer.forget_confirmations("d1", 1.0) == 0  # an older forget: the horizon stays
    assert [(w.device_id, w.prediction_id) for w in store.confirmed_windows()] == [("d2", "c")]
    second = make_store()
    with second.transaction() as writer:
        # A relayed answer from before the forget, arriving late, is not stored again ...
        assert writer.add_confirmation("d1", Confirmation("b", "Walking", "user", 2.0)) == (
            "forgotten"
        )
        # ... one given after it is.
        writer.add_prediction(prediction("d1", "e", 0, 0, 10))
        assert writer.add_confirmation("d1", Confirmation("e", "Laying", "user", 2.5)) == "new"
    assert sorted(w.prediction_id for w in store.confirmed_windows()) == ["c", "e"]
    assert store.batch("d1", 0) is not None  # sensor batches stay, under the retention policy


def test_confirmation_on_another_devices_topic_never_labels_the_window(
    make_store: MakeStore,
) -> None:
    store = make_store()
    with store.transaction() as writer:
        writer.add_batch(batch("d1", 0))
        writer.add_prediction(prediction("d1", "p1", 0, 0, 10))
        assert writer.add_confirmation("d2", Confirmation("p1", "Sitting", "user", 2.0)) == (
            "foreign"
        )
    assert store.join_pending() == 0
    assert store.counts().joined == 0
    assert store.confirmation_count() == 0  # refused, not stored


def test_two_devices_using_one_prediction_id_each_keep_their_own(make_store: MakeStore) -> None:
    """Prediction ids are unique per device only: rows are keyed by (device, id), so one device
    can neither shadow another's prediction nor take its confirmation."""
    store = make_store()
    with store.transaction() as writer:
        for device in ("d1", "d2"):
            writer.add_batch(batch(device, 0))
        assert writer.add_prediction(prediction("d1", "same", 0, 0, 10))
        assert writer.add_prediction(prediction("d2", "same", 0, 5, 10))  # stored, not shadowed
        assert writer.add_confirmation("d2", Confirmation("same", "Walking", "user", 1.0)) == (
            "new"
        )
        assert writer.add_confirmation("d1", Confirmation("same", "Sitting", "user", 2.0)) == (
            "new"  # not a "duplicate" of d2's
        )
    windows = {w.device_id: w for w in store.confirmed_windows()}
    assert {d: w.label for d, w in windows.items()} == {"d1": "Sitting", "d2": "Walking"}
    np.testing.assert_array_equal(windows["d2"].window, batch("d2", 0).samples[5:15])
    assert store.counts().predictions == 2


def test_confirmed_windows_come_in_pages_in_order_each_once(make_store: MakeStore) -> None:
    """What a retrain round writes out a page at a time: every confirmed window once, oldest
    first, ties (one transaction, one clock reading) broken by device and id."""
    store = make_store()
    with store.transaction() as writer:
        for device in ("d1", "d2"):
            writer.add_batch(batch(device, 0))
            for i in range(4 if device == "d1" else 3):
                assert writer.add_prediction(prediction(device, f"p{i}", 0, i, 10))
                answer = Confirmation(f"p{i}", "Walking", "user", 1.0)
                assert writer.add_confirmation(device, answer) == "new"
    pages = list(store.confirmed_window_pages(page_size=3))
    assert [len(page) for page in pages] == [3, 3, 1]
    paged = [window for page in pages for window in page]
    assert [(w.device_id, w.prediction_id) for w in paged] == sorted(
        (w.device_id, w.prediction_id) for w in store.confirmed_windows()
    )
    assert [(w.received, w.device_id, w.prediction_id) for w in paged] == sorted(
        (w.received, w.device_id, w.prediction_id) for w in paged
    )
    d2_p1 = next(w for w in paged if (w.device_id, w.prediction_id) == ("d2", "p1"))
    np.testing.assert_array_equal(d2_p1.window, batch("d2", 0).samples[1:11])


def test_an_answer_corrected_while_a_round_reads_its_pages_comes_once(
    make_store: MakeStore,
) -> None:
    """A correction moves its row to the end (it is received again): a round reading pages
    meanwhile must not read it twice, once with each label; it reads it in the next round."""
    now = [1000.0]
    store = make_store(clock=lambda: now[0])
    with store.transaction() as writer:
        writer.add_batch(batch("d1", 0))
        for i in range(3):
            writer.add_prediction(prediction("d1", f"p{i}", 0, i, 10))
            now[0] += 1
            assert writer.add_confirmation("d1", Confirmation(f"p{i}", "Walking", "user", 1.0))
    pages = store.confirmed_window_pages(page_size=1)
    read = list(next(pages))  # p0
    now[0] += 100
    with store.transaction() as writer:  # the wearer corrects p0 (read) and p2 (not yet)
        for pid in ("p0", "p2"):
            writer.add_confirmation("d1", Confirmation(pid, "Sitting", "user", 2.0))
    read += [window for page in pages for window in page]
    assert [(w.prediction_id, w.label) for w in read] == [("p0", "Walking"), ("p1", "Walking")]
    assert sorted((w.prediction_id, w.label) for w in store.confirmed_windows()) == [
        ("p0", "Sitting"),
        ("p1", "Walking"),
        ("p2", "Sitting"),
    ]


def test_retention_deletes_old_batches_but_keeps_confirmed_windows(make_store: MakeStore) -> None:
    now = [1000.0]
    store = make_store(clock=lambda: now[0])
    with store.transaction() as writer:
        for seq in range(10):
            writer.add_batch(batch("d1", seq))
        writer.add_prediction(prediction("d1", "p1", 0, 0, 10))
        writer.add_confirmation("d1", Confirmation("p1", "Sitting", "user", 2.0))
    now[0] = 1000.0 + 86400 * 2
    with store.transaction() as writer:
        for seq in range(10, 15):
            writer.add_batch(batch("d1", seq))
    removed = store.apply_retention(max_age_s=86400, max_batches_per_device=3)
    assert removed == 12
    assert store.batch_seqs("d1") == [12, 13, 14]
    assert len(store.confirmed_windows()) == 1


def test_accuracy_statuses_and_meta(make_store: MakeStore) -> None:
    store = make_store()
    with store.transaction() as writer:
        for pid, label, version in (("p1", "Walking", "v1"), ("p2", "Walking", "v1")):
            writer.add_prediction(
                Prediction(pid, "d1", WindowRef(0, 0, 10), label, 0, (1.0,), version, 1.0)
            )
        writer.add_confirmation("d1", Confirmation("p1", "Walking", "user", 2.0))
        writer.add_confirmation("d1", Confirmation("p2", "Jogging", "user", 2.0))
        writer.update_status(DeviceStatus("d3", "online", "v1", 3.0, {"batches": 4}))
        writer.set_meta("retrain_request", "command a")
        writer.set_meta("retrain_request", "command b")  # the last one wins
    assert store.accuracy_by_version() == {"v1": VersionAccuracy(confirmed=2, correct=1)}
    assert store.devices_by_state() == {"online": 1, "unknown": 1}
    assert store.meta("retrain_request") == "command b"
    assert store.take_meta("retrain_request") == "command b"
    assert store.take_meta("retrain_request") is None


def test_a_failed_transaction_stores_nothing(make_store: MakeStore) -> None:
    store = make_store()

    def failing_group() -> None:
        with store.transaction() as writer:
            writer.add_batch(batch("d1", 0))
            raise RuntimeError("the group failed")

    with pytest.raises(RuntimeError):
        failing_group()
    assert store.counts().batches == 0
    assert store.counts().devices == 0


def test_every_store_read_raises_storage_error(make_store: MakeStore) -> None:
    store = make_store()
    store.close()
    for read in (
        store.counts,
        store.confirmed_windows,
        store.join_pending,
        store.confirmation_count,
        lambda: store.batch_seqs("d1"),
        lambda: store.batch("d1", 0),
        lambda: store.schema_version,
    ):
        with pytest.raises(StorageError, match="cannot read"):
            read()


def test_a_version_1_store_is_migrated_and_keeps_its_confirmations(tmp_path: Path) -> None:
    from trainer_service.store import _MIGRATIONS

    path = tmp_path / "trainer.sqlite3"
    with sqlite3.connect(path) as db:
        db.executescript(_MIGRATIONS[0])
        db.execute(
            "INSERT INTO confirmations (prediction_id, device_id, label, source, ts, received)"
            " VALUES ('p1', 'd1', 'Sitting', 'user', 2.0, 2.0)"
        )
        db.execute("PRAGMA user_version = 1")
    store = SqliteStore(path)
    try:
        assert store.schema_version == SCHEMA_VERSION
        assert store.confirmation_count() == 1
        with store.transaction() as writer:
            assert writer.forget_confirmations("d1", 5.0) == 1
    finally:
        store.close()


def test_a_key_is_handled_once_across_replicas_and_forgotten_after_a_week(
    make_store: MakeStore,
) -> None:
    now = [1000.0]
    store = make_store(clock=lambda: now[0])
    with store.transaction() as writer:
        assert writer.first_time("command:a")
        assert not writer.first_time("command:a")
    with make_store().transaction() as writer:  # another replica
        assert not writer.first_time("command:a")
        assert writer.first_time("command:b")
    now[0] += HANDLED_KEEP_S + 1
    store.apply_retention(max_age_s=1e9, max_batches_per_device=10)
    with store.transaction() as writer:
        assert writer.first_time("command:a")  # redeliveries stop long before this


def test_a_version_2_store_is_rekeyed_by_device_and_keeps_every_row(
    make_store: MakeStore, store_url: str
) -> None:
    """Migration 3 on both back ends: predictions and confirmations keyed by (device, id)."""
    if store_url.startswith("sqlite://"):
        from trainer_service.store import _MIGRATIONS

        path = Path(store_url.removeprefix("sqlite://"))
        path.parent.mkdir(parents=True, exist_ok=True)
        with sqlite3.connect(path) as db:
            db.executescript(_MIGRATIONS[0] + _MIGRATIONS[1])
            db.execute("PRAGMA user_version = 2")
            version_2_rows(db.execute)
    else:
        import psycopg

        from trainer_service.store_postgres import _MIGRATIONS as PG_MIGRATIONS

        with psycopg.connect(store_url, autocommit=True) as pg:
            pg.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
            pg.execute(PG_MIGRATIONS[0] + PG_MIGRATIONS[1])
            pg.execute("INSERT INTO schema_version (version) VALUES (2)")
            version_2_rows(lambda sql, args: pg.execute(sql.replace("?", "%s"), args))
    store = make_store()
    assert store.schema_version == SCHEMA_VERSION
    assert store.counts().predictions == 1
    assert [(w.device_id, w.prediction_id, w.label) for w in store.confirmed_windows()] == [
        ("d1", "p1", "Sitting")
    ]
    with store.transaction() as writer:  # the new key: another device's id is its own
        assert writer.add_prediction(prediction("d2", "p1", 0, 0, 10))
    assert store.counts().predictions == 2


def version_2_rows(execute: Callable[[str, tuple[object, ...]], object]) -> None:
    """A version 2 store's rows: one prediction, its confirmation joined to its window."""
    execute(
        'INSERT INTO predictions (prediction_id, device_id, batch_seq, "offset", length, label,'
        " model_version, ts, received) VALUES (?, ?, 0, 0, 10, ?, 'v1', 1.0, 1.0)",
        ("p1", "d1", "Sitting"),
    )
    window = batch("d1", 0).samples[:10].astype("<f4").tobytes()
    execute(
        "INSERT INTO confirmations (prediction_id, device_id, label, source, ts, received,"
        ' "window", window_length, joined) VALUES (?, ?, ?, ?, 2.0, 2.0, ?, 10, 2.0)',
        ("p1", "d1", "Sitting", "user", window),
    )


def test_schema_is_versioned_and_a_newer_one_is_refused(
    make_store: MakeStore, store_url: str
) -> None:
    store = make_store()
    assert store.schema_version == SCHEMA_VERSION == 4
    if isinstance(store, SqliteStore):
        store.close()
        with sqlite3.connect(store_url.removeprefix("sqlite://")) as db:
            db.execute("PRAGMA user_version = 99")
    else:
        with store.transaction() as writer:
            writer.execute("UPDATE schema_version SET version = 99")
    with pytest.raises(StorageError, match="schema 99"):
        make_store()


def test_one_leader_at_a_time_and_the_lock_is_free_once_its_process_dies(
    make_store: MakeStore, store_url: str
) -> None:
    store = make_store()
    first, second = store.leader_lock(), make_store().leader_lock()
    assert first.try_acquire()
    assert first.try_acquire()  # still held
    assert not second.try_acquire()
    first.release()
    assert second.try_acquire()
    second.release()
    # A process that holds it, killed with SIGKILL: the lock is free within a second.
    with subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys; from trainer_service.stores import open_store\n"
            "lock = open_store(sys.argv[1]).leader_lock()\n"
            "assert lock.try_acquire(); print('held', flush=True); sys.stdin.read()",
            store_url,
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        cwd=REPO,
    ) as holder:
        try:
            assert holder.stdout is not None
            assert holder.stdout.readline() == b"held\n"
            assert not first.try_acquire()
            holder.kill()
            holder.wait(10)
            killed = time.monotonic()
            while not first.try_acquire():
                assert time.monotonic() - killed < 5.0, "the dead holder's lock was never freed"
                time.sleep(0.02)  # a bounded poll, as a replica's retrain loop does every second
            assert time.monotonic() - killed < 2.0
        finally:
            holder.kill()
            first.release()


# ------------------------------------------------------------------------------ each backend


def test_sqlite_and_postgresql_have_the_same_schema(tmp_path: Path, postgres_url: str) -> None:
    def columns(store: Store, sql: str) -> set[tuple[str, str]]:
        with store.transaction() as writer:
            return {(row[0], row[1]) for row in writer.fetchall(sql)}

    lite = open_store(f"sqlite://{tmp_path / 't.sqlite3'}")
    postgres = open_store(postgres_url)
    try:
        ours = columns(
            lite,
            "SELECT m.name, p.name FROM sqlite_master m, pragma_table_info(m.name) p"
            " WHERE m.type = 'table'",
        )
        theirs = columns(
            postgres,
            "SELECT table_name, column_name FROM information_schema.columns"
            " WHERE table_schema = 'public' AND table_name <> 'schema_version'",
        )
    finally:
        lite.close()
        postgres.close()
    assert ours == theirs
    assert ("batches", "samples") in ours


def test_postgres_refuses_a_nul_in_text_as_bad_input_and_keeps_the_rest(
    postgres_url: str,
) -> None:
    store = open_store(postgres_url)
    try:
        with store.transaction() as writer:
            assert writer.add_batch(batch("d1", 0))
            bad = Prediction("p\x00", "d1", WindowRef(0, 0, 10), "Walking", 0, (1.0,), "v1", 1.0)
            with pytest.raises(PayloadError, match="NUL"):
                writer.add_prediction(bad)
            assert writer.add_prediction(prediction("d1", "p2", 0, 0, 10))
        assert store.counts().predictions == 1
        assert store.batch_seqs("d1") == [0]
    finally:
        store.close()


def test_postgres_store_comes_back_after_its_connection_is_cut(
    postgres_url: str, postgres_server: object
) -> None:
    import psycopg

    store = open_store(postgres_url)
    try:
        with store.transaction() as writer:
            writer.add_batch(batch("d1", 0))
        with psycopg.connect(postgres_url, autocommit=True) as admin:
            # As a server restart would: every other session of this database ends.
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
        with pytest.raises(StorageError):
            store.counts()  # the statement that finds the connection gone
        assert store.batch_seqs("d1") == [0]  # the next one connects again
    finally:
        store.close()


def test_store_settings_never_show_a_password(postgres_server: object) -> None:
    url = "postgresql://har:s3cret-pw@127.0.0.1:1/har"
    assert "s3cret-pw" not in repr(StoreSettings(url=url))
    assert redact_url(url) == "postgresql://har:<redacted>@127.0.0.1:1/har"
    with pytest.raises(StorageError) as refused:
        open_store(url)
    assert "s3cret-pw" not in str(refused.value)
    assert "127.0.0.1:1" in str(refused.value)
