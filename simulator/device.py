"""One simulated device's state: its sensor stream, windows, model version and outbox.

No I/O here: the fleet (``simulator.fleet``) moves these messages over MQTT. Like a real agent,
a device publishes msgpack sensor batches with increasing sequence numbers, JSON predictions of
the model it runs, and its retained status; it installs a model only after the manifest's
signature and the payload's hash check out.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from device_agent.releases import refuse_replay
from device_agent.windowing import StreamWindow, StreamWindower
from shared import codec
from shared.errors import ModelError
from shared.messages import (
    DeviceState,
    DeviceStatus,
    ErrorEvent,
    ModelChunk,
    ModelManifest,
    Prediction,
    SensorBatch,
)
from shared.model_bundle import ChunkAssembler
from shared.mqtt_transport import Outbound
from shared.topics import Topics
from simulator.recordings import Cursor


@dataclass(frozen=True, slots=True)
class Download:
    manifest: ModelManifest
    assembler: ChunkAssembler
    topic: str


class SimDevice:
    def __init__(
        self,
        device_id: str,
        cursor: Cursor,
        topics: Topics,
        *,
        sample_rate_hz: float,
        batch_samples: int,
        window_hop: int,
        clock: Callable[[], float],
    ) -> None:
        self.device_id = device_id
        self._cursor = cursor
        self._topics = topics
        self._rate = sample_rate_hz
        self._batch_samples = batch_samples
        self._hop = window_hop
        self._clock = clock
        # Like the agent: numbering starts at the clock in ms, so a restarted simulator never
        # reuses a sequence number the trainer already stored.
        self.first_seq = int(clock() * 1000)
        self.next_seq = self.first_seq
        self.windower = StreamWindower()
        self.manifest: ModelManifest | None = None
        self.download: Download | None = None
        self.rejected: set[str] = set()  # manifests (by sha256) refused once: not retried
        self.counters: Counter[str] = Counter()

    @property
    def model_version(self) -> str | None:
        return None if self.manifest is None else self.manifest.version

    # ------------------------------------------------------------------ sensor
    def next_batch(self) -> tuple[Outbound, list[StreamWindow]]:
        """Read the next batch of samples: (its message, the windows it completed)."""
        samples, labels = self._cursor.take(self._batch_samples)
        now = self._clock()
        seq = self.next_seq
        self.next_seq += 1
        batch = SensorBatch(
            device_id=self.device_id,
            seq=seq,
            sample_rate_hz=self._rate,
            # The samples are the last batch period's: the newest was taken just now.
            t0_ns=int((now - (len(samples) - 1) / self._rate) * 1e9),
            samples=samples,
        )
        message = Outbound(
            self._topics.sensor(self.device_id),
            codec.encode_sensor_batch(batch),
            content_type=codec.CONTENT_TYPE_MSGPACK,
        )
        self.counters["batches_made"] += 1
        return message, self.windower.push(seq, samples, labels)

    # ------------------------------------------------------------------ predictions
    def prediction(
        self, window: StreamWindow, probabilities: npt.NDArray[np.float64], labels: tuple[str, ...]
    ) -> tuple[Prediction, Outbound]:
        assert self.manifest is not None
        prediction = Prediction.new(
            device_id=self.device_id,
            window=window.ref,
            probabilities=probabilities,
            labels=labels,
            model_version=self.manifest.version,
            ts=self._clock(),
            truth=window.truth,
        )
        self.counters["predictions"] += 1
        message = Outbound(
            self._topics.prediction(self.device_id), codec.encode_prediction(prediction)
        )
        return prediction, message

    # ------------------------------------------------------------------ status and errors
    def status(self, state: DeviceState) -> DeviceStatus:
        counters = {
            name: self.counters[name]
            for name in ("batches_sent", "predictions", "models_installed", "model_rejections")
        }
        return DeviceStatus(self.device_id, state, self.model_version, self._clock(), counters)

    def status_message(self, state: DeviceState) -> Outbound:
        return Outbound(
            self._topics.status(self.device_id),
            codec.encode_status(self.status(state)),
            retain=True,
        )

    def error_message(self, code: str, message: str, topic: str = "") -> Outbound:
        event = ErrorEvent.quoting(self.device_id, code, message, self._clock(), topic)
        return Outbound(self._topics.error(self.device_id), codec.encode_error(event))

    # ------------------------------------------------------------------ model updates
    def wants(self, manifest: ModelManifest) -> bool:
        """Whether ``manifest`` (signature already verified) should be downloaded."""
        if manifest.sha256 in self.rejected:
            return False
        if self.manifest is not None:
            if manifest.sha256 == self.manifest.sha256:
                return False
            try:
                refuse_replay(manifest, self.manifest)
            except ModelError:
                self.rejected.add(manifest.sha256)
                raise
        return not (self.download is not None and self.download.manifest.sha256 == manifest.sha256)

    def start_download(self, manifest: ModelManifest) -> Download:
        self.download = Download(
            manifest,
            ChunkAssembler(manifest.version, manifest.chunks, manifest.size),
            self._topics.model_chunks(manifest.version),
        )
        return self.download

    def add_chunk(self, chunk: ModelChunk) -> bytes | None:
        """The whole payload once the last chunk of the current download arrived."""
        if self.download is None or chunk.version != self.download.manifest.version:
            return None  # a retained chunk of a version we are not fetching
        return self.download.assembler.add(chunk)

    def install(self, manifest: ModelManifest) -> None:
        window = manifest.input.window
        if self.manifest is None or self.windower.length != window:
            self.windower.configure(window, self._hop)
        self.manifest = manifest
        self.download = None
        self.counters["models_installed"] += 1
