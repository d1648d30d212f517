"""``har trainer serve``: ingest the fleet, retrain behind a quality gate, redistribute models.

Threads:

- **ingest**: takes messages from the transport's queue in groups, decodes them, writes a group
  in one transaction, commits, and only then acknowledges each message to the broker. A kill -9
  at any instant loses nothing: what was not committed was not acknowledged, and the broker
  delivers it again to the persistent session; storage deduplicates what was.
- **retrain**: takes or keeps the leader lock (``Store.leader_lock``) every second; only the
  leader retrains and publishes models. It looks in the store for a trigger (N confirmations
  stored since the last round, by any replica; the interval; a command, which whichever replica
  received it left in the store's ``meta`` table), runs a round and publishes the new version.
  The round trains in a child process at a lower CPU priority
  (``trainer_service.retrain_process``): TensorFlow's memory goes back to the system after
  each round, and ingest keeps the CPU first; this process signs and promotes. Several
  ``har trainer serve`` replicas on one store and one ``$share`` group split the ingest; when
  the leader dies, another takes the lock within about a second.
- **metrics** (``[metrics] port``, off by default): prometheus_client's HTTP server answers
  ``/metrics`` from the status counters and the store on its own thread.
- **upkeep**: joins late confirmations, applies retention, publishes the service's status, and,
  on the leader, publishes the current model again after every (re)connect (a broker that lost
  its retained messages gets them back) and on becoming leader.

Failures follow ``shared.supervision``: a failing message or job is logged, counted, published on
the error topic and skipped; a loop that dies anyway makes ``run()`` publish a ``thread_died``
error event and a "failed" status, shut down, and return ``EXIT_THREAD_DIED`` so that systemd
restarts the service.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from shared import codec
from shared.counters import Counters
from shared.errors import BrokerError, ConfigError, HarError, PayloadError, StorageError
from shared.messages import DeviceState, DeviceStatus, ErrorEvent
from shared.mqtt_transport import (
    InboundMessage,
    MqttConnection,
    Outbound,
    PublishHandle,
    PublishRefusedError,
)
from shared.signing import load_private_key
from shared.supervision import EXIT_THREAD_DIED, Supervisor
from shared.topics import Topics
from trainer_service.distribution import current_release_messages, publish_all
from trainer_service.metrics import MetricsServer, TrainerCollector
from trainer_service.receipts import ReceiptBook
from trainer_service.registry import ModelRegistry
from trainer_service.retrain import RetrainOutcome
from trainer_service.retrain_process import RetrainProcess
from trainer_service.settings import TrainerSettings
from trainer_service.store import (
    META_RETRAIN_BASELINE,
    META_RETRAIN_REQUEST,
    Writer,
)
from trainer_service.stores import open_store

log = logging.getLogger(__name__)

PUBLISH_RETRY_S = 30.0  # after a failed publish of the current model on this connection
LEADER_POLL_S = 1.0  # how often the retrain loop checks the leader lock and the triggers
_REPORT_WAIT_S = 5.0  # the longest an error event waits for room to be published
# The counter each outcome of storing a confirmation adds to.
_CONFIRMATION_COUNTERS = {
    "new": "confirmations",
    "corrected": "confirmations_corrected",
    "duplicate": "confirmations_duplicate",
    "forgotten": "confirmations_after_forget",
    "foreign": "confirmations_foreign",
}


class ForeignPredictionError(PayloadError):
    """A confirmation on one device's topic names a prediction another device made."""


class TrainerService:
    def __init__(
        self, settings: TrainerSettings, *, clock: Callable[[], float] = time.time
    ) -> None:
        self._settings = settings
        self._clock = clock
        self._topics = Topics(settings.broker.topic_root)
        self.counters = Counters()
        self._last_counters: dict[str, int] = {}
        self.store = open_store(settings.store_url, password=settings.store.password(), clock=clock)
        self._leader_lock = self.store.leader_lock()
        self._leading = threading.Event()  # set while this process holds the leader lock
        self.registry = ModelRegistry(settings.registry_dir)
        # Statuses are composed on paho's thread too (birth): they read this, never the disk.
        self._current_version = self.registry.current()
        # (connection, version) the current model last went out on; written by whichever thread
        # publishes it (retrain or upkeep), read by upkeep.
        self._published: tuple[int, str] = (0, "")
        self._private_key = load_private_key(settings.private_key) if settings.private_key else None
        self._known = set(settings.ingest.known_devices)
        self._retrain_process = RetrainProcess(
            registry_dir=settings.registry_dir,
            base_data=settings.base_data,
            settings=settings.retrain,
        )
        self._stop = threading.Event()
        self._retrain_wake = threading.Event()  # look for a trigger now, not in a second
        self.retrain_done = threading.Event()  # set after every round (tests, demo)
        self.last_outcome: RetrainOutcome | None = None
        self._lock = threading.Lock()
        self._shut_down = False
        # (epoch, most epochs) of the retrain running now, (0, 0) between rounds: in the status.
        self._retrain_epoch = (0, 0)
        self._last_retrain = clock()
        self._inbox: queue.Queue[InboundMessage] = queue.Queue(maxsize=settings.ingest.queue_size)
        self._receipts = ReceiptBook()
        group = settings.ingest.shared_group
        root = self._topics
        self._connection = MqttConnection(
            settings.broker,
            client_id=settings.broker.client_id or f"har-trainer-{settings.instance}",
            subscriptions=[
                (f"$share/{group}/{root.all_sensor()}", 1),
                (f"$share/{group}/{root.all_prediction()}", 1),
                (f"$share/{group}/{root.all_confirmation()}", 1),
                (f"$share/{group}/{root.all_confirmed()}", 1),
                (f"$share/{group}/{root.all_forgotten()}", 1),
                (f"$share/{group}/{root.all_status()}", 1),
                (f"$share/{group}/{root.trainer_command()}", 1),
            ],
            inbox=self._inbox,
            will=self._status("offline", {}),
            # The birth runs on paho's network thread: it reuses the last counters rather than
            # counting rows in the store there.
            birth=lambda: [self._status("online", self._last_counters)],
            persistent_session=True,
            session_expiry_s=settings.ingest.session_expiry_s,
            counters=self.counters,  # inbox_overflow, publish_waits, ... in the status
        )
        self.metrics: MetricsServer | None = None  # started by start() when metrics.port > 0
        self._supervisor = Supervisor()
        self._supervisor.add("trainer-ingest", self._ingest_loop)
        self._supervisor.add("trainer-retrain", self._retrain_loop)
        self._supervisor.add("trainer-upkeep", self._upkeep_loop)

    # ================================================================== lifecycle
    def start(self) -> None:
        self.registry.remove_leftovers()
        self._start_metrics()
        self._connection.start()
        self._supervisor.start()

    def _start_metrics(self) -> None:
        metrics = self._settings.metrics
        if metrics.port == 0:
            return
        collector = TrainerCollector(
            self.status_counters, self.store.accuracy_by_version, self.store.devices_by_state
        )
        try:
            self.metrics = MetricsServer(collector, metrics.host, metrics.port)
        except OSError as exc:
            raise ConfigError(
                f"cannot serve metrics on {metrics.host}:{metrics.port}: {exc}"
            ) from exc

    def run(self) -> int:
        """Serve until ``request_stop``; 0, 3 (the broker refused us) or ``EXIT_THREAD_DIED``."""
        self.start()
        while not self._stop.is_set():
            if self._supervisor.wait(0.25):
                return self._after_thread_death()
            if self._connection.fatal_error is not None:
                log.error("broker refused the trainer: %s", self._connection.fatal_error)
                self.shutdown()
                return 3
        self.shutdown()
        return 0

    def _after_thread_death(self) -> int:
        """A loop died outside its per-job handling: say so, stop what is left, exit non-zero."""
        death = self._supervisor.death
        assert death is not None  # the supervisor woke us for it
        name, exc = death
        self.counters.add("threads_died")
        handle = self._report(
            "thread_died",
            f"thread {name} died ({type(exc).__name__}: {exc}); the trainer exits with code "
            f"{EXIT_THREAD_DIED} to be restarted",
        )
        if handle is not None:
            handle.wait(2.0)  # before the disconnect: the event is why the status says failed
        self.shutdown(final_state="failed")
        return EXIT_THREAD_DIED

    def request_stop(self) -> None:
        self._stop.set()

    def shutdown(self, final_state: DeviceState = "offline") -> None:
        """Finish the group being stored, say goodbye (``final_state``), disconnect. Idempotent."""
        self._stop.set()
        self._retrain_wake.set()
        self._retrain_process.stop()
        with self._lock:
            if self._shut_down:
                return
            self._shut_down = True
        for thread in self._supervisor.threads:
            if thread.ident is not None:
                thread.join(60)
        if self._connection.connected:
            counters = self._counters_or_last()  # the goodbye goes out even if the store fails
            try:
                self._connection.publish(self._status(final_state, counters), wait_s=2.0).wait(2.0)
            except BrokerError as exc:  # the will says offline instead
                log.warning("final status not published: %s", exc)
        self._connection.stop()
        if self.metrics is not None:
            self.metrics.close()  # before the store closes under a scrape
        self._leader_lock.release()
        self._leading.clear()
        try:
            self.store.close()
        except StorageError as exc:
            log.warning("%s", exc)

    def wait_connected(self, timeout: float) -> bool:
        return self._connection.wait_connected(timeout) and self._connection.wait_subscribed(
            timeout
        )

    @property
    def is_leader(self) -> bool:
        """True while this process holds the leader lock (it alone retrains and publishes)."""
        return self._leading.is_set()

    def request_retrain(self, reason: str) -> None:
        """Ask the leader, whichever replica it is, for a round (through the store)."""
        with self.store.transaction() as writer:
            writer.set_meta(META_RETRAIN_REQUEST, reason)
        self._retrain_wake.set()

    # ================================================================== status and errors
    def _status(self, state: DeviceState, counters: Mapping[str, int]) -> Outbound:
        status = DeviceStatus(
            device_id=self._settings.instance,
            state=state,
            model_version=self._current_version,
            ts=self._clock(),
            counters=counters,
        )
        return Outbound(
            self._topics.trainer_status(self._settings.instance),
            codec.encode_status(status),
            1,
            True,
        )

    def _refresh_counters(self) -> dict[str, int]:
        self._last_counters = self.status_counters()
        return self._last_counters

    def _counters_or_last(self) -> dict[str, int]:
        """Fresh counters, or the last ones when the store cannot be read (said in the log)."""
        try:
            return self._refresh_counters()
        except StorageError as exc:
            log.warning("status with the last known counts: %s", exc)
            return self._last_counters

    def status_counters(self) -> dict[str, int]:
        counts = self.counters.snapshot()
        stored = self.store.counts()
        counts.update(
            {
                "stored_batches": stored.batches,
                "stored_samples": stored.samples,
                "stored_predictions": stored.predictions,
                "stored_confirmations": stored.confirmations,
                "joined_confirmations": stored.joined,
                "devices": stored.devices,
                "inbox_depth": self._inbox.qsize(),
                "leader": int(self.is_leader),
            }
        )
        with self._lock:
            epoch, epochs = self._retrain_epoch
        counts["retrain_epoch"] = epoch
        counts["retrain_epochs_max"] = epochs
        return counts

    def _report(self, code: str, message: str, topic: str = "") -> PublishHandle | None:
        """Log, count and publish a handled error. Never raises: a report that cannot be
        published is counted (``error_events_lost``), and the loop that made it carries on."""
        log.warning("%s: %s (%s)", code, message, topic)
        self.counters.add(f"error_{code}")
        if not self._connection.connected:
            return None
        try:
            # Bad input quoted in a report may be unencodable or huge: escaped and cut to size.
            event = ErrorEvent.quoting(self._settings.instance, code, message, self._clock(), topic)
            return self._connection.publish(
                Outbound(self._topics.trainer_error(), codec.encode_error(event)),
                wait_s=_REPORT_WAIT_S,
            )
        except Exception as exc:  # whatever it is, the report must not kill a loop
            self.counters.add("error_events_lost")
            log.warning("error event %s not published: %s: %s", code, type(exc).__name__, exc)
            return None

    # ================================================================== ingest
    def _ingest_loop(self) -> None:
        limit = self._settings.ingest.commit_batch
        while not self._stop.is_set():
            try:
                group = [self._inbox.get(timeout=0.5)]
            except queue.Empty:
                continue
            while len(group) < limit:
                try:
                    group.append(self._inbox.get_nowait())
                except queue.Empty:
                    break
            self._ingest(group)

    def _ingest(self, group: list[InboundMessage]) -> None:
        problems: list[tuple[str, str, str]] = []
        new_confirmations = 0
        delay = 0.1
        while True:
            problems.clear()
            self._receipts.clear()
            try:
                with self.store.transaction() as writer:
                    new_confirmations = sum(
                        self._ingest_reported_once(writer, message, problems) for message in group
                    )
                break
            except StorageError as exc:
                # Nothing of the group was accepted: keep it unacknowledged and try again.
                log.error(  # noqa: TRY400 - the message says it all; no traceback per retry
                    "cannot store %d messages (%s): retrying in %.1f s", len(group), exc, delay
                )
                self.counters.add("storage_errors")
                if self._stop.wait(delay):
                    return  # unacknowledged: the broker redelivers them after a restart
                delay = min(delay * 2, 30.0)
        for message in group:
            message.ack()  # committed: now, and only now, accepted
        self.counters.add("messages_ingested", len(group))
        self.counters.add("payload_errors", sum(p[0] == "malformed_payload" for p in problems))
        try:
            # Waits while the broker has not answered many earlier publishes: back-pressure that
            # slows ingest down to what the broker takes, rather than queueing without bound.
            sent = self._receipts.send(self._connection, self._topics, self._clock())
            self.counters.add("receipts_sent", sent)
        except BrokerError as exc:
            # Stopping: the devices resend what was not receipted, and storage deduplicates it.
            self.counters.add("receipts_unsent")
            log.warning("receipts of a stored group not sent: %s", exc)
        for code, text, topic in problems:
            self._report(code, text, topic)
        if new_confirmations and self.is_leader:
            self._retrain_wake.set()  # count them now (a follower's are counted within a second)

    def _ingest_reported_once(
        self, writer: Writer, message: InboundMessage, problems: list[tuple[str, str, str]]
    ) -> int:
        """``_ingest_one``, reporting a message's problems once: a redelivery (MQTT's DUP flag:
        the broker did not get our acknowledgement) of a message already reported changes
        nothing in the store and reports nothing again. The same bytes sent again by a client
        are another message, reported again. The key is committed with the group."""
        before = len(problems)
        new = self._ingest_one(writer, message, problems)
        if (
            len(problems) > before
            and not writer.first_time("report:" + message.digest().hex())
            and message.redelivered
        ):
            del problems[before:]
            self.counters.add("reports_not_repeated")
        return new

    def _ingest_one(
        self, writer: Writer, message: InboundMessage, problems: list[tuple[str, str, str]]
    ) -> int:
        """Store one message; returns 1 for a new confirmation. Bad input goes to ``problems``."""
        topic = message.topic
        if topic == self._topics.trainer_command():
            self._command(writer, message, problems)
            return 0
        device = self._topics.device_of(topic)
        kind = self._topics.kind_of(topic)
        if device is None or kind is None:
            problems.append(
                ("unexpected_topic", "message on a topic the trainer does not know", topic)
            )
            return 0
        if self._known and device not in self._known:
            problems.append(
                ("unknown_device", f"device {device!r} is not in ingest.known_devices", topic)
            )
            return 0
        try:
            return self._store_message(writer, kind, device, message.payload)
        except ForeignPredictionError as exc:
            problems.append(("foreign_prediction", str(exc), topic))
        except PayloadError as exc:
            problems.append(("malformed_payload", str(exc), topic))
        except StorageError:
            raise  # the whole group is retried
        except Exception as exc:
            # A bug must not stop ingest: this message is reported and skipped.
            log.exception("ingest of a message on %s failed", topic)
            problems.append(("internal_error", f"{type(exc).__name__}: {exc}", topic))
        return 0

    def _store_message(self, writer: Writer, kind: str, device: str, payload: bytes) -> int:
        if kind == "sensor":
            batch = codec.decode_sensor_batch(payload)
            self._check_device(batch.device_id, device)
            self.counters.add("batches" if writer.add_batch(batch) else "batches_duplicate")
            self._receipts.batch(device, batch.seq)
        elif kind == "prediction":
            prediction = codec.decode_prediction(payload)
            self._check_device(prediction.device_id, device)
            writer.add_prediction(prediction)
            self.counters.add("predictions")
            self._receipts.prediction(device, prediction.prediction_id)
        elif kind in ("confirmation", "confirmed"):
            # "confirmed": one the device kept and relays, receipted so that it is sure to come.
            confirmation = codec.decode_confirmation(payload)
            stored = writer.add_confirmation(device, confirmation)
            self.counters.add(_CONFIRMATION_COUNTERS[stored])
            if stored == "foreign":
                raise ForeignPredictionError(
                    f"prediction {confirmation.prediction_id!r} is another device's, not "
                    f"{device!r}'s: the confirmation is not stored"
                )
            if kind == "confirmed":
                self._receipts.confirmation(device, confirmation.prediction_id)
            return int(stored == "new")
        elif kind == "forgotten":
            # The device forgot its confirmations: so does the store, and no retrain uses them.
            command = codec.decode_device_command(payload)
            if command.command != "forget":
                raise PayloadError(f"a {command.command} command on the forgotten topic")
            self._receipts.forget(device, command.request_id)
            if not writer.first_time(f"forget:{device}:{command.request_id}"):
                self.counters.add("forgets_duplicate")  # a redelivery: done, receipted again
                return 0
            removed = writer.forget_confirmations(device, command.ts)
            self.counters.add("forgets")
            self.counters.add("confirmations_forgotten", removed)
            log.info(
                "%s forgot its confirmations (request %s): %d deleted",
                device,
                command.request_id,
                removed,
            )
        elif kind == "status" and payload:  # an empty retained message clears a status
            status = codec.decode_status(payload)
            self._check_device(status.device_id, device)
            writer.update_status(status)
        return 0

    @staticmethod
    def _check_device(claimed: str, topic_device: str) -> None:
        if claimed != topic_device:
            raise PayloadError(
                f"payload names device {claimed!r} but arrived on {topic_device!r}'s topic"
            )

    def _command(
        self, writer: Writer, message: InboundMessage, problems: list[tuple[str, str, str]]
    ) -> None:
        try:
            command = codec.decode_command(message.payload)
        except PayloadError as exc:
            problems.append(("malformed_command", str(exc), message.topic))
            return
        if not writer.first_time(f"command:{command.request_id}"):
            # The same request again (a redelivery, or a client that sent it twice): run once.
            self.counters.add("commands_duplicate")
            return
        self.counters.add("commands")
        # For the leader, whichever replica this is; committed with the group, like any message.
        writer.set_meta(META_RETRAIN_REQUEST, f"command {command.request_id}")
        self._retrain_wake.set()

    # ================================================================== retraining
    def _retrain_loop(self) -> None:
        while not self._stop.is_set():
            self._retrain_wake.wait(timeout=LEADER_POLL_S)
            self._retrain_wake.clear()
            if self._stop.is_set():
                return
            try:
                reason = self._retrain_trigger() if self._lead() else None
            except (HarError, OSError) as exc:
                # The store or the lock is away for now: report it, look again in a second.
                self._report("retrain_trigger_failed", f"{type(exc).__name__}: {exc}")
                continue
            if reason is not None:
                self.retrain_once(reason)

    def _lead(self) -> bool:
        """Take or keep the leader lock; True while this process holds it."""
        held = self._leader_lock.try_acquire()
        if held and not self._leading.is_set():
            log.info("%s is the leader now: it retrains and publishes", self._settings.instance)
            self.counters.add("leader_acquired")
            self._last_retrain = self._clock()
            if self.store.meta(META_RETRAIN_BASELINE) is None:
                self._set_retrain_baseline()  # count from now, as a freshly started trainer does
            self._leading.set()  # upkeep publishes the current model on this connection now
        elif not held and self._leading.is_set():
            log.warning("%s lost the leader lock", self._settings.instance)
            self.counters.add("leader_lost")
            self._leading.clear()
        return held

    def _set_retrain_baseline(self) -> None:
        count = self.store.confirmation_count()
        with self.store.transaction() as writer:
            writer.set_meta(META_RETRAIN_BASELINE, str(count))

    def _retrain_trigger(self) -> str | None:
        """Why the leader should retrain now (None: no reason), from what every replica stored."""
        requested = self.store.take_meta(META_RETRAIN_REQUEST)
        if requested is not None:
            return requested
        retrain = self._settings.retrain
        new = self.store.confirmation_count() - int(self.store.meta(META_RETRAIN_BASELINE) or 0)
        if new >= retrain.min_new_confirmations:
            return f"{new} new confirmations"
        due = retrain.interval_s > 0 and self._clock() - self._last_retrain >= retrain.interval_s
        return "interval" if due and new > 0 else None

    def retrain_once(self, reason: str) -> RetrainOutcome | None:
        """One round, start to finish; reports instead of raising."""
        log.info("retraining (%s)", reason)
        self.counters.add("retrain_rounds")
        self._last_retrain = self._clock()
        outcome = None
        try:
            self._set_retrain_baseline()  # confirmations stored from now count for the next one
            private_key = self._require_private_key()
            self.store.join_pending()
            try:
                # In a child process at a lower CPU priority (trainer_service.retrain_process).
                outcome = self._retrain_process.run(
                    self.store.confirmed_window_pages(),
                    now=self._clock(),
                    on_epoch=self._on_retrain_epoch,
                )
            finally:
                with self._lock:
                    self._retrain_epoch = (0, 0)
            if outcome.version is None:
                self.counters.add("models_refused")
                self._report("retrain_refused", outcome.reason)
            elif not self._lead():
                self._report("leader_lost", f"{outcome.version} registered, not promoted")
            else:
                self.registry.promote(
                    outcome.version, private_key, chunk_size=self._settings.publish.chunk_bytes
                )
                self.counters.add("models_promoted")
                self.publish_current()
            log.info("retrain outcome: %s", outcome)
        except HarError as exc:
            if self._stop.is_set():  # shutdown ended the retrain process: not a failure
                log.info("retrain ended: the trainer is stopping (%s)", exc)
            else:
                self._report("retrain_failed", str(exc))
        except Exception as exc:
            log.exception("retrain failed")
            self._report("retrain_failed", f"unexpected: {exc}")
        self.last_outcome = outcome
        self.retrain_done.set()
        return outcome

    def _on_retrain_epoch(self, epoch: int, epochs: int) -> None:
        """An epoch of the retrain starts: say so in a status now, not at the next interval."""
        with self._lock:
            self._retrain_epoch = (epoch, epochs)
        if self._connection.connected:
            self._connection.publish(self._status("online", self._counters_or_last()))

    def _require_private_key(self) -> Any:
        if self._private_key is None:
            raise HarError("no private_key configured: the trainer cannot sign models")
        return self._private_key

    def publish_current(self) -> None:
        """Publish the current version's chunks and manifest (retained); clear older chunks."""
        connection = self._connection.connect_count
        self._current_version = self.registry.current()
        messages = current_release_messages(
            self._topics, self.registry, self._settings.publish.chunk_bytes
        )
        if messages:
            publish_all(self._connection, messages, self._settings.publish.ack_timeout_s)
            self.counters.add("models_published")
            log.info("published model %s to the fleet", self._current_version)
        # What is out, on which connection: upkeep publishes only what this does not cover.
        self._published = (connection, self._current_version or "")
        # The model is out: a store that cannot be counted now must not make this a failure.
        self._connection.publish(self._status("online", self._counters_or_last()))

    # ================================================================== upkeep
    def _upkeep_loop(self) -> None:
        retention = self._settings.retention
        next_status = 0.0
        next_retention = time.monotonic() + 60.0
        next_publish = 0.0
        while not self._stop.wait(1.0):
            now = time.monotonic()
            # On every connection: a broker that lost its retained messages (a crash between
            # autosaves) gets the model back as soon as the trainer reconnects. And on every
            # change of the current version, so `har models promote --no-publish` run beside
            # the service (whose login it must not share) reaches the fleet too.
            wanted = (self._connection.connect_count, self._registry_current())
            if (
                self.is_leader
                and wanted != self._published
                and now >= next_publish
                and self._connection.connected
            ):
                if not self._upkeep_job("publish", self.publish_current, refused_is_final=True):
                    next_publish = now + PUBLISH_RETRY_S
                elif wanted != self._published:  # refused by the ACL: not again on this one
                    self._published = wanted
            self._upkeep_job("join", self.store.join_pending)
            if now >= next_retention:
                next_retention = now + retention.interval_s
                self._upkeep_job("retention", self._apply_retention)
            if now >= next_status and self._connection.connected:
                next_status = now + self._settings.status_interval_s
                self._upkeep_job("status", self._publish_status)

    def _registry_current(self) -> str:
        try:
            return self.registry.current() or ""
        except (HarError, OSError):
            # Not reported here, every second: the status job reads it too and reports it.
            return self._current_version or ""

    def _upkeep_job(
        self, job: str, work: Callable[[], object], *, refused_is_final: bool = False
    ) -> bool:
        """Run one upkeep job; True when it is done. A failure is reported, and the job runs
        again on its schedule; a refused publish counts as done when ``refused_is_final`` (the
        broker's ACL would refuse every retry)."""
        try:
            work()
        except PublishRefusedError as exc:
            self._report("publish_refused", str(exc))
            return refused_is_final
        except HarError as exc:
            self._report("upkeep_failed", f"{job}: {exc}")
        except Exception as exc:
            log.exception("upkeep job %s failed", job)
            self._report("internal_error", f"upkeep {job}: {type(exc).__name__}: {exc}")
        else:
            return True
        return False

    def _apply_retention(self) -> None:
        retention = self._settings.retention
        removed = self.store.apply_retention(
            max_age_s=retention.max_age_days * 86400,
            max_batches_per_device=retention.max_batches_per_device,
        )
        self.counters.add("retention_removed", removed)

    def _publish_status(self) -> None:
        # Here, off paho's thread: `har models promote` may have changed it behind our back.
        self._current_version = self.registry.current()
        self._connection.publish(self._status("online", self._refresh_counters()))
