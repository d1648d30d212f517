"""Publishes the shipped ACL refuses (MQTT 5 PUBACK 0x87 Not authorized), against a real broker.

A refused publish is answered, so it is not "unacknowledged": the trainer's ``publish_all`` stops
with an error naming the topic and the reason, and the device agent reports the message and drops
it from its outbox rather than sending it again (it would be refused again).
"""

from __future__ import annotations

import json
import logging
import queue
from collections.abc import Callable
from pathlib import Path

import pytest

from device_agent.agent import DeviceAgent
from device_agent.sensors import SensorSettings, open_sensor
from device_agent.settings import AgentSettings, AgentTuning
from shared import homeassistant
from shared.config import BrokerSettings
from shared.mqtt_transport import InboundMessage, Outbound, PublishRefusedError
from shared.topics import Topics
from tests.mosquitto import BrokerUsers, MosquittoProcess
from tests.mqtt_helpers import connect, receive
from trainer_service.distribution import publish_all

pytestmark = pytest.mark.broker

SHIPPED_ACL = Path(__file__).resolve().parent.parent / "deploy" / "mosquitto" / "acl"
PASSWORDS = {"wrist-0001": "pw-wrist", "trainer": "pw-trainer"}
TOPICS = Topics("har/v1")  # the root the shipped ACL names
DEVICE = "wrist-0001"
WAIT_S = 30.0


@pytest.fixture
def shipped_broker(broker_factory: Callable[..., MosquittoProcess]) -> MosquittoProcess:
    return broker_factory(BrokerUsers(PASSWORDS, SHIPPED_ACL.read_text()))


def login(broker: MosquittoProcess, user: str) -> BrokerSettings:
    return BrokerSettings(
        host=broker.host,
        port=broker.port,
        topic_root=TOPICS.root,
        username=user,
        password=PASSWORDS[user],
        keepalive_s=5,
        reconnect_min_s=0.05,
        reconnect_max_s=0.5,
    )


def test_publish_all_names_the_refused_topic_and_the_reason(
    shipped_broker: MosquittoProcess,
) -> None:
    release = [
        Outbound(TOPICS.model_chunk("v0001", 0), b"chunk", retain=True),
        Outbound(TOPICS.model_manifest(), b"manifest", retain=True),
    ]
    device, _ = connect(login(shipped_broker, DEVICE))
    trainer, _ = connect(login(shipped_broker, "trainer"))
    try:
        with pytest.raises(PublishRefusedError) as refused:
            publish_all(device, release, WAIT_S)  # a device may read the model, not write it
        publish_all(trainer, release, WAIT_S)  # the trainer may: no error
    finally:
        device.stop()
        trainer.stop()
    assert str(refused.value) == (
        f"the broker refused the publish to {TOPICS.model_chunk('v0001', 0)}: Not authorized (0x87)"
    )
    assert refused.value.outcome.code == 0x87


def test_agent_reports_a_refused_message_once_and_keeps_sending_the_rest(
    shipped_broker: MosquittoProcess, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # The ACL lets a device write discovery configs under "homeassistant/" only: with another
    # prefix configured, each of them is refused, while its sensor batches are accepted.
    caplog.set_level(logging.WARNING, logger="device_agent.agent")
    prefix = "custom-ha"
    refused_topics = [
        message.topic for message in homeassistant.discovery_messages(TOPICS, DEVICE, prefix=prefix)
    ]
    settings = AgentSettings(
        device_id=DEVICE,
        state_dir=tmp_path / "device",
        broker=login(shipped_broker, DEVICE),
        sensor=SensorSettings(kind="synthetic", speed=5.0),
        agent=AgentTuning(homeassistant_discovery=True, homeassistant_prefix=prefix),
    )
    # The trainer's login reads every device topic, errors included.
    watcher, inbox = connect(login(shipped_broker, "trainer"), [(TOPICS.all_error(), 1)])
    agent = DeviceAgent(settings, open_sensor(settings.sensor))
    agent.start()
    try:
        assert agent.counters.wait_until("error_publish_refused", len(refused_topics), WAIT_S)
        reported = [error_event(inbox) for _ in refused_topics]
        # Many more batches go out after the refusals; a resent refusal would be counted again.
        sent_before = agent.counters.get("messages_sent")
        assert agent.counters.wait_until("messages_sent", sent_before + 10, WAIT_S)
        refusals = agent.counters.get("error_publish_refused")
    finally:
        agent.shutdown()
        watcher.stop()
    assert refusals == len(refused_topics)
    assert [event["topic"] for event in reported] == refused_topics
    assert {event["code"] for event in reported} == {"publish_refused"}
    assert all("Not authorized (0x87)" in str(event["message"]) for event in reported)
    logged = [r.getMessage() for r in caplog.records if "the broker refused" in r.getMessage()]
    assert len(logged) == len(refused_topics)


def error_event(inbox: queue.Queue[InboundMessage]) -> dict[str, object]:
    event: dict[str, object] = json.loads(receive(inbox, WAIT_S).payload)
    return event
