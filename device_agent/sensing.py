"""The sensor thread's job: read the sensor, cut and commit batches, hand windows on."""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable

import numpy as np

from device_agent.outbox import ErrorReporter, Outbox
from device_agent.sensors import SensorReading, SensorSource
from device_agent.store import Priority
from device_agent.windowing import StreamWindow, StreamWindower
from shared import codec
from shared.counters import Counters
from shared.errors import StorageError
from shared.messages import MAX_SAMPLES_PER_BATCH, ReceiptKey, SensorBatch
from shared.mqtt_transport import Outbound
from shared.topics import Topics

log = logging.getLogger(__name__)


class SensorPump:
    """Reads the sensor into batches of ``batch_seconds``; each batch is committed to the outbox
    together with the sequence number after it, then its completed windows go to ``on_window``.

    A gap in the samples (more than three periods) ends the batch and the window: a window never
    joins samples from either side of one.

    A batch the store refuses (a full disk) is held in memory, up to ``hold_unstored_s`` of
    sensor time, and committed before the next one as soon as the store takes it again; its
    sequence number is not used until then, so the numbers on disk never skip or repeat.
    """

    def __init__(
        self,
        device_id: str,
        sensor: SensorSource,
        windower: StreamWindower,
        outbox: Outbox,
        *,
        report: ErrorReporter,
        counters: Counters,
        topics: Topics,
        batch_seconds: float,
        next_seq: int,
        on_window: Callable[[StreamWindow], None],
        hold_unstored_s: float = 60.0,
    ) -> None:
        self._device = device_id
        self._sensor = sensor
        self._windower = windower
        self._outbox = outbox
        self._report = report
        self._counters = counters
        self._topic = topics.sensor(device_id)
        self._batch_seconds = batch_seconds
        self._next_seq = next_seq
        self._on_window = on_window
        self._hold_unstored_s = hold_unstored_s
        self._unstored: deque[list[SensorReading]] = deque()
        self._store_failing = False

    def run(self, stop: threading.Event) -> None:
        """Until ``stop`` is set or the sensor is exhausted (which sets ``stop``); the partial
        batch is committed on the way out."""
        rate = self._sensor.sample_rate_hz
        batch_size = max(1, min(MAX_SAMPLES_PER_BATCH, round(rate * self._batch_seconds)))
        pending: list[SensorReading] = []
        last_t_ns: int | None = None
        period_ns = 1e9 / rate
        while not stop.is_set():
            readings = self._sensor.read(stop, batch_size - len(pending))
            if not readings and self._sensor.exhausted:
                log.info("sensor stream ended: stopping")
                stop.set()
                break
            for reading in readings:
                if last_t_ns is not None and reading.t_ns - last_t_ns > 3 * period_ns:
                    # A gap: publish what came before, and never window across it.
                    self._publish(pending, rate)
                    pending = []
                    self._windower.reset()
                    self._counters.add("sensor_gaps")
                last_t_ns = reading.t_ns
                pending.append(reading)
                if len(pending) >= batch_size:
                    self._publish(pending, rate)
                    pending = []
        self._publish(pending, rate)
        if self._unstored:
            lost = sum(len(batch) for batch in self._unstored)
            log.error("stopping with %d samples the store never took: they are lost", lost)
            self._counters.add("samples_unstored_lost", lost)

    def _publish(self, readings: list[SensorReading], rate: float) -> None:
        """Commit ``readings`` as a batch, after any batch still held from a store failure."""
        if readings:
            self._unstored.append(readings)
        while self._unstored:
            try:
                self._commit(self._unstored[0], rate)
            except StorageError as exc:
                self._counters.add("batch_store_failures")
                if not self._store_failing:  # reported once per outage, not once per batch
                    self._store_failing = True
                    self._report(
                        "storage_error",
                        f"sensor batches cannot be stored ({exc}): up to "
                        f"{self._hold_unstored_s:g} s of them are held in memory and retried",
                    )
                break
            self._unstored.popleft()
            if self._store_failing:
                self._store_failing = False
                self._counters.add("storage_recoveries")
                log.warning("the store takes sensor batches again")
        held_max = round(self._hold_unstored_s * self._sensor.sample_rate_hz)
        while self._unstored and sum(len(batch) for batch in self._unstored) > held_max:
            dropped = self._unstored.popleft()
            self._counters.add("samples_unstored_dropped", len(dropped))
            self._windower.reset()  # the next window must not join samples across the loss
            # Logged, counted and published: a loss nobody hears of is the worst kind.
            self._report(
                "samples_dropped",
                f"dropped {len(dropped)} sensor samples "
                f"({dropped[0].t_ns / 1e9:.3f}-{dropped[-1].t_ns / 1e9:.3f} s sensor time): the "
                f"store has refused them for longer than agent.hold_unstored_s "
                f"({self._hold_unstored_s:g} s); "
                f"{self._counters.get('samples_unstored_dropped')} dropped since start",
            )

    def _commit(self, readings: list[SensorReading], rate: float) -> None:
        seq = self._next_seq  # this thread alone advances it, with each batch's commit
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
        self._outbox.put(
            Outbound(
                self._topic,
                codec.encode_sensor_batch(batch),
                qos=1,
                content_type=codec.CONTENT_TYPE_MSGPACK,
            ),
            Priority.BULK,
            counters={"next_seq": seq + 1},
            receipt_key=ReceiptKey.batch(seq),
        )
        self._next_seq = seq + 1
        self._counters.add("batches_queued")
        self._counters.add("samples", len(readings))
        for window in self._windower.push(seq, batch.samples, [r.label for r in readings]):
            self._on_window(window)
