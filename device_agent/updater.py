"""The updater thread's job: receive, verify, personalise and gate a new model version.

A manifest announces a version; its chunks are assembled and the bundle verified (signature,
size, sha256) before anything is loaded. The candidate is then warmed up and given the wearer's
learning (``device_agent.learning.personalise``: the same code the device learns with), and
gated on the wearer's confirmations, each scored by a state that had not learned it. Nothing
of this runs on the prediction path: the worker swaps a ready candidate in.

A download that gets no new chunk for ``stall_s`` is stalled: it is counted and reported, and the
chunk topic subscribed again, which makes the broker send the retained chunks again; after
``stall_retries`` such retries it is abandoned until a manifest announces it again. A manifest
announcing more than ``max_bundle_bytes`` is refused before anything is downloaded.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from activity_model.loading import load_model
from activity_model.runtime import ActivityModel
from device_agent.learning import (
    Learned,
    LearningPolicy,
    Record,
    evidence_of,
    gate,
    personalise,
)
from device_agent.outbox import ErrorReporter
from device_agent.releases import ReleaseStore, refuse_replay
from device_agent.store import AgentStore
from shared import codec
from shared.counters import Counters
from shared.errors import HarError, ModelError, StorageError
from shared.messages import ModelManifest
from shared.model_bundle import ChunkAssembler
from shared.mqtt_transport import InboundMessage, MqttConnection
from shared.topics import Topics

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ActiveModel:
    version: str
    manifest: ModelManifest
    model: ActivityModel


@dataclass(frozen=True, slots=True)
class Candidate:
    """A verified, loaded, personalised model waiting for the worker to swap it in."""

    active: ActiveModel
    learned: Learned | None  # None: the model cannot learn on the device


def open_release(releases: ReleaseStore, version: str, runtime: str) -> ActiveModel:
    """Load a stored release on ``runtime``, verified again, and trace it before it serves."""
    release = releases.open(version)
    model = load_model(release.saved_model_dir, runtime)
    model.predict(np.zeros((1, model.input_spec.window, 3), np.float32))
    return ActiveModel(version, release.manifest, model)


def _identity(manifest: ModelManifest) -> bytes:
    """Everything a manifest says, and its signature: two manifests differing anywhere differ."""
    return hashlib.sha256(codec.manifest_signing_bytes(manifest) + manifest.signature).digest()


@dataclass
class _Download:
    manifest: ModelManifest
    assembler: ChunkAssembler
    topic: str
    last_progress: float  # monotonic time of the manifest or of the last new chunk
    retries: int = 0  # resubscriptions after a stall


class ReleaseUpdater:
    """Handles manifest and chunk messages, one at a time, on the updater thread."""

    def __init__(
        self,
        releases: ReleaseStore,
        store: AgentStore,
        connection: MqttConnection,
        topics: Topics,
        *,
        policy: LearningPolicy,
        report: ErrorReporter,
        counters: Counters,
        accept_margin: float,
        min_confirmations_for_gate: int,
        active: Callable[[], ActiveModel | None],
        hand_over: Callable[[Candidate], None],
        max_bundle_bytes: int,
        stall_s: float,
        stall_retries: int,
        runtime: str,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._releases = releases
        self._runtime = runtime
        self._store = store
        self._connection = connection
        self._topics = topics
        self._policy = policy
        self._report = report
        self._counters = counters
        self._accept_margin = accept_margin
        self._min_for_gate = min_confirmations_for_gate
        self._active = active
        self._hand_over = hand_over
        self._max_bundle_bytes = max_bundle_bytes
        self._stall_s = stall_s
        self._stall_retries = stall_retries
        self._monotonic = monotonic
        # Manifests refused, by their whole signed content: never downloaded again. Not by the
        # payload's sha256 alone, or a forged manifest naming a coming release's sha256 would
        # make the device ignore the real one.
        self._rejected: set[bytes] = set()
        self._download: _Download | None = None

    def handle(self, message: InboundMessage) -> None:
        """Process one message; a refusal is reported. The message is acknowledged unless
        something could not be stored (then the broker delivers it again): a refused model
        would be refused again."""
        # Every message is counted, the ones ignored on purpose too (a repeated refused or
        # empty manifest, a chunk of a version not being fetched): nothing arrives unseen.
        try:
            if message.topic == self._topics.model_manifest():
                self._counters.add("manifest_messages")
                self._on_manifest(message)
            else:
                self._counters.add("chunk_messages")
                self._on_chunk(message)
        except StorageError as exc:
            self._report("storage_error", f"model update not stored: {exc}", message.topic)
            return
        except HarError as exc:
            self._counters.add("model_rejections")
            self._report("model_rejected", str(exc), message.topic)
        except Exception as exc:
            log.exception("model update failed")
            self._report("model_rejected", f"unexpected: {exc}", message.topic)
        message.ack()

    def wake_in(self) -> float | None:
        """Seconds until a download in progress would be stalled; None when none is."""
        download = self._download
        if download is None:
            return None
        return max(0.0, download.last_progress + self._stall_s - self._monotonic())

    def check_stalled(self) -> None:
        """Retry or abandon a download that got no new chunk for ``stall_s`` seconds."""
        download = self._download
        if download is None or self._monotonic() - download.last_progress < self._stall_s:
            return
        self._counters.add("download_stalled")
        version = download.manifest.version
        progress = f"{download.assembler.received} of {download.manifest.chunks} chunks"
        if download.retries < self._stall_retries:
            download.retries += 1
            download.last_progress = self._monotonic()
            self._report(
                "download_stalled",
                f"model {version}: no new chunk for {self._stall_s:g} s ({progress}); asking "
                f"for the retained chunks again (retry {download.retries} of "
                f"{self._stall_retries})",
                download.topic,
            )
            # A new subscription makes the broker send every retained chunk again.
            self._connection.unsubscribe(download.topic)
            self._connection.subscribe(download.topic, 1)
            return
        self._abandon_download()
        self._counters.add("downloads_abandoned")
        self._report(
            "download_stalled",
            f"model {version}: no new chunk for {self._stall_s:g} s ({progress}) after "
            f"{self._stall_retries} retries; abandoned until a manifest announces it again",
            download.topic,
        )

    def _on_manifest(self, message: InboundMessage) -> None:
        if not message.payload:
            return  # a cleared retained manifest
        manifest = codec.decode_manifest(message.payload)
        active = self._active()
        if active is not None and manifest.sha256 == active.manifest.sha256:
            return  # serving it already
        if _identity(manifest) in self._rejected:
            return
        try:
            self._releases.verify_manifest(manifest)
            refuse_replay(manifest, active.manifest if active is not None else None)
            if manifest.size > self._max_bundle_bytes:
                raise ModelError(
                    f"model {manifest.version} is {manifest.size} bytes, over this device's "
                    f"limit agent.max_model_bytes = {self._max_bundle_bytes}: not downloaded"
                )
        except HarError:
            self._rejected.add(_identity(manifest))
            raise
        log.info(
            "model %s announced (%d bytes in %d chunks)",
            manifest.version,
            manifest.size,
            manifest.chunks,
        )
        if self._releases.has(manifest.version):
            try:
                self._prepare(manifest.version)
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
        assembler = ChunkAssembler(
            manifest.version, manifest.chunks, manifest.size, max_bytes=self._max_bundle_bytes
        )
        self._download = _Download(manifest, assembler, topic, self._monotonic())
        self._connection.subscribe(topic, 1)

    def _on_chunk(self, message: InboundMessage) -> None:
        download = self._download
        located = self._topics.chunk_of(message.topic)
        if download is None or located is None or located[0] != download.manifest.version:
            return  # a chunk of a version we are not fetching (retained leftovers)
        if not message.payload:
            return
        self._counters.add("model_chunks_received")
        chunk = codec.decode_model_chunk(message.payload)
        held = download.assembler.received
        try:
            payload = download.assembler.add(chunk)
        except HarError:
            self._abandon_download()
            raise
        if payload is None:
            if download.assembler.received > held:  # a repeated chunk is no progress
                download.last_progress = self._monotonic()
            return
        self._abandon_download()
        self._releases.store(download.manifest, payload)  # verifies signature, size, sha256
        self._prepare(download.manifest.version)

    def _abandon_download(self) -> None:
        if self._download is not None:
            self._connection.unsubscribe(self._download.topic)
            self._download = None

    def _prepare(self, version: str) -> None:
        """Load, warm up, personalise and gate a verified release; hand it to the worker."""
        candidate = open_release(self._releases, version, self._runtime)
        learned = None
        if candidate.model.personalisable:
            entries = self._store.replay_entries()
            learned = personalise(candidate.model, entries, self._policy)
            self._gate(candidate, learned, evidence_of(entries))
        self._hand_over(Candidate(candidate, learned))

    def _gate(
        self, candidate: ActiveModel, learned: Learned, evidence: dict[str, tuple[str, Record]]
    ) -> None:
        """Refuse ``candidate`` if, answering the way the device answers now, it labels the
        latest confirmations worse than the version in use (``device_agent.learning.gate``)."""
        verdict = gate(
            learned,
            evidence,
            self._policy,
            accept_margin=self._accept_margin,
            min_scored=self._min_for_gate,
        )
        current = self._active()
        log.info(
            "candidate %s answering the %s way: %s on %d held-out confirmations (%s: %s)",
            candidate.version,
            verdict.way,
            verdict.accuracy,
            verdict.scored,
            current.version if current else "-",
            verdict.current_accuracy,
        )
        if verdict.refusal is not None:
            self._rejected.add(_identity(candidate.manifest))
            raise ModelError(f"model {candidate.version} {verdict.refusal}")
