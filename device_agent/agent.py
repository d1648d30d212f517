"""The device agent: sensor in, batches and predictions out, confirmations learned, models updated.

Threads, and what each one owns:

- **sensor**: reads the sensor, cuts batches, commits each batch to the outbox with its sequence
  number, and hands completed windows to the worker.
- **worker**: the only thread that runs the active model: predicts windows, learns confirmed
  ones and persists what it learned, and swaps in a new model version.
- **updater**: receives a model manifest and its chunks, verifies them, loads and warms up the
  candidate, scores it on the local replay set, re-applies the user's confirmations to it, and
  hands it to the worker. Nothing of this runs on the prediction path.
- **sender**: publishes the outbox in order when the broker is reachable, deleting each message
  once the broker acknowledged it.
- **dispatcher**: routes inbound messages from the transport's queue and publishes status.

paho's network thread only enqueues (see ``shared.mqtt_transport``).
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from device_agent.releases import ReleaseStore, refuse_replay
from device_agent.sensors import SensorReading, SensorSource
from device_agent.settings import AgentSettings
from device_agent.store import AgentStore, Priority, ReplayEntry
from device_agent.windowing import StreamWindow, StreamWindower
from shared import codec, homeassistant
from shared.counters import Counters, LatencyRecorder
from shared.errors import HarError, ModelError, PayloadError
from shared.messages import (
    MAX_SAMPLES_PER_BATCH,
    DeviceStatus,
    ErrorEvent,
    ModelManifest,
    Prediction,
    SensorBatch,
)
from shared.model.runtime import ActivityModel
from shared.model_bundle import ChunkAssembler
from shared.mqtt_transport import InboundMessage, MqttConnection, Outbound, PublishHandle
from shared.signing import load_public_key
from shared.topics import Topics

log = logging.getLogger(__name__)

_STOP = object()


@dataclass(frozen=True, slots=True)
class ActiveModel:
    version: str
    manifest: ModelManifest
    model: ActivityModel


@dataclass(frozen=True, slots=True)
class Candidate:
    """A verified, loaded, personalised model waiting for the worker to swap it in."""

    active: ActiveModel
    personalised_ids: frozenset[str]


@dataclass(frozen=True, slots=True)
class _Predict:
    window: StreamWindow


@dataclass(frozen=True, slots=True)
class _Confirm:
    message: InboundMessage


@dataclass(frozen=True, slots=True)
class _Swap:
    candidate: Candidate


@dataclass
class _Download:
    manifest: ModelManifest
    assembler: ChunkAssembler
    topic: str


def accuracy_on(model: ActivityModel, entries: list[ReplayEntry]) -> float | None:
    """Share of ``entries`` the model labels as confirmed; None if none is usable."""
    windows, labels = usable_replay(model, entries)
    if labels.size == 0:
        return None
    predicted = model.predict(windows).class_index
    return float(np.mean(predicted == labels))


def usable_replay(
    model: ActivityModel, entries: list[ReplayEntry]
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int32]]:
    """Confirmed windows this model can learn from: its window length, labels it knows."""
    index = {label: i for i, label in enumerate(model.labels)}
    length = model.input_spec.window
    kept = [e for e in entries if e.label in index and e.window.shape == (length, 3)]
    if not kept:
        return np.empty((0, length, 3), np.float32), np.empty(0, np.int32)
    windows = np.stack([e.window for e in kept]).astype(np.float32)
    return windows, np.array([index[e.label] for e in kept], np.int32)


def personalise(
    model: ActivityModel, entries: list[ReplayEntry], steps_per_window: float, batch_size: int = 16
) -> int:
    """Re-apply a user's confirmations to a model the way the device learned them.

    On the device every confirmation was one ``learn`` step on a batch of it plus rehearsed
    older ones; here each confirmed window buys ``steps_per_window`` steps on a random batch of
    the confirmed windows, so a new version gets about as much of the user as the old one had.
    Returns the steps taken.
    """
    windows, labels = usable_replay(model, entries)
    steps = math.ceil(labels.size * steps_per_window)
    rng = np.random.default_rng(labels.size)
    for _ in range(steps):
        chosen = rng.choice(labels.size, size=min(batch_size, labels.size), replace=False)
        model.learn(windows[chosen], labels[chosen])
    return steps


class DeviceAgent:
    def __init__(
        self,
        settings: AgentSettings,
        sensor: SensorSource,
        *,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._settings = settings
        self._tuning = settings.agent
        self._sensor = sensor
        self._clock = wall_clock
        self._device = settings.device_id
        self._topics = Topics(settings.broker.topic_root)
        self.counters = Counters()
        self._last_counters: dict[str, int] = {}
        self._next_seq = 0  # read from the store in start()
        self.latencies = LatencyRecorder()

        public_key = load_public_key(settings.public_key) if settings.public_key else None
        self._releases = ReleaseStore(settings.models_dir, public_key)
        self._store = AgentStore(
            settings.store_path,
            outbox_max_messages=self._tuning.outbox_max_messages,
            outbox_max_bytes=self._tuning.outbox_max_bytes,
            recent_max=self._tuning.recent_windows,
            replay_max=self._tuning.replay_max_windows,
        )
        self._windower = StreamWindower()
        self._active: ActiveModel | None = None
        self._rejected: set[str] = set()  # manifest sha256s refused: not downloaded again
        self._download: _Download | None = None

        self._stop = threading.Event()
        self._shutdown_lock = threading.Lock()
        self._shut_down = False
        self._sensor_done = threading.Event()
        self._outbox_signal = threading.Event()
        self.model_changed = threading.Event()  # set on every swap (tests and demo wait on it)
        self._work: queue.Queue[object] = queue.Queue(maxsize=self._tuning.work_queue_size)
        self._updates: queue.Queue[object] = queue.Queue()
        self._inbox: queue.Queue[InboundMessage] = queue.Queue(maxsize=self._tuning.inbox_size)
        self._connection = MqttConnection(
            settings.broker,
            client_id=settings.broker.client_id or f"har-agent-{self._device}",
            subscriptions=[
                (self._topics.confirmation(self._device), 1),
                (self._topics.model_manifest(), 1),
            ],
            inbox=self._inbox,
            will=self._status_message("offline", {}),
            # The birth runs on paho's network thread: it reuses the last counters rather than
            # reading the store there.
            birth=lambda: [self._status_message("online", self._last_counters)],
            persistent_session=True,
        )
        self._threads = [
            threading.Thread(target=self._sensor_loop, name="agent-sensor", daemon=True),
            threading.Thread(target=self._worker_loop, name="agent-worker", daemon=True),
            threading.Thread(target=self._updater_loop, name="agent-updater", daemon=True),
            threading.Thread(target=self._sender_loop, name="agent-sender", daemon=True),
            threading.Thread(target=self._dispatch_loop, name="agent-dispatch", daemon=True),
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

    def start(self) -> None:
        """Load the installed model, then start every thread and the connection."""
        self._next_seq = self._store.counter("next_seq", -1)
        if self._next_seq < 0:
            # A fresh state starts its sequence numbers at the time in milliseconds, so a device
            # whose storage was wiped never reuses numbers the trainer already holds (batches are
            # at least 50 ms apart, so the old sequence can never catch up with the clock).
            self._next_seq = int(self._clock() * 1000)
            self._store.set_counters({"next_seq": self._next_seq})
        self._releases.remove_leftovers()
        self._load_installed_model()
        if self._tuning.homeassistant_discovery:
            # Through the outbox, like everything else: they reach a broker that is down now.
            for message in homeassistant.discovery_messages(
                self._topics, self._device, prefix=self._tuning.homeassistant_prefix
            ):
                self._enqueue(message, Priority.NORMAL)
        for thread in self._threads:
            thread.start()
        self._connection.start()

    def request_stop(self) -> None:
        """Ask for a graceful stop (SIGTERM handler, sensor end); ``run`` then shuts down."""
        self._stop.set()

    def run(self) -> int:
        """Start, serve until asked to stop, shut down cleanly; the process exit code."""
        self.start()
        while not self._stop.wait(1.0):
            if self._connection.fatal_error is not None:
                log.error("broker refused this device: %s", self._connection.fatal_error)
                self.shutdown()
                return 3
        self.shutdown()
        return 0

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
            return
        sensor.join(10)  # flushes its partial batch into the outbox
        self._updates.put(_STOP)
        updater.join(30)
        self._work.put(_STOP)  # behind every queued window and confirmation
        worker.join(30)
        dispatcher.join(5)
        self._outbox_signal.set()
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

    # ================================================================== status and errors
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

    def status_counters(self) -> dict[str, int]:
        counts = self.counters.snapshot()
        depth, depth_bytes = self._store.outbox_size()
        counts["outbox_depth"] = depth
        counts["outbox_bytes"] = depth_bytes
        counts["replay_windows"] = self._store.replay_count()
        counts.update(self._store.counters())
        counts.update({f"sensor_{k}": v for k, v in self._sensor.counters().items()})
        return {k: v for k, v in counts.items() if v >= 0}

    def _report(self, code: str, message: str, topic: str = "") -> None:
        """Log, count and publish a handled error. Never raises."""
        log.warning("%s: %s", code, message)
        self.counters.add(f"error_{code}")
        try:
            event = ErrorEvent(self._device, code, message[:2000], self._clock(), topic=topic)
            self._enqueue(
                Outbound(self._topics.error(self._device), codec.encode_error(event)),
                Priority.NORMAL,
            )
        except (HarError, ValueError):
            log.exception("could not queue error event %s", code)

    def _enqueue(
        self,
        message: Outbound,
        priority: Priority,
        *,
        counters: dict[str, int] | None = None,
        recent: tuple[str, str, npt.NDArray[np.float32]] | None = None,
    ) -> None:
        evicted = self._store.enqueue(message, priority, counters=counters, recent=recent)
        if evicted:
            log.warning("outbox full: evicted %d oldest low-priority messages", evicted)
        self._outbox_signal.set()

    # ================================================================== sensor thread
    def _sensor_loop(self) -> None:
        rate = self._sensor.sample_rate_hz
        batch_size = max(1, min(MAX_SAMPLES_PER_BATCH, round(rate * self._tuning.batch_seconds)))
        pending: list[SensorReading] = []
        last_t_ns: int | None = None
        period_ns = 1e9 / rate
        try:
            while not self._stop.is_set():
                readings = self._sensor.read(self._stop, batch_size - len(pending))
                if not readings and self._sensor.exhausted:
                    log.info("sensor stream ended: stopping")
                    self._stop.set()
                    break
                for reading in readings:
                    if last_t_ns is not None and reading.t_ns - last_t_ns > 3 * period_ns:
                        # A gap: publish what came before, and never window across it.
                        self._publish_batch(pending, rate)
                        pending = []
                        self._windower.reset()
                        self.counters.add("sensor_gaps")
                    last_t_ns = reading.t_ns
                    pending.append(reading)
                    if len(pending) >= batch_size:
                        self._publish_batch(pending, rate)
                        pending = []
            self._publish_batch(pending, rate)
        except Exception:
            log.exception("sensor thread failed: stopping the agent")
            self._stop.set()
        finally:
            self._sensor_done.set()

    def _publish_batch(self, readings: list[SensorReading], rate: float) -> None:
        if not readings:
            return
        seq = self._next_seq  # the sensor thread alone advances it, with each batch's commit
        samples = np.array([r.xyz for r in readings], dtype=np.float32)
        t0 = readings[0].t_ns
        offsets_us = np.array([(r.t_ns - t0) // 1000 for r in readings], dtype=np.int64)
        nominal = np.arange(len(readings)) * (1e6 / rate)
        # Per-sample times only when the spacing is irregular: they cost 4 bytes a sample.
        irregular = bool(np.any(np.abs(offsets_us - nominal) > 0.5e6 / rate))
        try:
            batch = SensorBatch(
                device_id=self._device,
                seq=seq,
                sample_rate_hz=rate,
                t0_ns=max(0, t0),
                samples=samples,
                offsets_us=offsets_us.astype(np.uint32) if irregular else None,
            )
        except ValueError as exc:
            self._report("bad_sensor_data", f"dropped {len(readings)} samples: {exc}")
            self._windower.reset()
            return
        self._enqueue(
            Outbound(
                self._topics.sensor(self._device),
                codec.encode_sensor_batch(batch),
                qos=1,
                content_type=codec.CONTENT_TYPE_MSGPACK,
            ),
            Priority.BULK,
            counters={"next_seq": seq + 1},
        )
        self._next_seq = seq + 1
        self.counters.add("batches_queued")
        self.counters.add("samples", len(readings))
        for window in self._windower.push(seq, batch.samples, [r.label for r in readings]):
            self._submit_window(window)

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
                elif isinstance(job, _Swap):
                    self._swap(job.candidate)
            except Exception as exc:
                # One bad job must not end the worker: report it and carry on.
                log.exception("worker job %s failed", type(job).__name__)
                self._report("internal_error", f"{type(job).__name__}: {exc}")
                if isinstance(job, _Confirm):
                    job.message.ack()

    def _predict(self, window: StreamWindow) -> None:
        active = self._active
        if active is None or window.samples.shape[0] != active.model.input_spec.window:
            self.counters.add("windows_without_model")
            return
        started = time.perf_counter()
        result = active.model.predict(window.samples[None, ...])
        self.latencies.record("predict", time.perf_counter() - started)
        prediction = Prediction.new(
            device_id=self._device,
            window=window.ref,
            probabilities=result.probabilities[0],
            labels=active.model.labels,
            model_version=active.version,
            ts=self._clock(),
            truth=window.truth,
        )
        self._enqueue(
            Outbound(self._topics.prediction(self._device), codec.encode_prediction(prediction)),
            Priority.NORMAL,
            recent=(prediction.prediction_id, active.version, window.samples),
        )
        self.counters.add("predictions")

    def _confirm(self, message: InboundMessage) -> None:
        try:
            confirmation = codec.decode_confirmation(message.payload)
        except PayloadError as exc:
            self._report("malformed_confirmation", str(exc), message.topic)
            message.ack()
            return
        active = self._active
        window = self._store.recent_window(confirmation.prediction_id)
        if window is None:
            self._report(
                "unknown_prediction",
                f"prediction {confirmation.prediction_id!r} is unknown or expired "
                f"(the last {self._tuning.recent_windows} windows can be confirmed)",
                message.topic,
            )
        elif active is None or confirmation.label not in active.model.labels:
            known = ", ".join(active.model.labels) if active else "none: no model installed"
            self._report(
                "unknown_label",
                f"label {confirmation.label!r} is not one of the model's labels ({known})",
                message.topic,
            )
        elif self._store.add_replay(confirmation.prediction_id, confirmation.label, window):
            self._learn_pending(active)
        else:
            self.counters.add("confirmations_duplicate")  # a redelivery: learned already
        message.ack()

    def _learn_pending(self, active: ActiveModel) -> None:
        """Learn every confirmed window not yet learned (each with some rehearsal), persist."""
        entries = self._store.replay_entries()
        pending = [e for e in entries if not e.applied]
        learned = [e for e in entries if e.applied]
        rng = np.random.default_rng()
        for entry in pending:
            # Rehearse a few older confirmations with the new one, so one window cannot drag
            # the model away from what the user taught it before.
            rehearsal_count = min(self._tuning.rehearsal_windows, len(learned))
            chosen = rng.permutation(len(learned))[:rehearsal_count].tolist()
            batch = [entry, *(learned[i] for i in chosen)]
            windows, labels = usable_replay(active.model, batch)
            if labels.size and batch[0].label in active.model.labels:
                started = time.perf_counter()
                active.model.learn(windows, labels)
                self._save_learned(active)
                self.latencies.record("learn_and_persist", time.perf_counter() - started)
                self.counters.add("learn_steps")
            self._store.mark_applied([entry.prediction_id])
            self.counters.add("confirmations_applied")
            learned.append(entry)

    def _save_learned(self, active: ActiveModel) -> None:
        active.model.save_state(self._settings.learned_dir / f"{active.version}.state")

    def _swap(self, candidate: Candidate) -> None:
        new = candidate.active
        # Confirmations that arrived while the candidate was being prepared: learn them too.
        missed = [
            e
            for e in self._store.replay_entries()
            if e.prediction_id not in candidate.personalised_ids
        ]
        if missed:
            personalise(new.model, missed, steps_per_window=1.0)
        self._save_learned(new)
        self._releases.set_current(new.version)
        self._activate(new)
        for version in self._releases.prune():
            (self._settings.learned_dir / f"{version}.state").unlink(missing_ok=True)
        self.counters.add("model_installs")
        log.info("now serving model %s", new.version)
        if self._connection.connected:
            self._connection.publish(self._status_message("online", self._refresh_counters()))
        self.model_changed.set()

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
                active = self._open_release(version)
            except (HarError, OSError) as exc:
                self._report("model_unusable", f"installed model {version} unusable: {exc}")
                continue
            state = self._settings.learned_dir / f"{version}.state"
            try:
                active.model.restore_state(state)
            except ModelError as exc:
                # Weights of the release, then every confirmation again: nothing taught is lost.
                self._report("state_unusable", f"{exc}; re-learning the confirmed windows")
                self._store.mark_pending_all()
            if version != current:
                self._releases.set_current(version)
            self._activate(active)
            self._learn_pending(active)
            log.info("serving model %s (global step %d)", version, active.model.global_step)
            return
        log.info("no model installed yet: publishing sensor data until one arrives")

    def _open_release(self, version: str) -> ActiveModel:
        release = self._releases.open(version)
        model = ActivityModel.load(release.saved_model_dir)
        window = model.input_spec.window
        model.predict(np.zeros((1, window, 3), np.float32))  # warm up: trace before serving
        return ActiveModel(version, release.manifest, model)

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
                self._route(message)
            if time.monotonic() >= next_status:
                next_status = time.monotonic() + self._tuning.status_interval_s
                if self._connection.connected:
                    self._connection.publish(
                        self._status_message("online", self._refresh_counters())
                    )

    def _route(self, message: InboundMessage) -> None:
        topic = message.topic
        if topic == self._topics.confirmation(self._device):
            self.counters.add("confirmations_received")
            self._work.put(_Confirm(message))  # blocking is fine: not paho's thread
        elif topic == self._topics.model_manifest() or self._topics.chunk_of(topic):
            self._updates.put(message)
        else:
            log.warning("message on unexpected topic %s ignored", topic)
            message.ack()

    # ================================================================== updater thread
    def _updater_loop(self) -> None:
        while True:
            message = self._updates.get()
            if message is _STOP:
                break
            assert isinstance(message, InboundMessage)
            try:
                if message.topic == self._topics.model_manifest():
                    self._on_manifest(message)
                else:
                    self._on_chunk(message)
            except HarError as exc:
                self.counters.add("model_rejections")
                self._report("model_rejected", str(exc), message.topic)
            except Exception as exc:
                log.exception("model update failed")
                self._report("model_rejected", f"unexpected: {exc}", message.topic)
            finally:
                message.ack()

    def _on_manifest(self, message: InboundMessage) -> None:
        if not message.payload:
            return  # a cleared retained manifest
        manifest = codec.decode_manifest(message.payload)
        active = self._active
        if active is not None and manifest.sha256 == active.manifest.sha256:
            return  # serving it already
        if manifest.sha256 in self._rejected:
            return
        try:
            self._releases.verify_manifest(manifest)
            refuse_replay(manifest, active.manifest if active is not None else None)
        except HarError:
            self._rejected.add(manifest.sha256)
            raise
        log.info(
            "model %s announced (%d bytes in %d chunks)",
            manifest.version,
            manifest.size,
            manifest.chunks,
        )
        if self._releases.has(manifest.version):
            try:
                self._prepare_candidate(manifest.version)
            except HarError as exc:
                log.warning(
                    "stored copy of %s unusable (%s): downloading again", manifest.version, exc
                )
            else:
                return
        self._start_download(manifest)

    def _start_download(self, manifest: ModelManifest) -> None:
        if self._download is not None:
            self._connection.unsubscribe(self._download.topic)
        topic = self._topics.model_chunks(manifest.version)
        self._download = _Download(
            manifest, ChunkAssembler(manifest.version, manifest.chunks, manifest.size), topic
        )
        self._connection.subscribe(topic, 1)

    def _on_chunk(self, message: InboundMessage) -> None:
        download = self._download
        located = self._topics.chunk_of(message.topic)
        if download is None or located is None or located[0] != download.manifest.version:
            return  # a chunk of a version we are not fetching (retained leftovers)
        if not message.payload:
            return
        chunk = codec.decode_model_chunk(message.payload)
        try:
            payload = download.assembler.add(chunk)
        except HarError:
            self._abandon_download()
            raise
        if payload is None:
            return
        self._abandon_download()
        self._releases.store(download.manifest, payload)  # verifies signature, size, sha256
        self._prepare_candidate(download.manifest.version)

    def _abandon_download(self) -> None:
        if self._download is not None:
            self._connection.unsubscribe(self._download.topic)
            self._download = None

    def _prepare_candidate(self, version: str) -> None:
        """Load, warm up, personalise and gate a verified release; hand it to the worker."""
        candidate = self._open_release(version)
        entries = self._store.replay_entries()
        current = self._active
        before = accuracy_on(current.model, entries) if current else None
        steps = personalise(candidate.model, entries, self._tuning.personalise_steps_per_window)
        after = accuracy_on(candidate.model, entries)
        usable = usable_replay(candidate.model, entries)[1].size
        log.info(
            "candidate %s: %d local windows, accuracy %s (current %s), %d learn steps",
            version,
            usable,
            after,
            before,
            steps,
        )
        gate_applies = usable >= self._tuning.min_replay_for_gate
        if (
            gate_applies
            and before is not None
            and after is not None
            and after < before - self._tuning.accept_margin
        ):
            self._rejected.add(candidate.manifest.sha256)
            raise ModelError(
                f"model {version} scores {after:.3f} on this device's {usable} confirmed "
                f"windows against {before:.3f} for {current.version if current else '-'}: "
                f"worse by more than the margin {self._tuning.accept_margin}"
            )
        self._work.put(_Swap(Candidate(candidate, frozenset(e.prediction_id for e in entries))))

    # ================================================================== sender thread
    def _sender_loop(self) -> None:
        """Publish the outbox in order; delete a message only once the broker answered it.

        A message the broker refuses (its ACL, say) is reported and deleted too: it would be
        refused again.
        """
        in_flight: list[tuple[int, PublishHandle]] = []
        last_sent = 0
        flush_deadline: float | None = None
        oldest_in_flight_since = 0.0
        while True:
            if self._stop.is_set() and self._sensor_done.is_set() and not self._worker_alive():
                if flush_deadline is None:
                    flush_deadline = time.monotonic() + self._tuning.shutdown_flush_s
                if time.monotonic() > flush_deadline or not self._connection.connected:
                    break
            if not self._connection.connected:
                self._connection.wait_connected(0.5)
                continue
            if in_flight:
                answered = self._await_answers(in_flight)
                self._store.outbox_remove([entry_id for entry_id, _ in answered])
                refused = [handle for _, handle in answered if handle.refused]
                for handle in refused:
                    self._report_refused(handle)
                self.counters.add("messages_sent", len(answered) - len(refused))
                in_flight = in_flight[len(answered) :]
                if answered:
                    oldest_in_flight_since = time.monotonic()
                elif time.monotonic() - oldest_in_flight_since > 60.0:
                    # paho resends unacknowledged messages after a reconnect; if that never
                    # completes, send them again from the outbox (receivers deduplicate).
                    log.warning("%d publishes unacknowledged for 60 s: resending", len(in_flight))
                    in_flight, last_sent = [], 0
                continue
            entries = self._store.outbox_after(last_sent, self._tuning.publish_inflight)
            if not entries:
                if flush_deadline is not None:
                    break  # everything is out
                self._outbox_signal.wait(0.5)
                self._outbox_signal.clear()
                continue
            oldest_in_flight_since = time.monotonic()
            for entry in entries:
                in_flight.append((entry.id, self._connection.publish(entry.message)))
                last_sent = entry.id

    @staticmethod
    def _await_answers(
        in_flight: list[tuple[int, PublishHandle]],
    ) -> list[tuple[int, PublishHandle]]:
        """The leading messages the broker answered (order kept: stop at the first pending)."""
        answered = []
        for entry_id, handle in in_flight:
            if not handle.wait(1.0):
                break
            answered.append((entry_id, handle))
        return answered

    def _report_refused(self, handle: PublishHandle) -> None:
        """Log, count and publish a refusal: the message is not sent again, it would be refused."""
        outcome = handle.outcome()
        reason = outcome.describe() if outcome is not None else "no reason code"
        text = f"the broker refused {handle.topic}: {reason}; dropped from the outbox"
        if handle.topic == self._topics.error(self._device):
            # Reporting it on the error topic would be refused in turn, again and again.
            log.error("%s", text)
            self.counters.add("error_publish_refused")
        else:
            self._report("publish_refused", text, handle.topic)

    def _worker_alive(self) -> bool:
        return self._threads[1].is_alive()
