"""Many simulated devices in one process: one event-loop thread, one MQTT connection each.

Each device logs in as itself (client id and username = device id, so the shipped broker ACL
applies to it as to a real device), publishes sensor batches, predictions and its retained
status, and downloads, verifies and installs signed model versions on its own connection. What
makes a device lightweight is shared: one model runtime per version for the whole process (the
windows of every device are predicted together, on the event loop's thread), and one verified
copy of each release on disk. The simulated people confirm predictions through one separate
"app" connection, because with the shipped ACL devices may not confirm (the people's app's login
is "dashboard"); the app keeps each confirmation until its device relays it, and sends it again
when none came in time (docs/protocol.md, "End-to-end delivery").

Failures follow ``shared.supervision``: a device's job that fails (a tick, a message, a model
check or load) is logged, counted (``internal_errors``), published on that device's error topic
and skipped; a job the event loop cannot pin on a device is logged and counted
(``loop_failures``). If the event loop dies anyway, ``run`` returns the report with ``failed``
set, and ``har sim`` exits with ``EXIT_THREAD_DIED``.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from activity_model.loading import load_model
from activity_model.runtime import MAX_WINDOWS_PER_CALL, ActivityModel
from device_agent.releases import ReleaseStore
from device_agent.windowing import StreamWindow
from shared import codec, homeassistant
from shared.counters import LatencyRecorder
from shared.errors import HarError, ModelError, PayloadError
from shared.messages import Confirmation, ModelManifest, ReceiptKey
from shared.mqtt_transport import Outbound, PropertiesCache
from shared.signing import verify_payload
from shared.supervision import Supervisor
from shared.topics import Topics
from simulator.device import SimDevice
from simulator.event_loop import EventLoop
from simulator.link import Entry, Link
from simulator.people import SimulatedPerson
from simulator.recordings import Recording, cursor_for
from simulator.settings import SimSettings

log = logging.getLogger(__name__)

T = TypeVar("T")

FLUSH_TIMEOUT_S = 5.0  # at exit, for what is still queued
MAX_PENDING_WINDOWS = 4 * MAX_WINDOWS_PER_CALL
# Windows completed within this long are predicted together: one model call for many devices.
PREDICT_EVERY_S = 0.02
# New connections per second: a thousand devices starting at once would otherwise all wait on
# the broker's accept queue together and time out together.
CONNECTS_PER_SECOND = 500


@dataclass(frozen=True, slots=True)
class LoadedModel:
    manifest: ModelManifest
    model: ActivityModel


@dataclass(frozen=True, slots=True)
class _Job:
    device: SimDevice
    window: StreamWindow
    runtime: LoadedModel
    made: float  # loop time the window was completed


class FleetSimulator:
    def __init__(
        self,
        settings: SimSettings,
        recordings: list[Recording],
        releases: ReleaseStore,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._settings = settings
        self._topics = Topics(settings.broker.topic_root)
        self._clock = clock
        self._releases = releases
        self._rng = random.Random(settings.seed)
        self.loop = EventLoop()
        self._properties = PropertiesCache()
        self.counters: Counter[str] = Counter()
        self.app_counters: Counter[str] = Counter()  # the people's app's connection
        self.latencies = LatencyRecorder(keep=100_000)
        self.devices = [
            SimDevice(
                device_id,
                cursor_for(recordings, index),
                self._topics,
                sample_rate_hz=settings.sample_rate_hz,
                batch_samples=settings.batch_samples,
                window_hop=settings.window_hop,
                clock=clock,
            )
            for index, device_id in enumerate(settings.device_ids)
        ]
        self._people = {
            device.device_id: SimulatedPerson(
                settings.confirm_share, settings.mistake_rate, random.Random(self._rng.random())
            )
            for device in self.devices
        }
        self._links: dict[str, Link] = {}
        # Device id -> the labels of its last Home Assistant discovery configs.
        self._announced_labels: dict[str, tuple[str, ...]] = {}
        self._runtimes: dict[str, LoadedModel] = {}  # device id -> the model it runs
        self._loaded: dict[str, LoadedModel] = {}  # manifest sha256 -> runtime
        self._loading: dict[str, list[Callable[[LoadedModel | None], None]]] = {}
        self._pending: list[_Job] = []
        self._predict_scheduled = False
        # One thread loads new versions, two hash downloads: neither may hold up the event loop.
        self._load_thread = ThreadPoolExecutor(1, thread_name_prefix="sim-load")
        self._hash_threads = ThreadPoolExecutor(2, thread_name_prefix="sim-hash")
        self._stop_requested = threading.Event()
        self._stopping = False
        self._stop_deadline = 0.0
        self._password = settings.broker.resolved_password()
        self._app_password = (
            settings.app_password_file.read_text(encoding="utf-8").strip()
            if settings.app_password_file
            else ""
        )
        self._app: Link | None = None

    # ================================================================== running
    def request_stop(self) -> None:
        """Ask the fleet to stop; safe from any thread and from a signal handler."""
        self._stop_requested.set()
        self.loop.wake()

    def run(self) -> dict[str, Any]:
        """Simulate until ``request_stop``; flush what was produced; return the fleet's report.

        The report has ``failed`` (which thread, and why) when the event loop died: the devices'
        connections are then dropped, and the broker publishes their last wills.
        """
        started = self._clock()
        supervisor = Supervisor()
        try:
            self._start_app()
            period = self._settings.batch_seconds / self._settings.speed
            for index, device in enumerate(self.devices):
                self.loop.call_later(index / CONNECTS_PER_SECOND, self._starter(device))
                # Devices start spread over one period: the broker sees a stream, not bursts.
                first_tick = index / CONNECTS_PER_SECOND + self._rng.random() * period
                self.loop.call_later(first_tick, self._ticker(device))
                self.loop.call_later(
                    first_tick + self._rng.random() * self._settings.status_interval_s,
                    self._status_ticker(device),
                )
            self.loop.call_later(self._monitor_interval(), self._monitor)
            if self._settings.await_receipts:
                self.loop.call_later(self._settings.receipt_timeout_s / 2, self._resend_unreceipted)
            supervisor.add("sim-loop", lambda: self.loop.run(until=self._finished))
            supervisor.start()
            for thread in supervisor.threads:
                while thread.is_alive():
                    thread.join(0.5)  # in slices: signal handlers run on this thread meanwhile
        finally:
            for pool in (self._load_thread, self._hash_threads):
                pool.shutdown(wait=True, cancel_futures=True)
            self.loop.close()
        report = self.report(self._clock() - started)
        if supervisor.death is not None:
            name, exc = supervisor.death
            report["failed"] = {"thread": name, "error": f"{type(exc).__name__}: {exc}"}
        return report

    def _finished(self) -> bool:
        if not self._stop_requested.is_set():
            return False
        if not self._stopping:
            self._begin_stop()
        links = [*self._links.values(), *([self._app] if self._app else [])]
        if all(link.closed for link in links):
            return True
        if self.loop.time() > self._stop_deadline:
            for link in links:
                if not link.closed:
                    link.abort()
            return self.loop.time() > self._stop_deadline + 2.0
        return False

    def _begin_stop(self) -> None:
        self._stopping = True
        self._stop_deadline = self.loop.time() + FLUSH_TIMEOUT_S
        # Tickers and the monitor see _stopping and do not run again.
        for device in self.devices:
            link = self._links.get(device.device_id)
            if link is not None:
                link.close(final=device.status_message("offline"))
        if self._app is not None:
            self._app.close()
        # Wake the loop again before the deadline so a stuck flush is cut short in time.
        self.loop.call_later(FLUSH_TIMEOUT_S + 0.1, lambda: None)

    def report(self, seconds: float) -> dict[str, Any]:
        totals: Counter[str] = Counter(self.counters)
        totals["loop_failures"] = self.loop.failures
        for name in ("confirmations_sent", "unsent_at_exit"):
            totals[name] += self.app_counters[name]
        per_device = {}
        for device in self.devices:
            totals.update(device.counters)
            loaded = self._runtimes.get(device.device_id)
            per_device[device.device_id] = {
                "model_version": device.model_version,
                "model_runtime": loaded.model.runtime if loaded else None,
                "first_seq": device.first_seq,
                "next_seq": device.next_seq,
                **dict(sorted(device.counters.items())),
            }
        waits = np.asarray(self.latencies.samples("window_to_prediction")) * 1000
        return {
            "seconds": round(seconds, 1),
            "devices": len(self.devices),
            # From the batch that completes a window to its prediction handed to the connection.
            "window_to_prediction_ms": {
                "n": int(waits.size),
                **(
                    {
                        "p50": round(float(np.percentile(waits, 50)), 1),
                        "p99": round(float(np.percentile(waits, 99)), 1),
                    }
                    if waits.size
                    else {}
                ),
            },
            "totals": dict(sorted(totals.items())),
            # The people's app: confirmations sent again (no relay in time), relays seen, and
            # confirmations no device relayed before it closed.
            "app": dict(sorted(self.app_counters.items())),
            "per_device": per_device,
        }

    def _resend_unreceipted(self) -> None:
        """Every half receipt timeout: each device sends again what no receipt named in time."""
        if self._stopping:
            return
        self.loop.call_later(self._settings.receipt_timeout_s / 2, self._resend_unreceipted)
        for link in [*self._links.values(), *([self._app] if self._app else [])]:
            if link.connected:
                link.resend_unreceipted(self._settings.receipt_timeout_s)

    def _monitor_interval(self) -> float:
        return max(5.0, self._settings.status_interval_s / self._settings.speed)

    def _monitor(self) -> None:
        """A line in the log now and then: is the fleet up, and is it flowing?"""
        if not self._stopping:  # first: a monitor that fails once still runs next time
            self.loop.call_later(self._monitor_interval(), self._monitor)
        connected = sum(link.connected for link in self._links.values())
        versions = Counter(device.model_version for device in self.devices)
        sent = sum(device.counters["batches_sent"] for device in self.devices)
        log.info(
            "%d/%d devices connected, %d batches sent, models %s",
            connected,
            len(self.devices),
            sent,
            dict(versions),
        )

    def _in_thread(
        self, pool: ThreadPoolExecutor, work: Callable[[], T], done: Callable[[Future[T]], None]
    ) -> None:
        """Run ``work`` on ``pool``; call ``done(future)`` back on the loop's thread."""
        future = pool.submit(work)
        future.add_done_callback(lambda f: self.loop.call_soon_threadsafe(lambda: done(f)))

    # ================================================================== one device's link
    def _starter(self, device: SimDevice) -> Callable[[], None]:
        def start() -> None:
            if self._stopping:
                return
            # With a password configured each device logs in as itself (the ACL's %u patterns).
            username = device.device_id if self._password else self._settings.broker.username
            link = Link(
                self.loop,
                self._settings.broker,
                self._properties,
                client_id=device.device_id,
                username=username,
                password=self._password,
                counters=device.counters,
                will=device.status_message("offline"),
                on_connected=lambda link: self._on_connected(device, link),
                on_message=lambda topic, payload: self._on_message(device, topic, payload),
                on_acked=lambda entry: self._on_acked(device, entry.message),
                inflight=min(20, self._settings.broker.max_inflight),
                outbox_max=self._settings.outbox_max_messages,
            )
            self._links[device.device_id] = link
            link.start()

        return start

    def _on_connected(self, device: SimDevice, link: Link) -> None:
        try:
            self._greet(device, link)
        except Exception as exc:
            self._internal_error(device, "connecting", exc)

    def _greet(self, device: SimDevice, link: Link) -> None:
        """What a device publishes and subscribes to on every (re)connect."""
        if device.counters["connects"] == 1:
            self._announce_to_home_assistant(device)
        link.publish(device.status_message("online"))
        link.subscribe(self._topics.model_manifest(), 1)
        if self._settings.await_receipts:
            link.subscribe(self._topics.receipt(device.device_id), 1)
            # As a real agent, it relays each confirmation it gets, until a receipt: the
            # people's copy to the trainer is lost if the broker crashes before delivering it.
            link.subscribe(self._topics.confirmation(device.device_id), 1)
        if device.download is not None:  # resume a download a reconnect cut short
            link.subscribe(device.download.topic, 1)

    def _announce_to_home_assistant(self, device: SimDevice) -> None:
        """With the option on: the discovery configs, at the first connect and whenever the
        device's labels change. Sensors only: simulated devices take no commands, so they get
        no confirm button and no correction select."""
        if not self._settings.homeassistant_discovery:
            return
        labels = device.manifest.labels if device.manifest else ()
        if self._announced_labels.get(device.device_id) == labels:
            return
        for message in homeassistant.discovery_messages(
            self._topics,
            device.device_id,
            labels,
            prefix=self._settings.homeassistant_prefix,
            controls=False,
        ):
            self._publish(device, message)
        self._announced_labels[device.device_id] = labels

    def _status_ticker(self, device: SimDevice) -> Callable[[], None]:
        """The device's status with its counters every ``status_interval_s`` while connected,
        as a real agent refreshes its own: in real seconds, whatever the speed, because
        dashboards show it in real time."""

        def tick() -> None:
            if self._stopping:
                return
            # First: a tick that fails does not stop the next ones.
            self.loop.call_later(self._settings.status_interval_s, tick)
            link = self._links.get(device.device_id)
            if link is not None and link.connected:
                link.publish(device.status_message("online"))

        return tick

    def _on_acked(self, device: SimDevice, message: Outbound) -> None:
        if message.content_type == codec.CONTENT_TYPE_MSGPACK:
            device.counters["batches_sent"] += 1

    def _ticker(self, device: SimDevice) -> Callable[[], None]:
        period = self._settings.batch_seconds / self._settings.speed
        next_tick = self.loop.time()

        def tick() -> None:
            nonlocal next_tick
            if self._stopping:
                return
            # Absolute deadlines: a late tick does not shift every later one. Scheduled first, so
            # that a tick that fails does not stop the device's clock.
            next_tick = max(next_tick + period, self.loop.time() - period)
            self.loop.call_later(next_tick - self.loop.time(), tick)
            try:
                link = self._links.get(device.device_id)
                batch, windows = device.next_batch()
                if link is not None:
                    link.publish(batch, self._receipt_key(ReceiptKey.batch(device.next_seq - 1)))
                else:
                    device.counters["batches_before_start"] += 1
                self._submit(device, windows)
            except Exception as exc:
                self._internal_error(device, "sensor tick", exc)

        return tick

    def _publish(
        self, device: SimDevice, message: Outbound, receipt_key: str | None = None
    ) -> None:
        link = self._links.get(device.device_id)
        if link is not None:
            link.publish(message, self._receipt_key(receipt_key))

    def _receipt_key(self, key: str | None) -> str | None:
        """``key``, when the devices keep what they send until a receipt names it."""
        return key if self._settings.await_receipts else None

    # ================================================================== predictions
    def _submit(self, device: SimDevice, windows: list[StreamWindow]) -> None:
        runtime = self._runtimes.get(device.device_id)
        for window in windows:
            if runtime is None or window.samples.shape[0] != runtime.manifest.input.window:
                device.counters["windows_without_model"] += 1
            elif len(self._pending) >= MAX_PENDING_WINDOWS:
                device.counters["windows_dropped"] += 1  # the model cannot keep up
            else:
                self._pending.append(_Job(device, window, runtime, self.loop.time()))
        if self._pending and not self._predict_scheduled:
            self._predict_scheduled = True
            self.loop.call_later(PREDICT_EVERY_S, self._predict_pending)

    def _predict_pending(self) -> None:
        """Predict the windows the fleet completed lately, a model call per model version.

        On the loop's own thread: a model thread would wait for the interpreter lock behind the
        loop at every step, and its predictions came out seconds late with a thousand devices.
        """
        self._predict_scheduled = False
        pending, self._pending = self._pending, []
        if self._stopping:
            return  # the links are flushing and closing: no new predictions after that
        by_model: dict[int, list[_Job]] = {}
        for job in pending:
            by_model.setdefault(id(job.runtime), []).append(job)
        for jobs in by_model.values():
            runtime = jobs[0].runtime
            for start in range(0, len(jobs), MAX_WINDOWS_PER_CALL):
                batch = jobs[start : start + MAX_WINDOWS_PER_CALL]
                try:
                    probabilities = runtime.model.predict(
                        np.stack([job.window.samples for job in batch])
                    ).probabilities
                except HarError as exc:
                    log.warning("prediction failed: %s", exc)
                    self.counters["prediction_failures"] += len(batch)
                    continue
                except Exception as exc:
                    self.counters["prediction_failures"] += len(batch)
                    self._internal_error(None, f"predicting {len(batch)} windows", exc)
                    continue
                for job, row in zip(batch, probabilities, strict=True):
                    self._deliver(job, row.astype(np.float64))

    def _deliver(self, job: _Job, probabilities: Any) -> None:
        device = job.device
        if device.manifest is None or device.manifest.sha256 != job.runtime.manifest.sha256:
            device.counters["windows_outdated"] += 1  # the device moved on to another model
            return
        labels = job.runtime.manifest.labels
        prediction, message = device.prediction(job.window, probabilities, labels)
        self._publish(device, message, ReceiptKey.prediction(prediction.prediction_id))
        self.latencies.record("window_to_prediction", self.loop.time() - job.made)
        answer = self._people[device.device_id].answer(prediction.truth, labels)
        if answer is not None and self._app is not None:
            confirmation = Confirmation(prediction.prediction_id, answer, "user", self._clock())
            self._app.publish(
                Outbound(
                    self._topics.confirmation(device.device_id),
                    codec.encode_confirmation(confirmation),
                ),
                self._relay_key(device.device_id, confirmation.prediction_id),
            )
            device.counters["confirmations"] += 1
            if answer != prediction.truth:
                device.counters["confirmations_mistaken"] += 1

    # ================================================================== model updates
    def _on_message(self, device: SimDevice, topic: str, payload: bytes) -> None:
        try:
            if topic == self._topics.receipt(device.device_id):
                link = self._links.get(device.device_id)
                if link is not None:
                    link.receipted(codec.decode_receipt(payload).outbox_keys())
            elif topic == self._topics.confirmation(device.device_id):
                confirmation = codec.decode_confirmation(payload)
                relay = Outbound(self._topics.confirmed(device.device_id), payload)
                self._publish(device, relay, ReceiptKey.confirmation(confirmation.prediction_id))
                device.counters["confirmations_relayed"] += 1
            elif topic == self._topics.model_manifest():
                self._on_manifest(device, payload)
            elif self._topics.chunk_of(topic) is not None:
                self._on_chunk(device, payload)
        except HarError as exc:
            self._reject(device, str(exc), topic)
        except Exception as exc:
            self._internal_error(device, f"message on {topic}", exc, topic)

    def _internal_error(
        self, device: SimDevice | None, job: str, exc: Exception, topic: str = ""
    ) -> None:
        """A bug in one job: logged with its traceback, counted, published on the device's error
        topic (when the job was one device's), and skipped: the fleet carries on."""
        log.error("%s%s failed", f"{device.device_id}: " if device else "", job, exc_info=exc)
        self.counters["internal_errors"] += 1
        if device is not None:
            device.counters["internal_errors"] += 1
            text = f"{job}: {type(exc).__name__}: {exc}"
            self._publish(device, device.error_message("internal_error", text, topic))

    def _reject(self, device: SimDevice, reason: str, topic: str = "") -> None:
        device.counters["model_rejections"] += 1
        log.debug("%s: model rejected: %s", device.device_id, reason)
        self._publish(device, device.error_message("model_rejected", reason, topic))

    def _on_manifest(self, device: SimDevice, payload: bytes) -> None:
        if not payload:
            return  # a cleared retained manifest
        manifest = codec.decode_manifest(payload)
        try:
            self._releases.verify_manifest(manifest)
        except HarError:
            device.rejected.add(manifest.sha256)
            raise
        if not device.wants(manifest):
            return
        link = self._links[device.device_id]
        if device.download is not None:
            link.unsubscribe(device.download.topic)
        link.subscribe(device.start_download(manifest).topic, 1)

    def _on_chunk(self, device: SimDevice, payload: bytes) -> None:
        if not payload:
            return
        download = device.download
        link = self._links[device.device_id]
        try:
            whole = device.add_chunk(codec.decode_model_chunk(payload))
        except (HarError, PayloadError):
            if download is not None:
                device.download = None
                link.unsubscribe(download.topic)
            raise
        if whole is None or download is None:
            return
        device.download = None
        link.unsubscribe(download.topic)
        manifest = download.manifest
        # Every device checks its own bytes, as a real one would; hashing runs off the loop.
        self._in_thread(
            self._hash_threads,
            lambda: verify_payload(manifest, whole),
            lambda future: self._verified(device, manifest, whole, future),
        )

    def _verified(
        self, device: SimDevice, manifest: ModelManifest, payload: bytes, future: Future[None]
    ) -> None:
        try:
            future.result()
        except HarError as exc:
            device.rejected.add(manifest.sha256)
            self._reject(device, str(exc))
            return
        except Exception as exc:
            self._internal_error(device, f"verifying model {manifest.version}", exc)
            return
        self._with_runtime(manifest, payload, lambda runtime: self._install(device, runtime))

    def _with_runtime(
        self,
        manifest: ModelManifest,
        payload: bytes,
        then: Callable[[LoadedModel | None], None],
    ) -> None:
        """Call ``then`` with the loaded model of ``manifest`` (loaded once for the fleet)."""
        key = manifest.sha256
        if key in self._loaded:
            then(self._loaded[key])
            return
        waiting = self._loading.setdefault(key, [])
        waiting.append(then)
        if len(waiting) > 1:
            return  # another device started the load
        self._in_thread(
            self._load_thread,
            lambda: self._load(manifest, payload),
            lambda future: self._loaded_runtime(key, future),
        )

    def _load(self, manifest: ModelManifest, payload: bytes) -> LoadedModel:
        self._releases.store(manifest, payload)  # verifies signature, size and sha256 again
        release = self._releases.open(manifest.version)
        # "auto": LiteRT when installed (at 1000 devices 404 MB instead of 660 MB on TensorFlow).
        model = load_model(release.saved_model_dir, self._settings.runtime, prefer="litert")
        if model.labels != manifest.labels:
            raise ModelError(f"model {manifest.version}: labels differ from its manifest's")
        if model.input_spec.window != manifest.input.window:
            raise ModelError(f"model {manifest.version}: window differs from its manifest's")
        log.info("model %s loaded for the fleet", manifest.version)
        return LoadedModel(manifest, model)

    def _loaded_runtime(self, key: str, future: Future[LoadedModel]) -> None:
        waiting = self._loading.pop(key, [])
        try:
            runtime: LoadedModel | None = future.result()
        except HarError as exc:
            log.warning("model could not be loaded: %s", exc)
            runtime = None
        except Exception as exc:
            self._internal_error(None, "loading a model", exc)  # its devices hear of it below
            runtime = None
        if runtime is not None:
            self._loaded[key] = runtime
            while len(self._loaded) > 3:  # keep the newest few versions only
                del self._loaded[next(iter(self._loaded))]
        for then in waiting:
            then(runtime)

    def _install(self, device: SimDevice, runtime: LoadedModel | None) -> None:
        if runtime is None:
            self._reject(device, "the verified model could not be loaded")
            return
        device.install(runtime.manifest)
        self._runtimes[device.device_id] = runtime
        # Before the first prediction with the new labels (the loop's thread publishes both).
        self._announce_to_home_assistant(device)
        self._publish(device, device.status_message("online"))

    # ================================================================== the people's app
    def _start_app(self) -> None:
        identifier = f"{self._settings.device_prefix}people-{self._rng.getrandbits(32):08x}"
        self._app = Link(
            self.loop,
            self._settings.broker,
            self._properties,
            client_id=identifier,
            username=self._settings.app_username,
            password=self._app_password,
            counters=self.app_counters,
            on_connected=self._on_app_connected,
            on_message=self._on_app_message,
            on_acked=self._on_app_acked,
            inflight=self._settings.broker.max_inflight,
            outbox_max=100_000,
        )
        self._app.start()

    def _relay_key(self, device_id: str, prediction_id: str) -> str | None:
        """The app keeps a confirmation until the device relays it, when devices relay (they
        do when a trainer receipts): a broker that crashes after acknowledging the app's copy
        loses it before the device saw it, and the app sends it again."""
        return f"{device_id}/{prediction_id}" if self._settings.await_receipts else None

    def _on_app_connected(self, app: Link) -> None:
        if self._settings.await_receipts:
            app.subscribe(self._topics.all_confirmed(), 1)

    def _on_app_message(self, topic: str, payload: bytes) -> None:
        device_id = self._topics.device_of(topic)
        if self._app is None or device_id is None:
            return
        try:
            relayed = codec.decode_confirmation(payload)
        except PayloadError:
            self.app_counters["relays_unreadable"] += 1  # another device's bug, not the app's
            return
        key = self._relay_key(device_id, relayed.prediction_id)
        if key is not None:
            self._app.receipted([key])

    def _on_app_acked(self, entry: Entry) -> None:
        if not entry.resent:  # a resend is the same confirmation again
            self.app_counters["confirmations_sent"] += 1
