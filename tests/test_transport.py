"""The MQTT adapter against a real Mosquitto broker."""

from __future__ import annotations

import dataclasses
import json
import logging
import queue
import random
import subprocess
import threading

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.reasoncodes import ReasonCode

from shared import codec
from shared.config import BrokerSettings
from shared.errors import BrokerError
from shared.messages import Prediction, SensorBatch, WindowRef
from shared.mqtt_transport import (
    InboundMessage,
    MqttConnection,
    Outbound,
    PublishOutcome,
    PublishRefusedError,
    TakingTurns,
    backoff_delay,
)
from shared.topics import Topics
from tests.mosquitto import BrokerUsers, MosquittoProcess, find_mosquitto
from tests.mqtt_helpers import connect, receive

pytestmark = pytest.mark.broker


def test_sensor_batch_crosses_the_broker_intact(broker_settings: BrokerSettings) -> None:
    topics = Topics(broker_settings.topic_root)
    subscriber, inbox = connect(broker_settings, [(topics.all_sensor(), 1)])
    publisher, _ = connect(broker_settings)
    samples = np.random.default_rng(1).normal(0, 4, size=(200, 3)).astype(np.float32)
    batch = SensorBatch("wrist-7", 42, 20.0, 123_456_789, samples)
    try:
        handle = publisher.publish(
            Outbound(
                topics.sensor("wrist-7"),
                codec.encode_sensor_batch(batch),
                qos=1,
                content_type=codec.CONTENT_TYPE_MSGPACK,
            )
        )
        assert handle.wait(10.0)
        message = receive(inbox)
        assert message.topic == topics.sensor("wrist-7")
        assert message.content_type == codec.CONTENT_TYPE_MSGPACK
        assert message.qos == 1
        assert codec.decode_sensor_batch(message.payload) == batch
    finally:
        publisher.stop()
        subscriber.stop()


def test_stock_mosquitto_sub_reads_a_json_prediction(broker_settings: BrokerSettings) -> None:
    binary = find_mosquitto()
    assert binary is not None
    sub_binary = str(binary).replace("sbin/mosquitto", "bin/mosquitto_sub")
    topics = Topics(broker_settings.topic_root)
    topic = topics.prediction("wrist-7")
    # stdbuf: piped stdout is block-buffered, and we must see the SUBACK line as it happens.
    process = subprocess.Popen(
        [
            "stdbuf",
            "-oL",
            sub_binary,
            "-h",
            broker_settings.host,
            "-p",
            str(broker_settings.port),
            "-V",
            "mqttv5",
            "-t",
            topic,
            "-C",
            "1",
            "-W",
            "20",
            "-d",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    # -d reports the SUBACK: only then is the subscription in place to receive what we publish.
    for line in process.stdout:
        if "SUBACK" in line:
            break
    prediction = Prediction(
        prediction_id="p-9",
        device_id="wrist-7",
        window=WindowRef(batch_seq=4, offset=0, length=80),
        label="Walking",
        class_index=0,
        probabilities=(0.8, 0.2),
        model_version="v0001",
        ts=1_700_000_000.0,
    )
    publisher, _ = connect(broker_settings)
    try:
        assert publisher.publish(Outbound(topic, codec.encode_prediction(prediction))).wait(10.0)
        out, _ = process.communicate(timeout=20)
    finally:
        publisher.stop()
        process.kill()
    payload_lines = [line for line in out.splitlines() if line.startswith("{")]
    assert payload_lines, out
    parsed = json.loads(payload_lines[0])
    assert parsed["label"] == "Walking"
    assert parsed["prediction_id"] == "p-9"
    assert codec.decode_prediction(payload_lines[0].encode()) == prediction


def test_reconnects_and_resubscribes_after_a_broker_restart(
    broker: MosquittoProcess, broker_settings: BrokerSettings
) -> None:
    topics = Topics(broker_settings.topic_root)
    changes: queue.Queue[bool] = queue.Queue()
    inbox: queue.Queue[InboundMessage] = queue.Queue(maxsize=100)
    subscriber = MqttConnection(
        broker_settings,
        client_id="restart-sub",
        subscriptions=[(topics.all_status(), 1)],
        inbox=inbox,
        on_connection_change=changes.put,
    )
    subscriber.start()
    try:
        assert changes.get(timeout=10) is True
        broker.restart()
        assert changes.get(timeout=10) is False
        assert changes.get(timeout=10) is True
        assert subscriber.wait_subscribed(10)
        publisher, _ = connect(broker_settings)
        try:
            publisher.publish(Outbound(topics.status("d1"), b"{}")).wait(10)
        finally:
            publisher.stop()
        assert receive(inbox).topic == topics.status("d1")
        assert subscriber.connect_count == 2
    finally:
        subscriber.stop()


def test_an_unacknowledged_message_is_redelivered(broker_settings: BrokerSettings) -> None:
    """A worker that dies before acking loses nothing: the broker sends the message again."""
    topics = Topics(broker_settings.topic_root)
    subscription = [(topics.all_sensor(), 1)]
    first, inbox = connect(broker_settings, subscription, client_id="ack-test", persistent=True)
    publisher, _ = connect(broker_settings)
    try:
        publisher.publish(Outbound(topics.sensor("d1"), b"payload-1")).wait(10)
        unacked = inbox.get(timeout=10)
        assert (unacked.payload, unacked.redelivered) == (b"payload-1", False)
        first.stop()  # "crash" without acknowledging
        second, inbox2 = connect(
            broker_settings, subscription, client_id="ack-test", persistent=True
        )
        try:
            again = receive(inbox2)
            assert again.payload == b"payload-1"
            assert again.redelivered  # MQTT's DUP flag: receivers know it is the same message
        finally:
            second.stop()
    finally:
        publisher.stop()


def test_a_qos_1_burst_bigger_than_the_inbox_loses_nothing(broker_settings: BrokerSettings) -> None:
    """Mosquitto 2.0 overruns Receive Maximum once acks flow; a full inbox must wait, not drop."""
    topics = Topics(broker_settings.topic_root)
    subscriber, inbox = connect(broker_settings, [(topics.all_sensor(), 1)], inbox_size=10)
    publisher, _ = connect(broker_settings)
    sent = 2000
    try:
        handles = [
            publisher.publish(Outbound(topics.sensor("d1"), str(i).encode())) for i in range(sent)
        ]
        received: list[int] = []
        while len(received) < sent:
            message = inbox.get(timeout=30)
            received.append(int(message.payload))
            message.ack()  # a slow worker: one at a time, while the burst keeps coming
        assert all(handle.wait(30) for handle in handles)
        assert sorted(received) == list(range(sent))
        assert subscriber.counters.get("inbox_dropped_qos0") == 0
        assert subscriber.counters.get("inbox_overflow") > 0  # the inbox really was full
    finally:
        publisher.stop()
        subscriber.stop()


def login(broker: MosquittoProcess, topic_root: str, user: str, password: str) -> BrokerSettings:
    return BrokerSettings(
        host=broker.host,
        port=broker.port,
        topic_root=topic_root,
        username=user,
        password=password,
        reconnect_min_s=0.05,
        reconnect_max_s=0.2,
    )


def test_bad_credentials_stop_reconnecting(broker_factory: object, topic_root: str) -> None:
    users = BrokerUsers(passwords={"agent": "right"}, acl="user agent\ntopic readwrite #\n")
    broker = broker_factory(users=users)  # type: ignore[operator]
    ok, _ = connect(login(broker, topic_root, "agent", "right"))
    ok.stop()
    bad = login(broker, topic_root, "agent", "wrong")
    connection = MqttConnection(bad, client_id="bad-creds")
    connection.start()
    assert connection.wait_stopped(10)  # gives up by itself instead of hammering the broker
    assert connection.fatal_error is not None
    assert "Not authorized" in connection.fatal_error or "password" in connection.fatal_error
    connection.stop()


def test_backoff_grows_is_capped_and_jittered() -> None:
    rng = random.Random(3)
    delays = [[backoff_delay(a, 0.5, 30.0, rng) for a in range(1, 12)] for _ in range(200)]
    medians = [float(np.median([run[i] for run in delays])) for i in range(11)]
    assert medians[0] == pytest.approx(0.5)
    assert medians[3] > medians[1] > medians[0]
    assert max(max(run) for run in delays) <= 30.0
    assert len({round(run[6], 6) for run in delays}) > 150  # jitter: no two devices in step


def test_backoff_survives_a_broker_gone_for_days() -> None:
    rng = random.Random(4)
    assert all(0.5 <= backoff_delay(a, 0.5, 30.0, rng) <= 30.0 for a in (1025, 1026, 10**6))


# ------------------------------------------------------------------ publish answers (reason codes)

# Every reason code MQTT 5 allows in a PUBACK, as paho knows them.
PUBACK_CODES = sorted(
    code
    for code, names in ReasonCode(PacketTypes.PUBACK).names.items()
    if any(PacketTypes.PUBACK in packets for packets in names.values())
)


@given(code=st.sampled_from(PUBACK_CODES))
def test_an_outcome_is_accepted_exactly_when_paho_says_the_code_is_no_failure(code: int) -> None:
    reason_code = ReasonCode(PacketTypes.PUBACK, identifier=code)
    outcome = PublishOutcome.of(reason_code)
    assert outcome.accepted is not reason_code.is_failure
    assert outcome.describe() == f"{reason_code} (0x{code:02x})"


def test_the_brokers_reason_code_reaches_the_handle(
    broker_factory: object, topic_root: str
) -> None:
    acl = f"user writer\ntopic readwrite {topic_root}/allowed/#\n"
    broker = broker_factory(users=BrokerUsers(passwords={"writer": "pw"}, acl=acl))  # type: ignore[operator]
    settings = login(broker, topic_root, "writer", "pw")
    heard_topic, unheard_topic = f"{topic_root}/allowed/heard", f"{topic_root}/allowed/unheard"
    forbidden_topic = f"{topic_root}/forbidden"
    subscriber, inbox = connect(settings, [(heard_topic, 1)])
    publisher, _ = connect(settings)
    try:
        heard = publisher.publish(Outbound(heard_topic, b"1"))
        unheard = publisher.publish(Outbound(unheard_topic, b"2"))
        forbidden = publisher.publish(Outbound(forbidden_topic, b"3"))
        assert all(handle.wait(10.0) for handle in (heard, unheard, forbidden))
        delivered = receive(inbox)
    finally:
        publisher.stop()
        subscriber.stop()
    assert heard.outcome() == PublishOutcome(0x00, "Success")
    assert unheard.outcome() == PublishOutcome(0x10, "No matching subscribers")
    assert forbidden.outcome() == PublishOutcome(0x87, "Not authorized")
    assert (heard.refused, unheard.refused, forbidden.refused) == (False, False, True)
    assert unheard.wait_accepted(0.0).accepted  # nobody listening is still a success
    with pytest.raises(PublishRefusedError, match=rf"{forbidden_topic}: Not authorized \(0x87\)"):
        forbidden.wait_accepted(0.0)
    assert delivered.topic == heard_topic


def test_every_one_of_many_publishes_gets_its_own_answer(broker_settings: BrokerSettings) -> None:
    # More publishes than paho keeps in flight at once, all waited on only at the end.
    topic = Topics(broker_settings.topic_root).status("many")
    publisher, _ = connect(broker_settings)
    try:
        handles = [publisher.publish(Outbound(topic, b"%d" % n)) for n in range(3000)]
        outcomes = [handle.wait_accepted(30.0) for handle in handles]
    finally:
        publisher.stop()
    assert {outcome.code for outcome in outcomes} == {0x10}


def test_a_qos_0_publish_is_refused_here(broker_settings: BrokerSettings) -> None:
    publisher, _ = connect(broker_settings)
    try:
        with pytest.raises(ValueError, match="QoS 0"):
            publisher.publish(Outbound(Topics(broker_settings.topic_root).status("d1"), b"", 0))
    finally:
        publisher.stop()


def test_a_message_published_while_disconnected_is_answered_after_the_reconnect(
    broker: MosquittoProcess, broker_settings: BrokerSettings
) -> None:
    topics = Topics(broker_settings.topic_root)
    subscription = [(topics.all_status(), 1)]
    subscriber, inbox = connect(
        broker_settings, subscription, client_id="late-sub", persistent=True
    )
    changes: queue.Queue[bool] = queue.Queue()
    publisher = MqttConnection(
        broker_settings,
        client_id="late-pub",
        on_connection_change=changes.put,
        persistent_session=False,
    )
    publisher.start()
    try:
        assert changes.get(timeout=10) is True
        broker.stop()
        assert changes.get(timeout=10) is False
        # paho has no socket now: it keeps the message (rc NO_CONN) and sends it on reconnect.
        handle = publisher.publish(Outbound(topics.status("d1"), b"sent-offline"))
        assert not handle.done
        broker.start()  # same port; the subscriber's session comes back from persistence
        assert changes.get(timeout=10) is True
        assert handle.wait(10.0)
        received = receive(inbox)
    finally:
        publisher.stop()
        subscriber.stop()
    outcome = handle.outcome()
    assert outcome is not None
    assert outcome.accepted
    assert received.payload == b"sent-offline"


# ------------------------------------------------------------------------------ disconnect logs


def disconnect_records(caplog: pytest.LogCaptureFixture) -> list[tuple[int, str]]:
    return [
        (record.levelno, record.getMessage())
        for record in caplog.records
        if record.name == "shared.mqtt_transport" and "disconnected" in record.getMessage()
    ]


def test_a_requested_stop_is_no_warning(
    broker_settings: BrokerSettings, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="shared.mqtt_transport")
    changes: queue.Queue[bool] = queue.Queue()
    connection = MqttConnection(
        broker_settings, client_id="quiet", on_connection_change=changes.put
    )
    connection.start()
    assert changes.get(timeout=10) is True
    connection.stop()
    assert changes.get(timeout=10) is False  # still told, but it is no news
    assert disconnect_records(caplog) == [
        (logging.INFO, "disconnected from broker as asked: Normal disconnection")
    ]
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_losing_the_broker_is_a_warning(
    broker: MosquittoProcess, broker_settings: BrokerSettings, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="shared.mqtt_transport")
    changes: queue.Queue[bool] = queue.Queue()
    connection = MqttConnection(broker_settings, client_id="loud", on_connection_change=changes.put)
    connection.start()
    try:
        assert changes.get(timeout=10) is True
        broker.stop()
        assert changes.get(timeout=10) is False
        warnings = [level for level, _ in disconnect_records(caplog) if level == logging.WARNING]
    finally:
        connection.stop()
    assert warnings == [logging.WARNING]


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_taking_turns_speaks_after_three_short_connections_in_a_minute_then_rests() -> None:
    clock = FakeClock()
    turns = TakingTurns(short_s=10.0, within_s=60.0, times=3, clock=clock)
    said = []
    for _ in range(6):  # kicked off 1 s after each connect
        turns.connected()
        clock.now += 1.0
        said.append(turns.dropped())
    assert said == [False, False, True, False, False, False]  # once, not on every drop
    clock.now += 61.0
    for _ in range(3):
        turns.connected()
        clock.now += 1.0
        said.append(turns.dropped())
    assert said[-3:] == [False, False, True]  # a minute later, still taking turns: again


def test_taking_turns_stays_quiet_over_long_connections_and_drops_without_a_connect() -> None:
    clock = FakeClock()
    turns = TakingTurns(short_s=10.0, within_s=60.0, times=3, clock=clock)
    for _ in range(10):  # a flaky link: each connection lasted 30 s
        turns.connected()
        clock.now += 30.0
        assert not turns.dropped()
    for _ in range(10):  # no connection came up in between (a failed attempt)
        clock.now += 1.0
        assert not turns.dropped()
    for _ in range(3):  # three short ones, spread over more than a minute
        turns.connected()
        clock.now += 5.0
        assert not turns.dropped()
        clock.now += 30.0


def test_a_consumer_stalled_for_three_keepalives_stays_connected_and_gets_each_message_once(
    broker: MosquittoProcess, broker_settings: BrokerSettings
) -> None:
    """The inbox is full and the application reads nothing for more than three keepalives:
    paho's thread must keep sending PINGREQs (the broker drops a silent client at 1.5 x)."""
    settings = dataclasses.replace(broker_settings, keepalive_s=5)  # the shortest allowed
    topics = Topics(settings.topic_root)
    subscriber, inbox = connect(settings, [(topics.all_sensor(), 1)], inbox_size=10)
    publisher, _ = connect(settings)
    sent = 500
    try:
        handles = [
            publisher.publish(Outbound(topics.sensor("d1"), str(i).encode())) for i in range(sent)
        ]
        assert all(handle.wait(30) for handle in handles)
        threading.Event().wait(3.2 * settings.keepalive_s)  # the stall under test, not a sync
        received = []
        while len(received) < sent:
            message = inbox.get(timeout=30)
            received.append(int(message.payload))
            message.ack()
        assert sorted(received) == list(range(sent))  # each once: no redelivery
        assert subscriber.connect_count == 1
        assert subscriber.counters.get("inbox_overflow") > 0
    finally:
        publisher.stop()
        subscriber.stop()
    assert "exceeded timeout" not in broker.log_text()


def test_publish_waits_for_room_while_the_broker_has_not_answered_and_says_so(
    broker_settings: BrokerSettings,
) -> None:
    """Back-pressure, not an ever-growing queue: with max_unanswered publishes unanswered (here
    kept for a connection not made yet), the next waits, and gives up after wait_s."""
    topics = Topics(broker_settings.topic_root)
    connection = MqttConnection(broker_settings, client_id="room", max_unanswered=5)
    try:
        early = [connection.publish(Outbound(topics.sensor("d1"), b"x")) for _ in range(5)]
        with pytest.raises(BrokerError, match="5 publishes still wait for the broker's answer"):
            connection.publish(Outbound(topics.sensor("d1"), b"y"), wait_s=0.2)
        assert connection.counters.get("publish_waits") == 1
        connection.start()  # the kept publishes go out, their answers make room
        late = connection.publish(Outbound(topics.sensor("d1"), b"z"), wait_s=30)
        assert all(handle.wait(30) for handle in [*early, late])
        assert connection.unanswered == 0
    finally:
        connection.stop()
