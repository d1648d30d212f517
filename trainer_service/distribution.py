"""Publishing model releases over MQTT: retained chunks first, then the retained manifest.

Chunks go out before the manifest so that a device which sees the manifest finds every chunk
already retained. Both are retained, so a device that connects next week still gets the current
version. The previous current version's chunks stay retained (devices may still be fetching it,
and it is the rollback target); older ones are cleared with empty retained messages.
"""

from __future__ import annotations

import logging

from shared import codec
from shared.errors import HarError
from shared.messages import ModelManifest
from shared.model_bundle import split_chunks
from shared.mqtt_transport import MqttConnection, Outbound, PublishHandle
from shared.topics import Topics
from trainer_service.registry import ModelRegistry

log = logging.getLogger(__name__)


def manifest_chunk_size(manifest: ModelManifest) -> int:
    """A chunk size that cuts the payload into exactly the ``chunks`` its manifest says.

    The count is signed into the manifest when the version is promoted, with the chunk size
    configured then; ``publish.chunk_bytes`` may have changed since. Devices check only the count,
    so any size that makes it will do: ceil(size / chunks) always does.
    """
    return max(1, -(-manifest.size // manifest.chunks))


def release_messages(
    topics: Topics, manifest: ModelManifest, payload: bytes, max_chunk_bytes: int
) -> list[Outbound]:
    """Every message that publishes ``manifest`` and its payload, in the order to send them.

    The payload is cut as its manifest says; HarError if that makes chunks larger than
    ``max_chunk_bytes`` (what the broker is configured to take): promoting the version again signs
    a manifest with today's chunking.
    """
    if len(payload) != manifest.size:
        raise HarError(
            f"payload of {manifest.version} has {len(payload)} bytes, its manifest says "
            f"{manifest.size}"
        )
    chunk_size = manifest_chunk_size(manifest)
    if chunk_size > max_chunk_bytes:
        raise HarError(
            f"manifest of {manifest.version} cuts it into {manifest.chunks} chunks of "
            f"{chunk_size} bytes, more than publish.chunk_bytes ({max_chunk_bytes}): promote it "
            "again to sign a manifest with today's chunking"
        )
    chunks = split_chunks(manifest.version, payload, chunk_size)
    if len(chunks) != manifest.chunks:  # a manifest promote() never signs (more chunks than bytes)
        raise HarError(
            f"manifest of {manifest.version} says {manifest.chunks} chunks for "
            f"{manifest.size} bytes: promote it again"
        )
    messages = [
        Outbound(
            topics.model_chunk(manifest.version, chunk.index),
            codec.encode_model_chunk(chunk),
            qos=1,
            retain=True,
            content_type=codec.CONTENT_TYPE_MSGPACK,
        )
        for chunk in chunks
    ]
    messages.append(
        Outbound(topics.model_manifest(), codec.encode_manifest(manifest), qos=1, retain=True)
    )
    return messages


def clearing_messages(topics: Topics, version: str, chunks: int) -> list[Outbound]:
    """Empty retained messages that delete a version's retained chunks from the broker."""
    return [
        Outbound(topics.model_chunk(version, index), b"", qos=1, retain=True)
        for index in range(chunks)
    ]


def publish_all(connection: MqttConnection, messages: list[Outbound], timeout: float) -> None:
    """Publish and wait until the broker accepted every message.

    BrokerError names the first topic the broker refused (its ACL, say) with the reason, or did
    not acknowledge within ``timeout`` seconds.
    """
    handles: list[PublishHandle] = [connection.publish(message) for message in messages]
    for handle in handles:
        handle.wait_accepted(timeout)
    log.info("published %d retained model messages", len(messages))


def current_release_messages(
    topics: Topics, registry: ModelRegistry, max_chunk_bytes: int
) -> list[Outbound]:
    """Messages that publish the registry's current version and clear superseded chunks.

    The previous current version stays retained: devices may still be fetching it, and it is
    what a rollback returns to.
    """
    current = registry.current()
    if current is None:
        return []
    manifest = registry.manifest(current)
    if manifest is None:
        raise HarError(f"current model {current} has no signed manifest: promote it again")
    messages = release_messages(topics, manifest, registry.payload(current), max_chunk_bytes)
    history = registry.history()
    keep = {current, *history[-1:]}
    for version in history:
        old = registry.manifest(version) if version not in keep else None
        if old is not None:
            messages += clearing_messages(topics, version, old.chunks)
    return messages
