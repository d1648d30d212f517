"""docs/protocol.md cannot rot: its examples are decoded by the codec, its topics are the code's.

- every ```json <type>``` block decodes with the matching decoder and re-encodes to the same bytes;
- every ```hex <kind>``` block (annotated msgpack) does the same;
- the example manifest's signature verifies with the example public key, over the signing bytes
  the page shows;
- every topic builder of ``shared.topics.Topics`` appears, by name and as a rendered topic;
- every ``mosquitto_pub`` command in the page sends a payload its topic's receivers accept;
- the size limits the page states are the code's and the shipped broker's.
"""

from __future__ import annotations

import inspect
import re
import shlex
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from shared import codec
from shared.messages import MAX_SAMPLES_PER_BATCH
from shared.signing import key_id, verify_manifest
from shared.topics import Topics

REPO = Path(__file__).resolve().parent.parent
DOC_PATH = REPO / "docs" / "protocol.md"
DOC = DOC_PATH.read_text(encoding="utf-8")

JSON_CODECS: dict[str, tuple[Callable[[bytes], Any], Callable[[Any], bytes]]] = {
    "prediction": (codec.decode_prediction, codec.encode_prediction),
    "confirmation": (codec.decode_confirmation, codec.encode_confirmation),
    "status": (codec.decode_status, codec.encode_status),
    "error": (codec.decode_error, codec.encode_error),
    "command": (codec.decode_command, codec.encode_command),
    "device_command": (codec.decode_device_command, codec.encode_device_command),
    "receipt": (codec.decode_receipt, codec.encode_receipt),
    "model_manifest": (codec.decode_manifest, codec.encode_manifest),
}
MSGPACK_CODECS: dict[str, tuple[Callable[[bytes], Any], Callable[[Any], bytes]]] = {
    "sensor_batch": (codec.decode_sensor_batch, codec.encode_sensor_batch),
    "model_chunk": (codec.decode_model_chunk, codec.encode_model_chunk),
}


def blocks(info: str) -> list[tuple[str, str]]:
    """(label, body) of every fenced block whose info string is ``info <label>``."""
    pattern = re.compile(rf"^```{info} ([\w-]+)\n(.*?)\n```$", re.MULTILINE | re.DOTALL)
    return [(m.group(1), m.group(2)) for m in pattern.finditer(DOC)]


def one_block(info: str, label: str) -> str:
    found = [body for name, body in blocks(info) if name == label]
    assert len(found) == 1, f"expected one ```{info} {label}``` block, found {len(found)}"
    return found[0]


def hex_bytes(body: str) -> bytes:
    """Annotated hex: everything after # on a line is a comment, whitespace is ignored."""
    digits = "".join(line.split("#", 1)[0] for line in body.splitlines())
    return bytes.fromhex("".join(digits.split()))


# ------------------------------------------------------------------------------ examples


JSON_EXAMPLES = blocks("json")


def test_every_json_message_type_has_an_example() -> None:
    assert {label for label, _ in JSON_EXAMPLES} == set(JSON_CODECS)


@pytest.mark.parametrize(("label", "body"), JSON_EXAMPLES, ids=[b[0] for b in JSON_EXAMPLES])
def test_json_example_decodes_and_is_verbatim(label: str, body: str) -> None:
    decode, encode = JSON_CODECS[label]
    payload = body.encode("utf-8")
    message = decode(payload)
    assert encode(message) == payload, "the example is not what the codec writes"


HEX_EXAMPLES = blocks("hex")


def test_every_msgpack_message_has_an_annotated_example() -> None:
    assert {label for label, _ in HEX_EXAMPLES} == set(MSGPACK_CODECS)


@pytest.mark.parametrize(("label", "body"), HEX_EXAMPLES, ids=[b[0] for b in HEX_EXAMPLES])
def test_hex_example_decodes_and_is_verbatim(label: str, body: str) -> None:
    decode, encode = MSGPACK_CODECS[label]
    payload = hex_bytes(body)
    assert encode(decode(payload)) == payload


def test_sensor_batch_example_holds_the_annotated_samples() -> None:
    first = hex_bytes(blocks("hex")[0][1])
    batch = codec.decode_sensor_batch(first)
    assert batch.device_id == "wrist-0001"
    assert batch.seq == 41
    assert batch.samples.tolist() == [[0.5, 9.75, -1.25], [0.625, 9.5, -1.0]]


def test_example_manifest_is_signed_by_the_example_key() -> None:
    manifest = codec.decode_manifest(one_block("json", "model_manifest").encode())
    public_key = serialization.load_pem_public_key(one_block("pem", "example-public-key").encode())
    assert isinstance(public_key, Ed25519PublicKey)
    verify_manifest(manifest, public_key)  # raises if the signature does not match
    assert manifest.key_id == key_id(public_key)
    assert one_block("text", "signing-bytes").encode() == codec.manifest_signing_bytes(manifest)


# ------------------------------------------------------------------------------ topics

PLACEHOLDERS = {
    "device_id": ("DEVICEX", "{device_id}"),
    "version": ("VERSIONX", "{version}"),
    "instance": ("INSTANCEX", "{instance}"),
    "index": (7, "{i}"),
}
ROOT_SENTINEL = "ROOTA/ROOTB"


def topic_builders() -> dict[str, Callable[..., str]]:
    return {
        name: member
        for name, member in vars(Topics).items()
        if inspect.isfunction(member) and not name.startswith("_") and not name.endswith("_of")
    }


def render(name: str, builder: Callable[..., str]) -> str:
    """The topic as the doc writes it: {root}/devices/{device_id}/sensor ..."""
    parameters = list(inspect.signature(builder).parameters)[1:]
    unknown = [p for p in parameters if p not in PLACEHOLDERS]
    assert not unknown, f"Topics.{name} takes {unknown}: add a placeholder to this test"
    topic = builder(Topics(ROOT_SENTINEL), *(PLACEHOLDERS[p][0] for p in parameters))
    topic = topic.replace(ROOT_SENTINEL, "{root}")
    for parameter in parameters:
        sentinel, placeholder = PLACEHOLDERS[parameter]
        if parameter == "index":
            topic = topic.replace(f"/chunk/{sentinel}", f"/chunk/{placeholder}")
        else:
            topic = topic.replace(str(sentinel), placeholder)
    return topic


def test_topic_builders_are_found() -> None:
    # Guards the introspection below: it must see the builders it is meant to check.
    assert {"sensor", "model_manifest", "trainer_command"} <= set(topic_builders())


@pytest.mark.parametrize("name", sorted(topic_builders()))
def test_every_topic_builder_is_documented(name: str) -> None:
    builder = topic_builders()[name]
    topic = render(name, builder)
    assert f"`{topic}`" in DOC, f"docs/protocol.md does not show the topic {topic}"
    assert f"`{name}(" in DOC, f"docs/protocol.md does not name the builder Topics.{name}"


@pytest.mark.parametrize("name", ["device_of", "kind_of", "chunk_of"])
def test_topic_parsers_are_documented(name: str) -> None:
    assert callable(getattr(Topics, name))
    assert f"{name}(topic)" in DOC


# ------------------------------------------------------------------------------ shell examples


def shell_commands() -> list[list[str]]:
    commands = []
    for body in re.findall(r"^```sh\n(.*?)\n```$", DOC, re.MULTILINE | re.DOTALL):
        for command in body.replace("\\\n", " ").splitlines():
            if command.strip():
                commands.append(shlex.split(command))
    return commands


def test_mosquitto_pub_examples_send_valid_payloads() -> None:
    topics = Topics("har/v1")
    published = [argv for argv in shell_commands() if argv[0] == "mosquitto_pub"]
    assert published, "docs/protocol.md should show how to publish"
    decoders = {
        "confirmation": codec.decode_confirmation,
        "command": codec.decode_device_command,
    }
    for argv in published:
        topic = argv[argv.index("-t") + 1]
        payload = argv[argv.index("-m") + 1].encode()
        assert "-q" in argv
        assert argv[argv.index("-q") + 1] == "1", "the contract is QoS 1"
        if topic == topics.trainer_command():
            codec.decode_command(payload)
        else:
            kind = topics.kind_of(topic)
            assert kind in decoders, f"no decoder for the doc's mosquitto_pub to {topic}"
            decoders[kind](payload)


# ------------------------------------------------------------------------------ limits


def test_stated_limits_are_the_codes() -> None:
    limits = codec.DEFAULT_LIMITS
    assert f"| JSON message | {limits.max_json_bytes // 1024} KiB |" in DOC
    assert f"| sensor batch message | {limits.max_batch_bytes // 1024} KiB |" in DOC
    assert f"| samples per batch | {MAX_SAMPLES_PER_BATCH} " in DOC
    assert f"{limits.max_chunk_bytes // (1024 * 1024)} MiB in the decoder" in DOC
    conf = (REPO / "deploy" / "mosquitto" / "mosquitto.conf").read_text()
    packet = re.search(r"^max_packet_size (\d+)$", conf, re.MULTILINE)
    assert packet is not None
    assert int(packet.group(1)) == 1024 * 1024, "docs/protocol.md says 1 MiB max_packet_size"
