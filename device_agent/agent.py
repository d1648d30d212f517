"""The device agent: wires the parts together and owns their threads.

Threads, and whose job each one runs:

- **sensor**: ``SensorPump`` (``device_agent.sensing``) reads the sensor, commits each batch to
  the outbox with its sequence number, and hands completed windows to the worker.
- **worker**: the only thread that uses the served model: predicts windows, lets the
  ``DeviceLearner`` (``device_agent.learning``) learn confirmations and forget them, swaps in a
  new version.
- **updater**: ``ReleaseUpdater`` (``device_agent.updater``) receives, verifies, personalises
  and gates a new version, off the prediction path.
- **sender**: ``OutboxSender`` (``device_agent.sender``) publishes the outbox in order.
- **dispatcher**: routes inbound messages from the transport's queue and publishes status.

paho's network thread only enqueues (see ``shared.mqtt_transport``).

Failure policy (``shared.supervision``): each loop handles a failing message or job itself
(logged, counted, reported on the error topic, skipped; a message that was not stored is not
acknowledged). A loop that dies anyway ends ``run`` with ``EXIT_THREAD_DIED`` after a
``thread_died`` error event and the offline status, so systemd restarts the agent.
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from activity_model.runtime import ActivityModel
from device_agent.learning import DeviceLearner, LearningPolicy
from device_agent.local_requests import LocalRequests
from device_agent.outbox import ErrorReporter, Outbox, forget_relay
from device_agent.releases import ReleaseStore
from device_agent.sender import OutboxSender, Receipts
from device_agent.sensing import SensorPump
from device_agent.sensors import SensorSource
from device_agent.settings import AgentSettings
from device_agent.state_lock import StateLock
from device_agent.store import AgentStore, Priority
from device_agent.updater import ActiveModel, Candidate, ReleaseUpdater, open_release
from device_agent.windowing import StreamWindow, StreamWindower
from shared import codec, homeassistant
from shared.counters import Counters, LatencyRecorder
from shared.errors import HarError, ModelError, PayloadError, StorageError
from shared.messages import (
    Confirmation,
    DeviceCommand,
    DeviceStatus,
    Prediction,
    ReceiptKey,
)
from shared.mqtt_transport import InboundMessage, MqttConnection, Outbound, PublishHandle
from shared.signing import load_public_key
from shared.supervision import EXIT_THREAD_DIED, Supervisor
from shared.topics import Topics

log = logging.getLogger(__name__)

_STOP = object()


@dataclass(frozen=True, slots=True)
class _Predict:
    window: StreamWindow


@dataclass(frozen=True, slots=True)
class _Confirm:
    message: InboundMessage


@dataclass(frozen=True, slots=True)
class _Command:
    message: InboundMessage


@dataclass(frozen=True, slots=True)
class _Swap:
    candidate: Candidate


class DeviceAgent:
    def __init__(
        self,
        settings: AgentSettings,
        sensor: SensorSource,
        *,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._settings = settings
        self._tuning = tuning = settings.agent
        self._sensor = sensor
        self._clock = wall_clock
        self._device = settings.device_id
        self._topics = Topics(settings.broker.topic_root)
        self.counters = Counters()
        self.latencies = LatencyRecorder()
        self._last_counters: dict[str, int] = {}
        self._lock = StateLock(settings.state_dir)

        public_key = load_public_key(settings.public_key) if settings.public_key else None
        if public_key is None:
            log.warning(
                "no public key configured (public_key, HAR_PUBLIC_KEY or --public-key): this "
                "device will accept no model, neither a new one nor the one installed; it "
                "publishes sensor data only"
            )
        self._releases = ReleaseStore(
            settings.models_dir, public_key, max_bytes=tuning.max_model_bytes
        )
        self.runtime = tuning.model_runtime()
        log.info("models run on %s", self.runtime)
        self._active: ActiveModel | None = None
        self._predictions_unstored = False  # reported once per store outage
        # What confirm_latest / correct_latest confirm; worker thread only.
        self._latest_prediction: Prediction | None = None
        # The labels of the last Home Assistant discovery configs queued (None: none yet).
        self._announced_labels: tuple[str, ...] | None = None

        self._stop = threading.Event()
        self._shutdown_lock = threading.Lock()
        self._shut_down = False
        self._sensor_done = threading.Event()
        self.model_changed = threading.Event()  # set on every swap (tests and demo wait on it)
        self._work: queue.Queue[object] = queue.Queue(maxsize=tuning.work_queue_size)
        self._updates: queue.Queue[object] = queue.Queue()
        self._inbox: queue.Queue[InboundMessage] = queue.Queue(maxsize=tuning.inbox_size)
        self._local = LocalRequests(settings.state_dir, self._topics.command(self._device))
        self._connection = MqttConnection(
            settings.broker,
            client_id=settings.broker.client_id or f"har-agent-{self._device}",
            subscriptions=[
                (self._topics.confirmation(self._device), 1),
                (self._topics.command(self._device), 1),
                (self._topics.receipt(self._device), 1),
                (self._topics.model_manifest(), 1),
            ],
            inbox=self._inbox,
            will=self._status_message("offline", {}),
            # The birth runs on paho's network thread: it reuses the last counters rather than
            # reading the store there.
            birth=lambda: [self._status_message("online", self._last_counters)],
            persistent_session=True,
            counters=self.counters,  # inbox_overflow, publish_waits, ... in the status
        )
        self._store = AgentStore(
            settings.store_path,
            outbox_max_messages=tuning.outbox_max_messages,
            outbox_max_bytes=tuning.outbox_max_bytes,
            recent_max=tuning.recent_windows,
            replay_max=tuning.replay_max_windows,
        )
        self._outbox = Outbox(self._store)
        self._report = ErrorReporter(
            self._device,
            self._topics,
            self._outbox,
            self.counters,
            wall_clock,
            publish_directly=self._connection.publish,
        )
        self._windower = StreamWindower()
        self._learner = DeviceLearner(
            self._store,
            settings.learned_dir,
            tuning.learning_policy(),
            counters=self.counters,
            latencies=self.latencies,
            report=self._report,
        )
        self._sender = OutboxSender(
            self._store,
            self._outbox,
            self._connection,
            self._report,
            self.counters,
            inflight=tuning.publish_inflight,
            flush_s=tuning.shutdown_flush_s,
            receipts=Receipts(tuning.await_receipts, tuning.receipt_timeout_s, tuning.max_resends),
        )
        self._updater = ReleaseUpdater(
            self._releases,
            self._store,
            self._connection,
            self._topics,
            policy=self._learner.policy,
            report=self._report,
            counters=self.counters,
            accept_margin=tuning.accept_margin,
            min_confirmations_for_gate=tuning.min_replay_for_gate,
            active=lambda: self._active,
            hand_over=lambda candidate: self._work.put(_Swap(candidate)),
            max_bundle_bytes=tuning.max_model_bytes,
            stall_s=tuning.download_stall_s,
            stall_retries=tuning.download_retries,
            runtime=self.runtime,
        )
        self._pump: SensorPump | None = None  # built in start(), once the sequence is known
        self._supervisor = Supervisor()
        self._threads = [
            self._supervisor.add("agent-sensor", self._sensor_loop),
            self._supervisor.add("agent-worker", self._worker_loop),
            self._supervisor.add("agent-updater", self._updater_loop),
            self._supervisor.add("agent-sender", self._sender_loop),
            self._supervisor.add("agent-dispatch", self._dispatch_loop),
        ]

    # ================================================================== lifecycle
    @property
    def active_version(self) -> str | None:
        active = self._active
        return active.version if active else None

    @property
    def active_model(self) -> ActivityModel | None:
        active = self._active
        return active.model if active else None

    @property
    def learner(self) -> DeviceLearner:
        return self._learner

    def start(self) -> None:
        """Load the installed model, then start every thread and the connection."""
        if not self._lock.acquire():
            raise HarError(
                f"another agent is using {self._settings.state_dir}: one agent per state folder"
            )
        next_seq = self._store.counter("next_seq", -1)
        if next_seq < 0:
            # A fresh state starts its sequence numbers at the time in milliseconds, so a device
            # whose storage was wiped never reuses numbers the trainer already holds (batches are
            # at least 50 ms apart, so the old sequence can never catch up with the clock).
            next_seq = int(self._clock() * 1000)
            self._store.set_counters({"next_seq": next_seq})
        self._pump = SensorPump(
            self._device,
            self._sensor,
            self._windower,
            self._outbox,
            report=self._report,
            counters=self.counters,
            topics=self._topics,
            batch_seconds=self._tuning.batch_seconds,
            next_seq=next_seq,
            on_window=self._submit_window,
            hold_unstored_s=self._tuning.hold_unstored_s,
        )
        self._releases.remove_leftovers()
        self._load_installed_model()
        self._announce_to_home_assistant()
        self._supervisor.start()
        self._connection.start()

    def wait_subscribed(self, timeout: float) -> bool:
        """Wait until the broker acknowledged the device's subscriptions: from then on, what is
        published to it reaches it (its session keeps it across reconnects)."""
        return self._connection.wait_subscribed(timeout)

    def request_stop(self) -> None:
        """Ask for a graceful stop (SIGTERM handler, sensor end); ``run`` then shuts down."""
        self._stop.set()

    def run(self) -> int:
        """Start, serve until asked to stop, shut down cleanly; the process exit code:
        0 after a stop, 3 when the broker refuses this device, ``EXIT_THREAD_DIED`` (70) when
        one of the agent's threads died."""
        self.start()
        while not self._stop.is_set():
            if self._supervisor.wait(0.5):  # at once when a loop dies; a stop within 0.5 s
                break
            if self._connection.fatal_error is not None:
                log.error("broker refused this device: %s", self._connection.fatal_error)
                self.shutdown()
                return 3
        death = self._supervisor.death
        if death is not None:
            self._report_death(*death)
            self.shutdown()  # what it can: the dead thread's part is simply not waited for
            return EXIT_THREAD_DIED
        self.shutdown()
        return 0

    def _report_death(self, thread: str, exc: BaseException) -> None:
        """The ``thread_died`` error event: directly when connected (the dead thread may be the
        sender), else through the outbox, to be sent after the restart."""
        text = (
            f"thread {thread} died ({type(exc).__name__}: {exc}): the agent exits with code "
            f"{EXIT_THREAD_DIED} to be restarted"
        )
        log.error("%s", text)
        self.counters.add("error_thread_died")
        event = self._report.encode("thread_died", text)
        if self._connection.connected:
            handle = self._report.publish_now(event)
            if isinstance(handle, PublishHandle) and not handle.wait(2.0):
                log.warning("thread_died event not acknowledged before the exit")
            return
        try:
            self._outbox.put(event, Priority.NORMAL)
        except StorageError as error:
            log.warning("thread_died event lost: not connected and not stored (%s)", error)

    def shutdown(self) -> None:
        """Flush and persist everything, say goodbye, disconnect. Idempotent."""
        self._stop.set()
        with self._shutdown_lock:
            if self._shut_down:
                return
            self._shut_down = True
        sensor, worker, updater, sender, dispatcher = self._threads
        if not sensor.is_alive() and sensor.ident is None:  # never started
            self._store.close()
            self._lock.release()
            return
        sensor.join(10)  # flushes its partial batch into the outbox
        self._updates.put(_STOP)
        updater.join(30)
        if worker.is_alive():  # a dead worker would leave a full queue that never drains
            self._work.put(_STOP)  # behind every queued window and confirmation
        worker.join(30)
        dispatcher.join(5)
        self._outbox.ready.set()
        sender.join(self._tuning.shutdown_flush_s + 5)
        if self._connection.connected:
            handle = self._connection.publish(
                self._status_message("offline", self._refresh_counters())
            )
            if not handle.wait(2.0):
                log.warning("offline status not acknowledged before disconnect")
        self._connection.stop()
        self._sensor.close()
        pending, _ = self._store.outbox_size()
        log.info("agent stopped; %d messages stay in the outbox for the next start", pending)
        self._store.close()
        self._lock.release()

    # ================================================================== status
    def _status_message(self, state: str, counters: Mapping[str, int]) -> Outbound:
        status = DeviceStatus(
            device_id=self._device,
            state=state,  # type: ignore[arg-type]
            model_version=self.active_version,
            ts=self._clock(),
            counters=counters,
        )
        return Outbound(self._topics.status(self._device), codec.encode_status(status), 1, True)

    def _refresh_counters(self) -> dict[str, int]:
        self._last_counters = self.status_counters()
        return self._last_counters

    def _publish_status(self) -> None:
        if self._connection.connected:
            self._connection.publish(self._status_message("online", self._refresh_counters()))

    def status_counters(self) -> dict[str, int]:
        counts = self.counters.snapshot()
        depth, depth_bytes = self._store.outbox_size()
        counts["outbox_depth"] = depth
        counts["outbox_bytes"] = depth_bytes
        counts["outbox_awaiting_receipt"] = self._store.outbox_awaiting_receipt()
        counts["replay_windows"] = self._store.replay_count()
        counts["serving_learned_state"] = int(self._learner.serving)
        counts.update(self._store.counters())
        counts.update({f"sensor_{k}": v for k, v in self._sensor.counters().items()})
        return {k: v for k, v in counts.items() if v >= 0}

    # ================================================================== sensor thread
    def _sensor_loop(self) -> None:
        assert self._pump is not None  # built in start()
        try:
            # The pump handles a batch the store refuses itself; anything else (a sensor that
            # fails for good) ends the loop, and the Supervisor has the agent restarted.
            self._pump.run(self._stop)
        finally:
            self._sensor_done.set()

    def _submit_window(self, window: StreamWindow) -> None:
        try:
            self._work.put_nowait(_Predict(window))
        except queue.Full:
            # The model cannot keep up: predictions are the one thing we may skip.
            self.counters.add("windows_dropped")

    # ================================================================== worker thread
    def _worker_loop(self) -> None:
        while True:
            job = self._work.get()
            if job is _STOP:
                break
            try:
                if isinstance(job, _Predict):
                    self._predict(job.window)
                elif isinstance(job, _Confirm):
                    self._confirm(job.message)
                elif isinstance(job, _Command):
                    self._command(job.message)
                elif isinstance(job, _Swap):
                    self._swap(job.candidate)
            except StorageError as exc:
                # Not kept; a message behind the job is not acknowledged, so it comes again.
                self._report("storage_error", f"{type(job).__name__} not stored: {exc}")
            except Exception as exc:
                # One bad job must not end the worker: report it and carry on.
                log.exception("worker job %s failed", type(job).__name__)
                self._report("internal_error", f"{type(job).__name__}: {exc}")

    def _predict(self, window: StreamWindow) -> None:
        active = self._active
        if active is None or window.samples.shape[0] != active.model.input_spec.window:
            self.counters.add("windows_without_model")
            return
        started = time.perf_counter()
        result = active.model.predict(window.samples[None, ...])
        self.latencies.record("predict", time.perf_counter() - started)
        try:
            self._store_prediction(active, window, result.probabilities[0])
        except StorageError as exc:
            self.counters.add("predictions_unstored")
            if not self._predictions_unstored:  # reported once per outage, not per window
                self._predictions_unstored = True
                self._report("storage_error", f"predictions cannot be stored: {exc}")
            return
        if self._predictions_unstored:
            self._predictions_unstored = False
            log.warning("the store takes predictions again")
        self.counters.add("predictions")

    def _store_prediction(
        self, active: ActiveModel, window: StreamWindow, probabilities: npt.NDArray[np.float32]
    ) -> None:
        prediction = Prediction.new(
            device_id=self._device,
            window=window.ref,
            probabilities=probabilities,
            labels=active.model.labels,
            model_version=active.version,
            ts=self._clock(),
            truth=window.truth,
        )
        self._outbox.put(
            Outbound(self._topics.prediction(self._device), codec.encode_prediction(prediction)),
            Priority.NORMAL,
            recent=(prediction.prediction_id, active.version, window.samples),
            receipt_key=ReceiptKey.prediction(prediction.prediction_id),
        )
        self._latest_prediction = prediction

    def _confirm(self, message: InboundMessage) -> None:
        """A confirmation from the confirmation topic."""
        try:
            confirmation = codec.decode_confirmation(message.payload)
        except PayloadError as exc:
            self._report.about(message, "malformed_confirmation", str(exc))
            message.ack()
            return
        self._keep_confirmation(confirmation, message)

    def _keep_confirmation(self, confirmation: Confirmation, message: InboundMessage) -> None:
        """Keep, learn and relay a confirmation that ``message`` brought (a confirmation, or a
        command about the latest prediction); acknowledged once kept, or when it can never be."""
        active = self._active
        window = self._store.recent_window(confirmation.prediction_id)
        if window is None:
            self._report.about(
                message,
                "unknown_prediction",
                f"prediction {confirmation.prediction_id!r} is unknown or expired "
                f"(the last {self._tuning.recent_windows} windows can be confirmed)",
            )
        elif active is None or confirmation.label not in active.model.labels:
            known = ", ".join(active.model.labels) if active else "none: no model installed"
            self._report.about(
                message,
                "unknown_label",
                f"label {confirmation.label!r} is not one of the model's labels ({known})",
            )
        else:
            forgotten = False
            try:
                stored = self._learner.confirm(
                    confirmation.prediction_id, confirmation.label, window, confirmation.ts
                ).stored
                forgotten = stored == "forgotten"  # given before the wearer's forget: not kept
            except StorageError as exc:
                # Not kept: not acknowledged either, so the broker can deliver it again.
                self._report("storage_error", f"confirmation not stored: {exc}", message.topic)
                return
            except ModelError as exc:
                # Kept, learned again when the model is next attached.
                self._report("learning_failed", str(exc), message.topic)
            try:
                if not forgotten:
                    self._relay(confirmation)
            except StorageError as exc:
                self._report("storage_error", f"confirmation not relayed: {exc}", message.topic)
                return  # delivered again, kept again (a duplicate), relayed then
        message.ack()

    def _relay(self, confirmation: Confirmation) -> None:
        """Pass a kept confirmation on to the trainer, until its receipt: the user's own copy
        to the trainer is lost if the broker crashes before delivering it."""
        self._outbox.put(
            Outbound(self._topics.confirmed(self._device), codec.encode_confirmation(confirmation)),
            Priority.NORMAL,
            receipt_key=ReceiptKey.confirmation(confirmation.prediction_id),
        )

    def _command(self, message: InboundMessage) -> None:
        try:
            command = codec.decode_device_command(message.payload)
        except PayloadError as exc:
            self._report.about(message, "malformed_command", str(exc))
            message.ack()
            return
        try:
            if self._store.command_handled(command.request_id):
                # Delivered again (our acknowledgement was lost): carried out once already.
                self.counters.add("commands_duplicate")
                message.ack()
                return
        except StorageError as exc:
            self._report("storage_error", f"command not carried out: {exc}", message.topic)
            return  # not acknowledged: delivered again
        message = _marking_handled(message, self._store, command.request_id)
        if command.command in ("confirm_latest", "correct_latest"):
            self._confirm_latest(command, message)
            return
        if command.command == "forget":
            forgotten = self._learner.forget(
                command.ts, forget_relay(self._topics, self._device, command)
            )
            log.info(
                "forget (request %s): %d confirmations forgotten", command.request_id, forgotten
            )
        message.ack()
        self._publish_status()

    def _confirm_latest(self, command: DeviceCommand, message: InboundMessage) -> None:
        """``confirm_latest`` / ``correct_latest``: a confirmation of the latest prediction,
        for dashboards that cannot know prediction ids (Home Assistant's button and select)."""
        latest = self._latest_prediction
        if latest is None:
            self._report.about(
                message,
                "no_latest_prediction",
                f"{command.command} (request {command.request_id}): no prediction since the "
                "agent started",
            )
            message.ack()
            return
        label = latest.label if command.label is None else command.label
        log.info(
            "%s (request %s): prediction %s is %r",
            command.command,
            command.request_id,
            latest.prediction_id,
            label,
        )
        self._keep_confirmation(
            Confirmation(latest.prediction_id, label, "user", command.ts), message
        )

    def _swap(self, candidate: Candidate) -> None:
        new = candidate.active
        if candidate.learned is not None:
            self._learner.adopt(new.version, new.model, candidate.learned)
        else:
            self._learner.attach(new.version, new.model)
        self._releases.set_current(new.version)
        self._activate(new)
        for version in self._releases.prune():
            self._learner.state_path(version).unlink(missing_ok=True)
        self.counters.add("model_installs")
        log.info("now serving model %s", new.version)
        self._announce_to_home_assistant()
        self._publish_status()
        self.model_changed.set()

    def _announce_to_home_assistant(self) -> None:
        """With the option on: the discovery configs, at start and whenever the labels change
        (the Activity sensor's and the select's options). Through the outbox, like everything
        else: they reach a broker that is down now, and (queued on the worker thread before it
        predicts with the new model) before the first prediction with the new labels."""
        if not self._tuning.homeassistant_discovery:
            return
        labels = self._active.model.labels if self._active else ()
        if labels == self._announced_labels:
            return
        try:
            for message in homeassistant.discovery_messages(
                self._topics, self._device, labels, prefix=self._tuning.homeassistant_prefix
            ):
                self._outbox.put(message, Priority.NORMAL)
        except StorageError as exc:
            # Queued again at the next start or model change.
            self._report("storage_error", f"Home Assistant discovery configs not queued: {exc}")
            return
        self._announced_labels = labels

    def _activate(self, active: ActiveModel) -> None:
        hop = self._tuning.window_hop
        if self._windower.length != active.model.input_spec.window:
            self._windower.configure(active.model.input_spec.window, hop)
        self._active = active

    def _load_installed_model(self) -> None:
        """At start: the current release, verified again; else the previous one; else none."""
        current, previous = self._releases.pointer()
        for version in (current, previous):
            if version is None:
                continue
            try:
                active = open_release(self._releases, version, self.runtime)
            except (HarError, OSError) as exc:
                self._report("model_unusable", f"installed model {version} unusable: {exc}")
                continue
            self._learner.attach(version, active.model)
            if version != current:
                self._releases.set_current(version)
            self._activate(active)
            log.info("serving model %s", version)
            return
        log.info("no model installed yet: publishing sensor data until one arrives")

    # ================================================================== dispatcher thread
    def _dispatch_loop(self) -> None:
        next_status = time.monotonic() + self._tuning.status_interval_s
        while not self._stop.is_set():
            timeout = max(0.0, min(0.5, next_status - time.monotonic()))
            try:
                message = self._inbox.get(timeout=timeout)
            except queue.Empty:
                message = None
            if message is not None:
                self._route_safely(message)
            if (request := self._local.take()) is not None:  # `har agent forget`
                self._route_safely(request)
            if time.monotonic() >= next_status:
                next_status = time.monotonic() + self._tuning.status_interval_s
                try:
                    self._publish_status()
                except StorageError as exc:
                    self._report("storage_error", f"status not published: {exc}")

    def _route_safely(self, message: InboundMessage) -> None:
        try:
            self._route(message)
        except Exception as exc:
            # One message must not end the dispatcher. It was not handed on, so it is not
            # acknowledged: the broker delivers it again after a reconnect.
            log.exception("routing a message on %s failed", message.topic)
            self.counters.add("dispatch_failures")
            self._report("internal_error", f"message not routed: {exc}", message.topic)

    def _route(self, message: InboundMessage) -> None:
        topic = message.topic
        if topic == self._topics.confirmation(self._device):
            self.counters.add("confirmations_received")
            self._hand_to_worker(_Confirm(message))
        elif topic == self._topics.command(self._device):
            self.counters.add("commands_received")
            self._hand_to_worker(_Command(message))
        elif topic == self._topics.receipt(self._device):
            self._receipt(message)
        elif topic == self._topics.model_manifest() or self._topics.chunk_of(topic):
            self._updates.put(message)
        else:
            log.warning("message on unexpected topic %s ignored", topic)
            message.ack()

    def _hand_to_worker(self, job: _Confirm | _Command) -> None:
        """Queue a job, waiting while the worker is behind (this is not paho's thread); at a
        stop it stays unacknowledged, and the broker delivers it again."""
        while not self._stop.is_set():
            try:
                self._work.put(job, timeout=0.5)
            except queue.Full:
                continue
            return

    def _receipt(self, message: InboundMessage) -> None:
        """The trainer stored what the receipt names: it leaves the outbox. Not acknowledged
        unless that was written (the broker then delivers the receipt again)."""
        try:
            receipt = codec.decode_receipt(message.payload)
            if receipt.device_id != self._device:
                # Reported like the decoder's own errors.
                raise PayloadError(f"receipt for {receipt.device_id!r} on this device's topic")  # noqa: TRY301
        except PayloadError as exc:
            self._report.about(message, "malformed_receipt", str(exc))
            message.ack()
            return
        try:
            removed = self._store.outbox_receipted(receipt.outbox_keys())
        except StorageError as exc:
            self._report("storage_error", f"receipt not applied: {exc}", message.topic)
            return
        self.counters.add("receipts")
        self.counters.add("messages_receipted", removed)
        self.counters.add("forgets_receipted", len(receipt.forgets))  # the trainer forgot too
        message.ack()

    # ================================================================== updater thread
    def _updater_loop(self) -> None:
        while True:
            # Woken by a message, or when a download in progress would be stalled.
            try:
                message = self._updates.get(timeout=self._updater.wake_in())
            except queue.Empty:
                message = None
            if message is _STOP:
                break
            if message is not None:
                assert isinstance(message, InboundMessage)
                self._updater.handle(message)
            self._updater.check_stalled()

    # ================================================================== sender thread
    def _sender_loop(self) -> None:
        """The sender, restarted with a backoff after a storage error (a full disk passes, and
        the outbox is durable: a restart only sends again what was in flight, which receivers
        deduplicate). Any other exception is a bug: it ends the loop, and the agent restarts."""
        backoff_s = 0.5
        while True:
            try:
                self._sender.run(
                    lambda: (
                        self._stop.is_set()
                        and self._sensor_done.is_set()
                        and not self._threads[1].is_alive()
                    )
                )
            except StorageError as exc:
                self.counters.add("sender_restarts")
                self._report("storage_error", f"sender restarts in {backoff_s:g} s: {exc}")
            else:
                return
            if self._stop.wait(backoff_s):
                return  # stopping: what is left stays in the outbox for the next start
            backoff_s = min(30.0, backoff_s * 2)


__all__ = ["ActiveModel", "DeviceAgent", "LearningPolicy"]


def _marking_handled(message: InboundMessage, store: AgentStore, request_id: str) -> InboundMessage:
    """``message``, whose acknowledgement first records its command as carried out: a command
    is acknowledged once done (or once it can never be), and is then never done again."""

    def ack() -> None:
        try:
            store.mark_command_handled(request_id)
        except StorageError as exc:  # acknowledged all the same: it is done
            log.warning("command %s done, but not recorded as done: %s", request_id, exc)
        message.ack()

    return dataclasses.replace(message, _ack=ack)
